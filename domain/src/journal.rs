//! What one lead's conversion changed (SPEC §4a "The journal"): written in
//! the conversion's own transaction, one [`Entry`] per converted lead, so
//! that an undo can take it back exactly and a record's history can say
//! who changed what.
//!
//! An entry records what was *written*, not what was meant: the store
//! builds it from the plan's decisions and from what its statements return
//! (the ids of created and copied records, the rows as they were before a
//! fill). This module holds its shape and the pure steps of building it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::{self, Module, Record};

/// One converted lead's changes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Entry {
    /// The lead's own fields that the conversion set, before and after.
    pub lead: LeadChange,
    /// Records the conversion created, with every value written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<Created>,
    /// Fields the conversion filled on records that existed before (or that
    /// an earlier lead of the same batch created): links, custom fields,
    /// tags and the opt-out included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filled: Vec<Filled>,
    /// Notes, attachments and activities moved from the lead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<Moved>,
    /// Note copies made (SPEC §3.11: a deal gets the notes, the contact and
    /// the account a copy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<NoteCopy>,
}

impl Entry {
    /// The records this entry created or filled, as `module:id`, each once:
    /// what a record's history looks its conversions up by (stored beside
    /// the entry and indexed, so the lookup never parses entries).
    pub fn records(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .created
            .iter()
            .map(|c| (c.module, c.id))
            .chain(self.filled.iter().map(|f| (f.module, f.id)))
            .map(|(m, id)| format!("{}:{id}", m.as_str()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

/// The lead's fields a conversion sets (SPEC §3.12): what [`LeadChange`]
/// holds, before and after.
pub const LEAD_MARKS: [&str; 6] =
    ["lead_status", "is_repeat", "converted_at", "converted_account_id", "converted_contact_id", "converted_deal_id"];

/// The [`LEAD_MARKS`] of `lead` (a lead's row; a missing field reads as null).
pub fn lead_marks(lead: &Record) -> Record {
    LEAD_MARKS.iter().map(|&k| (k.to_owned(), lead.get(k).cloned().unwrap_or(Value::Null))).collect()
}

/// The [`LEAD_MARKS`] a conversion writes: `converted_at` as the database
/// stored it, the ids it converted into, whether the lead is a repeat.
pub fn lead_marks_converted(converted_at: Value, is_repeat: bool, ids: [Option<i64>; 3]) -> Record {
    let [account, contact, deal] = ids;
    let values =
        [Value::from("Converted"), Value::from(is_repeat), converted_at, account.into(), contact.into(), deal.into()];
    LEAD_MARKS.iter().map(|&k| k.to_owned()).zip(values).collect()
}

/// The lead's fields a conversion sets (SPEC §3.12), before and after.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LeadChange {
    pub before: Record,
    pub after: Record,
}

/// A record the conversion created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub module: Module,
    pub id: i64,
    /// Every writable column as stored, but those left null (a missing
    /// column reads as null) and `created_at`/`updated_at`.
    pub values: Record,
}

/// One field the conversion wrote on a record it did not create: its exact
/// value before (`""`, white space and null told apart) and the value
/// written. `field` is a column, or `custom_fields.<api_name>` for one key
/// of the custom fields; `tags` holds the whole list before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filled {
    pub module: Module,
    pub id: i64,
    pub field: String,
    pub before: Value,
    pub after: Value,
}

/// The related tables a conversion moves rows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Related {
    Notes,
    Attachments,
    Activities,
}

impl Related {
    pub fn table(self) -> &'static str {
        match self {
            Related::Notes => "notes",
            Related::Attachments => "attachments",
            Related::Activities => "activities",
        }
    }
}

/// A row moved from the lead (`parent_module = 'lead'`, the lead's id) to a
/// record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moved {
    pub table: Related,
    pub id: i64,
    pub to_module: Module,
    pub to_id: i64,
}

/// A note copy the conversion made, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoteCopy {
    pub id: i64,
    pub module: Module,
    pub parent_id: i64,
    pub title: Value,
    pub body: Value,
}

/// The prefix of a custom field's key in [`Filled::field`].
pub const CUSTOM_PREFIX: &str = "custom_fields.";

/// The fields `values` (a fill the plan decided) writes over `row` (the
/// record as it is before it, read back from the database), one [`Filled`]
/// per column that changes, and per custom field key that changes; then
/// lays the fill over `row`, so that the next lead of a batch filling the
/// same record journals against what this one left.
pub fn fill(module: Module, id: i64, row: &mut Record, values: &Record) -> Vec<Filled> {
    let mut out = Vec::new();
    for (field, after) in values {
        if field == "custom_fields" {
            let before_custom = record::custom_fields(row);
            if let Value::Object(after_custom) = after {
                for (key, v) in after_custom {
                    let before = before_custom.get(key).cloned().unwrap_or(Value::Null);
                    if &before != v {
                        out.push(Filled {
                            module,
                            id,
                            field: format!("{CUSTOM_PREFIX}{key}"),
                            before,
                            after: v.clone(),
                        });
                    }
                }
            }
        } else {
            let before = row.get(field).cloned().unwrap_or(Value::Null);
            if &before != after {
                out.push(Filled { module, id, field: field.clone(), before, after: after.clone() });
            }
        }
        row.insert(field.clone(), after.clone());
    }
    out
}

/// The field of a row: a column, or one key of its custom fields.
pub fn get_field(row: &Record, field: &str) -> Value {
    match field.strip_prefix(CUSTOM_PREFIX) {
        Some(key) => record::custom_fields(row).get(key).cloned().unwrap_or(Value::Null),
        None => row.get(field).cloned().unwrap_or(Value::Null),
    }
}

/// Sets a column, or one key of the custom fields (null removes the key).
pub fn set_field(row: &mut Record, field: &str, value: Value) {
    match field.strip_prefix(CUSTOM_PREFIX) {
        Some(key) => {
            let mut custom = record::custom_fields(row);
            if value.is_null() {
                custom.remove(key);
            } else {
                custom.insert(key.to_owned(), value);
            }
            row.insert("custom_fields".into(), Value::Object(custom));
        }
        None => {
            row.insert(field.to_owned(), value);
        }
    }
}

/// The tags a fill added: those of `after` that `before` lacked.
pub fn tags_added(f: &Filled) -> Vec<String> {
    let list = |v: &Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let before = list(&f.before);
    list(&f.after).into_iter().filter(|t| !before.contains(t)).collect()
}

/// One field of a record's history: before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub before: Value,
    pub after: Value,
}

/// What a conversion, or its undo, did to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Touch {
    /// The conversion created it.
    Created,
    /// The conversion filled fields of it.
    Filled,
    /// The lead itself, marked converted.
    Converted,
    /// The undo deleted the record the conversion created.
    Deleted,
    /// The undo set the filled fields back.
    SetBack,
    /// The lead itself, its conversion taken back.
    Unconverted,
}

/// What `entry` (lead `lead_id`'s conversion) did to the record `module`
/// `id`, field by field; `None` when it did not touch it. With `undone`,
/// what taking it back did (the opt-out it set stays, consent wins).
pub fn touched(entry: &Entry, lead_id: i64, module: Module, id: i64, undone: bool) -> Option<(Touch, Vec<Change>)> {
    let change = |field: &str, before: &Value, after: &Value| {
        if undone {
            Change { field: field.to_owned(), before: after.clone(), after: before.clone() }
        } else {
            Change { field: field.to_owned(), before: before.clone(), after: after.clone() }
        }
    };
    if module == Module::Lead {
        if id != lead_id {
            return None;
        }
        let mut fields: Vec<&String> = entry.lead.after.keys().collect();
        fields.sort();
        let changes = fields
            .into_iter()
            .map(|k| change(k, entry.lead.before.get(k).unwrap_or(&Value::Null), &entry.lead.after[k]))
            .collect();
        return Some((if undone { Touch::Unconverted } else { Touch::Converted }, changes));
    }
    if let Some(c) = entry.created.iter().find(|c| c.module == module && c.id == id) {
        let mut fields: Vec<&String> = c.values.keys().filter(|k| k.as_str() != "id").collect();
        fields.sort();
        let changes = fields
            .into_iter()
            .filter(|k| !record::is_empty(c.values.get(k.as_str())))
            .map(|k| change(k, &Value::Null, &c.values[k.as_str()]))
            .collect();
        return Some((if undone { Touch::Deleted } else { Touch::Created }, changes));
    }
    let filled: Vec<Change> = entry
        .filled
        .iter()
        .filter(|f| f.module == module && f.id == id)
        .filter(|f| !(undone && f.field == "email_opt_out" && f.after == Value::Bool(true)))
        .map(|f| change(&f.field, &f.before, &f.after))
        .collect();
    if filled.is_empty() {
        return None;
    }
    Some((if undone { Touch::SetBack } else { Touch::Filled }, filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leads_marks_before_and_after_name_the_same_fields() {
        let lead: Record =
            serde_json::from_value(serde_json::json!({"id": 7, "lead_status": "Qualified", "is_repeat": false}))
                .unwrap();
        let before = lead_marks(&lead);
        let after = lead_marks_converted(Value::from("2026-12-07T18:00:00+00:00"), true, [Some(1), None, Some(3)]);
        assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
        assert_eq!(before["lead_status"], "Qualified");
        assert_eq!(before["converted_at"], Value::Null);
        assert_eq!(after["lead_status"], "Converted");
        assert_eq!((&after["is_repeat"], &after["converted_contact_id"]), (&Value::from(true), &Value::Null));
        assert_eq!((&after["converted_account_id"], &after["converted_deal_id"]), (&Value::from(1), &Value::from(3)));
    }
    use serde_json::json;

    fn rec(v: Value) -> Record {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn an_entry_names_each_record_it_created_or_filled_once() {
        let mut row = rec(json!({"id": 7, "phone": null, "city": null}));
        let mut filled = fill(Module::Account, 7, &mut row, &rec(json!({"phone": "1"})));
        filled.extend(fill(Module::Account, 7, &mut row, &rec(json!({"city": "Hà Nội"}))));
        let entry = Entry {
            created: vec![
                Created { module: Module::Contact, id: 12, values: Record::new() },
                Created { module: Module::Deal, id: 3, values: Record::new() },
            ],
            filled,
            ..Default::default()
        };
        assert_eq!(entry.records(), ["account:7", "contact:12", "deal:3"]);
        assert!(Entry::default().records().is_empty());
    }

    #[test]
    fn a_fill_records_the_exact_value_before_and_lays_itself_over_the_row() {
        let mut row = rec(
            json!({"id": 5, "phone": " ", "city": "", "fax": null, "custom_fields": {"region": "", "size": 3}, "tags": ["a"]}),
        );
        let values = rec(json!({
            "phone": "+48 123", "city": "Kraków", "fax": "1",
            "custom_fields": {"region": "EMEA", "size": 3, "tier": "gold"},
            "tags": ["a", "b"]
        }));
        let filled = fill(Module::Contact, 5, &mut row, &values);
        let by_field = |f: &str| filled.iter().find(|x| x.field == f).unwrap_or_else(|| panic!("{f} journaled"));
        assert_eq!(by_field("phone").before, json!(" "), "white space is kept as it was, not as null");
        assert_eq!(by_field("city").before, json!(""));
        assert_eq!(by_field("fax").before, Value::Null);
        assert_eq!(by_field("custom_fields.region").before, json!(""));
        assert_eq!(by_field("custom_fields.tier").before, Value::Null);
        assert!(filled.iter().all(|f| f.field != "custom_fields.size"), "an unchanged key is not journaled");
        assert_eq!(tags_added(by_field("tags")), vec!["b".to_owned()]);
        // The next lead of the batch sees this one's fill.
        let next = fill(Module::Contact, 5, &mut row, &rec(json!({"tags": ["a", "b", "c"]})));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].before, json!(["a", "b"]));
        assert_eq!(tags_added(&next[0]), vec!["c".to_owned()]);
    }

    #[test]
    fn a_records_history_reads_from_the_entry_both_ways() {
        let e = Entry {
            lead: LeadChange {
                before: rec(json!({"lead_status": "New", "converted_at": null})),
                after: rec(json!({"lead_status": "Converted", "converted_at": "2026-12-06T08:00:00Z"})),
            },
            created: vec![Created {
                module: Module::Deal,
                id: 3,
                values: rec(json!({"id": 3, "deal_name": "Acme", "amount": null})),
            }],
            filled: vec![
                Filled { module: Module::Contact, id: 9, field: "phone".into(), before: json!(""), after: json!("1") },
                Filled {
                    module: Module::Contact,
                    id: 9,
                    field: "email_opt_out".into(),
                    before: json!(false),
                    after: json!(true),
                },
            ],
            ..Default::default()
        };
        let (t, c) = touched(&e, 5, Module::Deal, 3, false).unwrap();
        assert_eq!((t, c.len(), c[0].field.as_str()), (Touch::Created, 1, "deal_name"), "empty values left out");
        let (t, c) = touched(&e, 5, Module::Contact, 9, true).unwrap();
        assert_eq!(t, Touch::SetBack);
        assert_eq!(
            c,
            vec![Change { field: "phone".into(), before: json!("1"), after: json!("") }],
            "the opt-out stays"
        );
        let (t, c) = touched(&e, 5, Module::Lead, 5, false).unwrap();
        assert_eq!((t, c[1].after.clone()), (Touch::Converted, json!("Converted")));
        assert!(touched(&e, 5, Module::Lead, 6, false).is_none());
        assert!(touched(&e, 5, Module::Account, 9, false).is_none());
    }

    #[test]
    fn an_entry_reads_back_what_was_written() {
        let e = Entry {
            lead: LeadChange {
                before: rec(json!({"lead_status": "Qualified", "is_repeat": false})),
                after: rec(json!({"lead_status": "Converted", "is_repeat": true})),
            },
            created: vec![Created { module: Module::Deal, id: 3, values: rec(json!({"deal_name": "Acme"})) }],
            filled: vec![Filled {
                module: Module::Account,
                id: 9,
                field: "phone".into(),
                before: json!(""),
                after: json!("1"),
            }],
            moved: vec![Moved { table: Related::Notes, id: 7, to_module: Module::Deal, to_id: 3 }],
            copies: vec![NoteCopy {
                id: 8,
                module: Module::Contact,
                parent_id: 2,
                title: json!("t"),
                body: json!("b"),
            }],
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), e);
        assert!(text.contains(r#""table":"notes""#), "{text}");
    }
}
