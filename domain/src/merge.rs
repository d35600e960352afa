//! Merging a lead into an existing record: fill what is empty, overwrite
//! nothing (SPEC §3.4–3.5, seed 000: "values move only when the contact's
//! fields are empty").

use serde_json::Value;

use crate::record::{self, Record};

/// The fields of `existing` that `proposed` may fill: those empty in
/// `existing` and not empty in `proposed`. Custom fields are filled key by
/// key; the patch then carries the whole merged object. Tags are not fields
/// to fill but a set to grow, see [`union_tags`].
pub fn fill_empty(existing: &Record, proposed: &Record) -> Record {
    let mut patch = Record::new();
    for (field, value) in proposed {
        if field == "custom_fields" || field == "tags" || record::is_empty(Some(value)) {
            continue;
        }
        if record::is_empty(existing.get(field)) {
            patch.insert(field.clone(), value.clone());
        }
    }
    if let Some(Value::Object(proposed_custom)) = proposed.get("custom_fields") {
        let mut merged = record::custom_fields(existing);
        let mut changed = false;
        for (k, v) in proposed_custom {
            if record::is_empty(merged.get(k)) && !record::is_empty(Some(v)) {
                merged.insert(k.clone(), v.clone());
                changed = true;
            }
        }
        if changed {
            patch.insert("custom_fields".into(), Value::Object(merged));
        }
    }
    patch
}

/// `existing` followed by the tags of `added` it lacks, in order, without
/// duplicates (case-sensitive, as tags are shown).
pub fn union_tags(existing: &[String], added: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(existing.len() + added.len());
    for t in existing.iter().chain(added) {
        let t = t.trim();
        if !t.is_empty() && !out.iter().any(|o| o == t) {
            out.push(t.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> Record {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn fills_only_empty_fields() {
        let existing = rec(json!({"phone": "123", "city": "  ", "fax": null, "custom_fields": {"a": 1}}));
        let proposed = rec(json!({"phone": "999", "city": "Łódź", "fax": "55", "street": "",
                                  "custom_fields": {"a": 2, "b": "x"}}));
        let patch = fill_empty(&existing, &proposed);
        assert_eq!(Value::Object(patch), json!({"city": "Łódź", "fax": "55", "custom_fields": {"a": 1, "b": "x"}}));
    }

    #[test]
    fn tags_union_keeps_order_and_drops_duplicates() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(union_tags(&t(&["vip", "expo"]), &t(&["expo", "new", "new", " "])), t(&["vip", "expo", "new"]));
    }
}
