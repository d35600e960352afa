//! Which records a lead becomes (issue 24, seed 001): a contact, an
//! account, a deal or any non-empty combination (`create_contact`,
//! `create_account`, `create_deal`). For every combination: what is made,
//! what is merged into, where notes, attachments and activities go, the
//! tags, the results' actions, and an undo that takes it back; the empty
//! combination and attachments sent to a record the job does not make are
//! refused. (That the dry run equals the run for each combination is in
//! `agreement.rs`.)

mod common;

use common::*;
use leadconv::record::Record;
use leadconv::store::convert::LeadResult;
use leadconv::store::job::{self, Trigger};
use leadconv::Error;
use leadconv::ErrorCode;
use serde_json::{json, Value};

fn options(contact: bool, account: bool, deal: bool) -> Value {
    json!({"create_contact": contact, "create_account": account, "create_deal": deal,
           "deal": {"closing_date": "2026-12-31", "stage": "Qualification"}})
}

/// One lead that merges into an existing contact and account (with tags
/// and notes, an attachment and an activity), one that makes new records.
struct Scene {
    crm: Crm,
    rep: i64,
    existing_contact: i64,
    existing_account: i64,
    merging: i64,
    fresh: i64,
    note: i64,
    copy_source: i64,
    file: i64,
    call: i64,
}

async fn scene() -> Scene {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let existing_account = crm.account(json!({"owner_id": rep, "account_name": "Stara Firma", "tags": ["old"]})).await;
    let existing_contact = crm
        .contact(json!({"owner_id": rep, "account_id": existing_account, "last_name": "Öztürk",
                        "email": "ayse@ornek.com.tr", "tags": ["old"]}))
        .await;
    let merging = crm
        .lead(json!({"owner_id": rep, "first_name": "Ayşe", "last_name": "Öztürk", "email": " AYSE@ornek.com.tr ",
                     "company": "stara  firma", "phone": "+90 212", "website": "ornek.com.tr", "tags": ["expo"]}))
        .await;
    let fresh = crm
        .lead(json!({"owner_id": rep, "first_name": "Nguyễn", "last_name": "Văn An", "email": "an@vi.vn",
                     "company": "Công ty Mới", "phone": "+84 28", "tags": ["expo"]}))
        .await;
    let note = crm
        .insert("notes", json!({"parent_module": "lead", "parent_id": merging, "title": "Call", "body": "Called"}))
        .await;
    let copy_source = crm
        .insert("notes", json!({"parent_module": "lead", "parent_id": fresh, "title": "Visit", "body": "Visited"}))
        .await;
    let file = crm
        .insert(
            "attachments",
            json!({"parent_module": "lead", "parent_id": fresh, "file_name": "offer.pdf",
                   "content_type": "application/pdf", "size_bytes": 10, "storage_key": "s3://b/offer.pdf"}),
        )
        .await;
    let call = crm
        .insert("activities", json!({"parent_module": "lead", "parent_id": fresh, "kind": "call", "subject": "Intro"}))
        .await;
    Scene { crm, rep, existing_contact, existing_account, merging, fresh, note, copy_source, file, call }
}

fn action(r: &LeadResult) -> (Option<&str>, Option<&str>, Option<&str>) {
    (r.contact_action.map(|a| a.as_str()), r.account_action.map(|a| a.as_str()), r.deal_action.map(|a| a.as_str()))
}

fn tags(r: &Record) -> Value {
    r.get("tags").cloned().unwrap_or(Value::Null)
}

#[tokio::test]
async fn each_combination_makes_merges_and_moves_only_among_the_records_it_makes() {
    for (contact, account, deal) in [
        (true, true, true),
        (true, true, false),
        (true, false, true),
        (true, false, false),
        (false, true, true),
        (false, true, false),
        (false, false, true),
    ] {
        let what = format!("contact {contact}, account {account}, deal {deal}");
        let s = scene().await;
        let crm = &s.crm;
        let contacts_before = crm.count("SELECT count(*) FROM contacts").await;
        let contact_before = without_updated_at(crm.row("contacts", s.existing_contact).await.unwrap());
        let account_before = without_updated_at(crm.row("accounts", s.existing_account).await.unwrap());
        let accounts_before = crm.count("SELECT count(*) FROM accounts").await;
        let (job, results) = crm.convert_all(s.rep, options(contact, account, deal), &[s.merging, s.fresh]).await;
        let (merged, fresh) = (&results[0], &results[1]);
        assert_eq!((merged.outcome.as_str(), fresh.outcome.as_str()), ("converted", "converted"), "{what}");

        // What is made and what is merged into.
        let yes = |b: bool, a: &'static str| if b { a } else { "none" };
        assert_eq!(
            action(merged),
            (Some(yes(contact, "merged")), Some(yes(account, "matched")), Some(yes(deal, "created"))),
            "{what}"
        );
        assert_eq!(
            action(fresh),
            (Some(yes(contact, "created")), Some(yes(account, "created")), Some(yes(deal, "created"))),
            "{what}"
        );
        assert_eq!(merged.contact_id, contact.then_some(s.existing_contact), "{what}");
        assert_eq!(merged.account_id, account.then_some(s.existing_account), "{what}");
        assert_eq!(
            crm.count("SELECT count(*) FROM contacts").await,
            contacts_before + i64::from(contact),
            "{what}: one new contact, or none"
        );
        assert_eq!(crm.count("SELECT count(*) FROM accounts").await, accounts_before + i64::from(account), "{what}");
        assert_eq!(crm.count("SELECT count(*) FROM deals").await, 2 * i64::from(deal), "{what}");
        let lead = crm.row("leads", s.fresh).await.unwrap();
        assert!(!lead["converted_at"].is_null(), "{what}: the lead is marked converted");
        assert_eq!(lead["converted_contact_id"].as_i64(), fresh.contact_id, "{what}");
        assert_eq!(lead["converted_account_id"].as_i64(), fresh.account_id, "{what}");

        // Filled, linked and tagged only where made.
        let old_contact = crm.row("contacts", s.existing_contact).await.unwrap();
        let old_account = crm.row("accounts", s.existing_account).await.unwrap();
        assert_eq!(!old_contact["phone"].is_null(), contact, "{what}: the existing contact is filled only when made");
        assert_eq!(tags(&old_contact) == json!(["old", "expo"]), contact, "{what}");
        assert_eq!(!old_account["website"].is_null(), account, "{what}: the account is filled only when made");
        assert_eq!(tags(&old_account) == json!(["old", "expo"]), account, "{what}");
        if let (Some(c), Some(a)) = (fresh.contact_id, fresh.account_id) {
            assert_eq!(crm.row("contacts", c).await.unwrap()["account_id"].as_i64(), Some(a), "{what}: linked");
        }
        if let Some(c) = fresh.contact_id {
            let row = crm.row("contacts", c).await.unwrap();
            assert_eq!(row["account_id"].as_i64(), fresh.account_id, "{what}: no account, no link");
            assert_eq!(tags(&row), json!(["expo"]), "{what}");
        }
        if let Some(d) = fresh.deal_id {
            let row = crm.row("deals", d).await.unwrap();
            assert_eq!((row["contact_id"].as_i64(), row["account_id"].as_i64()), (fresh.contact_id, fresh.account_id));
            assert_eq!(row["is_repeat_inquiry"], json!(false), "{what}: a new lead's deal");
            let other = crm.row("deals", merged.deal_id.unwrap()).await.unwrap();
            assert_eq!(other["is_repeat_inquiry"], json!(true), "{what}: the lead was known before");
        }

        // Related records among the records made: notes to the deal (copies
        // to the contact and account made), else the contact, else the
        // account; attachments to the contact, else the deal, else the
        // account; activities to the deal, else the contact, else the account.
        let first = |order: &[(&str, Option<i64>)]| {
            order.iter().find_map(|(m, id)| id.map(|id| (m.to_string(), id))).expect("a record is made")
        };
        let (c, a, d) = (fresh.contact_id, fresh.account_id, fresh.deal_id);
        let note_to = first(&[("deal", d), ("contact", c), ("account", a)]);
        assert_eq!(crm.parent_of("notes", s.copy_source).await, note_to, "{what}: the note");
        let copies: Vec<(String, i64)> =
            sqlx::query_as("SELECT parent_module, parent_id FROM notes WHERE title = 'Visit' AND id <> $1 ORDER BY 1")
                .bind(s.copy_source)
                .fetch_all(crm.pool())
                .await
                .unwrap();
        let mut want = Vec::new();
        if deal {
            want.extend(a.map(|a| ("account".to_owned(), a)));
            want.extend(c.map(|c| ("contact".to_owned(), c)));
        }
        assert_eq!(copies, want, "{what}: note copies on the records made");
        assert_eq!(
            crm.parent_of("attachments", s.file).await,
            first(&[("contact", c), ("deal", d), ("account", a)]),
            "{what}: the attachment"
        );
        assert_eq!(
            crm.parent_of("activities", s.call).await,
            first(&[("deal", d), ("contact", c), ("account", a)]),
            "{what}: the activity"
        );
        assert_ne!(crm.parent_of("notes", s.note).await.0, "lead", "{what}: the merging lead's note moved");

        // And the undo takes it back exactly.
        let (_, undone) = crm.undo(job, None).await;
        assert!(undone.iter().all(|r| r.outcome.as_str() == "undone"), "{what}: {undone:?}");
        assert_eq!(crm.count("SELECT count(*) FROM contacts").await, contacts_before, "{what}");
        assert_eq!(crm.count("SELECT count(*) FROM accounts").await, accounts_before, "{what}");
        assert_eq!(crm.count("SELECT count(*) FROM deals").await, 0, "{what}");
        assert_eq!(crm.parent_of("attachments", s.file).await, ("lead".into(), s.fresh), "{what}");
        let contact_after = without_updated_at(crm.row("contacts", s.existing_contact).await.unwrap());
        let account_after = without_updated_at(crm.row("accounts", s.existing_account).await.unwrap());
        assert_eq!(contact_after, contact_before, "{what}: the merged contact as it was");
        assert_eq!(account_after, account_before, "{what}: the matched account as it was");
    }
}

fn without_updated_at(mut r: Record) -> Record {
    r.remove("updated_at");
    r
}

#[tokio::test]
async fn an_account_alone_needs_a_company_to_name_it_and_writes_nothing_without_one() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "jan@nowak.pl"})).await;
    let r = crm.convert(rep, options(false, true, true), lead).await;
    assert_eq!(r.outcome.as_str(), "failed");
    assert_eq!(r.error_code.as_deref(), Some("missing_mandatory_field"), "{r:?}");
    assert!(r.error_message.as_deref().unwrap_or("").contains("company"), "{r:?}");
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 0, "nothing written");
    assert!(crm.row("leads", lead).await.unwrap()["converted_at"].is_null());
    // With a contact, a lead without a company is a contact (SPEC §3.5).
    let r = crm.convert(rep, options(true, true, false), lead).await;
    assert_eq!((r.outcome.as_str(), r.account_id), ("converted", None), "{r:?}");
}

#[tokio::test]
async fn no_contact_means_no_hierarchy_block_and_no_last_name_needed() {
    let crm = Crm::new().await;
    let boss = crm.user("Boss", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": boss})).await;
    crm.contact(json!({"owner_id": boss, "last_name": "Dup", "email": "dup@firma.pl"})).await;
    let bosses =
        crm.lead(json!({"owner_id": boss, "last_name": "Dup", "email": "dup@firma.pl", "company": "Firma"})).await;
    let blocked = crm.convert(rep, options(true, true, false), bosses).await;
    assert_eq!(blocked.error_code.as_deref(), Some("blocked_by_hierarchy"), "with a contact: rule 7");
    let r = crm.convert(rep, options(false, true, false), bosses).await;
    assert_eq!((r.outcome.as_str(), r.contact_id), ("converted", None), "rule 7 is about a merge into a contact");

    let nameless = crm.lead(json!({"owner_id": rep, "last_name": "  ", "company": "Bez Nazwiska"})).await;
    let r = crm.convert(rep, options(false, true, false), nameless).await;
    assert_eq!(r.outcome.as_str(), "converted", "an account needs no last name: {r:?}");
}

async fn refusal(crm: &Crm, acting: i64, options: Value) -> leadconv::Refusal {
    let lead = crm.lead(json!({"last_name": "Kowalski", "company": "Refused Ltd"})).await;
    let created = job::create_for_leads(crm.pool(), acting, Trigger::Manual, &options, &[lead]).await;
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0, "a refused job leaves no row: {options}");
    match created {
        Err(Error::Refused(r)) => r,
        other => panic!("expected a refusal for {options}, got {other:?}"),
    }
}

#[tokio::test]
async fn nothing_to_make_or_attachments_to_a_record_not_made_refuse_the_job() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let r = refusal(&crm, rep, options(false, false, false)).await;
    assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidOption, "options"), "{r:?}");
    assert!(r.message.contains("create_contact") && r.message.contains("create_deal"), "{r:?}");

    let mut o = options(false, true, true);
    o["move_attachments_to"] = json!("contact");
    let r = refusal(&crm, rep, o).await;
    assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidOption, "move_attachments_to"), "{r:?}");
    assert!(r.message.contains("create_contact"), "{r:?}");

    let mut o = options(true, false, true);
    o["move_attachments_to"] = json!("account");
    let r = refusal(&crm, rep, o).await;
    assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidOption, "move_attachments_to"), "{r:?}");

    let r = refusal(&crm, rep, json!({"create_contact": "no"})).await;
    assert_eq!(r.code, ErrorCode::InvalidOption, "{r:?}");
}
