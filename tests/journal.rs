//! The conversion journal (SPEC §4a, issue 21): written in each lead's
//! conversion transaction, it records what was written — records created
//! (as stored), each field filled on existing records with its exact value
//! before (`''`, white space and null told apart) and the value written,
//! custom field keys, links, tags added, the opt-out, notes, attachments
//! and activities moved and note copies made, and the lead's own fields
//! before and after. Checked against the database rows themselves.

mod common;

use common::*;
use leadconv::journal::{tags_added, Entry, Filled, Related};
use leadconv::record::{Module, Record};
use leadconv::store::mapping::{self, CustomMapping};
use serde_json::{json, Value};
use uuid::Uuid;

async fn journal(crm: &Crm, job: Uuid, lead: i64) -> Option<Entry> {
    sqlx::query_scalar::<_, sqlx::types::Json<Entry>>(
        "SELECT entry FROM conversion_journal WHERE job_id = $1 AND lead_id = $2",
    )
    .bind(job)
    .bind(lead)
    .fetch_optional(crm.pool())
    .await
    .unwrap()
    .map(|j| j.0)
}

fn filled<'a>(e: &'a Entry, module: Module, field: &str) -> &'a Filled {
    e.filled
        .iter()
        .find(|f| f.module == module && f.field == field)
        .unwrap_or_else(|| panic!("{module:?}.{field} journaled in {e:#?}"))
}

/// A row as the journal keeps it: without its timestamps.
async fn stored(crm: &Crm, table: &str, id: i64) -> Record {
    let mut r = crm.row(table, id).await.unwrap();
    r.remove("created_at");
    r.remove("updated_at");
    r
}

/// A created record as the journal keeps it: its empty columns left out
/// (a missing column reads as null).
fn non_null(mut r: Record) -> Record {
    r.retain(|_, v| !v.is_null());
    r
}

#[tokio::test]
async fn a_merge_journals_the_exact_values_before_and_what_it_wrote() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    for (module, api, max) in [("lead", "region", 50), ("contact", "region", 50)] {
        sqlx::query(
            "INSERT INTO custom_field_defs (module, api_name, data_type, max_length) VALUES ($1, $2, 'text', $3)",
        )
        .bind(module)
        .bind(api)
        .bind(max)
        .execute(crm.pool())
        .await
        .unwrap();
    }
    let mut conn = crm.pool().acquire().await.unwrap();
    let m =
        CustomMapping { lead_field: "region".into(), target_module: "contact".into(), target_field: "region".into() };
    mapping::save(&mut conn, &m).await.unwrap();
    drop(conn);

    // An existing contact with a blank phone (white space), an empty city,
    // no mobile, an empty region, one tag, and no account.
    let contact = crm
        .contact(json!({"owner_id": rep, "last_name": "Kowalska", "email": "anna@acme.pl", "phone": " ", "city": "",
                        "custom_fields": {"region": ""}, "tags": ["vip"], "email_opt_out": false}))
        .await;
    let before_contact = stored(&crm, "contacts", contact).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "first_name": "Anna", "last_name": "Kowalska", "email": "Anna@Acme.pl",
                     "phone": "+48 1", "city": "Kraków", "mobile": "+48 2", "company": "Acme Sp. z o.o.",
                     "custom_fields": {"region": "EMEA"}, "tags": ["expo", "vip"], "email_opt_out": true,
                     "lead_status": "Qualified"}))
        .await;
    let note = crm
        .insert("notes", json!({"parent_module": "lead", "parent_id": lead, "title": "Call", "body": "Called"}))
        .await;
    let activity = crm
        .insert(
            "activities",
            json!({"parent_module": "lead", "parent_id": lead, "kind": "call", "subject": "Follow up"}),
        )
        .await;
    let attachment = crm
        .insert(
            "attachments",
            json!({"parent_module": "lead", "parent_id": lead, "file_name": "a.pdf", "storage_key": "k"}),
        )
        .await;

    let (job, results) = crm.convert_all(rep, with_deal(), &[lead]).await;
    let r = &results[0];
    assert_eq!(r.outcome.to_string(), "converted");
    let (account, deal) = (r.account_id.unwrap(), r.deal_id.unwrap());
    let e = journal(&crm, job, lead).await.expect("a converted lead has its journal entry");

    // Filled: exact values before, values written as stored now.
    let now = stored(&crm, "contacts", contact).await;
    assert_eq!(filled(&e, Module::Contact, "phone").before, json!(" "));
    assert_eq!(filled(&e, Module::Contact, "city").before, json!(""));
    assert_eq!(filled(&e, Module::Contact, "mobile").before, Value::Null);
    assert_eq!(filled(&e, Module::Contact, "custom_fields.region").before, json!(""));
    assert_eq!(filled(&e, Module::Contact, "custom_fields.region").after, json!("EMEA"));
    assert_eq!(filled(&e, Module::Contact, "account_id").before, Value::Null, "the link is journaled");
    assert_eq!(filled(&e, Module::Contact, "account_id").after, json!(account));
    assert_eq!(filled(&e, Module::Contact, "email_opt_out").before, json!(false), "the opt-out it set");
    assert_eq!(tags_added(filled(&e, Module::Contact, "tags")), vec!["expo".to_owned()]);
    for f in e.filled.iter().filter(|f| f.module == Module::Contact) {
        let now_value = match f.field.strip_prefix("custom_fields.") {
            Some(k) => now["custom_fields"][k].clone(),
            None => now[&f.field].clone(),
        };
        assert_eq!(f.after, now_value, "{}: the value written is the value stored", f.field);
        let then = match f.field.strip_prefix("custom_fields.") {
            Some(k) => before_contact["custom_fields"].get(k).cloned().unwrap_or(Value::Null),
            None => before_contact[&f.field].clone(),
        };
        assert_eq!(f.before, then, "{}: the value before is the value that was stored", f.field);
    }
    assert!(e.filled.iter().all(|f| f.field != "last_name"), "a field already set is not touched");

    // Created: the account and the deal, exactly as stored.
    let made: Vec<(Module, i64)> = e.created.iter().map(|c| (c.module, c.id)).collect();
    assert_eq!(made, vec![(Module::Account, account), (Module::Deal, deal)]);
    assert_eq!(e.created[0].values, non_null(stored(&crm, "accounts", account).await));
    assert_eq!(e.created[1].values, non_null(stored(&crm, "deals", deal).await));

    // Moved from the lead, and the note copies made.
    let moved: Vec<(Related, i64, Module, i64)> =
        e.moved.iter().map(|m| (m.table, m.id, m.to_module, m.to_id)).collect();
    assert_eq!(
        moved,
        vec![
            (Related::Notes, note, Module::Deal, deal),
            (Related::Attachments, attachment, Module::Contact, contact),
            (Related::Activities, activity, Module::Deal, deal)
        ]
    );
    let mut copies: Vec<(Module, i64)> = e.copies.iter().map(|c| (c.module, c.parent_id)).collect();
    copies.sort_by_key(|(m, _)| m.as_str());
    assert_eq!(copies, vec![(Module::Account, account), (Module::Contact, contact)]);
    for c in &e.copies {
        let row = crm.row("notes", c.id).await.expect("the copy exists with the journaled id");
        assert_eq!((row["title"].clone(), row["body"].clone()), (c.title.clone(), c.body.clone()));
        assert_eq!(row["parent_id"], json!(c.parent_id));
    }

    // The lead's own fields.
    assert_eq!(e.lead.before["lead_status"], "Qualified");
    assert_eq!(e.lead.before["is_repeat"], false);
    assert_eq!(e.lead.before["converted_at"], Value::Null);
    assert_eq!(e.lead.after["lead_status"], "Converted");
    assert_eq!(e.lead.after["converted_contact_id"], json!(contact));
    assert_eq!(e.lead.after["is_repeat"], true, "a lead that merged is a repeat");
}

#[tokio::test]
async fn leads_of_one_batch_journal_against_what_the_earlier_ones_left() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    // Two leads of one company: the first creates the account, the second
    // merges into it, fills what the first left empty and adds its tag.
    let first = crm
        .lead(json!({"owner_id": rep, "last_name": "One", "email": "one@acme.pl", "company": "Acme", "tags": ["a"]}))
        .await;
    let second = crm
        .lead(json!({"owner_id": rep, "last_name": "Two", "email": "two@acme.pl", "company": "ACME ",
                     "website": "acme.pl", "tags": ["b"]}))
        .await;
    // And one that fails, alone: its neighbours keep their journal, it has none.
    let bad = crm.lead(json!({"owner_id": rep, "last_name": "  ", "email": "bad@acme.pl"})).await;
    let (job, results) = crm.convert_in_batches(rep, json!({}), &[first, second, bad], 10).await;
    assert_eq!(results.iter().map(|r| r.outcome.to_string()).collect::<Vec<_>>(), ["converted", "converted", "failed"]);
    let account = results[0].account_id.unwrap();
    assert_eq!(results[1].account_id, Some(account));

    let e1 = journal(&crm, job, first).await.unwrap();
    let e2 = journal(&crm, job, second).await.unwrap();
    assert!(journal(&crm, job, bad).await.is_none(), "a failed lead wrote nothing, its journal neither");
    // The first lead's account as it made it: without the second's fills.
    let created = e1.created.iter().find(|c| c.module == Module::Account).unwrap();
    assert_eq!(created.values.get("website"), None);
    assert_eq!(created.values["tags"], json!(["a"]));
    // The second's fills, against what the first left.
    let website = filled(&e2, Module::Account, "website");
    assert_eq!((website.id, website.before.clone(), website.after.clone()), (account, Value::Null, json!("acme.pl")));
    let tags = filled(&e2, Module::Account, "tags");
    assert_eq!(tags.before, json!(["a"]));
    assert_eq!(tags_added(tags), vec!["b".to_owned()]);
    // Put together, they are the account as stored.
    let mut rebuilt = created.values.clone();
    for f in e2.filled.iter().filter(|f| f.module == Module::Account) {
        rebuilt.insert(f.field.clone(), f.after.clone());
    }
    assert_eq!(rebuilt, non_null(stored(&crm, "accounts", account).await));

    // A lead converted again (a redelivered message) writes no second entry.
    let again = leadconv::store::convert::convert_lead(
        crm.pool(),
        job,
        &leadconv::store::job::settings(
            crm.pool(),
            &leadconv::store::job::get(crm.pool(), job).await.unwrap().unwrap(),
        )
        .await
        .unwrap(),
        first,
    )
    .await
    .unwrap();
    assert_eq!(again.outcome.to_string(), "converted");
    assert_eq!(crm.count(&format!("SELECT count(*) FROM conversion_journal WHERE job_id = '{job}'")).await, 2);
}
