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
use leadconv::store::job;
use leadconv_sample::{self as seed, SeedSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn leadconv(crm: &Crm, broker: &TestBroker, args: &[&str]) -> Command {
    leadconv_command(&crm.url(), broker.prefix(), args)
}

async fn run_to_idle(mut child: Child) {
    let status = tokio::time::timeout(Duration::from_secs(600), child.wait()).await.expect("worker finishes").unwrap();
    assert!(status.success(), "worker exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_again_and_again_loses_nothing_and_repeats_nothing() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = (broker.seeded_bulk_job(&crm, 3_000, 11).await, 3_000);

    for round in 1..=3 {
        let before = crm.converted_leads().await;
        let mut w = leadconv(&crm, &broker, &["worker", "--concurrency", "8"]).spawn().unwrap();
        wait_for(&format!("round {round}: the worker converts"), Duration::from_secs(120), || async {
            crm.converted_leads().await >= before + 250
        })
        .await;
        w.start_kill().unwrap(); // SIGKILL, in the middle of transactions
        w.wait().await.unwrap();
    }
    assert!(crm.converted_leads().await < total, "the kills happened mid-job");
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
    let (job_id, total) = (broker.seeded_bulk_job(&crm, 2_000, 11).await, 2_000);

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
        wait_for(what, Duration::from_secs(120), || async { crm.converted_leads().await >= threshold }).await;
        let (pg_at_cut, mq_at_cut) = (accepted(&pg), accepted(&mq));
        pg.cut_all();
        mq.cut_all();
        // The worker comes back by itself, on new connections.
        wait_for("the worker reconnects to RabbitMQ", Duration::from_secs(60), || async { accepted(&mq) > mq_at_cut })
            .await;
        wait_for("the worker reconnects to Postgres", Duration::from_secs(60), || async { accepted(&pg) > pg_at_cut })
            .await;
        assert!(crm.converted_leads().await < total, "the cut happened mid-job");
    }
    tokio::time::timeout(Duration::from_secs(600), w).await.expect("the job completes").unwrap().unwrap();
    assert_exactly_once(&crm, job_id, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_worker_finish_in_flight_conversions_and_exit_0() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = (broker.seeded_bulk_job(&crm, 1_500, 11).await, 1_500);
    // Small batches: what the worker holds at once (in flight and
    // prefetched) is a fraction of the job, so the stop lands mid-job.
    let args = ["worker", "--concurrency", "2", "--batch-size", "25"];
    let w = leadconv(&crm, &broker, &args).spawn().unwrap();
    wait_for("the worker converts", Duration::from_secs(120), || async { crm.converted_leads().await >= 200 }).await;
    let pid = w.id().unwrap().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(term.success());
    let out = tokio::time::timeout(Duration::from_secs(60), w.wait_with_output()).await.expect("it stops").unwrap();
    assert_eq!(out.status.code(), Some(0), "graceful exit");
    // Everything it took was either committed and acked, or given back:
    // the results agree with the leads, and a new worker finishes the job.
    let stopped_at = crm.converted_leads().await;
    assert!(stopped_at < total, "stopped mid-job");
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'converted'").await,
        stopped_at,
        "no conversion half-recorded"
    );
    run_to_idle(leadconv(&crm, &broker, &["worker", "--exit-when-idle"]).spawn().unwrap()).await;
    assert_exactly_once(&crm, job_id, total).await;
}

// ---------------------------------------------------------------------------
// Liveness (issue 11): a participant that hangs delays only what it holds.

/// Sends `signal` (`STOP`, `CONT`) to a child process.
async fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    assert!(Command::new("kill").args([&format!("-{signal}"), &pid]).status().await.unwrap().success());
}

/// The local ports of the TCP connections process `pid` has open to
/// Postgres (127.0.0.1:5432), from /proc: how `pg_stat_activity` tells its
/// sessions apart (`client_port`).
fn postgres_client_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let ports: Vec<u16> = tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local, remote as hex ip:port; remote 0100007F:1538 is 127.0.0.1:5432.
            let (local, remote, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
            (remote.ends_with(":1538") && inodes.contains(*inode))
                .then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect();
    assert!(!ports.is_empty(), "process {pid} has no connection to Postgres");
    ports
}

/// Seeds `leads` leads (30 % duplicates) and returns the acting user.
async fn seeded(crm: &Crm, leads: usize) -> i64 {
    seed::seed(crm.pool(), &SeedSpec { leads, duplicates: 0.3, rng_seed: 11 }).await.unwrap().acting_user
}

/// One of two workers frozen (SIGSTOP: a paused VM, a half-open connection)
/// for 30 s mid-job, at the worst moment (one of its transactions holds the
/// job's progress counters): the other keeps at least half of its pace, because
/// nothing it needs is held by the frozen one for long (per-backend counter
/// shards; Postgres ends the frozen one's idle transactions and cancels lock
/// waits), and after SIGCONT the job completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_does_not_stall_the_other_one() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = (broker.seeded_bulk_job(&crm, 40_000, 11).await, 40_000);
    let args = ["worker", "--concurrency", "8", "--lock-timeout-secs", "2", "--idle-in-transaction-timeout-secs", "3"];
    let frozen = leadconv(&crm, &broker, &args).spawn().unwrap();
    let healthy = leadconv(&crm, &broker, &args).spawn().unwrap();
    wait_for("both workers convert", Duration::from_secs(120), || async { crm.converted_leads().await >= 1_000 }).await;

    // The pace of the two together, then of the healthy one alone.
    let pace = |from: i64, to: i64, secs: f64| (to - from) as f64 / secs;
    let (t0, c0) = (std::time::Instant::now(), crm.converted_leads().await);
    tokio::time::sleep(Duration::from_secs(5)).await; // a measurement window, not a wait for an event
    let (c1, both) = (crm.converted_leads().await, t0.elapsed().as_secs_f64());
    let per_worker = pace(c0, c1, both) / 2.0;
    assert!(c1 < total / 2, "most of the job is left when the worker freezes");

    // The worst moment: frozen while one of its transactions holds the
    // job's progress counters (it has counted its lead and not committed).
    let frozen_ports = postgres_client_ports(frozen.id().unwrap());
    let mut holding = false;
    for _ in 0..500 {
        signal(&frozen, "STOP").await;
        holding = crm
            .count(&format!(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.relation = 'conversion_job_counters'::regclass AND l.granted
                   AND a.client_port IN ({})",
                frozen_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
            ))
            .await
            > 0;
        if holding {
            break;
        }
        signal(&frozen, "CONT").await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(holding, "never caught the worker holding the job's counters");
    // The healthy one's pace over half of what is surely left to it: the
    // frozen one holds up to its prefetch (9 batches in flight or next, and
    // a quarter of 8 waiting: 2,200 messages) until RabbitMQ gives them
    // back, so a window that ran past the rest would time idleness, not
    // the pace (on a fast machine the healthy worker is done in seconds).
    let held_by_frozen = 200 * (8 + 1) + 200 * 2;
    let want = c1 + (total - c1 - held_by_frozen) / 2;
    let t1 = std::time::Instant::now();
    let mut alone = c1;
    while t1.elapsed() < Duration::from_secs(30) && alone < want {
        tokio::time::sleep(Duration::from_millis(200)).await;
        alone = crm.converted_leads().await;
    }
    let healthy_pace = pace(c1, alone, t1.elapsed().as_secs_f64());
    signal(&frozen, "CONT").await;
    eprintln!(
        "pace before the freeze: {per_worker:.0} leads/s per worker; the healthy one alone: {healthy_pace:.0} leads/s"
    );
    assert!(
        healthy_pace >= per_worker / 2.0,
        "the healthy worker converted {:.0} leads/s while the other was frozen, against {per_worker:.0}/s each before",
        healthy_pace
    );

    wait_for("the job completes", Duration::from_secs(600), || async {
        job::rollup(crm.pool(), job_id).await.unwrap();
        job::get(crm.pool(), job_id).await.unwrap().unwrap().is_finished()
    })
    .await;
    drop((frozen, healthy));
    assert_exactly_once(&crm, job_id, total).await;
}

/// `leadconv enqueue` of every lead (with a deal), talking to RabbitMQ
/// through `mq`, with a publisher lease of `lease_secs` and small batches.
fn enqueue_through(crm: &Crm, broker: &TestBroker, acting: i64, mq: &Proxy, lease_secs: &str) -> Command {
    let options = with_deal().to_string();
    let acting = acting.to_string();
    let args = [
        "enqueue",
        "--criteria",
        r#"{"all_leads": true}"#,
        "--options",
        &options,
        "--requested-by",
        &acting,
        "--lease-secs",
        lease_secs,
        "--batch-size",
        "500",
    ];
    let mut c = leadconv(crm, broker, &args);
    c.env("AMQP_URL", amqp_url().replace("127.0.0.1:5672", &mq.addr.to_string()));
    c
}

/// Messages on `queue` now, counted by the broker.
async fn messages(broker: &TestBroker) -> u32 {
    broker.depth(&broker.topology.work_queue(Lane::Bulk)).await
}

/// RabbitMQ stops taking what the producer sends (flow control after a
/// disk or memory alarm, here a proxy that stops forwarding) for several
/// times its lease, while a sweeper watches for orphaned outboxes: the
/// producer keeps its lease, so each lead's message is published once, by
/// one publisher, and the job completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_held_up_by_the_broker_keeps_its_job_and_nothing_is_published_twice() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let acting = seeded(&crm, 6_000).await;
    let mq = Proxy::start("127.0.0.1:5672").await;
    // Enough for the handshake, the declarations and a few thousand messages.
    mq.pause_after(250_000);
    let mut producer = enqueue_through(&crm, &broker, acting, &mq, "2");
    let producer = producer.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    // A sweeper, as every worker runs one, on a direct connection.
    let sweeping = CancellationToken::new();
    let sweeper = {
        let (pool, topology, stop) = (crm.pool().clone(), broker.topology.clone(), sweeping.clone());
        let ch = broker.conn.create_channel().await.unwrap();
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
        tokio::spawn(async move {
            let lease = producer::Lease::new(Duration::from_secs(2));
            while !stop.is_cancelled() {
                leadconv::maintenance::sweep_outbox(&pool, &ch, &topology, &lease).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    wait_for("the broker holds the producer up", Duration::from_secs(60), || async { mq.is_paused() }).await;
    let held_at = messages(&broker).await;
    assert!(held_at < 6_000, "held up mid-job ({held_at} messages through)");
    // Four leases long: a publisher that does not renew while held up loses
    // its job to the sweeper here.
    tokio::time::sleep(Duration::from_secs(8)).await; // the fault's duration
    mq.resume();
    let out = tokio::time::timeout(Duration::from_secs(120), producer.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job_id: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    wait_for("the job is published", Duration::from_secs(60), || async {
        crm.count(&format!("SELECT count(*) FROM conversion_jobs WHERE id = '{job_id}' AND published_at IS NOT NULL"))
            .await
            == 1
    })
    .await;
    sweeping.cancel();
    sweeper.await.unwrap();
    assert_eq!(messages(&broker).await, 6_000, "each lead's message published once");

    run_to_idle(leadconv(&crm, &broker, &["worker", "--concurrency", "8", "--exit-when-idle"]).spawn().unwrap()).await;
    assert_exactly_once(&crm, job_id, 6_000).await;
}

/// The producer loses RabbitMQ half-way (a broker restart, here every
/// connection cut by a proxy): it gives its lease up at once and exits 0
/// saying the workers publish the rest, and they do without waiting for the
/// lease (600 s here) to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_loses_the_broker_hands_the_job_to_the_workers_at_once() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let acting = seeded(&crm, 6_000).await;
    let mq = Proxy::start("127.0.0.1:5672").await;
    mq.cut_after(250_000);
    let mut producer = enqueue_through(&crm, &broker, acting, &mq, "600");
    let out = tokio::time::timeout(Duration::from_secs(120), producer.output()).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("the workers publish the rest"), "{err}");
    let job_id: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let published = messages(&broker).await;
    assert!(published < 6_000, "cut mid-publish ({published} through)");

    let worker = leadconv(&crm, &broker, &["worker", "--concurrency", "8", "--exit-when-idle"]).spawn().unwrap();
    // Far less than the lease: the sweeper took the job over at once.
    let status = tokio::time::timeout(Duration::from_secs(300), worker.wait_with_output()).await;
    assert!(status.is_ok(), "the workers waited for the producer's lease");
    assert_exactly_once(&crm, job_id, 6_000).await;
}

/// A lead whose row stays locked by someone else: the worker's wait ends at
/// its lock timeout, the lead goes around a retry queue and converts once
/// the lock is gone, and `attempts` counts every delivery that reached a
/// conversion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_end_and_attempts_count_every_try() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, _) = (broker.seeded_bulk_job(&crm, 1, 11).await, 1);
    let lead: i64 = sqlx::query_scalar("SELECT lead_id FROM conversion_results WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(crm.pool())
        .await
        .unwrap();
    let mut holder = crm.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversion_results WHERE job_id = $1 AND lead_id = $2 FOR UPDATE")
        .bind(job_id)
        .bind(lead)
        .execute(&mut *holder)
        .await
        .unwrap();
    let addr = format!("127.0.0.1:{}", common::server::free_port());
    let _worker =
        leadconv(&crm, &broker, &["worker", "--lock-timeout-secs", "0.5", "--metrics", &addr]).spawn().unwrap();
    wait_for("the lock wait to end and the lead to go around a retry queue", Duration::from_secs(60), || async {
        let body = match reqwest::get(format!("http://{addr}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return false,
        };
        body.lines().any(|l| l.starts_with("leadconv_retries_total") && !l.ends_with(" 0"))
    })
    .await;
    holder.commit().await.unwrap();
    wait_for("the lead converts", Duration::from_secs(60), || async { crm.converted_leads().await == 1 }).await;
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM conversion_results WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(crm.pool())
        .await
        .unwrap();
    assert!(attempts >= 2, "attempts {attempts}: the try that timed out counts");
}

/// Whatever a stuck transaction holds of a job's progress counters (here
/// one that updated every one of the old 16 shards and then hung, as a
/// frozen worker's can), no conversion of the job waits for it: each
/// backend counts in a shard of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_stuck_on_the_job_counters_blocks_no_conversion() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let (job_id, total) = (broker.seeded_bulk_job(&crm, 300, 11).await, 300);
    let mut stuck = crm.pool().begin().await.unwrap();
    for shard in 0..16 {
        sqlx::query(
            "INSERT INTO conversion_job_counters (job_id, shard) VALUES ($1, $2) ON CONFLICT (job_id, shard) DO UPDATE SET last_at = now()",
        )
        .bind(job_id)
        .bind(shard)
        .execute(&mut *stuck)
        .await
        .unwrap();
    }
    let worker = leadconv(&crm, &broker, &["worker", "--concurrency", "8"]).spawn().unwrap();
    wait_for("every lead converted while the transaction is stuck", Duration::from_secs(120), || async {
        crm.converted_leads().await == total
    })
    .await;
    stuck.rollback().await.unwrap();
    drop(worker);
    run_to_idle(leadconv(&crm, &broker, &["worker", "--exit-when-idle"]).spawn().unwrap()).await;
    assert_exactly_once(&crm, job_id, total).await;
}
