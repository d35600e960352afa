//! Batched conversion (issue 10, SPEC §3 "several leads in one
//! transaction"): a batch converts as one transaction, its leads see what
//! earlier ones of the batch make, a bad lead fails alone, concurrent
//! batches never make a record twice, and a worker killed between a
//! batch's commit and its acks converts nothing twice.

mod common;

use std::time::Duration;

use common::broker::{amqp_url, wait_for, TestBroker};
use common::proxy::Proxy;
use common::*;
use leadconv::store::apply;
use leadconv::store::convert::{self, Item, LeadResult};
use leadconv::store::job::{self, Trigger};
use serde_json::{json, Value};
use uuid::Uuid;

fn items(leads: &[i64]) -> Vec<Item> {
    leads.iter().map(|&lead_id| Item { lead_id, enqueued_at: None, earlier_attempts: 0 }).collect()
}

async fn batch(crm: &Crm, job_id: Uuid, leads: &[i64]) -> Vec<LeadResult> {
    let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    let settings = job::settings(crm.pool(), &job).await.unwrap();
    let results = convert::convert_batch(crm.pool(), job_id, &settings, &items(leads)).await.expect("batch runs");
    results.into_iter().map(|r| r.expect("a result per lead")).collect()
}

/// When each lead's result was recorded: `now()`, the time its transaction
/// started.
async fn finished_at(crm: &Crm, job_id: Uuid, leads: &[i64]) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT finished_at::text FROM conversion_results WHERE job_id = $1 AND lead_id = ANY($2) ORDER BY lead_id",
    )
    .bind(job_id)
    .bind(leads)
    .fetch_all(crm.pool())
    .await
    .unwrap()
}

// The defaults a batch gives new records match the schema's, so a record
// made in a batch is the record an INSERT with only the plan's values makes;
// and each writable column is of the kind the batch takes it for, so a row
// it does not read back is stored as written.
#[tokio::test]
async fn new_records_get_the_schema_defaults() {
    let crm = Crm::new().await;
    let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, column_default::text, udt_name::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name IN ('accounts', 'contacts', 'deals')",
    )
    .fetch_all(crm.pool())
    .await
    .unwrap();
    let mut problems = Vec::new();
    for module in [leadconv::record::Module::Account, leadconv::record::Module::Contact, leadconv::record::Module::Deal]
    {
        let (table, columns) = apply::writable_columns(module);
        for column in columns {
            let found = rows.iter().find(|(t, c, _, _)| t == table && c == column);
            let Some((_, _, default, udt)) = found.cloned() else {
                problems.push(format!("{table}.{column} is not in the schema"));
                continue;
            };
            // What a batch takes to read back as written (`apply::reads_back`).
            let kind = match udt.as_str() {
                "text" => apply::Kind::Text,
                "int8" | "int4" => apply::Kind::Integer,
                "numeric" => apply::Kind::Numeric,
                "bool" => apply::Kind::Boolean,
                "date" => apply::Kind::Date,
                "jsonb" => apply::Kind::Json,
                "_text" => apply::Kind::TextArray,
                other => {
                    problems.push(format!("{table}.{column} is of type {other}, which no batch expects"));
                    continue;
                }
            };
            if apply::kind(column) != kind {
                problems
                    .push(format!("{table}.{column} is {kind:?}, the batch takes it for {:?}", apply::kind(column)));
            }
            let expected: Value = match default {
                Some(expr) => sqlx::query_scalar(&format!("SELECT to_jsonb({expr})"))
                    .fetch_one(crm.pool())
                    .await
                    .unwrap_or_else(|e| panic!("{expr}: {e}")),
                None => Value::Null,
            };
            let ours = apply::DEFAULTS
                .iter()
                .find(|(t, c, _)| t == &table && c == column)
                .map_or(Value::Null, |(_, _, f)| f());
            if ours != expected {
                problems.push(format!("{table}.{column}: the schema's default is {expected}, the batch's {ours}"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// One batch of mixed leads: the same e-mail and company twice (written
// differently), a lead without e-mail that matches by name in the account
// an earlier lead of the batch creates, a merge into an existing contact,
// and a lead another job converted already. All in one transaction (one
// `now()`), each record made once.
#[tokio::test]
async fn a_batch_converts_mixed_leads_in_one_transaction_each_record_once() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let ewa = crm.contact(json!({"owner_id": rep, "last_name": "Kowalska", "email": "ewa@acme.pl"})).await;
    let lead = |v: Value| {
        let mut base = json!({"owner_id": rep, "first_name": "Jan", "last_name": "Nowak", "lead_status": "Qualified"});
        merge(&mut base, v);
        crm.lead(base)
    };
    let jan = lead(json!({"email": "Jan@Example.com", "company": "Acme İstanbul"})).await;
    let jan_again = lead(json!({"email": " jan@example.COM\u{a0}", "company": "ACME  istanbul"})).await;
    let no_email = lead(json!({"company": "acme\tİSTANBUL", "phone": "+48 1"})).await;
    let to_ewa = lead(json!({"first_name": "Ewa", "last_name": "Kowalska", "email": "EWA@acme.pl"})).await;
    let done_elsewhere = lead(json!({"last_name": "Zając", "email": "z@x.pl"})).await;
    let leads = [jan, jan_again, no_email, to_ewa, done_elsewhere];
    let job_id = job::create_for_leads(crm.pool(), rep, Trigger::Manual, &with_deal(), &leads).await.unwrap();
    // Another job converts one of them after this job took its snapshot.
    let earlier = crm.convert(rep, json!({}), done_elsewhere).await;
    assert_eq!(earlier.outcome, "converted");
    let rs = batch(&crm, job_id, &leads).await;
    let by = |l: i64| rs.iter().find(|r| r.lead_id == l).unwrap();

    assert_eq!((by(jan).outcome.as_str(), by(jan).contact_action.map(|a| a.as_str())), ("converted", Some("created")));
    assert_eq!(by(jan_again).contact_action.map(|a| a.as_str()), Some("merged"), "{:?}", by(jan_again));
    assert_eq!(by(jan_again).contact_id, by(jan).contact_id, "the same e-mail: one contact");
    assert_eq!(by(jan_again).account_id, by(jan).account_id, "the same company: one account");
    assert_eq!(by(no_email).contact_id, by(jan).contact_id, "same name in the account an earlier lead made");
    assert_eq!(by(to_ewa).contact_id, Some(ewa));
    assert_eq!(
        (by(done_elsewhere).outcome.as_str(), by(done_elsewhere).error_code.as_deref()),
        ("skipped", Some("already_converted"))
    );
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 3, "Ewa, Jan, and Zając from the other job");
    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, 1);
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 4, "a deal per converted lead");
    // The merge filled the phone the earlier lead of the batch left empty.
    let contact = crm.row("contacts", by(jan).contact_id.unwrap()).await.unwrap();
    assert_eq!(contact["phone"], "+48 1");
    assert_eq!(contact["email"], "Jan@Example.com", "a created record keeps the first lead's values");

    let stamps = finished_at(&crm, job_id, &leads[..4]).await;
    assert!(stamps.windows(2).all(|w| w[0] == w[1]), "one transaction for the batch: {stamps:?}");
    let j = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!((j.converted_count, j.merged_count, j.skipped_count, j.failed_count), (4, 3, 1, 0));

    // Redelivered messages of the committed batch: recognised as done.
    let again = batch(&crm, job_id, &leads).await;
    assert_eq!(again, rs);
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 4);
}

// A lead that fails a constraint in the middle of a batch fails alone with
// its code; its neighbours convert.
#[tokio::test]
async fn a_lead_failing_a_constraint_mid_batch_fails_alone() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    sqlx::query("ALTER TABLE deals ADD CONSTRAINT no_boom CHECK (deal_name <> 'Boom Ltd')")
        .execute(crm.pool())
        .await
        .unwrap();
    let mut leads = Vec::new();
    for i in 0..9 {
        let company = if i == 4 { "Boom Ltd".to_owned() } else { format!("Firma {}", i % 3) };
        leads.push(
            crm.lead(json!({"owner_id": rep, "last_name": format!("N{i}"), "email": format!("n{}@x.pl", i % 4),
                            "company": company}))
                .await,
        );
    }
    let boom = leads[4];
    crm.insert("notes", json!({"parent_module": "lead", "parent_id": boom, "title": "keep"})).await;
    let job_id = job::create_for_leads(crm.pool(), rep, Trigger::Manual, &with_deal(), &leads).await.unwrap();
    let rs = batch(&crm, job_id, &leads).await;
    for r in &rs {
        if r.lead_id == boom {
            assert_eq!(
                (r.outcome.as_str(), r.error_code.as_deref()),
                ("failed", Some("constraint_violation")),
                "{r:?}"
            );
            assert!(r.error_message.as_deref().is_some_and(|m| m.contains("no_boom")), "{r:?}");
        } else {
            assert_eq!(r.outcome, "converted", "{r:?}");
        }
    }
    let l = crm.row("leads", boom).await.unwrap();
    assert_eq!(l["converted_at"], Value::Null, "nothing of the bad lead stays");
    assert_eq!(crm.count("SELECT count(*) FROM notes WHERE parent_module = 'lead'").await, 1);
    assert_eq!(crm.count("SELECT count(*) FROM accounts WHERE account_name = 'Boom Ltd'").await, 0);
    // Neighbours that share e-mails and companies across the split still
    // made each record once.
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 4);
    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, 3);
    let j = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!((j.converted_count, j.failed_count), (8, 1));
}

// Batches running at once, whose leads share e-mails and companies (written
// differently), never make a contact or an account twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_sharing_keys_make_each_record_once() {
    let crm = Crm { db: TestDb::with_connections(12).await };
    let rep = crm.user("Rep", json!({})).await;
    let mut leads = Vec::new();
    for i in 0..400 {
        let k = i % 60;
        let email = if i % 2 == 0 { format!("Osoba{k}@Firma.PL") } else { format!(" osoba{k}@firma.pl") };
        let company = if i % 3 == 0 { format!("FIRMA  {}", k % 25) } else { format!("firma {}", k % 25) };
        leads.push(
            crm.lead(json!({"owner_id": rep, "last_name": format!("N{k}"), "email": email, "company": company})).await,
        );
    }
    let job_id = job::create_for_leads(crm.pool(), rep, Trigger::Manual, &with_deal(), &leads).await.unwrap();
    let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    let settings = std::sync::Arc::new(job::settings(crm.pool(), &job).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for part in 0..4 {
        let mine: Vec<i64> = leads.iter().copied().skip(part).step_by(4).collect();
        let (pool, settings) = (crm.pool().clone(), settings.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            for chunk in mine.chunks(50) {
                out.extend(convert::convert_batch(&pool, job_id, &settings, &items(chunk)).await.expect("batch runs"));
            }
            out
        });
    }
    let mut converted = 0;
    while let Some(done) = tasks.join_next().await {
        for r in done.unwrap() {
            let r = r.expect("a result per lead");
            assert_eq!(r.outcome, "converted", "{r:?}");
            converted += 1;
        }
    }
    assert_eq!(converted, 400);
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 60, "one contact per e-mail");
    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, 25, "one account per company");
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 400);
}

// A worker whose batches committed but whose acks never reached RabbitMQ
// (its connection to the broker stops forwarding), then SIGKILLed: the
// messages come back to the next worker, which recognises each lead as
// done. Nothing is converted twice, nothing is lost, the counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_commit_and_ack_converts_nothing_twice() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let total = 3_000;
    let job_id = broker.seeded_bulk_job(&crm, 3_000, 5).await;

    let mq = Proxy::start("127.0.0.1:5672").await;
    let mut w = leadconv_command(&crm.url(), broker.prefix(), &["worker", "--concurrency", "2", "--batch-size", "100"]);
    w.env("AMQP_URL", amqp_url().replace("127.0.0.1:5672", &mq.addr.to_string()));
    let mut w = w.spawn().unwrap();
    wait_for("the worker converts", Duration::from_secs(120), || async { crm.converted_leads().await >= 200 }).await;
    // From now on nothing the worker sends reaches RabbitMQ: not its acks.
    mq.pause_after(0);
    let at_pause = crm.converted_leads().await;
    // The worker goes on with what it prefetched, committing batches whose
    // acks stay with the proxy.
    wait_for("batches commit after the acks stop", Duration::from_secs(120), || async {
        crm.converted_leads().await >= at_pause + 200
    })
    .await;
    w.start_kill().unwrap(); // SIGKILL
    w.wait().await.unwrap();
    // The dead worker's connection closes: RabbitMQ takes its unacked
    // messages back.
    mq.cut_all();
    drop(mq);
    let before_kill: Vec<Row> = sqlx::query_as(
        "SELECT lead_id, finished_at::text, attempts, contact_id, deal_id FROM conversion_results
         WHERE job_id = $1 AND outcome <> 'pending' ORDER BY lead_id",
    )
    .bind(job_id)
    .fetch_all(crm.pool())
    .await
    .unwrap();
    let committed_unacked = crm.converted_leads().await - at_pause;
    assert!(committed_unacked >= 200 && crm.converted_leads().await < total, "killed mid-job after unacked commits");

    let mut next = leadconv_command(&crm.url(), broker.prefix(), &["worker", "--exit-when-idle"]).spawn().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(600), next.wait()).await.expect("worker finishes").unwrap();
    assert!(status.success());

    assert_exactly_once(&crm, job_id, total).await;
    // The results the killed worker committed stand as they were: their
    // redelivered messages were recognised as done, not converted again.
    assert_eq!(results_of(&crm, job_id, &before_kill).await, before_kill);
}

/// A result as recorded: lead, finished_at, attempts, contact, deal.
type Row = (i64, String, i32, Option<i64>, Option<i64>);

async fn results_of(crm: &Crm, job_id: Uuid, rows: &[Row]) -> Vec<Row> {
    let leads: Vec<i64> = rows.iter().map(|r| r.0).collect();
    sqlx::query_as(
        "SELECT lead_id, finished_at::text, attempts, contact_id, deal_id FROM conversion_results
         WHERE job_id = $1 AND lead_id = ANY($2) ORDER BY lead_id",
    )
    .bind(job_id)
    .bind(&leads)
    .fetch_all(crm.pool())
    .await
    .unwrap()
}

/// Holds a row lock on record `id` of `table` (as a CRM user's open edit
/// does) until `change` is run there and committed, while a conversion of
/// `lead` waits for that lock after it looked its candidates up: the
/// conversion must see the record as `change` left it.
async fn convert_while_a_crm_user_changes(
    crm: &Crm,
    acting: i64,
    lead: i64,
    (table, id): (&str, i64),
    change: &str,
) -> LeadResult {
    let job_id = job::create_for_leads(crm.pool(), acting, Trigger::Manual, &json!({}), &[lead]).await.unwrap();
    let mut user = crm.pool().begin().await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE")).bind(id).execute(&mut *user).await.unwrap();
    let pool = crm.pool().clone();
    let conversion = tokio::spawn(async move {
        let j = job::get(&pool, job_id).await.unwrap().unwrap();
        let settings = job::settings(&pool, &j).await.unwrap();
        convert::convert_lead(&pool, job_id, &settings, lead).await.unwrap()
    });
    // The conversion found the record (unlocked) and now waits to lock it.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
         AND wait_event_type = 'Lock' AND query LIKE '%FROM {table} % WHERE id = ANY%'"
    );
    wait_for("the conversion waits for the record's row lock", Duration::from_secs(30), || async {
        crm.count(&waiting).await == 1
    })
    .await;
    sqlx::query(change).bind(id).execute(&mut *user).await.unwrap();
    user.commit().await.unwrap();
    conversion.await.unwrap()
}

// A CRM user edits or deletes the contact a lead's e-mail found (or
// deletes or blanks out the account its company found), between the conversion's lookup
// and its lock on the record: the conversion decides on the record as it
// is once locked (as a locking lookup by e-mail would), never merging into
// a contact with another e-mail and never creating a second contact for an
// e-mail one still has.
#[tokio::test]
async fn a_candidate_changed_by_a_crm_user_before_it_is_locked_is_looked_up_again() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;

    let anna = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let lead =
        crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "phone": "+48 1"})).await;
    let edit = "UPDATE contacts SET email = 'anna@beta.pl' WHERE id = $1";
    let r = convert_while_a_crm_user_changes(&crm, rep, lead, ("contacts", anna), edit).await;
    assert_eq!(r.contact_action.map(|a| a.to_string()).as_deref(), Some("created"), "{r:?}");
    assert_ne!(r.contact_id, Some(anna));
    let edited = crm.row("contacts", anna).await.unwrap();
    assert_eq!((edited["email"].as_str(), edited["phone"].as_str()), (Some("anna@beta.pl"), None), "not merged into");

    let first = crm.contact(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@acme.pl"})).await;
    let second = crm.contact(json!({"owner_id": rep, "last_name": "Kowalski", "email": "JAN@acme.pl"})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@acme.pl"})).await;
    let r =
        convert_while_a_crm_user_changes(&crm, rep, lead, ("contacts", first), "DELETE FROM contacts WHERE id = $1")
            .await;
    assert_eq!(
        (r.contact_action.map(|a| a.to_string()).as_deref(), r.contact_id),
        (Some("merged"), Some(second)),
        "merged into the contact that has the e-mail now: {r:?}"
    );
    assert_eq!(crm.count("SELECT count(*) FROM contacts WHERE email ILIKE 'jan@acme.pl'").await, 1);

    // The oldest account of the lead's company deleted: the next one is the
    // match, not a third account.
    let first = crm.account(json!({"owner_id": rep, "account_name": "Acme"})).await;
    let second = crm.account(json!({"owner_id": rep, "account_name": "ACME"})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Wiśniewska", "company": "acme "})).await;
    let delete = "DELETE FROM accounts WHERE id = $1";
    let r = convert_while_a_crm_user_changes(&crm, rep, lead, ("accounts", first), delete).await;
    assert_eq!(
        (r.account_action.map(|a| a.to_string()).as_deref(), r.account_id),
        (Some("matched"), Some(second)),
        "matched the account that has the name now: {r:?}"
    );
    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, 1);

    // The account's name blanked out: it names no company any more.
    let blanked = second;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Zielińska", "company": "Acme"})).await;
    let blank = "UPDATE accounts SET account_name = E' \\u00a0' WHERE id = $1";
    let r = convert_while_a_crm_user_changes(&crm, rep, lead, ("accounts", blanked), blank).await;
    assert_eq!(r.account_action.map(|a| a.to_string()).as_deref(), Some("created"), "{r:?}");
    assert_ne!(r.account_id, Some(blanked));
}
