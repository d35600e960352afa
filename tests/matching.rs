//! SPEC §3 rules 1–7: the guard, who acts, matching, merging into contacts
//! and accounts, read-only merges and the hierarchy block.
//!
//! Every test runs against its own database (`Crm::new()`) and checks what
//! ended up in Postgres, chosen so that the test fails if the rule it names
//! were taken out of the code.

mod common;

use std::sync::Arc;

use common::*;
use leadconv::record::Record;
use leadconv::store::convert::{self, LeadResult};
use leadconv::store::job::{self, Job, Trigger};
use leadconv::store::options::Settings;
use leadconv::Error;
use leadconv::ErrorCode;
use serde_json::{json, Value};
use tokio::sync::Barrier;
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Helpers local to these tests.

async fn job_row(crm: &Crm, id: Uuid) -> Job {
    job::get(crm.pool(), id).await.unwrap().expect("job exists")
}

async fn settings_of(crm: &Crm, id: Uuid) -> Settings {
    job::settings(crm.pool(), &job_row(crm, id).await).await.expect("settings")
}

/// A job over `leads` that is created but not run yet.
async fn new_job(crm: &Crm, acting: i64, leads: &[i64]) -> Uuid {
    job::create_for_leads(crm.pool(), acting, Trigger::Manual, &json!({}), leads).await.expect("job accepted")
}

async fn exec(crm: &Crm, sql: &str) {
    sqlx::query(sql).execute(crm.pool()).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A text custom field on `module`.
async fn custom_field(crm: &Crm, module: &str, api_name: &str, unique: bool) {
    sqlx::query("INSERT INTO custom_field_defs (module, api_name, data_type, max_length, is_unique) VALUES ($1, $2, 'text', 100, $3)")
        .bind(module)
        .bind(api_name)
        .bind(unique)
        .execute(crm.pool())
        .await
        .unwrap();
}

/// A `conversion_mappings` row (the trigger checks it).
async fn mapping(crm: &Crm, lead_field: &str, target_module: &str, target_field: &str) {
    sqlx::query("INSERT INTO conversion_mappings (lead_field, target_module, target_field) VALUES ($1, $2, $3)")
        .bind(lead_field)
        .bind(target_module)
        .bind(target_field)
        .execute(crm.pool())
        .await
        .unwrap();
}

async fn row(crm: &Crm, table: &str, id: i64) -> Record {
    crm.row(table, id).await.unwrap_or_else(|| panic!("{table} {id} exists"))
}

fn id_of(r: &Record, field: &str) -> Option<i64> {
    r.get(field).and_then(Value::as_i64)
}

async fn contacts(crm: &Crm) -> i64 {
    crm.count("SELECT count(*) FROM contacts").await
}

async fn accounts(crm: &Crm) -> i64 {
    crm.count("SELECT count(*) FROM accounts").await
}

fn converted(r: &LeadResult) {
    assert_eq!(r.outcome, "converted", "{r:?}");
    assert_eq!(r.error_code, None, "{r:?}");
}

// ---------------------------------------------------------------------------
// Rule 1: guard.

// SPEC §3.1: a lead whose converted_at got set after its job was created
// (converted elsewhere) is skipped, already_converted, and nothing is merged
// or created, although a contact with its e-mail exists.
#[tokio::test]
async fn rule1_already_converted_lead_is_skipped_and_nothing_is_written() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let existing = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "phone": "999",
                     "company": "Acme", "lead_status": "Qualified"}))
        .await;
    let job_id = new_job(&crm, rep, &[lead]).await;
    let settings = settings_of(&crm, job_id).await;
    exec(
        &crm,
        &format!("UPDATE leads SET converted_at = '2025-03-01T10:00:00Z', lead_status = 'Converted' WHERE id = {lead}"),
    )
    .await;
    let lead_before = row(&crm, "leads", lead).await;
    let contact_before = row(&crm, "contacts", existing).await;

    let r = convert::convert_lead(crm.pool(), job_id, &settings, lead).await.expect("conversion runs");
    assert_eq!(r.outcome, "skipped", "{r:?}");
    assert_eq!(r.error_code.as_deref(), Some("already_converted"));
    assert_eq!((r.contact_id, r.account_id), (None, None));

    assert_eq!(row(&crm, "leads", lead).await, lead_before, "the converted lead is not touched");
    assert_eq!(row(&crm, "contacts", existing).await, contact_before, "no merge into the contact");
    assert_eq!((contacts(&crm).await, accounts(&crm).await), (1, 0));
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 0);
    let job = job_row(&crm, job_id).await;
    assert_eq!((job.converted_count, job.skipped_count, job.merged_count), (0, 1, 0));
    let stored: (String, String) =
        sqlx::query_as("SELECT outcome, error_code FROM conversion_results WHERE job_id = $1 AND lead_id = $2")
            .bind(job_id)
            .bind(lead)
            .fetch_one(crm.pool())
            .await
            .unwrap();
    assert_eq!(stored, ("skipped".to_owned(), "already_converted".to_owned()));
}

// SPEC §3.1: a lead deleted after its job was created is skipped, not_found.
#[tokio::test]
async fn rule1_lead_deleted_after_job_creation_is_skipped_not_found() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead =
        crm.lead(json!({"owner_id": rep, "last_name": "Gone", "company": "Gone Ltd", "email": "gone@x.pl"})).await;
    let job_id = new_job(&crm, rep, &[lead]).await;
    let settings = settings_of(&crm, job_id).await;
    exec(&crm, &format!("DELETE FROM leads WHERE id = {lead}")).await;

    let r = convert::convert_lead(crm.pool(), job_id, &settings, lead).await.expect("conversion runs");
    assert_eq!(r.outcome, "skipped", "{r:?}");
    assert_eq!(r.error_code.as_deref(), Some("not_found"));
    assert_eq!((contacts(&crm).await, accounts(&crm).await), (0, 0));
    let job = job_row(&crm, job_id).await;
    assert_eq!((job.total_count, job.converted_count, job.skipped_count, job.failed_count), (1, 0, 1, 0));
    assert_eq!(job.status, "completed");
    assert_eq!(convert::results(crm.pool(), job_id).await.unwrap(), vec![r]);
}

// SPEC §3.1: two jobs over one lead, run one after the other: the second
// reports already_converted and creates nothing more.
#[tokio::test]
async fn rule1_second_job_for_a_converted_lead_reports_already_converted() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead =
        crm.lead(json!({"owner_id": rep, "last_name": "Twice", "company": "Twice Co", "email": "twice@x.pl"})).await;
    let (job1, job2) = (new_job(&crm, rep, &[lead]).await, new_job(&crm, rep, &[lead]).await);
    let (s1, s2) = (settings_of(&crm, job1).await, settings_of(&crm, job2).await);

    let first = convert::convert_lead(crm.pool(), job1, &s1, lead).await.unwrap();
    converted(&first);
    let lead_after_first = row(&crm, "leads", lead).await;
    assert_eq!(id_of(&lead_after_first, "converted_contact_id"), first.contact_id);
    let counts = (contacts(&crm).await, accounts(&crm).await);
    assert_eq!(counts, (1, 1));

    let second = convert::convert_lead(crm.pool(), job2, &s2, lead).await.unwrap();
    assert_eq!(second.outcome, "skipped", "{second:?}");
    assert_eq!(second.error_code.as_deref(), Some("already_converted"));
    assert_eq!((contacts(&crm).await, accounts(&crm).await), counts);
    assert_eq!(row(&crm, "leads", lead).await, lead_after_first, "the first conversion stands");
    let (j1, j2) = (job_row(&crm, job1).await, job_row(&crm, job2).await);
    assert_eq!((j1.converted_count, j1.skipped_count), (1, 0));
    assert_eq!((j2.converted_count, j2.skipped_count), (0, 1));
}

// SPEC §3.1 (and §7): two jobs over one lead, converted at the same time:
// exactly one converts it, the other finds it already converted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rule1_concurrent_conversions_of_one_lead_convert_it_once() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    // A few rounds: a race that is lost only sometimes still shows up.
    for round in 0..5 {
        let email = format!("race{round}@example.com");
        let company = format!("Race Co {round}");
        let lead = crm
            .lead(json!({"owner_id": rep, "last_name": format!("Race{round}"), "email": email, "company": company}))
            .await;
        let jobs = [new_job(&crm, rep, &[lead]).await, new_job(&crm, rep, &[lead]).await];
        let barrier = Arc::new(Barrier::new(2));
        let mut handles = Vec::new();
        for job_id in jobs {
            let settings = settings_of(&crm, job_id).await;
            let pool = crm.pool().clone();
            let barrier = barrier.clone();
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                convert::convert_lead(&pool, job_id, &settings, lead).await.expect("conversion runs")
            }));
        }
        let (second, first) = (handles.pop().unwrap(), handles.pop().unwrap());
        let (a, b) = tokio::join!(first, second);
        let (a, b) = (a.unwrap(), b.unwrap());

        let (won, lost) = if a.outcome == "converted" { (&a, &b) } else { (&b, &a) };
        converted(won);
        assert_eq!(lost.outcome, "skipped", "round {round}: {a:?} / {b:?}");
        assert_eq!(lost.error_code.as_deref(), Some("already_converted"));
        assert_eq!(lost.contact_id, None);

        let n_contacts = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM contacts WHERE email = $1")
            .bind(&email)
            .fetch_one(crm.pool());
        let n_accounts = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM accounts WHERE account_name = $1")
            .bind(&company)
            .fetch_one(crm.pool());
        assert_eq!((n_contacts.await.unwrap(), n_accounts.await.unwrap()), (1, 1), "round {round}");
        let l = row(&crm, "leads", lead).await;
        assert_eq!(id_of(&l, "converted_contact_id"), won.contact_id);
        let won_job = job_row(&crm, won.job_id).await;
        let lost_job = job_row(&crm, lost.job_id).await;
        assert_eq!((won_job.converted_count, won_job.skipped_count), (1, 0));
        assert_eq!((lost_job.converted_count, lost_job.skipped_count), (0, 1));
    }
}

// SPEC §3.1 / §4: calling convert_lead again for the same job and lead (a
// redelivered message) returns the recorded result and counts nothing twice.
#[tokio::test]
async fn rule1_converting_again_in_the_same_job_returns_the_recorded_result() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Again", "email": "again@x.pl"})).await;
    let lead =
        crm.lead(json!({"owner_id": rep, "last_name": "Again", "company": "Again Co", "email": "again@x.pl"})).await;
    let job_id = new_job(&crm, rep, &[lead]).await;
    let settings = settings_of(&crm, job_id).await;

    let first = convert::convert_lead(crm.pool(), job_id, &settings, lead).await.unwrap();
    converted(&first);
    assert_eq!(first.contact_action.map(|a| a.as_str()), Some("merged"));
    let second = convert::convert_lead(crm.pool(), job_id, &settings, lead).await.unwrap();
    assert_eq!(second, first, "the recorded result, attempts included");

    let job = job_row(&crm, job_id).await;
    assert_eq!((job.total_count, job.converted_count, job.merged_count, job.skipped_count), (1, 1, 1, 0));
    assert_eq!((contacts(&crm).await, accounts(&crm).await), (1, 1));
}

// ---------------------------------------------------------------------------
// Rule 2: who acts.

async fn assert_refused_without_trace(crm: &Crm, requested_by: i64, lead: i64, code: ErrorCode) {
    let err = job::create_for_leads(crm.pool(), requested_by, Trigger::Manual, &json!({}), &[lead])
        .await
        .expect_err("the job is refused");
    let Error::Refused(r) = err else { panic!("expected a refusal, got {err:?}") };
    assert_eq!(r.code, code, "{r:?}");
    assert_eq!(r.field, "requested_by");
    assert!(r.message.contains(&requested_by.to_string()), "the message names the user: {}", r.message);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results").await, 0);
    assert!(row(crm, "leads", lead).await["converted_at"].is_null());
}

// SPEC §3.2: an inactive requester is refused at job creation.
#[tokio::test]
async fn rule2_inactive_requester_is_refused() {
    let crm = Crm::new().await;
    let gone = crm.user("Former rep", json!({"active": false, "can_convert": true})).await;
    let lead = crm.lead(json!({"owner_id": gone, "last_name": "Kowalski"})).await;
    assert_refused_without_trace(&crm, gone, lead, ErrorCode::RequesterCannotConvert).await;
}

// SPEC §3.2: a requester without can_convert is refused at job creation.
#[tokio::test]
async fn rule2_requester_without_can_convert_is_refused() {
    let crm = Crm::new().await;
    let viewer = crm.user("Viewer", json!({"can_convert": false})).await;
    let lead = crm.lead(json!({"owner_id": viewer, "last_name": "Kowalski"})).await;
    assert_refused_without_trace(&crm, viewer, lead, ErrorCode::RequesterCannotConvert).await;
    // The same user with the right gets the job: the flag made the difference.
    exec(&crm, &format!("UPDATE users SET can_convert = true WHERE id = {viewer}")).await;
    new_job(&crm, viewer, &[lead]).await;
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 1);
}

// SPEC §3.2: a requester that does not exist is refused at job creation.
#[tokio::test]
async fn rule2_missing_requester_is_refused() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski"})).await;
    assert_refused_without_trace(&crm, rep + 1000, lead, ErrorCode::RequesterNotFound).await;
}

// ---------------------------------------------------------------------------
// Rule 3: matching order.

// SPEC §3.3.1: a contact matched by a unique custom field wins over an
// (older) contact with the lead's e-mail.
#[tokio::test]
async fn rule3_unique_contact_field_beats_email() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    custom_field(&crm, "lead", "ext_id", false).await;
    custom_field(&crm, "contact", "ext_id", true).await;
    mapping(&crm, "ext_id", "contact", "ext_id").await;
    let by_email = crm
        .contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "created_at": "2020-01-01T00:00:00Z"}))
        .await;
    let by_unique =
        crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "a.nowak@other.pl", "custom_fields": {"ext_id": "X-1"}})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "title": "CTO",
                     "custom_fields": {"ext_id": "X-1"}}))
        .await;

    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!(r.contact_action.map(|a| a.as_str()), Some("merged"));
    assert_eq!(r.contact_id, Some(by_unique));
    assert_eq!(row(&crm, "contacts", by_unique).await["title"], "CTO");
    assert!(row(&crm, "contacts", by_email).await["title"].is_null(), "the e-mail match is left alone");
    assert_eq!(contacts(&crm).await, 2);
}

// SPEC §3.3.1 contrast: the same field without is_unique does not match;
// the e-mail rule picks the contact.
#[tokio::test]
async fn rule3_custom_field_that_is_not_unique_does_not_match() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    custom_field(&crm, "lead", "ext_id", false).await;
    custom_field(&crm, "contact", "ext_id", false).await;
    mapping(&crm, "ext_id", "contact", "ext_id").await;
    let by_email = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    crm.contact(
        json!({"owner_id": rep, "last_name": "Nowak", "email": "a.nowak@other.pl", "custom_fields": {"ext_id": "X-1"}}),
    )
    .await;
    let lead = crm
        .lead(
            json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "custom_fields": {"ext_id": "X-1"}}),
        )
        .await;
    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!(r.contact_id, Some(by_email));
}

// SPEC §3.3.1: an account unique field picks the account, over an account
// whose name equals the lead's company.
#[tokio::test]
async fn rule3_unique_account_field_picks_the_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    custom_field(&crm, "lead", "tax_id", false).await;
    custom_field(&crm, "account", "tax_id", true).await;
    mapping(&crm, "tax_id", "account", "tax_id").await;
    let by_name =
        crm.account(json!({"owner_id": rep, "account_name": "Acme", "created_at": "2020-01-01T00:00:00Z"})).await;
    let by_tax = crm
        .account(json!({"owner_id": rep, "account_name": "Acme Holding S.A.", "custom_fields": {"tax_id": "PL123"}}))
        .await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme", "industry": "Retail",
                     "custom_fields": {"tax_id": "PL123"}}))
        .await;

    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!(r.account_action.map(|a| a.as_str()), Some("matched"));
    assert_eq!(r.account_id, Some(by_tax));
    assert_eq!(accounts(&crm).await, 2);
    assert_eq!(row(&crm, "accounts", by_tax).await["industry"], "Retail");
    assert!(row(&crm, "accounts", by_name).await["industry"].is_null());
    let c = row(&crm, "contacts", r.contact_id.unwrap()).await;
    assert_eq!(id_of(&c, "account_id"), Some(by_tax));
    assert_eq!(id_of(&row(&crm, "leads", lead).await, "converted_account_id"), Some(by_tax));
}

// SPEC §3.3.2: e-mails are compared trimmed and case-insensitively, on
// both sides (the lead's e-mail, and a contact's as stored).
#[tokio::test]
async fn rule3_email_match_is_trimmed_and_case_insensitive() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let anna = crm
        .contact(json!({"owner_id": rep, "first_name": "Anna", "last_name": "Nowak", "email": "anna@acme.pl"}))
        .await;
    let jan = crm
        .contact(json!({"owner_id": rep, "first_name": "Jan", "last_name": "Kowalski", "email": " Jan@Globex.PL  "}))
        .await;
    let padded_lead = crm
        .lead(json!({"owner_id": rep, "first_name": "Anna", "last_name": "Nowak", "email": "  ANNA@Acme.PL "}))
        .await;
    let plain_lead = crm
        .lead(json!({"owner_id": rep, "first_name": "Jan", "last_name": "Kowalski", "email": "jan@globex.pl"}))
        .await;

    let (_, results) = crm.convert_all(rep, json!({}), &[padded_lead, plain_lead]).await;
    for (r, (contact, lead)) in results.iter().zip([(anna, padded_lead), (jan, plain_lead)]) {
        converted(r);
        assert_eq!(r.contact_action.map(|a| a.as_str()), Some("merged"), "{r:?}");
        assert_eq!(r.contact_id, Some(contact));
        assert_eq!(id_of(&row(&crm, "leads", lead).await, "converted_contact_id"), Some(contact));
    }
    assert_eq!(contacts(&crm).await, 2);
    assert_eq!(row(&crm, "contacts", anna).await["email"], "anna@acme.pl", "the contact's e-mail is kept");
    assert_eq!(row(&crm, "contacts", jan).await["email"], " Jan@Globex.PL  ");
}

// SPEC §3.3.2 under concurrency (§7): two different leads with one e-mail,
// in two jobs converted at the same time: the second one to run must see
// the contact the first one created and merge into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rule3_concurrent_leads_with_one_email_make_one_contact() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    for round in 0..5 {
        let email = format!("twin{round}@example.com");
        let company = format!("Twin Co {round}");
        let mut tasks = Vec::new();
        for variant in [email.clone(), format!(" {} ", email.to_uppercase())] {
            let lead =
                crm.lead(json!({"owner_id": rep, "last_name": "Twin", "email": variant, "company": company})).await;
            let job_id = new_job(&crm, rep, &[lead]).await;
            tasks.push((job_id, settings_of(&crm, job_id).await, lead));
        }
        let barrier = Arc::new(Barrier::new(tasks.len()));
        let handles: Vec<_> = tasks
            .into_iter()
            .map(|(job_id, settings, lead)| {
                let (pool, barrier) = (crm.pool().clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    convert::convert_lead(&pool, job_id, &settings, lead).await.expect("conversion runs")
                })
            })
            .collect();
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.unwrap());
        }
        let mut actions: Vec<_> = results
            .iter()
            .map(|r| (r.contact_action.map(|a| a.as_str()), r.account_action.map(|a| a.as_str())))
            .collect();
        actions.sort();
        let (c, m) = (Some("created"), Some("merged"));
        assert_eq!(actions, [(c, c), (m, Some("matched"))], "round {round}: {results:?}");
        assert_eq!(results[0].contact_id, results[1].contact_id);
        assert_eq!(results[0].account_id, results[1].account_id);
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts WHERE leadconv_norm_email(email) = $1")
            .bind(&email)
            .fetch_one(crm.pool())
            .await
            .unwrap();
        assert_eq!(n, 1, "round {round}: one contact for one e-mail");
    }
    assert_eq!(accounts(&crm).await, 5, "one account per company");
}

// SPEC §3.3.2: several contacts with the e-mail: the oldest by created_at,
// which here is not the one with the lowest id.
#[tokio::test]
async fn rule3_oldest_contact_with_the_email_wins() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let newer = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let older = crm
        .contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "Anna@Acme.pl", "created_at": "2019-05-01T08:00:00Z"}))
        .await;
    assert!(older > newer, "id order and age order differ");
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "title": "CEO"})).await;

    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!(r.contact_id, Some(older));
    assert_eq!(row(&crm, "contacts", older).await["title"], "CEO");
    assert!(row(&crm, "contacts", newer).await["title"].is_null());
    assert_eq!(contacts(&crm).await, 2);
}

// SPEC §3.3.2 / §3.4: a lead without e-mail never matches by e-mail, not even
// contacts whose e-mail is NULL or empty; it gets a new contact.
#[tokio::test]
async fn rule3_lead_without_email_never_matches() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let null_email = crm.contact(json!({"owner_id": rep, "last_name": "Nowak"})).await;
    let empty_email = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": ""})).await;
    let blank_email = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "   "})).await;
    let no_email = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "title": "A"})).await;
    let empty = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "", "title": "B"})).await;
    let blank = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "  ", "title": "C"})).await;

    let (_, results) = crm.convert_all(rep, json!({}), &[no_email, empty, blank]).await;
    let mut new_ids = Vec::new();
    for r in &results {
        converted(r);
        assert_eq!(r.contact_action.map(|a| a.as_str()), Some("created"), "{r:?}");
        let id = r.contact_id.unwrap();
        assert!(![null_email, empty_email, blank_email].contains(&id));
        new_ids.push(id);
    }
    new_ids.sort_unstable();
    new_ids.dedup();
    assert_eq!(new_ids.len(), 3, "one new contact per lead: {results:?}");
    assert_eq!(contacts(&crm).await, 6);
    for existing in [null_email, empty_email, blank_email] {
        assert!(row(&crm, "contacts", existing).await["title"].is_null());
    }
}

// SPEC §3.3.3: company names are compared trimmed, case-insensitively, with
// inner white space collapsed; a longer name is not the same company.
#[tokio::test]
async fn rule3_company_match_is_normalised() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let acme = crm.account(json!({"owner_id": rep, "account_name": "Acme Sp. z o.o."})).await;
    crm.account(json!({"owner_id": rep, "account_name": "Globex Holding"})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "  ACME   sp. z o.o. ", "industry": "IT"}))
        .await;
    let other = crm.lead(json!({"owner_id": rep, "last_name": "Kowal", "company": "Globex"})).await;

    let (_, results) = crm.convert_all(rep, json!({}), &[lead, other]).await;
    converted(&results[0]);
    assert_eq!(results[0].account_action.map(|a| a.as_str()), Some("matched"));
    assert_eq!(results[0].account_id, Some(acme));
    let a = row(&crm, "accounts", acme).await;
    assert_eq!(a["account_name"], "Acme Sp. z o.o.", "the name is kept");
    assert_eq!(a["industry"], "IT");
    converted(&results[1]);
    assert_eq!(results[1].account_action.map(|a| a.as_str()), Some("created"), "Globex is not Globex Holding");
    assert_eq!(accounts(&crm).await, 3);
}

// SPEC §3.3.3 with Polish, Vietnamese and Chinese companies differing only by
// case (or not at all), and non-ASCII person names stored as given.
#[tokio::test]
async fn rule3_non_ascii_companies_match_and_names_are_kept() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let cases = [
        ("łódzka firma", "ŁÓDZKA FIRMA", "Łucja", "Żółkiewska-Wiśniewska"),
        ("công ty sao mai", "CÔNG TY SAO MAI", "Thị Minh Khai", "Nguyễn"),
        ("北京星辰科技有限公司", "北京星辰科技有限公司", "小明", "王"),
    ];
    let mut expected = Vec::new();
    for (account_name, company, first, last) in cases {
        let account = crm.account(json!({"owner_id": rep, "account_name": account_name})).await;
        let lead = crm.lead(json!({"owner_id": rep, "first_name": first, "last_name": last, "company": company})).await;
        expected.push((account, lead, account_name, first, last));
    }
    let leads: Vec<i64> = expected.iter().map(|e| e.1).collect();
    let (_, results) = crm.convert_all(rep, json!({}), &leads).await;

    for ((account, _, account_name, first, last), r) in expected.iter().zip(&results) {
        converted(r);
        assert_eq!(r.account_action.map(|a| a.as_str()), Some("matched"), "{account_name}: {r:?}");
        assert_eq!(r.account_id, Some(*account), "{account_name}");
        assert_eq!(row(&crm, "accounts", *account).await["account_name"], *account_name);
        let c = row(&crm, "contacts", r.contact_id.unwrap()).await;
        assert_eq!((c["first_name"].as_str(), c["last_name"].as_str()), (Some(*first), Some(*last)));
        assert_eq!(id_of(&c, "account_id"), Some(*account));
    }
    assert_eq!(accounts(&crm).await, 3, "no account created for a case-only difference");
    // Read back by SQL too: what another system sees.
    let names: Vec<String> = sqlx::query_scalar("SELECT first_name || ' ' || last_name FROM contacts ORDER BY id")
        .fetch_all(crm.pool())
        .await
        .unwrap();
    assert_eq!(names, ["Łucja Żółkiewska-Wiśniewska", "Thị Minh Khai Nguyễn", "小明 王"]);
}

// SPEC §3.3.3: the matched contact's own account comes before a company
// match; the account named like the company is left alone.
#[tokio::test]
async fn rule3_matched_contacts_own_account_beats_company_match() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let own = crm.account(json!({"owner_id": rep, "account_name": "Nowak Consulting"})).await;
    let named = crm.account(json!({"owner_id": rep, "account_name": "Acme"})).await;
    let anna =
        crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "account_id": own})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "company": "Acme", "industry": "IT"})).await;

    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!((r.contact_id, r.account_id), (Some(anna), Some(own)));
    assert_eq!(r.account_action.map(|a| a.as_str()), Some("matched"));
    assert_eq!(
        id_of(&row(&crm, "contacts", anna).await, "account_id"),
        Some(own),
        "the contact stays with its account"
    );
    assert!(row(&crm, "accounts", named).await["industry"].is_null(), "the company match is not used");
    // SPEC §3.5: the contact's own account is another company than the
    // lead's, so it is linked but not filled with the lead's company data.
    assert!(row(&crm, "accounts", own).await["industry"].is_null());
    assert_eq!(id_of(&row(&crm, "leads", lead).await, "converted_account_id"), Some(own));
    assert_eq!(accounts(&crm).await, 2);
}

// ---------------------------------------------------------------------------
// Rule 4: contact merge.

// SPEC §3.4: merging fills only the contact's empty fields (standard and
// custom), overwrites nothing, keeps the contact's owner; counted as merged.
#[tokio::test]
async fn rule4_merge_fills_only_empty_fields_and_keeps_the_owner() {
    let crm = Crm::new().await;
    let contact_owner = crm.user("Contact owner", json!({})).await;
    let lead_owner = crm.user("Lead owner", json!({})).await;
    custom_field(&crm, "lead", "segment", false).await;
    custom_field(&crm, "lead", "region", false).await;
    custom_field(&crm, "contact", "segment", false).await;
    custom_field(&crm, "contact", "region", false).await;
    mapping(&crm, "segment", "contact", "segment").await;
    mapping(&crm, "region", "contact", "region").await;
    let anna = crm
        .contact(json!({"owner_id": contact_owner, "first_name": "Anna", "last_name": "Nowak", "email": "anna@acme.pl",
                        "phone": "111", "city": "", "title": null, "custom_fields": {"segment": "SMB"}}))
        .await;
    let lead = crm
        .lead(
            json!({"owner_id": lead_owner, "first_name": "Ania", "last_name": "Nowak-Kowalska", "email": "anna@acme.pl",
                     "phone": "999", "city": "Kraków", "title": "CFO", "mobile": "+48 600 000 000",
                     "custom_fields": {"segment": "Enterprise", "region": "EMEA"}}),
        )
        .await;

    let (job_id, results) = crm.convert_all(contact_owner, json!({}), &[lead]).await;
    let r = &results[0];
    converted(r);
    assert_eq!(r.contact_action.map(|a| a.as_str()), Some("merged"));
    assert_eq!(r.contact_id, Some(anna));
    assert_eq!(contacts(&crm).await, 1);

    let c = row(&crm, "contacts", anna).await;
    // Filled values are kept.
    assert_eq!(c["first_name"], "Anna");
    assert_eq!(c["last_name"], "Nowak");
    assert_eq!(c["phone"], "111");
    // Empty ones (NULL or blank) are filled from the lead.
    assert_eq!(c["title"], "CFO");
    assert_eq!(c["city"], "Kraków");
    assert_eq!(c["mobile"], "+48 600 000 000");
    assert_eq!(c["custom_fields"], json!({"segment": "SMB", "region": "EMEA"}));
    assert_eq!(id_of(&c, "owner_id"), Some(contact_owner), "the contact keeps its owner");

    let job = job_row(&crm, job_id).await;
    assert_eq!((job.converted_count, job.merged_count), (1, 1));
    assert_eq!(id_of(&row(&crm, "leads", lead).await, "converted_contact_id"), Some(anna));
}

// SPEC §3.4 contrast: a lead that matches nothing creates a contact, and the
// job's merged_count stays 0.
#[tokio::test]
async fn rule4_unmatched_lead_creates_a_contact_and_is_not_counted_as_merged() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let lead =
        crm.lead(json!({"owner_id": rep, "first_name": "Jan", "last_name": "Kowalski", "email": "jan@acme.pl"})).await;
    let (job_id, results) = crm.convert_all(rep, json!({}), &[lead]).await;
    converted(&results[0]);
    assert_eq!(results[0].contact_action.map(|a| a.as_str()), Some("created"));
    let c = row(&crm, "contacts", results[0].contact_id.unwrap()).await;
    assert_eq!((c["first_name"].as_str(), c["email"].as_str()), (Some("Jan"), Some("jan@acme.pl")));
    assert_eq!(id_of(&c, "owner_id"), Some(rep));
    let job = job_row(&crm, job_id).await;
    assert_eq!((job.converted_count, job.merged_count), (1, 0));
    assert_eq!(contacts(&crm).await, 2);
}

// ---------------------------------------------------------------------------
// Rule 5: account.

// SPEC §3.5: no company (missing or blank), no account: account_action none.
#[tokio::test]
async fn rule5_no_company_no_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let without = crm.lead(json!({"owner_id": rep, "last_name": "Solo", "email": "solo@x.pl", "industry": "IT"})).await;
    let blank = crm.lead(json!({"owner_id": rep, "last_name": "Blank", "company": "   ", "phone": "123"})).await;

    let (_, results) = crm.convert_all(rep, json!({}), &[without, blank]).await;
    for (r, lead) in results.iter().zip([without, blank]) {
        converted(r);
        assert_eq!(r.account_action.map(|a| a.as_str()), Some("none"), "{r:?}");
        assert_eq!(r.account_id, None);
        let c = row(&crm, "contacts", r.contact_id.unwrap()).await;
        assert!(c["account_id"].is_null());
        let l = row(&crm, "leads", lead).await;
        assert!(l["converted_account_id"].is_null());
        assert_eq!(id_of(&l, "converted_contact_id"), r.contact_id);
    }
    assert_eq!(accounts(&crm).await, 0);
}

// SPEC §3.5: with a company and no match, an account is created from the
// lead and the new contact is linked to it.
#[tokio::test]
async fn rule5_new_contact_is_linked_to_the_new_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme", "industry": "IT", "website": "acme.pl",
                     "phone": "123", "no_of_employees": 50}))
        .await;
    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!(
        (r.contact_action.map(|a| a.as_str()), r.account_action.map(|a| a.as_str())),
        (Some("created"), Some("created"))
    );
    let account_id = r.account_id.expect("an account");
    let a = row(&crm, "accounts", account_id).await;
    assert_eq!(a["account_name"], "Acme");
    assert_eq!(
        (a["industry"].as_str(), a["website"].as_str(), a["phone"].as_str()),
        (Some("IT"), Some("acme.pl"), Some("123"))
    );
    assert_eq!(a["no_of_employees"].as_i64(), Some(50));
    assert_eq!(id_of(&a, "owner_id"), Some(rep));
    assert_eq!(id_of(&row(&crm, "contacts", r.contact_id.unwrap()).await, "account_id"), Some(account_id));
    assert_eq!(id_of(&row(&crm, "leads", lead).await, "converted_account_id"), Some(account_id));
    assert_eq!(accounts(&crm).await, 1);
}

// SPEC §3.5: a matched account gets only its empty fields filled, keeps its
// owner, and no new account is created.
#[tokio::test]
async fn rule5_matched_account_gets_only_empty_fields_filled() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let boss = crm.user("Boss", json!({})).await;
    exec(&crm, &format!("UPDATE users SET manager_id = {boss} WHERE id = {rep}")).await;
    let acme = crm
        .account(json!({"owner_id": rep, "account_name": "Acme", "phone": "111", "website": "", "city": "Gdańsk"}))
        .await;
    let lead = crm
        .lead(json!({"owner_id": boss, "last_name": "Nowak", "company": "acme", "phone": "999", "website": "acme.pl",
                     "industry": "IT", "city": "Poznań"}))
        .await;
    // The boss converts their own lead into their report's account.
    let r = crm.convert(boss, json!({}), lead).await;
    converted(&r);
    assert_eq!(r.account_action.map(|a| a.as_str()), Some("matched"));
    assert_eq!(r.account_id, Some(acme));
    let a = row(&crm, "accounts", acme).await;
    assert_eq!(
        (a["account_name"].as_str(), a["phone"].as_str(), a["city"].as_str()),
        (Some("Acme"), Some("111"), Some("Gdańsk"))
    );
    assert_eq!((a["website"].as_str(), a["industry"].as_str()), (Some("acme.pl"), Some("IT")));
    assert_eq!(id_of(&a, "owner_id"), Some(rep), "the account keeps its owner");
    assert_eq!(accounts(&crm).await, 1);
    assert_eq!(id_of(&row(&crm, "contacts", r.contact_id.unwrap()).await, "account_id"), Some(acme));
}

// SPEC §3.5: a merged contact without an account is linked to the account
// (created here, and matched by company in a second case).
#[tokio::test]
async fn rule5_merged_contact_without_account_gets_linked() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let anna = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let jan = crm.contact(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@globex.pl"})).await;
    let globex = crm.account(json!({"owner_id": rep, "account_name": "Globex"})).await;
    let lead_new =
        crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "company": "Acme"})).await;
    let lead_matched = crm
        .lead(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@globex.pl", "company": "GLOBEX"}))
        .await;

    let (_, results) = crm.convert_all(rep, json!({}), &[lead_new, lead_matched]).await;
    let (r1, r2) = (&results[0], &results[1]);
    converted(r1);
    assert_eq!(
        (r1.contact_action.map(|a| a.as_str()), r1.account_action.map(|a| a.as_str())),
        (Some("merged"), Some("created"))
    );
    assert_eq!(r1.contact_id, Some(anna));
    assert_eq!(id_of(&row(&crm, "contacts", anna).await, "account_id"), r1.account_id);
    assert_eq!(row(&crm, "accounts", r1.account_id.unwrap()).await["account_name"], "Acme");

    converted(r2);
    assert_eq!(
        (r2.contact_action.map(|a| a.as_str()), r2.account_action.map(|a| a.as_str())),
        (Some("merged"), Some("matched"))
    );
    assert_eq!((r2.contact_id, r2.account_id), (Some(jan), Some(globex)));
    assert_eq!(id_of(&row(&crm, "contacts", jan).await, "account_id"), Some(globex));
    assert_eq!((contacts(&crm).await, accounts(&crm).await), (2, 2));
}

// ---------------------------------------------------------------------------
// Rule 6: read-only merge.

/// A contact and an account owned by `owner`, with empty fields the lead
/// could fill, and a lead of `lead_owner` matching both.
async fn read_only_case(crm: &Crm, owner: i64, lead_owner: i64) -> (i64, i64, i64) {
    let account = crm.account(json!({"owner_id": owner, "account_name": "Acme"})).await;
    let contact = crm.contact(json!({"owner_id": owner, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let lead = crm
        .lead(json!({"owner_id": lead_owner, "last_name": "Nowak", "email": "anna@acme.pl", "company": "Acme",
                     "phone": "999", "title": "CFO", "industry": "IT", "website": "acme.pl", "tags": ["expo"]}))
        .await;
    (contact, account, lead)
}

// SPEC §3.6: a peer (same manager, not admin) converts into another rep's
// contact and account: converted and linked, but nothing of them is filled.
#[tokio::test]
async fn rule6_peer_converts_and_links_without_filling() {
    let crm = Crm::new().await;
    let manager = crm.user("Manager", json!({})).await;
    let owner = crm.user("Owner", json!({"manager_id": manager})).await;
    let peer = crm.user("Peer", json!({"manager_id": manager})).await;
    let (contact, account, lead) = read_only_case(&crm, owner, peer).await;
    let contact_before = row(&crm, "contacts", contact).await;
    let account_before = row(&crm, "accounts", account).await;

    let r = crm.convert(peer, json!({}), lead).await;
    converted(&r);
    assert_eq!(
        (r.contact_action.map(|a| a.as_str()), r.account_action.map(|a| a.as_str())),
        (Some("merged"), Some("matched"))
    );
    assert_eq!((r.contact_id, r.account_id), (Some(contact), Some(account)));
    let l = row(&crm, "leads", lead).await;
    assert_eq!(id_of(&l, "converted_contact_id"), Some(contact));
    assert_eq!(id_of(&l, "converted_account_id"), Some(account));
    assert_eq!(l["lead_status"], "Converted");
    // Not a field of either record changed (phone, title, industry, tags),
    // but the contact, which had no account, is linked to the account its
    // deal would point to (SPEC §3.5: also in a read-only merge).
    let mut contact_after = row(&crm, "contacts", contact).await;
    assert_eq!(id_of(&contact_after, "account_id"), Some(account));
    for k in ["account_id", "updated_at"] {
        contact_after.insert(k.into(), contact_before[k].clone());
    }
    assert_eq!(contact_after, contact_before);
    assert_eq!(row(&crm, "accounts", account).await, account_before);
    assert_eq!((contacts(&crm).await, accounts(&crm).await), (1, 1));
}

// SPEC §3.6: the record's owner's manager is above it, not the other way
// round: a rep converting into their manager's contact may not fill it.
#[tokio::test]
async fn rule6_record_of_own_manager_is_read_only() {
    let crm = Crm::new().await;
    let manager = crm.user("Manager", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": manager})).await;
    let (contact, account, lead) = read_only_case(&crm, manager, rep).await;

    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!((r.contact_id, r.account_id), (Some(contact), Some(account)));
    let c = row(&crm, "contacts", contact).await;
    assert!(c["phone"].is_null() && c["title"].is_null(), "{c:?}");
    assert_eq!(id_of(&c, "account_id"), Some(account), "linked, as the deal is (SPEC §3.5)");
    assert!(row(&crm, "accounts", account).await["industry"].is_null());
}

// SPEC §3.6 contrast: the owner's manager, and the manager's manager, are
// above the owner and do fill.
#[tokio::test]
async fn rule6_users_above_the_owner_fill_the_record() {
    for levels_up in [1, 2] {
        let crm = Crm::new().await;
        let director = crm.user("Director", json!({})).await;
        let manager = crm.user("Manager", json!({"manager_id": director})).await;
        let owner = crm.user("Owner", json!({"manager_id": manager})).await;
        let acting = if levels_up == 1 { manager } else { director };
        let (contact, account, lead) = read_only_case(&crm, owner, acting).await;

        let r = crm.convert(acting, json!({}), lead).await;
        converted(&r);
        assert_eq!((r.contact_id, r.account_id), (Some(contact), Some(account)));
        let c = row(&crm, "contacts", contact).await;
        assert_eq!((c["phone"].as_str(), c["title"].as_str()), (Some("999"), Some("CFO")), "{levels_up} up");
        assert_eq!(id_of(&c, "account_id"), Some(account));
        assert_eq!(id_of(&c, "owner_id"), Some(owner));
        let a = row(&crm, "accounts", account).await;
        assert_eq!((a["industry"].as_str(), a["website"].as_str()), (Some("IT"), Some("acme.pl")));
    }
}

// SPEC §3.6 contrast: an admin outside the owner's hierarchy fills.
#[tokio::test]
async fn rule6_admin_fills_the_record() {
    let crm = Crm::new().await;
    let owner = crm.user("Owner", json!({})).await;
    let admin = crm.user("Admin", json!({"is_admin": true})).await;
    let (contact, account, lead) = read_only_case(&crm, owner, admin).await;

    let r = crm.convert(admin, json!({}), lead).await;
    converted(&r);
    let c = row(&crm, "contacts", contact).await;
    assert_eq!((c["phone"].as_str(), c["title"].as_str()), (Some("999"), Some("CFO")));
    assert_eq!(id_of(&c, "account_id"), Some(account));
    assert_eq!(id_of(&c, "owner_id"), Some(owner));
    assert_eq!(row(&crm, "accounts", account).await["industry"], "IT");
}

// ---------------------------------------------------------------------------
// Rule 7: hierarchy block.

// SPEC §3.7: the lead's owner is above the acting user (one or two levels)
// and a contact has the lead's e-mail: failed, blocked_by_hierarchy, nothing
// written.
#[tokio::test]
async fn rule7_lead_of_a_superior_with_an_email_duplicate_is_blocked() {
    for levels_up in [1, 2] {
        let crm = Crm::new().await;
        let director = crm.user("Director", json!({})).await;
        let manager = crm.user("Manager", json!({"manager_id": director})).await;
        let rep = crm.user("Rep", json!({"manager_id": manager})).await;
        let lead_owner = if levels_up == 1 { manager } else { director };
        let dup = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
        let lead = crm
            .lead(json!({"owner_id": lead_owner, "last_name": "Nowak", "email": " Anna@ACME.pl", "company": "Acme",
                         "phone": "999", "lead_status": "Qualified"}))
            .await;
        crm.insert("notes", json!({"parent_module": "lead", "parent_id": lead, "title": "call back"})).await;
        let lead_before = row(&crm, "leads", lead).await;
        let dup_before = row(&crm, "contacts", dup).await;

        let (job_id, results) = crm.convert_all(rep, json!({}), &[lead]).await;
        let r = &results[0];
        assert_eq!(r.outcome, "failed", "{levels_up} up: {r:?}");
        assert_eq!(r.error_code.as_deref(), Some("blocked_by_hierarchy"));
        assert!(r.error_message.as_deref().is_some_and(|m| !m.is_empty()));
        assert_eq!((r.contact_id, r.account_id, r.deal_id), (None, None, None));

        assert_eq!(row(&crm, "leads", lead).await, lead_before, "the lead is not converted");
        assert_eq!(row(&crm, "contacts", dup).await, dup_before, "the duplicate is not merged into");
        assert_eq!((contacts(&crm).await, accounts(&crm).await), (1, 0));
        assert_eq!(crm.count("SELECT count(*) FROM notes WHERE parent_module = 'lead'").await, 1);
        let job = job_row(&crm, job_id).await;
        assert_eq!((job.converted_count, job.failed_count, job.merged_count), (0, 1, 0));
    }
}

// SPEC §3.7 contrast: the same superior's lead without an e-mail duplicate
// converts.
#[tokio::test]
async fn rule7_lead_of_a_superior_without_duplicate_converts() {
    let crm = Crm::new().await;
    let manager = crm.user("Manager", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": manager})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "someone.else@acme.pl"})).await;
    let lead =
        crm.lead(json!({"owner_id": manager, "last_name": "Nowak", "email": "anna@acme.pl", "company": "Acme"})).await;

    let r = crm.convert(rep, json!({}), lead).await;
    converted(&r);
    assert_eq!(r.contact_action.map(|a| a.as_str()), Some("created"));
    assert!(!row(&crm, "leads", lead).await["converted_at"].is_null());
    assert_eq!(contacts(&crm).await, 2);
}

// SPEC §3.7 contrast: the block is about the lead's owner being above the
// acting user: a manager converting a report's lead, or a peer's lead, into
// a duplicate merges.
#[tokio::test]
async fn rule7_lead_of_a_subordinate_or_peer_with_duplicate_merges() {
    let crm = Crm::new().await;
    let manager = crm.user("Manager", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": manager})).await;
    let peer = crm.user("Peer", json!({"manager_id": manager})).await;
    let anna = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let jan = crm.contact(json!({"owner_id": peer, "last_name": "Kowalski", "email": "jan@acme.pl"})).await;
    let reports_lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let peers_lead = crm.lead(json!({"owner_id": peer, "last_name": "Kowalski", "email": "jan@acme.pl"})).await;

    let by_manager = crm.convert(manager, json!({}), reports_lead).await;
    converted(&by_manager);
    assert_eq!((by_manager.contact_action.map(|a| a.as_str()), by_manager.contact_id), (Some("merged"), Some(anna)));
    let by_peer = crm.convert(rep, json!({}), peers_lead).await;
    converted(&by_peer);
    assert_eq!((by_peer.contact_action.map(|a| a.as_str()), by_peer.contact_id), (Some("merged"), Some(jan)));
    assert_eq!(contacts(&crm).await, 2);
}
