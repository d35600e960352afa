//! Bulk jobs through the real RabbitMQ (issue 3): producer, worker pool,
//! exact progress, dead letters, the workflow lane, cancellation.

mod common;

use std::time::Duration;

use common::broker::{wait_for, TestBroker};
use common::*;
use leadconv::queue::producer;
use leadconv::queue::worker;
use leadconv::queue::{Lane, LeadMessage};
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use leadconv_sample::{self as seed, SeedSpec};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

/// Checks, creates and publishes a job, as `leadconv enqueue` does.
async fn enqueue(
    crm: &Crm,
    broker: &TestBroker,
    criteria: Value,
    options: Value,
    acting: i64,
    trigger: Trigger,
) -> Uuid {
    let checked = job::check(crm.pool(), NewJob { criteria, options, requested_by: acting, trigger }).await.unwrap();
    let lease = producer::Lease::new(LEASE);
    let created = job::create(crm.pool(), &checked, Dispatch::Queue { lease }).await.unwrap();
    producer::publish_job(
        crm.pool(),
        &broker.channel,
        &broker.topology,
        created.id,
        Lane::for_trigger(trigger),
        &lease,
        producer::BATCH,
    )
    .await
    .unwrap();
    created.id
}

fn start_worker(
    crm: &Crm,
    broker: &TestBroker,
    concurrency: u16,
    exit_when_idle: bool,
) -> (JoinHandle<()>, CancellationToken) {
    start_worker_batching(crm, broker, concurrency, None, exit_when_idle)
}

/// [`start_worker`] with bulk batches of `batch_size` leads (`None`: the
/// default).
fn start_worker_batching(
    crm: &Crm,
    broker: &TestBroker,
    concurrency: u16,
    batch_size: Option<u16>,
    exit_when_idle: bool,
) -> (JoinHandle<()>, CancellationToken) {
    let mut cfg = worker::WorkerConfig::new(common::broker::amqp_url(), broker.topology.clone());
    cfg.concurrency = concurrency;
    cfg.batch_size = batch_size.unwrap_or(cfg.batch_size);
    cfg.exit_when_idle = exit_when_idle;
    cfg.tick = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let (pool, token) = (crm.pool().clone(), stop.clone());
    (tokio::spawn(async move { worker::run(pool, cfg, token).await.expect("worker runs") }), stop)
}

async fn job_status(crm: &Crm, id: Uuid) -> job::Job {
    job::get(crm.pool(), id).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_leads_with_duplicates_complete_with_exact_counts() {
    let crm = Crm { db: TestDb::with_connections(16).await };
    let broker = TestBroker::new().await;
    let seeded = seed::seed(crm.pool(), &SeedSpec { leads: 10_000, duplicates: 0.4, rng_seed: 7 }).await.unwrap();
    let email_dups = crm
        .count(
            // Leads whose e-mail an existing contact or an earlier lead has,
            // set-based (a correlated subquery per lead is quadratic).
            "SELECT count(*) FROM (
                 SELECT k, row_number() OVER (PARTITION BY k ORDER BY id) AS n
                 FROM (SELECT id, leadconv_norm_email(email) AS k FROM leads) l WHERE k IS NOT NULL
             ) l
             WHERE n > 1 OR k IN (SELECT leadconv_norm_email(email) FROM contacts)",
        )
        .await;
    assert!(email_dups >= 2_000, "at least 20% of leads share an e-mail: {email_dups}");
    let contacts_before = crm.count("SELECT count(*) FROM contacts").await;
    let accounts_before = crm.count("SELECT count(*) FROM accounts").await;

    let job_id =
        enqueue(&crm, &broker, json!({"all_leads": true}), with_deal(), seeded.acting_user, Trigger::Schedule).await;
    assert_eq!(job_status(&crm, job_id).await.total_count, 10_000);
    let (w, _stop) = start_worker(&crm, &broker, 8, true);
    tokio::time::timeout(Duration::from_secs(600), w).await.expect("the job drains").unwrap();
    job::rollup(crm.pool(), job_id).await.unwrap();

    // The stored row itself (not only the exact view) is complete and exact.
    let (status, total, converted, merged, skipped, failed): (String, i32, i32, i32, i32, i32) = sqlx::query_as(
        "SELECT status, total_count, converted_count, merged_count, skipped_count, failed_count FROM conversion_jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_one(crm.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), total, converted, skipped, failed), ("completed", 10_000, 10_000, 0, 0));
    let merged_results = crm.count("SELECT count(*) FROM conversion_results WHERE contact_action = 'merged'").await;
    assert_eq!(i64::from(merged), merged_results);
    assert!(merged_results >= 2_000);

    // Results, leads and CRM tables agree.
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NULL").await, 0);
    assert_eq!(
        crm.count(
            "SELECT count(*) FROM conversion_results r JOIN leads l ON l.id = r.lead_id
             WHERE l.converted_contact_id IS DISTINCT FROM r.contact_id OR l.converted_deal_id IS DISTINCT FROM r.deal_id
                OR l.converted_account_id IS DISTINCT FROM r.account_id"
        )
        .await,
        0
    );
    let created_contacts = crm.count("SELECT count(*) FROM conversion_results WHERE contact_action = 'created'").await;
    let created_accounts = crm.count("SELECT count(*) FROM conversion_results WHERE account_action = 'created'").await;
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, contacts_before + created_contacts);
    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, accounts_before + created_accounts);
    assert_eq!(crm.count("SELECT count(*) FROM deals WHERE deal_name <> '' AND stage = 'Qualification'").await, 10_000);
    // No duplicates were created.
    assert_eq!(
        crm.count("SELECT count(*) FROM (SELECT 1 FROM contacts GROUP BY leadconv_norm_email(email) HAVING count(*) > 1 AND leadconv_norm_email(email) IS NOT NULL) d").await,
        0
    );
    assert_eq!(
        crm.count("SELECT count(*) FROM (SELECT 1 FROM accounts GROUP BY leadconv_norm_company(account_name) HAVING count(*) > 1) d").await,
        0
    );
    assert_eq!(broker.depth(&broker.topology.dead_queue()).await, 0);
    // Every result carries when its message was published, before the
    // commit: the enqueue→commit latency.
    assert_eq!(
        crm.count(
            "SELECT count(*) FROM conversion_results WHERE enqueued_at IS NOT NULL AND enqueued_at <= finished_at"
        )
        .await,
        10_000
    );
    // The outbox watermark reached the last lead.
    assert_eq!(
        crm.count("SELECT published_through FROM conversion_jobs").await,
        crm.count("SELECT max(lead_id) FROM conversion_results").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_converts_once() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Twice", "email": "twice@example.com", "company": "Twice Co"}))
        .await;
    let job_id = enqueue(&crm, &broker, json!({"ids": [lead]}), with_deal(), rep, Trigger::Manual).await;
    // The same message again, as RabbitMQ would redeliver it.
    let body = serde_json::to_vec(&LeadMessage { job_id, lead_id: lead, enqueued_at: None }).unwrap();
    broker.publish_raw(Lane::Bulk, &body).await;
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 2);

    let (w, _stop) = start_worker(&crm, &broker, 2, true);
    tokio::time::timeout(Duration::from_secs(60), w).await.unwrap().unwrap();
    let j = job_status(&crm, job_id).await;
    assert_eq!((j.total_count, j.converted_count, j.skipped_count, j.failed_count), (1, 1, 0, 0));
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 1);
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 1);
    assert_eq!(crm.count("SELECT attempts::bigint FROM conversion_results").await, 1);
}

/// A message whose consumers keep dying before they settle it (a lead that
/// crashes workers) must not crash-loop until the broker parks it and its
/// job never completes: past a number of redeliveries its lead is recorded
/// failed instead of converted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_again_and_again_fails_its_lead_and_the_job_completes() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let poison = crm.lead(json!({"owner_id": rep, "last_name": "Poison", "email": "p@example.com"})).await;
    let job_id = enqueue(&crm, &broker, json!({"ids": [poison]}), json!({}), rep, Trigger::Manual).await;

    // Consumers that die holding the message: each takes it and its
    // channel closes without an ack, which RabbitMQ counts as a delivery.
    let queue_name = broker.topology.work_queue(Lane::Bulk);
    for _ in 0..leadconv::queue::POISON_REDELIVERIES {
        let ch = broker.conn.create_channel().await.unwrap();
        let got = ch
            .basic_get(&queue_name, lapin::options::BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("the message is back in the queue");
        assert_eq!(serde_json::from_slice::<LeadMessage>(&got.delivery.data).unwrap().lead_id, poison);
        ch.close(200, "crash").await.unwrap();
        wait_for("the message is ready again", Duration::from_secs(30), || async {
            broker.depth(&queue_name).await == 1
        })
        .await;
    }

    let (w, _stop) = start_worker(&crm, &broker, 2, true);
    tokio::time::timeout(Duration::from_secs(60), w).await.unwrap().unwrap();
    let j = job_status(&crm, job_id).await;
    assert_eq!(j.status, "completed");
    assert_eq!((j.total_count, j.converted_count, j.failed_count), (1, 0, 1));
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'failed' AND error_code = 'poison_message'")
            .await,
        1
    );
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 0);
    assert_eq!(broker.depth(&queue_name).await, 0);
    assert_eq!(broker.depth(&broker.topology.dead_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_dead_lettered_and_the_worker_goes_on() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    broker.publish_raw(Lane::Bulk, b"this is not json {").await;
    broker.publish_raw(Lane::Bulk, br#"{"job_id": "not-a-uuid", "lead_id": 1}"#).await;
    let leads = [
        crm.lead(json!({"owner_id": rep, "last_name": "After", "email": "a@example.com"})).await,
        crm.lead(json!({"owner_id": rep, "last_name": "Poison", "email": "b@example.com"})).await,
    ];
    let job_id = enqueue(&crm, &broker, json!({"ids": leads}), json!({}), rep, Trigger::Manual).await;

    let (w, _stop) = start_worker(&crm, &broker, 2, true);
    tokio::time::timeout(Duration::from_secs(60), w).await.unwrap().unwrap();
    assert_eq!(job_status(&crm, job_id).await.converted_count, 2, "the worker converted past the bad messages");
    assert_eq!(broker.depth(&broker.topology.dead_queue()).await, 2, "both bad messages are parked");
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workflow_lead_is_converted_before_a_bulk_backlog_drains() {
    let crm = Crm { db: TestDb::with_connections(12).await };
    let broker = TestBroker::new().await;
    let seeded = seed::seed(crm.pool(), &SeedSpec { leads: 50_000, duplicates: 0.0, rng_seed: 3 }).await.unwrap();
    let bulk =
        enqueue(&crm, &broker, json!({"all_leads": true}), json!({}), seeded.acting_user, Trigger::Schedule).await;
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 50_000);
    // One more lead, fired by a workflow rule after the backlog was queued.
    let rep = crm.user("Rep", json!({})).await;
    let urgent = crm.lead(json!({"owner_id": rep, "last_name": "Urgent", "email": "urgent@example.com"})).await;
    let flow = enqueue(&crm, &broker, json!({"ids": [urgent]}), json!({}), rep, Trigger::Workflow).await;

    let (w, stop) = start_worker(&crm, &broker, 8, false);
    wait_for("the workflow job completes", Duration::from_secs(120), || async {
        job_status(&crm, flow).await.status == "completed"
    })
    .await;
    let backlog = job_status(&crm, bulk).await;
    assert!(backlog.pending_count() > 40_000, "the backlog is still there: {} pending", backlog.pending_count());
    let converted_before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversion_results b WHERE b.job_id = $1 AND b.outcome <> 'pending'
           AND b.finished_at < (SELECT finished_at FROM conversion_results WHERE job_id = $2)",
    )
    .bind(bulk)
    .bind(flow)
    .fetch_one(crm.pool())
    .await
    .unwrap();
    assert!(
        converted_before < 5_000,
        "the workflow lead did not wait for the backlog ({converted_before} bulk leads before it)"
    );
    stop.cancel();
    w.await.unwrap();
    job::cancel(crm.pool(), bulk).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_mid_job_stops_conversion_and_counts_add_up() {
    let crm = Crm { db: TestDb::with_connections(12).await };
    let broker = TestBroker::new().await;
    let seeded = seed::seed(crm.pool(), &SeedSpec { leads: 3_000, duplicates: 0.2, rng_seed: 5 }).await.unwrap();
    let job_id =
        enqueue(&crm, &broker, json!({"all_leads": true}), with_deal(), seeded.acting_user, Trigger::Manual).await;
    // Small batches: what the worker holds at once is a fraction of the
    // job, so the cancel lands mid-job.
    let (w, _stop) = start_worker_batching(&crm, &broker, 2, Some(25), true);
    wait_for("some leads are converted", Duration::from_secs(120), || async {
        job_status(&crm, job_id).await.converted_count >= 200
    })
    .await;

    let cancelled = job::cancel(crm.pool(), job_id).await.unwrap();
    let converted_at_cancel = crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await;
    assert_eq!(cancelled.status, "cancelled");
    assert!(cancelled.skipped_count > 0, "pending leads were skipped");

    // The worker drains the remaining messages without converting them.
    tokio::time::timeout(Duration::from_secs(300), w).await.unwrap().unwrap();
    let after = job_status(&crm, job_id).await;
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, converted_at_cancel);
    assert_eq!(after.status, "cancelled");
    assert_eq!(i64::from(after.converted_count), converted_at_cancel);
    assert_eq!(after.converted_count + after.skipped_count + after.failed_count, after.total_count);
    assert_eq!(
        i64::from(after.skipped_count),
        crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'skipped' AND error_code = 'cancelled'")
            .await
    );
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'pending'").await, 0);
    // Cancelling twice is refused, with a reason.
    let again = job::cancel(crm.pool(), job_id).await.unwrap_err();
    assert!(matches!(again, leadconv::Error::Refused(r) if r.code == leadconv::ErrorCode::JobFinished));
}

// Issue 12: a publisher cannot make a pending lead fail as poison by
// writing the broker's `x-delivery-count` header into a first delivery:
// only a delivery the broker marks as redelivered is believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delivery_count_header_does_not_make_a_lead_poison() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Forged", "email": "forged@example.com"})).await;
    let checked = job::check(
        crm.pool(),
        NewJob { criteria: json!({"ids": [lead]}), options: json!({}), requested_by: rep, trigger: Trigger::Api },
    )
    .await
    .unwrap();
    let created = job::create(crm.pool(), &checked, Dispatch::InProcess).await.unwrap();
    let body = serde_json::to_vec(&LeadMessage { job_id: created.id, lead_id: lead, enqueued_at: None }).unwrap();
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from("x-delivery-count"), AMQPValue::LongLongInt(50));
    broker
        .channel
        .basic_publish(
            &broker.topology.convert_exchange(),
            &leadconv::queue::Topology::routing_key(Lane::Bulk, None),
            BasicPublishOptions::default(),
            &body,
            lapin::BasicProperties::default().with_delivery_mode(2).with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (w, _stop) = start_worker(&crm, &broker, 2, true);
    tokio::time::timeout(Duration::from_secs(60), w).await.expect("the worker goes idle").unwrap();
    let sql =
        format!("SELECT count(*) FROM conversion_results WHERE job_id = '{}' AND outcome = 'converted'", created.id);
    assert_eq!(crm.count(&sql).await, 1, "converted, not failed as poison_message");
}

// Issue 12: a retry that cannot be published (the broker refuses it; here
// the retry exchange is gone) does not hand the message back and forth at
// once until it looks like poison: the worker reconnects with back-off
// (declaring the topology again), the lead goes around its retry queue, and
// converts once its lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_that_cannot_be_published_does_not_make_a_lead_poison() {
    use lapin::options::ExchangeDeleteOptions;
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Retried", "email": "retried@example.com"})).await;
    let checked = job::check(
        crm.pool(),
        NewJob { criteria: json!({"ids": [lead]}), options: json!({}), requested_by: rep, trigger: Trigger::Api },
    )
    .await
    .unwrap();
    let lease = producer::Lease::new(LEASE);
    let job_id = job::create(crm.pool(), &checked, Dispatch::Queue { lease }).await.unwrap().id;
    // The lead's row stays locked: every conversion of it times out, a
    // transient failure that goes to a retry queue.
    let mut holder = crm.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversion_results WHERE job_id = $1 FOR UPDATE")
        .bind(job_id)
        .execute(&mut *holder)
        .await
        .unwrap();

    let limits = leadconv::store::db::Limits { lock: Duration::from_millis(300), ..Default::default() };
    let pool = leadconv::store::db::connect_service(&crm.url(), 4, &limits).await.unwrap();
    let mut cfg = worker::WorkerConfig::new(common::broker::amqp_url(), broker.topology.clone());
    cfg.tick = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let w = tokio::spawn(worker::run(pool, cfg, stop.clone()));
    let bulk = broker.topology.work_queue(Lane::Bulk);
    wait_for("the worker consumes", Duration::from_secs(60), || async {
        let ch = broker.conn.create_channel().await.unwrap();
        let consumers = broker.topology.state(&ch, &bulk).await.map(|q| q.consumers).unwrap_or(0);
        let _ = ch.close(200, "bye").await;
        consumers > 0
    })
    .await;
    // Gone after the worker declared the topology: its first retry fails.
    broker.channel.exchange_delete(&broker.topology.retry_exchange(), ExchangeDeleteOptions::default()).await.unwrap();
    producer::publish_job(crm.pool(), &broker.channel, &broker.topology, job_id, Lane::Bulk, &lease, producer::BATCH)
        .await
        .unwrap();
    let retry_queue = broker.topology.retry_queue(0);
    wait_for("the lead in its first retry queue", Duration::from_secs(60), || async {
        broker.depth(&retry_queue).await > 0
    })
    .await;
    holder.commit().await.unwrap();
    wait_for("the lead converts", Duration::from_secs(60), || async {
        crm.count(&format!(
            "SELECT count(*) FROM conversion_results WHERE job_id = '{job_id}' AND outcome <> 'pending'"
        ))
        .await
            == 1
    })
    .await;
    stop.cancel();
    w.await.unwrap().unwrap();
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM conversion_results WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(crm.pool())
        .await
        .unwrap();
    assert_eq!(outcome, "converted", "not poison_message");
}

/// An undo job's leads are published the other way round, the highest lead
/// id (the latest conversion) first, page after page past its watermark:
/// taken back in that order, a lead rarely waits for one that merged into
/// its records after it (SPEC §4a).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_job_publishes_its_latest_leads_first() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let mut leads = Vec::new();
    for i in 0..5 {
        leads.push(
            crm.lead(json!({"owner_id": rep, "last_name": format!("Ünal {i}"), "email": format!("u{i}@example.com")}))
                .await,
        );
    }
    let converted = enqueue(&crm, &broker, json!({"ids": leads}), json!({}), rep, Trigger::Manual).await;
    let (w, _stop) = start_worker(&crm, &broker, 2, true);
    tokio::time::timeout(Duration::from_secs(60), w).await.unwrap().unwrap();
    assert_eq!(job_status(&crm, converted).await.converted_count, 5);

    let lease = producer::Lease::new(LEASE);
    let of = job::UndoOf { job_id: converted, lead_ids: None };
    let undo = job::create_undo(crm.pool(), &of, None, None, Trigger::Manual, Dispatch::Queue { lease }).await.unwrap();
    // Pages of two: the watermark carries the order from page to page.
    let sent = producer::publish_job(crm.pool(), &broker.channel, &broker.topology, undo.id, Lane::Bulk, &lease, 2)
        .await
        .unwrap();
    assert_eq!(sent, 5);
    let queue_name = broker.topology.work_queue(Lane::Bulk);
    let mut got = Vec::new();
    while let Some(m) =
        broker.channel.basic_get(&queue_name, lapin::options::BasicGetOptions { no_ack: true }).await.unwrap()
    {
        let msg: LeadMessage = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(msg.job_id, undo.id);
        got.push(msg.lead_id);
    }
    let mut expected = leads.clone();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(got, expected, "every lead once, the latest first");
    assert!(job_status(&crm, undo.id).await.status == "scheduled");
    assert_eq!(
        crm.count(&format!(
            "SELECT count(*) FROM conversion_jobs WHERE id = '{}' AND published_at IS NOT NULL",
            undo.id
        ))
        .await,
        1,
        "published through its last page"
    );
}

/// A lead left pending with its message gone (with asynchronous
/// replication, a primary that crashes can lose a commit whose message was
/// acknowledged): once no queue holds a message and the job recorded
/// nothing for a while, its pending leads are published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_pending_with_no_message_anywhere_are_published_again() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let mut leads = Vec::new();
    for i in 0..3 {
        leads.push(
            crm.lead(json!({"owner_id": rep, "last_name": format!("Øberg {i}"), "email": format!("o{i}@example.no")}))
                .await,
        );
    }
    let job_id = enqueue(&crm, &broker, json!({"ids": leads}), json!({}), rep, Trigger::Manual).await;
    // The messages are gone, and the job was published a while ago.
    let queue_name = broker.topology.work_queue(Lane::Bulk);
    broker.channel.queue_purge(&queue_name, lapin::options::QueuePurgeOptions::default()).await.unwrap();
    sqlx::query("UPDATE conversion_jobs SET published_at = now() - interval '1 minute' WHERE id = $1")
        .bind(job_id)
        .execute(crm.pool())
        .await
        .unwrap();

    let mut cfg = worker::WorkerConfig::new(common::broker::amqp_url(), broker.topology.clone());
    cfg.tick = Duration::from_millis(100);
    cfg.stranded_after = Duration::from_secs(2);
    let stop = CancellationToken::new();
    let (pool, token) = (crm.pool().clone(), stop.clone());
    let w = tokio::spawn(async move { worker::run(pool, cfg, token).await.expect("worker runs") });
    wait_for("the stranded leads are converted", Duration::from_secs(60), || async {
        job::get(crm.pool(), job_id).await.unwrap().unwrap().is_finished()
    })
    .await;
    stop.cancel();
    w.await.unwrap();
    job::rollup(crm.pool(), job_id).await.unwrap();
    let j = job_status(&crm, job_id).await;
    assert_eq!((j.status.to_string().as_str(), j.converted_count), ("completed", 3));
}

/// The lock keys of a bulk lead ride with its message (issue 22): its
/// e-mail's and company's, as the conversion's advisory locks compute them
/// from messy text, then the company of the account of the contact its
/// e-mail matches, whose row its conversion locks too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_message_carries_its_leads_lock_keys() {
    use leadconv::store::snapshot;
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let globex = crm.account(json!({"owner_id": rep, "account_name": "Globex Sp. z o.o."})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Şahin", "email": "sahin@globex.example", "account_id": globex}))
        .await;
    let merging = crm
        .lead(json!({"owner_id": rep, "last_name": "Şahin", "email": "\"Şahin\" <SAHIN@Globex.Example>",
                     "company": "  ÖZTÜRK\u{a0}TEKSTİL A.Ş. "}))
        .await;
    let bare = crm.lead(json!({"owner_id": rep, "last_name": "Nobody"})).await;
    enqueue(&crm, &broker, json!({"ids": [merging, bare]}), json!({}), rep, Trigger::Manual).await;

    let queue_name = broker.topology.work_queue(Lane::Bulk);
    let mut headers = std::collections::HashMap::new();
    while let Some(m) =
        broker.channel.basic_get(&queue_name, lapin::options::BasicGetOptions { no_ack: true }).await.unwrap()
    {
        let msg: LeadMessage = serde_json::from_slice(&m.delivery.data).unwrap();
        headers.insert(msg.lead_id, leadconv::queue::keys_of(&m.delivery.properties));
    }
    let mut conn = crm.pool().acquire().await.unwrap();
    let lead = crm.row("leads", merging).await.unwrap();
    let new =
        NewJob { criteria: json!({"ids": [merging]}), options: json!({}), requested_by: rep, trigger: Trigger::Manual };
    let settings = job::check(crm.pool(), new).await.unwrap().settings;
    let locked = snapshot::lock_keys(&mut conn, &lead, &settings).await.unwrap();
    let globex_key: i64 =
        sqlx::query_scalar("SELECT leadconv_lock_key('company', leadconv_norm_company('globex  sp. z o.o.'))")
            .fetch_one(crm.pool())
            .await
            .unwrap();
    let sent = &headers[&merging];
    assert_eq!(sent.len(), 3, "e-mail, company, the matched contact's account: {sent:?}");
    let mut own = sent[..2].to_vec();
    own.sort_unstable();
    assert_eq!(own, locked, "the keys the conversion locks, e-mail first");
    assert_eq!(sent[2], globex_key);
    assert_eq!(headers[&bare], vec![0, 0], "neither e-mail nor company");
}

/// A lead whose company a batch in flight holds waits in the worker, not
/// on the lock in Postgres, while leads of other keys go on; and it then
/// converts after that batch, in the order of the job (issue 22). The
/// first lead's batch is held by a lock on its lead row, taken before any
/// key, so without the worker's choice the second lead would convert
/// first, creating the account the first one was to create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_sharing_a_key_with_a_batch_in_flight_waits_for_it_and_others_go_on() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let first = crm
        .lead(json!({"owner_id": rep, "last_name": "Ünal", "email": "unal@example.com", "company": "Öztürk Tekstil A.Ş."}))
        .await;
    let second = crm
        .lead(json!({"owner_id": rep, "last_name": "Kaya", "email": "kaya@example.com", "company": " ÖZTÜRK  TEKSTİL A.Ş."}))
        .await;
    let other = crm
        .lead(json!({"owner_id": rep, "last_name": "Demir", "email": "demir@example.com", "company": "Globex"}))
        .await;
    let mut holder = crm.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM leads WHERE id = $1 FOR UPDATE").bind(first).execute(&mut *holder).await.unwrap();
    let job_id = enqueue(&crm, &broker, json!({"ids": [first, second, other]}), json!({}), rep, Trigger::Manual).await;
    // Batches of one lead, two in flight: the first lead's, held, and one more.
    let (w, stop) = start_worker_batching(&crm, &broker, 2, Some(1), false);
    let outcome = |lead: i64| {
        let pool = crm.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT outcome FROM conversion_results WHERE job_id = $1 AND lead_id = $2")
                .bind(job_id)
                .bind(lead)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    wait_for("the lead of another company to convert", Duration::from_secs(60), || async {
        outcome(other).await == "converted"
    })
    .await;
    assert_eq!(outcome(second).await, "pending", "the second lead waits for the batch holding its company");
    holder.rollback().await.unwrap();
    wait_for("the job to complete", Duration::from_secs(60), || async {
        job_status(&crm, job_id).await.status == "completed"
    })
    .await;
    stop.cancel();
    w.await.unwrap();
    let results = leadconv::store::convert::results(crm.pool(), job_id).await.unwrap();
    let of = |lead: i64| results.iter().find(|r| r.lead_id == lead).unwrap();
    assert_eq!(of(first).account_action.map(|a| a.as_str()), Some("created"), "the first lead creates the account");
    assert_eq!(of(second).account_action.map(|a| a.as_str()), Some("matched"));
    assert_eq!(of(first).account_id, of(second).account_id);
}

/// Pages read by a generic plan of `sql` (prepared with parameters, as
/// sqlx prepares every statement) executed with `args`.
async fn pages_read(conn: &mut sqlx::PgConnection, name: &str, sql: &str, args: &str) -> i64 {
    sqlx::query(&format!("PREPARE {name} AS {sql}")).execute(&mut *conn).await.unwrap();
    let plan: Value =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, FORMAT JSON) EXECUTE {name}({args})"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let top = &plan[0]["Plan"];
    top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap()
}

/// ANALYZE while one big job fills `conversion_results` sees a single
/// job_id. The statements a one-lead job runs (the producer's next page,
/// the finished result) must still read that job's rows by its own index,
/// not walk the big job: with a plan that took `job_id = $1` for the whole
/// table they read thousands of pages for each convert-now call.
#[tokio::test]
async fn statistics_that_saw_one_big_job_leave_a_one_lead_jobs_reads_small() {
    let crm = Crm::new().await;
    let user = crm.user("Ops", json!({})).await;
    let (big, small) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, total) in [(big, 20_000), (small, 1)] {
        sqlx::query(
            "INSERT INTO conversion_jobs (id, criteria, options, requested_by, total_count)
             VALUES ($1, '{}', '{}', $2, $3)",
        )
        .bind(id)
        .bind(user)
        .bind(total)
        .execute(crm.pool())
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO conversion_results (job_id, lead_id) SELECT $1, g FROM generate_series(1, 20000) g")
        .bind(big)
        .execute(crm.pool())
        .await
        .unwrap();
    // The one-lead job's lead came after every lead of the big job.
    sqlx::query("INSERT INTO conversion_results (job_id, lead_id) VALUES ($1, 30000)")
        .bind(small)
        .execute(crm.pool())
        .await
        .unwrap();
    sqlx::query("ANALYZE conversion_results").execute(crm.pool()).await.unwrap();

    let mut conn = crm.pool().acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
    let page = pages_read(
        &mut conn,
        "next_page",
        "SELECT lead_id FROM conversion_results WHERE job_id = $1 AND outcome = 'pending' AND lead_id > $2
         ORDER BY lead_id LIMIT $3",
        &format!("'{small}', 0, 2000"),
    )
    .await;
    let finished = pages_read(
        &mut conn,
        "finished",
        "SELECT * FROM conversion_results WHERE job_id = $1 AND outcome <> 'pending' LIMIT 1",
        &format!("'{small}'"),
    )
    .await;
    assert!(page < 20, "the next page of a one-lead job read {page} pages");
    assert!(finished < 20, "the finished result of a one-lead job read {finished} pages");
}
