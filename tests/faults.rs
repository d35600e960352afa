//! Crashes and lost connections (SPEC §7): a worker killed with SIGKILL, a
//! producer killed half-way through publishing, connections to Postgres and
//! RabbitMQ cut under a running worker. Each time the job completes with
//! every lead converted exactly once.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::broker::{amqp_url, wait_for, TestBroker};
use common::proxy::Proxy;
use common::*;
use leadconv::queue::producer;
use leadconv::queue::worker;
use leadconv::queue::Lane;
use leadconv::store::db;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use leadconv_sample::{self as seed, SeedSpec};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn leadconv(crm: &Crm, broker: &TestBroker, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_leadconv"));
    c.args(args)
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn converted(crm: &Crm) -> i64 {
    crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await
}

/// Every lead of the job converted exactly once, the job complete, the
/// counts exact and the CRM tables in agreement with the results.
async fn assert_exactly_once(crm: &Crm, job_id: Uuid, total: i64) {
    job::rollup(crm.pool(), job_id).await.unwrap();
    let j = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!(j.status, "completed");
    assert_eq!(
        (i64::from(j.total_count), i64::from(j.converted_count), j.skipped_count, j.failed_count),
        (total, total, 0, 0)
    );
    assert_eq!(converted(crm).await, total);
    assert_eq!(
        crm.count("SELECT count(*) FROM deals WHERE stage = 'Qualification'").await,
        total,
        "one deal per lead, none twice"
    );
    let created = crm.count("SELECT count(*) FROM conversion_results WHERE contact_action = 'created'").await;
    let seeded_contacts = crm.count("SELECT count(*) FROM contacts WHERE id NOT IN (SELECT contact_id FROM conversion_results WHERE contact_action = 'created')").await;
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, created + seeded_contacts);
    assert_eq!(
        crm.count("SELECT count(*) FROM (SELECT 1 FROM contacts WHERE email IS NOT NULL GROUP BY leadconv_norm_email(email) HAVING count(*) > 1) d").await,
        0,
        "no contact twice"
    );
    assert_eq!(
        crm.count(
            "SELECT count(*) FROM conversion_results r JOIN leads l ON l.id = r.lead_id
             WHERE l.converted_contact_id IS DISTINCT FROM r.contact_id OR l.converted_deal_id IS DISTINCT FROM r.deal_id"
        )
        .await,
        0
    );
}

async fn seeded_job(crm: &Crm, broker: &TestBroker, leads: usize) -> (Uuid, i64) {
    let s = seed::seed(crm.pool(), &SeedSpec { leads, duplicates: 0.3, rng_seed: 11 }).await.unwrap();
    let checked = job::check(
        crm.pool(),
        NewJob {
            criteria: json!({"all_leads": true}),
            options: with_deal(),
            requested_by: s.acting_user,
            trigger: Trigger::Manual,
        },
    )
    .await
    .unwrap();
    let lease = Duration::from_secs(30);
    let created = job::create(crm.pool(), &checked, Dispatch::Queue { lease }).await.unwrap();
    producer::publish_job(
        crm.pool(),
        &broker.channel,
        &broker.topology,
        created.id,
        Lane::Bulk,
        lease,
        producer::BATCH,
    )
    .await
    .unwrap();
    (created.id, leads as i64)
}

async fn run_to_idle(mut child: Child) {
    let status = tokio::time::timeout(Duration::from_secs(600), child.wait()).await.expect("worker finishes").unwrap();
    assert!(status.success(), "worker exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_again_and_again_loses_nothing_and_repeats_nothing() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = seeded_job(&crm, &broker, 3_000).await;

    for round in 1..=3 {
        let before = converted(&crm).await;
        let mut w = leadconv(&crm, &broker, &["worker", "--concurrency", "8"]).spawn().unwrap();
        wait_for(&format!("round {round}: the worker converts"), Duration::from_secs(120), || async {
            converted(&crm).await >= before + 250
        })
        .await;
        w.start_kill().unwrap(); // SIGKILL, in the middle of transactions
        w.wait().await.unwrap();
    }
    assert!(converted(&crm).await < total, "the kills happened mid-job");
    run_to_idle(leadconv(&crm, &broker, &["worker", "--concurrency", "8", "--exit-when-idle"]).spawn().unwrap()).await;
    assert_exactly_once(&crm, job_id, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_publish_leaves_an_outbox_that_a_worker_publishes() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let s = seed::seed(crm.pool(), &SeedSpec { leads: 4_000, duplicates: 0.3, rng_seed: 12 }).await.unwrap();

    let mut producer = leadconv(&crm, &broker, &["enqueue", "--criteria", r#"{"all_leads": true}"#])
        .args(["--options", &with_deal().to_string(), "--requested-by", &s.acting_user.to_string()])
        .args(["--lease-secs", "1", "--batch-size", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(producer.stdout.take().unwrap()).lines();
    let job_id: Uuid = out.next_line().await.unwrap().unwrap().trim().parse().unwrap();
    // The watermark: every lead up to it is confirmed by RabbitMQ.
    let enqueued = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM conversion_results r JOIN conversion_jobs j ON j.id = r.job_id
             WHERE r.job_id = $1 AND r.lead_id <= j.published_through",
        )
        .bind(job_id)
        .fetch_one(crm.pool())
        .await
        .unwrap()
    };
    wait_for("the producer publishes a few batches", Duration::from_secs(60), || async { enqueued().await >= 200 })
        .await;
    producer.start_kill().unwrap();
    producer.wait().await.unwrap();
    let published = enqueued().await;
    assert!(published < 4_000, "killed mid-publish ({published} of 4000 confirmed)");
    assert_eq!(job::get(crm.pool(), job_id).await.unwrap().unwrap().total_count, 4_000, "the snapshot is whole");

    // A worker's sweeper finds the orphaned outbox once the lease ran out.
    run_to_idle(
        leadconv(&crm, &broker, &["worker", "--concurrency", "8", "--exit-when-idle", "--lease-secs", "5"])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_exactly_once(&crm, job_id, 4_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_reconnects_after_its_postgres_and_rabbitmq_connections_are_cut() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = seeded_job(&crm, &broker, 2_000).await;

    let pg = Proxy::start("127.0.0.1:5432").await;
    let mq = Proxy::start("127.0.0.1:5672").await;
    let pg_url = crm.url().replace("127.0.0.1:5432", &pg.addr.to_string());
    let mq_url = amqp_url().replace("127.0.0.1:5672", &mq.addr.to_string());
    let pool = db::connect(&pg_url, 10).await.unwrap();
    let mut cfg = worker::WorkerConfig::new(mq_url, broker.topology.clone());
    cfg.exit_when_idle = true;
    cfg.tick = Duration::from_millis(100);
    let w = tokio::spawn(worker::run(pool, cfg, CancellationToken::new()));

    let accepted = |p: &Proxy| p.accepted.load(std::sync::atomic::Ordering::SeqCst);
    for (threshold, what) in [(300, "first cut"), (900, "second cut")] {
        wait_for(what, Duration::from_secs(120), || async { converted(&crm).await >= threshold }).await;
        let (pg_at_cut, mq_at_cut) = (accepted(&pg), accepted(&mq));
        pg.cut_all();
        mq.cut_all();
        // The worker comes back by itself, on new connections.
        wait_for("the worker reconnects to RabbitMQ", Duration::from_secs(60), || async { accepted(&mq) > mq_at_cut })
            .await;
        wait_for("the worker reconnects to Postgres", Duration::from_secs(60), || async { accepted(&pg) > pg_at_cut })
            .await;
        assert!(converted(&crm).await < total, "the cut happened mid-job");
    }
    tokio::time::timeout(Duration::from_secs(600), w).await.expect("the job completes").unwrap().unwrap();
    assert_exactly_once(&crm, job_id, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_worker_finish_in_flight_conversions_and_exit_0() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = seeded_job(&crm, &broker, 1_500).await;
    let w = leadconv(&crm, &broker, &["worker", "--concurrency", "8"]).spawn().unwrap();
    wait_for("the worker converts", Duration::from_secs(120), || async { converted(&crm).await >= 200 }).await;
    let pid = w.id().unwrap().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(term.success());
    let out = tokio::time::timeout(Duration::from_secs(60), w.wait_with_output()).await.expect("it stops").unwrap();
    assert_eq!(out.status.code(), Some(0), "graceful exit");
    // Everything it took was either committed and acked, or given back:
    // the results agree with the leads, and a new worker finishes the job.
    let stopped_at = converted(&crm).await;
    assert!(stopped_at < total, "stopped mid-job");
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'converted'").await,
        stopped_at,
        "no conversion half-recorded"
    );
    run_to_idle(leadconv(&crm, &broker, &["worker", "--exit-when-idle"]).spawn().unwrap()).await;
    assert_exactly_once(&crm, job_id, total).await;
}
