//! What taking one lead's conversion back may do (SPEC §4a), decided from
//! its journal [`Entry`] and the records as they are now ([`Now`]), like
//! [`crate::plan::decide`] is for converting: the undo's dry run and its
//! run share it, and it knows nothing of the database.
//!
//! Never destroy later work. A record the conversion created is deleted
//! only if nothing it did not make refers to it and no field of it changed
//! since; a filled field is emptied (to its exact value before) only if it
//! still holds the value written; on records that existed before, nothing
//! else is looked at. Where that does not hold, nothing of the lead changes
//! and the undo is skipped with a code naming the record.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use crate::error::ErrorCode;
use crate::journal::{self, get_field, set_field, Entry, Filled, Related, CUSTOM_PREFIX};
use crate::record::{self, Module, Record};

/// A record or related row, as the undo names it: `contact 42`, `note 7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Named {
    pub kind: &'static str,
    pub id: i64,
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}

fn named(module: Module, id: i64) -> Named {
    Named { kind: module.as_str(), id }
}

fn named_row(table: Related, id: i64) -> Named {
    let kind = match table {
        Related::Notes => "note",
        Related::Attachments => "attachment",
        Related::Activities => "activity",
    };
    Named { kind, id }
}

/// The world as the undo finds it, read under the same locks a conversion
/// takes. Records and rows that no longer exist are absent.
#[derive(Debug, Clone, Default)]
pub struct Now {
    /// The lead as it is now; `None` when it was deleted.
    pub lead: Option<Record>,
    /// This conversion was taken back already.
    pub undone: bool,
    /// Every record the entry names (created or filled), as it is now.
    pub records: HashMap<(Module, i64), Record>,
    /// What refers to each record the conversion created and that the
    /// conversion did not make: a later conversion that merged into it, a
    /// deal, a contact of the account, a note, a row of any other table.
    pub used_by: HashMap<(Module, i64), Vec<String>>,
    /// The related rows the entry moved or copied, as they are now:
    /// (table, id) → (parent_module, parent_id, title, body).
    pub rows: HashMap<(Related, i64), RelatedRow>,
    /// Tags other conversions (not taken back) into the same record
    /// brought, by lead: they stay.
    pub later_tags: HashMap<(Module, i64), Vec<(i64, String)>>,
}

/// A note, attachment or activity as it is now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RelatedRow {
    pub parent_module: String,
    pub parent_id: i64,
    /// Notes only.
    pub title: Value,
    pub body: Value,
}

/// A field set back to its value before the conversion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restore {
    pub module: Module,
    pub id: i64,
    /// A column, or `custom_fields.<api_name>`.
    pub field: String,
    /// The exact value before; for `tags`, the list without the tags the
    /// conversion added (those a later conversion brought too stay).
    pub value: Value,
}

/// What taking the lead back does, all in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Takeback {
    /// Rows moved back to the lead: (table, id).
    pub move_back: Vec<(Related, i64)>,
    /// Note copies deleted.
    pub delete_copies: Vec<i64>,
    /// Fields set back, on records that stay.
    pub restore: Vec<Restore>,
    /// Records deleted, in an order no foreign key minds: deals, then
    /// contacts, then accounts.
    pub delete: Vec<(Module, i64)>,
    /// The lead's own fields as they were (`lead_status`, `is_repeat`,
    /// `converted_*`).
    pub lead: Record,
    /// The e-mail opt-out the conversion set stays (consent wins): said in
    /// the undo's result.
    pub opt_out_kept: Option<Named>,
}

/// The decision for one lead.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum UndoVerdict {
    Undo(Box<Takeback>),
    Skipped {
        code: ErrorCode,
        /// The record (or row) that stopped it.
        #[serde(skip_serializing_if = "Option::is_none")]
        record: Option<Named>,
        message: String,
    },
}

fn skipped(code: ErrorCode, record: Option<Named>, message: String) -> UndoVerdict {
    UndoVerdict::Skipped { code, record, message }
}

/// The lead fields a conversion sets and an undo restores.
const LEAD_MARKS: [&str; 6] =
    ["lead_status", "is_repeat", "converted_at", "converted_account_id", "converted_contact_id", "converted_deal_id"];

/// Decides what undoing `entry` (the journal of lead `lead_id`'s
/// conversion; `None`: converted before the journal existed) does now.
pub fn decide(lead_id: i64, entry: Option<&Entry>, now: &Now) -> UndoVerdict {
    let Some(entry) = entry else {
        return skipped(ErrorCode::NoJournal, None, format!("lead {lead_id}'s conversion has no journal entry"));
    };
    if now.undone {
        return skipped(ErrorCode::AlreadyUndone, None, format!("lead {lead_id}'s conversion was taken back already"));
    }
    let lead_named = Named { kind: "lead", id: lead_id };
    let Some(lead) = &now.lead else {
        return skipped(ErrorCode::NotFound, Some(lead_named), format!("lead {lead_id} no longer exists"));
    };
    // The lead still carries this conversion's marks: else it was converted
    // again since (after an undo), and that conversion is the one to take back.
    let same_conversion = ["converted_contact_id", "converted_account_id", "converted_deal_id"]
        .iter()
        .all(|k| lead.get(*k).unwrap_or(&Value::Null) == entry.lead.after.get(*k).unwrap_or(&Value::Null))
        && !record::is_empty(lead.get("converted_at"));
    if !same_conversion {
        return skipped(
            ErrorCode::NotLatestConversion,
            Some(lead_named),
            format!("lead {lead_id} is no longer marked with this conversion: it was converted again since"),
        );
    }
    for k in ["lead_status", "is_repeat"] {
        if lead.get(k).unwrap_or(&Value::Null) != entry.lead.after.get(k).unwrap_or(&Value::Null) {
            return skipped(
                ErrorCode::ChangedSince,
                Some(lead_named),
                format!("lead {lead_id}'s {k} was changed since its conversion"),
            );
        }
    }

    let created: HashSet<(Module, i64)> = entry.created.iter().map(|c| (c.module, c.id)).collect();
    let mut t = Takeback::default();

    // Records created: unchanged field by field, used by nothing else.
    for c in &entry.created {
        let key = (c.module, c.id);
        let Some(current) = now.records.get(&key) else {
            return skipped(
                ErrorCode::ChangedSince,
                Some(named(c.module, c.id)),
                format!("{} was deleted since", named(c.module, c.id)),
            );
        };
        if let Some(users) = now.used_by.get(&key).filter(|u| !u.is_empty()) {
            return skipped(
                ErrorCode::InUse,
                Some(named(c.module, c.id)),
                format!("{} is used by {}", named(c.module, c.id), users.join(", ")),
            );
        }
        // Fields this lead itself filled later (a link, say) are its own.
        let mut expected = c.values.clone();
        for f in entry.filled.iter().filter(|f| (f.module, f.id) == key) {
            set_field(&mut expected, &f.field, f.after.clone());
        }
        if let Some(field) = first_difference(&expected, current) {
            return skipped(
                ErrorCode::ChangedSince,
                Some(named(c.module, c.id)),
                format!("{}'s {field} was changed since the conversion created it", named(c.module, c.id)),
            );
        }
    }

    // Fields filled on records that existed before: each still holds what
    // was written (the opt-out is never taken back, so never looked at).
    for f in entry.filled.iter().filter(|f| !created.contains(&(f.module, f.id))) {
        let who = named(f.module, f.id);
        if f.field == "email_opt_out" && f.after == Value::Bool(true) {
            // An opt-out (true) is consent withdrawn: never taken back. A
            // `false` filled into an empty field is an ordinary fill.
            t.opt_out_kept = Some(who);
            continue;
        }
        let Some(current) = now.records.get(&(f.module, f.id)) else {
            return skipped(ErrorCode::ChangedSince, Some(who), format!("{who} was deleted since"));
        };
        if f.field == "tags" {
            let value = tags_without_added(f, current, now.later_tags.get(&(f.module, f.id)));
            if value != current.get("tags").cloned().unwrap_or(Value::Null) {
                t.restore.push(Restore { module: f.module, id: f.id, field: f.field.clone(), value });
            }
            continue;
        }
        if get_field(current, &f.field) != f.after {
            return skipped(
                ErrorCode::ChangedSince,
                Some(who),
                format!("{who}'s {} was changed since the conversion filled it", field_name(&f.field)),
            );
        }
        t.restore.push(Restore { module: f.module, id: f.id, field: f.field.clone(), value: f.before.clone() });
    }

    // Related rows go back to the lead if they are still where the
    // conversion put them; note copies go if unchanged.
    for m in &entry.moved {
        let who = named_row(m.table, m.id);
        match now.rows.get(&(m.table, m.id)) {
            Some(r) if r.parent_module == m.to_module.as_str() && r.parent_id == m.to_id => {
                t.move_back.push((m.table, m.id))
            }
            Some(_) => return skipped(ErrorCode::ChangedSince, Some(who), format!("{who} was moved elsewhere since")),
            None => return skipped(ErrorCode::ChangedSince, Some(who), format!("{who} was deleted since")),
        }
    }
    for c in &entry.copies {
        let who = Named { kind: "note", id: c.id };
        match now.rows.get(&(Related::Notes, c.id)) {
            Some(r)
                if r.parent_module == c.module.as_str()
                    && r.parent_id == c.parent_id
                    && r.title == c.title
                    && r.body == c.body =>
            {
                t.delete_copies.push(c.id)
            }
            Some(_) => return skipped(ErrorCode::ChangedSince, Some(who), format!("{who} (a copy) was changed since")),
            // A copy someone deleted is gone either way.
            None => {}
        }
    }

    let order = |m: Module| match m {
        Module::Deal => 0,
        Module::Contact => 1,
        Module::Account => 2,
        Module::Lead => 3,
    };
    let mut delete: Vec<(Module, i64)> = created.into_iter().collect();
    delete.sort_by_key(|(m, id)| (order(*m), *id));
    t.delete = delete;
    for k in LEAD_MARKS {
        t.lead.insert(k.to_owned(), entry.lead.before.get(k).cloned().unwrap_or(Value::Null));
    }
    UndoVerdict::Undo(Box::new(t))
}

/// The leads of one undo decided one after another, the latest
/// conversions first, as they are taken back: each sees what the earlier
/// ones take back, laid over what was read before any of them was (the
/// database, unchanged by a dry run, and by a batch until it commits).
/// The undo's batches and its dry run decide through it, so the dry run
/// is what the undo does.
#[derive(Debug, Default)]
pub struct Run {
    /// Names of rows gone or detached (`contact 5`, `note 7`, `lead 3`):
    /// deleted records, leads taken back, rows moved back to their lead,
    /// copies deleted, contacts unlinked from an account.
    gone: HashSet<String>,
    deleted: HashSet<(Module, i64)>,
    /// Fields set back, in the order they were.
    restored: HashMap<(Module, i64), Vec<(String, Value)>>,
    leads: HashSet<i64>,
}

impl Run {
    /// Decides `lead_id` (see [`decide`]) on `now` as the earlier leads of
    /// the run left it.
    pub fn decide(&mut self, lead_id: i64, entry: Option<&Entry>, mut now: Now) -> UndoVerdict {
        self.lay_over(&mut now);
        let verdict = decide(lead_id, entry, &now);
        if let UndoVerdict::Undo(t) = &verdict {
            self.note(lead_id, t);
        }
        verdict
    }

    fn note(&mut self, lead_id: i64, t: &Takeback) {
        self.leads.insert(lead_id);
        self.gone.insert(Named { kind: "lead", id: lead_id }.to_string());
        for (m, id) in &t.delete {
            self.deleted.insert((*m, *id));
            self.gone.insert(named(*m, *id).to_string());
        }
        for (kind, id) in &t.move_back {
            self.gone.insert(named_row(*kind, *id).to_string());
        }
        for id in &t.delete_copies {
            self.gone.insert(named_row(Related::Notes, *id).to_string());
        }
        for r in &t.restore {
            if r.module == Module::Contact && r.field == "account_id" {
                self.gone.insert(named(r.module, r.id).to_string());
            }
            self.restored.entry((r.module, r.id)).or_default().push((r.field.clone(), r.value.clone()));
        }
    }

    fn lay_over(&self, now: &mut Now) {
        now.records.retain(|k, _| !self.deleted.contains(k));
        for (k, row) in now.records.iter_mut() {
            for (field, value) in self.restored.get(k).into_iter().flatten() {
                set_field(row, field, value.clone());
            }
        }
        for users in now.used_by.values_mut() {
            users.retain(|u| !self.gone.contains(u));
        }
        now.used_by.retain(|_, u| !u.is_empty());
        for tags in now.later_tags.values_mut() {
            tags.retain(|(lead, _)| !self.leads.contains(lead));
        }
    }
}

fn field_name(field: &str) -> &str {
    field.strip_prefix(CUSTOM_PREFIX).unwrap_or(field)
}

/// The first column whose value differs ("changed since"), comparing
/// custom fields key by key.
fn first_difference(expected: &Record, current: &Record) -> Option<String> {
    let mut columns: Vec<&String> = expected.keys().chain(current.keys()).collect();
    columns.sort();
    columns.dedup();
    for c in columns {
        let (a, b) = (expected.get(c).unwrap_or(&Value::Null), current.get(c).unwrap_or(&Value::Null));
        if c == "custom_fields" {
            let (a, b) = (record::custom_fields(expected), record::custom_fields(current));
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                if a.get(k).unwrap_or(&Value::Null) != b.get(k).unwrap_or(&Value::Null) {
                    return Some(k.clone());
                }
            }
        } else if a != b {
            return Some(c.clone());
        }
    }
    None
}

/// The record's tags now, less those the conversion added, except those a
/// later conversion into the same record brought too; a person's tags stay.
fn tags_without_added(f: &Filled, current: &Record, later: Option<&Vec<(i64, String)>>) -> Value {
    let added = journal::tags_added(f);
    let keep = |t: &String| !added.contains(t) || later.is_some_and(|l| l.iter().any(|(_, x)| x == t));
    Value::Array(record::tags(current).into_iter().filter(keep).map(Value::String).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Created, LeadChange, Moved, NoteCopy};
    use serde_json::json;

    fn rec(v: Value) -> Record {
        v.as_object().unwrap().clone()
    }

    /// Lead 1 merged into existing contact 10 (filled its phone, added a
    /// tag, set the opt-out), created account 20 and deal 30, moved note 40
    /// to the deal and copied it to the contact as note 41.
    fn entry() -> Entry {
        Entry {
            lead: LeadChange {
                before: rec(json!({"lead_status": "Qualified", "is_repeat": false, "converted_at": null,
                                   "converted_account_id": null, "converted_contact_id": null, "converted_deal_id": null})),
                after: rec(
                    json!({"lead_status": "Converted", "is_repeat": true, "converted_at": "2026-12-06T08:00:00Z",
                                  "converted_account_id": 20, "converted_contact_id": 10, "converted_deal_id": 30}),
                ),
            },
            created: vec![
                Created {
                    module: Module::Account,
                    id: 20,
                    values: rec(json!({"id": 20, "account_name": "Acme", "custom_fields": {}})),
                },
                Created {
                    module: Module::Deal,
                    id: 30,
                    values: rec(json!({"id": 30, "deal_name": "Acme", "account_id": 20, "contact_id": 10})),
                },
            ],
            filled: vec![
                Filled {
                    module: Module::Contact,
                    id: 10,
                    field: "phone".into(),
                    before: json!(" "),
                    after: json!("+48 1"),
                },
                Filled {
                    module: Module::Contact,
                    id: 10,
                    field: "account_id".into(),
                    before: Value::Null,
                    after: json!(20),
                },
                Filled {
                    module: Module::Contact,
                    id: 10,
                    field: "custom_fields.region".into(),
                    before: json!(""),
                    after: json!("EMEA"),
                },
                Filled {
                    module: Module::Contact,
                    id: 10,
                    field: "tags".into(),
                    before: json!(["vip"]),
                    after: json!(["vip", "expo"]),
                },
                Filled {
                    module: Module::Contact,
                    id: 10,
                    field: "email_opt_out".into(),
                    before: json!(false),
                    after: json!(true),
                },
            ],
            moved: vec![Moved { table: Related::Notes, id: 40, to_module: Module::Deal, to_id: 30 }],
            copies: vec![NoteCopy {
                id: 41,
                module: Module::Contact,
                parent_id: 10,
                title: json!("Call"),
                body: json!("Called"),
            }],
        }
    }

    /// The world right after the conversion.
    fn now() -> Now {
        let mut records = HashMap::new();
        records.insert(
            (Module::Contact, 10),
            rec(json!({"id": 10, "last_name": "K", "phone": "+48 1", "account_id": 20, "email_opt_out": true,
                       "custom_fields": {"region": "EMEA"}, "tags": ["vip", "expo"]})),
        );
        records.insert((Module::Account, 20), rec(json!({"id": 20, "account_name": "Acme", "custom_fields": {}})));
        records.insert(
            (Module::Deal, 30),
            rec(json!({"id": 30, "deal_name": "Acme", "account_id": 20, "contact_id": 10})),
        );
        let mut rows = HashMap::new();
        rows.insert(
            (Related::Notes, 40),
            RelatedRow { parent_module: "deal".into(), parent_id: 30, ..Default::default() },
        );
        rows.insert(
            (Related::Notes, 41),
            RelatedRow { parent_module: "contact".into(), parent_id: 10, title: json!("Call"), body: json!("Called") },
        );
        Now {
            lead: Some(rec(
                json!({"id": 1, "lead_status": "Converted", "is_repeat": true, "converted_at": "2026-12-06T08:00:00Z",
                                  "converted_account_id": 20, "converted_contact_id": 10, "converted_deal_id": 30}),
            )),
            records,
            rows,
            ..Default::default()
        }
    }

    fn takeback(v: UndoVerdict) -> Takeback {
        match v {
            UndoVerdict::Undo(t) => *t,
            other => panic!("expected an undo, got {other:?}"),
        }
    }

    fn skip(v: UndoVerdict) -> (ErrorCode, Option<String>) {
        match v {
            UndoVerdict::Skipped { code, record, .. } => (code, record.map(|r| r.to_string())),
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    #[test]
    fn a_false_opt_out_filled_into_an_empty_field_is_taken_back() {
        let mut e = entry();
        e.filled.retain(|f| f.field != "email_opt_out");
        e.filled.push(Filled {
            module: Module::Contact,
            id: 10,
            field: "email_opt_out".into(),
            before: Value::Null,
            after: json!(false),
        });
        let mut n = now();
        n.records.get_mut(&(Module::Contact, 10)).unwrap().insert("email_opt_out".into(), json!(false));
        let t = takeback(decide(1, Some(&e), &n));
        assert_eq!(t.opt_out_kept, None);
        assert!(t.restore.iter().any(|r| r.field == "email_opt_out" && r.value.is_null()));
    }

    #[test]
    fn an_untouched_conversion_is_taken_back_exactly() {
        let t = takeback(decide(1, Some(&entry()), &now()));
        assert_eq!(t.delete, vec![(Module::Deal, 30), (Module::Account, 20)], "deals before accounts");
        assert_eq!(t.move_back, vec![(Related::Notes, 40)]);
        assert_eq!(t.delete_copies, vec![41]);
        let restored: Vec<(&str, Value)> = t.restore.iter().map(|r| (r.field.as_str(), r.value.clone())).collect();
        assert_eq!(
            restored,
            vec![
                ("phone", json!(" ")),
                ("account_id", Value::Null),
                ("custom_fields.region", json!("")),
                ("tags", json!(["vip"]))
            ],
            "each to its exact value before; the opt-out is not among them"
        );
        assert_eq!(t.opt_out_kept.map(|n| n.to_string()).as_deref(), Some("contact 10"));
        assert_eq!(t.lead["lead_status"], "Qualified");
        assert_eq!(t.lead["converted_contact_id"], Value::Null);
    }

    #[test]
    fn a_field_changed_since_keeps_the_whole_lead() {
        let mut n = now();
        n.records.get_mut(&(Module::Contact, 10)).unwrap().insert("phone".into(), json!("+48 999"));
        assert_eq!(skip(decide(1, Some(&entry()), &n)), (ErrorCode::ChangedSince, Some("contact 10".into())));
        // A custom field key, compared alone.
        let mut n = now();
        n.records.get_mut(&(Module::Contact, 10)).unwrap()["custom_fields"] = json!({"region": "APAC"});
        assert_eq!(skip(decide(1, Some(&entry()), &n)).0, ErrorCode::ChangedSince);
        // A field the conversion did not fill changes nothing.
        let mut n = now();
        n.records.get_mut(&(Module::Contact, 10)).unwrap().insert("city".into(), json!("Gdańsk"));
        n.records.get_mut(&(Module::Contact, 10)).unwrap().insert("email_opt_out".into(), json!(false));
        takeback(decide(1, Some(&entry()), &n));
        // A created record edited since.
        let mut n = now();
        n.records.get_mut(&(Module::Account, 20)).unwrap().insert("website".into(), json!("acme.pl"));
        assert_eq!(skip(decide(1, Some(&entry()), &n)), (ErrorCode::ChangedSince, Some("account 20".into())));
    }

    #[test]
    fn a_created_record_used_by_later_work_is_in_use() {
        let mut n = now();
        n.used_by.insert((Module::Account, 20), vec!["deal 99".into()]);
        assert_eq!(skip(decide(1, Some(&entry()), &n)), (ErrorCode::InUse, Some("account 20".into())));
    }

    #[test]
    fn related_rows_must_be_where_the_conversion_left_them() {
        let mut n = now();
        n.rows.get_mut(&(Related::Notes, 40)).unwrap().parent_id = 77;
        assert_eq!(skip(decide(1, Some(&entry()), &n)), (ErrorCode::ChangedSince, Some("note 40".into())));
        let mut n = now();
        n.rows.get_mut(&(Related::Notes, 41)).unwrap().body = json!("Called twice");
        assert_eq!(skip(decide(1, Some(&entry()), &n)), (ErrorCode::ChangedSince, Some("note 41".into())));
        // A copy someone deleted: nothing to delete.
        let mut n = now();
        n.rows.remove(&(Related::Notes, 41));
        assert!(takeback(decide(1, Some(&entry()), &n)).delete_copies.is_empty());
    }

    #[test]
    fn tags_a_person_or_a_later_conversion_brought_stay() {
        let mut n = now();
        n.records.get_mut(&(Module::Contact, 10)).unwrap()["tags"] = json!(["vip", "expo", "mine"]);
        let t = takeback(decide(1, Some(&entry()), &n));
        assert_eq!(t.restore.iter().find(|r| r.field == "tags").unwrap().value, json!(["vip", "mine"]));
        n.later_tags.insert((Module::Contact, 10), vec![(2, "expo".into())]);
        let t = takeback(decide(1, Some(&entry()), &n));
        assert!(t.restore.iter().all(|r| r.field != "tags"), "nothing to change: expo came again later");
    }

    #[test]
    fn the_lead_must_still_carry_this_conversion() {
        assert_eq!(skip(decide(1, None, &now())).0, ErrorCode::NoJournal);
        let mut n = now();
        n.undone = true;
        assert_eq!(skip(decide(1, Some(&entry()), &n)).0, ErrorCode::AlreadyUndone);
        let mut n = now();
        n.lead.as_mut().unwrap().insert("converted_contact_id".into(), json!(11));
        assert_eq!(skip(decide(1, Some(&entry()), &n)).0, ErrorCode::NotLatestConversion);
        let mut n = now();
        n.lead.as_mut().unwrap().insert("lead_status".into(), json!("Lost"));
        assert_eq!(skip(decide(1, Some(&entry()), &n)), (ErrorCode::ChangedSince, Some("lead 1".into())));
        let mut n = now();
        n.lead = None;
        assert_eq!(skip(decide(1, Some(&entry()), &n)).0, ErrorCode::NotFound);
    }

    /// Lead 2, converted after lead 1, created contact 50 on lead 1's
    /// account 20 and filled its phone: the world after both.
    fn two_leads() -> (Entry, Now, Entry, Now) {
        let second = Entry {
            lead: LeadChange {
                before: rec(json!({"lead_status": "New", "is_repeat": false, "converted_at": null,
                                   "converted_account_id": null, "converted_contact_id": null, "converted_deal_id": null})),
                after: rec(
                    json!({"lead_status": "Converted", "is_repeat": false, "converted_at": "2026-12-06T08:01:00Z",
                                  "converted_account_id": 20, "converted_contact_id": 50, "converted_deal_id": null}),
                ),
            },
            created: vec![Created {
                module: Module::Contact,
                id: 50,
                values: rec(json!({"id": 50, "last_name": "Ş", "account_id": 20})),
            }],
            filled: vec![Filled {
                module: Module::Account,
                id: 20,
                field: "phone".into(),
                before: Value::Null,
                after: json!("+90 1"),
            }],
            ..Default::default()
        };
        let account = rec(json!({"id": 20, "account_name": "Acme", "custom_fields": {}, "phone": "+90 1"}));
        let mut first_now = now();
        first_now.records.insert((Module::Account, 20), account.clone());
        first_now.used_by.insert((Module::Account, 20), vec!["contact 50".into(), "lead 2".into()]);
        let mut second_now = Now {
            lead: Some(rec(json!({"id": 2, "lead_status": "Converted", "is_repeat": false,
                                  "converted_at": "2026-12-06T08:01:00Z", "converted_account_id": 20,
                                  "converted_contact_id": 50, "converted_deal_id": null}))),
            ..Default::default()
        };
        second_now.records.insert((Module::Account, 20), account);
        second_now.records.insert((Module::Contact, 50), rec(json!({"id": 50, "last_name": "Ş", "account_id": 20})));
        (entry(), first_now, second, second_now)
    }

    #[test]
    fn a_run_sees_what_the_later_conversions_it_took_back_left() {
        let (first, first_now, second, second_now) = two_leads();
        // Alone, lead 1 finds its account used by lead 2 and changed.
        assert_eq!(skip(decide(1, Some(&first), &first_now)), (ErrorCode::InUse, Some("account 20".into())));
        let mut run = Run::default();
        let t2 = takeback(run.decide(2, Some(&second), second_now.clone()));
        assert_eq!(t2.delete, vec![(Module::Contact, 50)]);
        let t1 = takeback(run.decide(1, Some(&first), first_now.clone()));
        assert!(t1.delete.contains(&(Module::Account, 20)), "lead 2's contact and fill are gone: {t1:?}");

        // Lead 2 kept (its status changed since): lead 1 stays too.
        let mut kept = second_now;
        kept.lead.as_mut().unwrap().insert("lead_status".into(), json!("Lost"));
        let mut run = Run::default();
        assert_eq!(skip(run.decide(2, Some(&second), kept)).0, ErrorCode::ChangedSince);
        assert_eq!(skip(run.decide(1, Some(&first), first_now)), (ErrorCode::InUse, Some("account 20".into())));
    }
}
