//! `leadconv bench`: end-to-end throughput through RabbitMQ, next to the
//! same conversions run directly against Postgres with the same
//! parallelism and no queue.
//!
//! Each run gets a database of its own, created afresh
//! (`<database>_bench_direct`, `<database>_bench_queue`), seeded with leads
//! of the same shape, analyzed and checkpointed before its clock starts: the
//! second run must not pay for the first one's dead rows, autovacuum or
//! dirty pages, nor match against its contacts. The queue run spawns the
//! real `leadconv enqueue` and `leadconv worker` processes, so their peak
//! memory is measured as deployed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::Semaphore;
use uuid::Uuid;

use leadconv::queue::Topology;
use leadconv::store::convert;
use leadconv::store::db;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use leadconv_sample::{self as seed, SeedSpec};

use crate::cpu::{CpuUse, CpuWatch};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Leads per run.
    #[arg(long, default_value_t = 10_000)]
    pub leads: usize,
    /// Share of leads duplicating existing e-mails or companies (0–1).
    #[arg(long, default_value_t = 0.3)]
    pub duplicates: f64,
    /// Conversions in flight at once, in both runs.
    #[arg(long, default_value_t = 8)]
    pub workers: u16,
    /// Only the run through RabbitMQ.
    #[arg(long)]
    pub skip_direct: bool,
    /// Skip the set-based run (the ceiling the queue run is compared with).
    #[arg(long)]
    pub skip_ceiling: bool,
    /// Stop the worker after this many seconds and cancel the rest of the
    /// job (to measure memory on a job too big to finish).
    #[arg(long)]
    pub worker_seconds: Option<u64>,
    /// While the bulk job runs, time this many calls of the one-lead
    /// convert endpoint (`POST /v1/leads/{id}/convert`) on a `leadconv serve`.
    /// Each client makes one more call first, reported apart: it meets the
    /// serve process just started.
    #[arg(long, default_value_t = 0)]
    pub api_calls: usize,
    /// Callers making those calls at once (each one call after another),
    /// as workflow rules firing together would. With none given by
    /// `--api-calls` or `--api-seconds`, 10 calls per client.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub api_clients: u16,
    /// Skip the reference ceiling (`../shared/bench/pg-limit-set-based.sql`,
    /// one `psql` loop per core).
    #[arg(long)]
    pub skip_reference: bool,
    /// The reference ceiling's SQL: by default the copy vendored in
    /// `devtools/reference/`; refused unless its SHA-256 is the reference's.
    #[arg(long)]
    pub reference_sql: Option<std::path::PathBuf>,
    /// With `--api-clients`: each client calls one lead after another for
    /// this many seconds (closed loop, each call on a lead of its own made
    /// before the clock starts), instead of a fixed number of calls.
    #[arg(long)]
    pub api_seconds: Option<u64>,
    /// After the run through RabbitMQ, take its job back (`leadconv undo`)
    /// through the same queue with a fresh worker, and report the undo's
    /// leads/s against the conversion's.
    #[arg(long)]
    pub undo: bool,
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub name: &'static str,
    pub leads: u64,
    pub wall: Duration,
    /// One lead's transaction; `None` when leads are not converted one by one.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    pub peak_rss: Vec<(&'static str, u64)>,
    /// Contacts, accounts and deals in the database after the run, and the
    /// leads that merged, leaving out what the one-lead convert calls made
    /// (`--api-calls`): the runs did the same work when these agree.
    pub made: (i64, i64, i64, i64),
    /// A queue run's job, from its creation to its last result (no pending
    /// result left): with convert-now callers, the wall time also holds
    /// the callers' whole duration, which may outlast the job.
    pub done_in: Option<Duration>,
    /// With convert-now callers: the job's pace while they called.
    pub while_called: Option<f64>,
    /// CPU used by each group of processes while the run's clock ran.
    pub cpu: crate::cpu::CpuUse,
}

const DIRECT: &str = "direct to Postgres (baseline)";
const CEILING: &str = "set-based in SQL alone (ceiling)";
const QUEUE: &str = "enqueue → RabbitMQ → worker";
const QUEUE_ALONE: &str = "enqueue → RabbitMQ → worker, no convert-now callers";
const REFERENCE: &str = "reference ceiling (../shared/bench, psql loops)";

/// SHA-256 of `../shared/bench/pg-limit-set-based.sql`: the bench runs the
/// reference ceiling only unchanged.
const REFERENCE_SHA256: &str = "ee4eeddd2dee394219e55071de41e5db9dbdd9a04b88e59a8f87956db8808369";

/// One loop of the reference ceiling, as its README runs it: the file fed
/// to one `psql` session again and again until a batch comes back empty.
/// `ON_ERROR_STOP`: a failing statement ends the loop instead of spinning.
const REFERENCE_LOOP: &str = r#"while cat "$F" && echo '\if :more \else \q \endif'; do :; done |
    psql -q -X -At -v ON_ERROR_STOP=1 -d "$DB" -v job="$JOB" -v streams="$STREAMS" -v stream="$STREAM" >/dev/null"#;

/// The reference ceiling (`devtools/reference/README.md`): the same seed as
/// the queue run, the job snapshotted with no message published, then one
/// `psql` loop per core, each over its share of the job's leads.
/// The reference ceiling's SQL file (`--reference-sql`, or the vendored
/// copy), refused unless it is the reference unchanged.
fn reference_sql(args: &BenchArgs) -> anyhow::Result<std::path::PathBuf> {
    use sha2::Digest;
    let path = args
        .reference_sql
        .clone()
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/pg-limit-set-based.sql"));
    let sql =
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading the reference ceiling {}: {e}", path.display()))?;
    let sum: String = sha2::Sha256::digest(&sql).iter().map(|b| format!("{b:02x}")).collect();
    anyhow::ensure!(
        sum == REFERENCE_SHA256,
        "{} is not the reference ceiling (SHA-256 {sum}, expected {REFERENCE_SHA256}): pass \
         ../shared/bench/pg-limit-set-based.sql unchanged with --reference-sql, or leave it out",
        path.display()
    );
    Ok(path)
}

async fn reference(pool: &PgPool, url: &str, args: &BenchArgs, path: &std::path::Path) -> anyhow::Result<RunReport> {
    let (seeded, criteria) = seed_run(pool, args, 2).await?;
    let new = NewJob { criteria, options: options(), requested_by: seeded.acting_user, trigger: Trigger::Manual };
    let checked = job::check(pool, new).await?;
    let created = job::create(pool, &checked, Dispatch::InProcess).await?;
    let streams = std::thread::available_parallelism().map_or(2, |n| n.get());
    let watch = CpuWatch::start();
    let t = Instant::now();
    let mut loops = Vec::with_capacity(streams);
    for stream in 0..streams {
        loops.push(
            Command::new("bash")
                .args(["-c", REFERENCE_LOOP])
                .env("F", path)
                .env("DB", url)
                .env("JOB", created.id.to_string())
                .env("STREAMS", streams.to_string())
                .env("STREAM", stream.to_string())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| anyhow::anyhow!("starting bash for the reference ceiling: {e}"))?,
        );
    }
    for mut l in loops {
        let status = l.wait().await?;
        anyhow::ensure!(status.success(), "a reference ceiling loop (psql) failed: {status}");
    }
    let wall = t.elapsed();
    let cpu = watch.stop();
    job::rollup(pool, created.id).await?;
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversion_results WHERE job_id = $1 AND outcome <> 'pending'")
            .bind(created.id)
            .fetch_one(pool)
            .await?;
    println!("reference ceiling ({streams} psql loops): {done} of {} leads in {wall:.1?}", created.total_count);
    RunReport::set_based(REFERENCE, done as u64, wall, cpu, pool).await
}

async fn made(pool: &PgPool) -> sqlx::Result<(i64, i64, i64, i64)> {
    sqlx::query_as(
        "WITH calls AS (SELECT r.* FROM conversion_results r JOIN conversion_jobs j ON j.id = r.job_id
                        WHERE j.trigger = 'workflow')
         SELECT (SELECT count(*) FROM contacts) - (SELECT count(*) FROM calls WHERE contact_action = 'created'),
                (SELECT count(*) FROM accounts) - (SELECT count(*) FROM calls WHERE account_action = 'created'),
                (SELECT count(*) FROM deals) - (SELECT count(*) FROM calls WHERE deal_action = 'created'),
                (SELECT count(*) FROM conversion_results WHERE contact_action = 'merged')
                - (SELECT count(*) FROM calls WHERE contact_action = 'merged')",
    )
    .fetch_one(pool)
    .await
}

/// The ceiling: the same leads (the queue run's seed), converted by
/// Postgres alone, set-based (see `ceiling`).
async fn ceiling(pool: &PgPool, args: &BenchArgs) -> anyhow::Result<RunReport> {
    let (seeded, criteria) = seed_run(pool, args, 2).await?;
    let new = NewJob { criteria, options: options(), requested_by: seeded.acting_user, trigger: Trigger::Manual };
    let checked = job::check(pool, new).await?;
    let watch = CpuWatch::start();
    let t = Instant::now();
    let created = job::create(pool, &checked, Dispatch::InProcess).await?;
    let done = crate::ceiling::convert(pool, created.id).await?;
    let wall = t.elapsed();
    let cpu = watch.stop();
    job::rollup(pool, created.id).await?;
    println!("set-based: {done} of {} leads in {wall:.1?}", created.total_count);
    RunReport::set_based(CEILING, done, wall, cpu, pool).await
}

impl RunReport {
    /// A run in SQL alone: no per-lead latencies, no process of ours.
    async fn set_based(
        name: &'static str,
        leads: u64,
        wall: Duration,
        cpu: CpuUse,
        pool: &PgPool,
    ) -> anyhow::Result<RunReport> {
        Ok(RunReport {
            name,
            leads,
            wall,
            p50_ms: None,
            p99_ms: None,
            e2e_p50_ms: None,
            e2e_p99_ms: None,
            peak_rss: vec![],
            made: made(pool).await?,
            done_in: None,
            while_called: None,
            cpu,
        })
    }

    pub fn per_sec(&self) -> f64 {
        self.leads as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

fn bench_url(database_url: &str, run: &str) -> anyhow::Result<String> {
    let options: PgConnectOptions = database_url.parse()?;
    let db = options.get_database().unwrap_or("leadconv");
    let (base, _) = database_url.split_once('?').unwrap_or((database_url, ""));
    let prefix = base.rsplit_once('/').map(|(p, _)| p).unwrap_or(base);
    Ok(format!("{prefix}/{db}_bench_{run}"))
}

/// Drops and recreates the run's database, migrated: figures never depend
/// on earlier runs.
async fn fresh_database(database_url: &str, run: &str, args: &BenchArgs) -> anyhow::Result<(String, PgPool)> {
    use sqlx::{ConnectOptions, Connection};
    let url = bench_url(database_url, run)?;
    let options: PgConnectOptions = url.parse()?;
    let name = options.get_database().expect("a database name").to_owned();
    let mut admin = options.clone().database("postgres").connect().await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await?;
    admin.close().await?;
    db::create_database_if_missing(&url).await?;
    let pool = db::connect(&url, u32::from(args.workers) + 4).await?;
    db::migrate(&pool).await?;
    Ok((url, pool))
}

pub async fn run(database_url: &str, amqp_url: &str, args: &BenchArgs) -> anyhow::Result<()> {
    println!(
        "leadconv bench: {} leads per run, {:.0}% duplicates, {} conversions in flight; databases {}, {}, {}, {}",
        args.leads,
        args.duplicates * 100.0,
        args.workers,
        bench_url(database_url, "direct")?,
        bench_url(database_url, "ceiling")?,
        bench_url(database_url, "reference")?,
        bench_url(database_url, "queue")?,
    );

    // Checked before anything runs: a changed reference is no reference.
    let reference_path = if args.skip_reference { None } else { Some(reference_sql(args)?) };
    let mut reports = Vec::new();
    if !args.skip_direct {
        let (_, pool) = fresh_database(database_url, "direct", args).await?;
        reports.push(direct(&pool, args).await?);
        pool.close().await;
    }
    if !args.skip_ceiling {
        let (_, pool) = fresh_database(database_url, "ceiling", args).await?;
        reports.push(ceiling(&pool, args).await?);
        pool.close().await;
    }
    if let Some(path) = &reference_path {
        let (url, pool) = fresh_database(database_url, "reference", args).await?;
        reports.push(reference(&pool, &url, args, path).await?);
        pool.close().await;
    }
    if args.api_seconds.is_some() {
        // The bulk job's rate without callers, in the same run: what the
        // callers may take from it is measured against this.
        let alone = BenchArgs { api_calls: 0, api_clients: 1, api_seconds: None, undo: false, ..args.clone() };
        let (url, pool) = fresh_database(database_url, "queue", args).await?;
        let mut r = through_queue(&pool, &url, amqp_url, &alone).await?;
        r.name = QUEUE_ALONE;
        reports.push(r);
        pool.close().await;
    }
    let (url, pool) = fresh_database(database_url, "queue", args).await?;
    reports.push(through_queue(&pool, &url, amqp_url, args).await?);
    pool.close().await;

    println!();
    println!("| run | leads | wall | leads/s | conversion p50 | p99 | enqueue→commit p50 | p99 | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &reports {
        let rss: Vec<String> =
            r.peak_rss.iter().map(|(who, b)| format!("{who} {:.0} MiB", *b as f64 / 1048576.0)).collect();
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
        println!(
            "| {} | {} | {:.1} s | {:.0} | {} | {} | {} | {} | {} |",
            r.name,
            r.leads,
            r.wall.as_secs_f64(),
            r.per_sec(),
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.e2e_p50_ms),
            ms(r.e2e_p99_ms),
            rss.join(", ")
        );
    }
    println!();
    println!(
        "CPU per lead while each run's clock ran (ms, from /proc; {} cores), and the share of the cores busy:",
        reports.first().map_or(0, |r| r.cpu.cores)
    );
    println!("| run | {} | total | cores busy |", crate::cpu::GROUPS.join(" | "));
    println!("|---|{}---|---|", "---|".repeat(crate::cpu::GROUPS.len()));
    for r in &reports {
        let per_lead = |s: f64| 1000.0 * s / (r.leads.max(1) as f64);
        let groups: Vec<String> = crate::cpu::GROUPS
            .iter()
            .map(|g| r.cpu.seconds.get(g).map_or("-".into(), |&s| format!("{:.3}", per_lead(s))))
            .collect();
        println!(
            "| {} | {} | {:.3} | {:.0}% |",
            r.name,
            groups.join(" | "),
            per_lead(r.cpu.seconds.values().sum()),
            100.0 * r.cpu.busy()
        );
    }
    let find = |name: &str| reports.iter().find(|r| r.name == name);
    println!();
    // With convert-now callers, the bulk job's own pace is the run without them.
    let bulk = find(QUEUE_ALONE).or_else(|| find(QUEUE));
    for other in [DIRECT, CEILING, REFERENCE] {
        if let (Some(queue), Some(o)) = (bulk, find(other)) {
            println!(
                "through RabbitMQ / {other}: {:.0} / {:.0} leads/s = {:.0}%",
                queue.per_sec(),
                o.per_sec(),
                100.0 * queue.per_sec() / o.per_sec()
            );
        }
    }
    if let (Some(with), Some(alone)) = (find(QUEUE), find(QUEUE_ALONE)) {
        // Each job from its creation to its last result: the run's wall
        // time with callers holds all of their --api-seconds, even when the
        // job was done before them.
        let rate = |r: &RunReport| r.done_in.map_or(r.per_sec(), |d| r.leads as f64 / d.as_secs_f64().max(1e-9));
        println!(
            "bulk job with convert-now callers / without (job created to last result, {:.1} s / {:.1} s): {:.0} / {:.0} leads/s = {:.0}%",
            with.done_in.unwrap_or(with.wall).as_secs_f64(),
            alone.done_in.unwrap_or(alone.wall).as_secs_f64(),
            rate(with),
            rate(alone),
            100.0 * rate(with) / rate(alone)
        );
        if let Some(w) = with.while_called {
            println!(
                "bulk job while the convert-now callers called / without: {w:.0} / {:.0} leads/s = {:.0}%",
                rate(alone),
                100.0 * w / rate(alone)
            );
        }
    }
    for r in &reports {
        println!(
            "records made by {}: {} contacts, {} accounts, {} deals, {} leads merged",
            r.name, r.made.0, r.made.1, r.made.2, r.made.3
        );
    }
    Ok(())
}

async fn seed_run(pool: &PgPool, args: &BenchArgs, rng_seed: u64) -> anyhow::Result<(seed::Seeded, serde_json::Value)> {
    let t = Instant::now();
    let seeded = seed::seed(pool, &SeedSpec { leads: args.leads, duplicates: args.duplicates, rng_seed }).await?;
    // Fresh statistics, as autovacuum would have them on a live CRM: without
    // them the first run plans its lookups for empty tables and the
    // comparison measures the planner, not the queue.
    sqlx::query("ANALYZE").execute(pool).await?;
    // Dirty pages of the seeding (or of the other run) are written now, not
    // by a checkpoint in the middle of the timed run. Needs superuser; a
    // run without it is merely noisier.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        println!("(no CHECKPOINT before the run: {e})");
    }
    println!("seeded {} leads in {:.1?}", seeded.lead_ids.len(), t.elapsed());
    let (first, last) = (seeded.lead_ids[0], *seeded.lead_ids.last().expect("leads"));
    Ok((seeded, json!({"field": "id", "op": "between", "value": [first, last]})))
}

fn options() -> serde_json::Value {
    json!({"create_deal": true, "deal": {"name": "{{company}} – {{last_name}}", "closing_date": "+30d", "stage": "Qualification"}})
}

/// The baseline: the same conversions, same parallelism, no queue.
async fn direct(pool: &PgPool, args: &BenchArgs) -> anyhow::Result<RunReport> {
    let (seeded, criteria) = seed_run(pool, args, 1).await?;
    let new = NewJob { criteria, options: options(), requested_by: seeded.acting_user, trigger: Trigger::Manual };
    let checked = job::check(pool, new).await?;
    let watch = CpuWatch::start();
    let t = Instant::now();
    let created = job::create(pool, &checked, Dispatch::InProcess).await?;
    let settings = Arc::new(checked.settings);
    let gate = Arc::new(Semaphore::new(usize::from(args.workers)));
    let mut tasks = tokio::task::JoinSet::new();
    for lead in seeded.lead_ids {
        let (pool, settings, permit) = (pool.clone(), settings.clone(), gate.clone().acquire_owned().await?);
        tasks.spawn(async move {
            let r = convert::convert_lead(&pool, created.id, &settings, lead).await;
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let wall = t.elapsed();
    let cpu = watch.stop();
    job::rollup(pool, created.id).await?;
    let (p50, p99) = percentiles(pool, created.id, "duration_ms::float8").await?;
    println!("direct: {} leads in {:.1?}", created.total_count, wall);
    Ok(RunReport {
        name: DIRECT,
        leads: created.total_count as u64,
        wall,
        p50_ms: Some(p50),
        p99_ms: Some(p99),
        e2e_p50_ms: None,
        e2e_p99_ms: None,
        peak_rss: vec![("bench process", peak_rss(std::process::id()).unwrap_or(0))],
        made: made(pool).await?,
        done_in: None,
        while_called: None,
        cpu,
    })
}

/// The `leadconv` binary the queue run starts: `LEADCONV_BIN`, or the one
/// cargo built next to this `leadconv-dev`.
fn leadconv_binary() -> anyhow::Result<std::path::PathBuf> {
    let path = match std::env::var_os("LEADCONV_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name(format!("leadconv{}", std::env::consts::EXE_SUFFIX)),
    };
    anyhow::ensure!(
        path.is_file(),
        "no leadconv binary at {}: build it (cargo build --release --bins) or set LEADCONV_BIN",
        path.display()
    );
    Ok(path)
}

/// The product: `leadconv enqueue` and `leadconv worker` as processes.
async fn through_queue(pool: &PgPool, url: &str, amqp_url: &str, args: &BenchArgs) -> anyhow::Result<RunReport> {
    let (seeded, criteria) = seed_run(pool, args, 2).await?;
    let prefix = format!("leadconv_bench_{}", std::process::id());
    let exe = leadconv_binary()?;
    let base = |sub: &str| {
        let mut c = Command::new(&exe);
        c.arg(sub)
            .env("DATABASE_URL", url)
            .env("AMQP_URL", amqp_url)
            .env("LEADCONV_QUEUE_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    };

    let calls = match args.api_seconds {
        // Closed loop for a duration: leads enough for 40 calls a second
        // per client (a client that runs out stops, and says so).
        Some(secs) => usize::from(args.api_clients) * usize::try_from(secs * 40).unwrap_or(usize::MAX),
        None if args.api_calls == 0 && args.api_clients > 1 => usize::from(args.api_clients) * 10,
        None => args.api_calls,
    };
    let caller_leads =
        if calls > 0 { caller_leads(pool, seeded.acting_user, calls, args.api_clients).await? } else { vec![] };

    let watch = Arc::new(CpuWatch::start());
    let t = Instant::now();
    let mut producer = base("enqueue")
        .args(["--criteria", &criteria.to_string(), "--options", &options().to_string()])
        .args(["--requested-by", &seeded.acting_user.to_string(), "--trigger", "schedule"])
        .stdout(Stdio::piped())
        .spawn()?;
    let producer_pid = producer.id().expect("a running child");
    watch.name(producer_pid, "enqueue");
    let producer_rss = tokio::spawn(watch_rss(producer_pid));
    let mut lines = BufReader::new(producer.stdout.take().expect("piped")).lines();
    let job_id: Uuid =
        lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("enqueue printed no job id"))?.trim().parse()?;

    let mut worker = base("worker").args(["--concurrency", &args.workers.to_string(), "--exit-when-idle"]).spawn()?;
    let worker_pid = worker.id().expect("a running child");
    watch.name(worker_pid, "worker");
    let worker_rss = tokio::spawn(watch_rss(worker_pid));
    let mut last_result = tokio::spawn(until_none_pending(pool.clone(), job_id, t, watch.clone()));

    // The callers start with the bulk job (once it is under way), while
    // the producer still publishes it.
    let published = async {
        let status = producer.wait().await?;
        anyhow::ensure!(status.success(), "enqueue failed: {status}");
        println!("enqueue: job {job_id} published in {:.1?}", t.elapsed());
        anyhow::Ok(())
    };
    let called = async {
        if caller_leads.is_empty() {
            return Ok(None);
        }
        let deadline = args.api_seconds.map(Duration::from_secs);
        let serve = base("serve");
        convert_calls(pool, serve, seeded.acting_user, caller_leads, args.api_clients, job_id, deadline).await.map(Some)
    };
    let ((), api) = tokio::try_join!(published, called)?;

    if let Some(secs) = args.worker_seconds {
        tokio::select! {
            s = worker.wait() => { s?; }
            _ = tokio::time::sleep(Duration::from_secs(secs)) => {
                // SIGTERM: the worker finishes what it holds and exits.
                let _ = Command::new("kill").args(["-TERM", &worker_pid.to_string()]).status().await;
                worker.wait().await?;
            }
        }
    } else {
        let status = worker.wait().await?;
        anyhow::ensure!(status.success(), "worker failed: {status}");
    }
    let exited = t.elapsed();
    // The job's clock: from `enqueue` to its last result (no pending lead
    // left), as the reference's runs to its last commit. The worker's
    // idle check and exit after that are not conversion. A job left
    // pending (`--worker-seconds`) runs to the worker's exit.
    let wall = match tokio::time::timeout(Duration::from_secs(2), &mut last_result).await {
        Ok(joined) => joined?.unwrap_or(exited),
        Err(_) => {
            last_result.abort();
            exited
        }
    };
    let cpu = watch.stop();
    job::rollup(pool, job_id).await?;
    let job = job::get(pool, job_id).await?.expect("the job exists");
    let done = (job.total_count - job.pending_count()) as u64;
    if job.pending_count() > 0 {
        job::cancel(pool, job_id).await?;
    }
    let (p50, p99) = percentiles(pool, job_id, "duration_ms::float8").await?;
    let (e50, e99) = percentiles(pool, job_id, "extract(epoch from finished_at - enqueued_at) * 1000").await?;
    println!(
        "through RabbitMQ: {done} of {} leads in {wall:.1?} (to the last result; the worker exited at {exited:.1?})",
        job.total_count
    );
    let while_called = api.as_ref().map(|a| a.bulk_while.0 as f64 / a.bulk_while.1.as_secs_f64().max(1e-9));
    if let Some(a) = api {
        println!(
            "one-lead convert endpoint during the bulk job: {} calls by {} concurrent clients{}, {} answered 200 with the result; latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; bulk job pending when they ended: {}",
            a.calls,
            args.api_clients,
            args.api_seconds.map_or(String::new(), |s| format!(
                " calling back to back for {s} s ({:.0} calls/s{})",
                a.calls as f64 / s as f64,
                if a.ran_out { "; some clients ran out of leads before the end" } else { "" }
            )),
            a.ok,
            a.p50,
            a.p99,
            a.max,
            a.bulk_pending_after
        );
        let (n, window) = a.bulk_while;
        println!(
            "  the bulk job while they called: {n} leads in {:.1} s = {:.0} leads/s",
            window.as_secs_f64(),
            n as f64 / window.as_secs_f64().max(1e-9)
        );
        if let Some((n, p50, p99)) = a.during_bulk {
            println!(
                "  the bulk job was done before the callers: {n} calls started while it had pending leads, latency p50 {p50:.0} ms, p99 {p99:.0} ms"
            );
        }
        println!(
            "  (not counted above: each client's first call, on the serve process just started: p50 {:.0} ms, max {:.0} ms)",
            a.cold_p50, a.cold_max
        );
    }

    if args.undo {
        let t = Instant::now();
        let out = base("undo").arg(job_id.to_string()).stdout(Stdio::piped()).output().await?;
        anyhow::ensure!(out.status.success(), "undo failed: {}", String::from_utf8_lossy(&out.stderr));
        let undo_id: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        let mut w = base("worker").args(["--concurrency", &args.workers.to_string(), "--exit-when-idle"]).spawn()?;
        let status = w.wait().await?;
        anyhow::ensure!(status.success(), "undo worker failed: {status}");
        let undo_wall = t.elapsed();
        job::rollup(pool, undo_id).await?;
        let u = job::get(pool, undo_id).await?.expect("the undo job exists");
        let undone = f64::from(u.converted_count);
        let (rate, conv) = (undone / undo_wall.as_secs_f64(), done as f64 / wall.as_secs_f64());
        println!(
            "undo through RabbitMQ: {} of {} leads taken back ({} skipped, {} failed) in {undo_wall:.1?} = {rate:.0} leads/s = {:.0}% of the conversion's {conv:.0} leads/s",
            u.converted_count,
            u.total_count,
            u.skipped_count,
            u.failed_count,
            100.0 * rate / conv
        );
    }

    // Leave the broker as it was.
    if let Ok(conn) = leadconv::queue::connect(amqp_url).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = Topology::new(prefix).delete(&ch).await;
            // The channel before the connection, or lapin logs an error.
            let _ = ch.close(200, "bye").await;
        }
        let _ = conn.close(200, "bye").await;
    }
    Ok(RunReport {
        name: QUEUE,
        leads: done,
        wall,
        p50_ms: Some(p50),
        p99_ms: Some(p99),
        e2e_p50_ms: Some(e50),
        e2e_p99_ms: Some(e99),
        peak_rss: vec![("producer", producer_rss.await?), ("worker", worker_rss.await?)],
        made: made(pool).await?,
        done_in: job.finished_at.and_then(|f| (f - job.created_at).to_std().ok()),
        while_called,
        cpu,
    })
}

/// When job `job_id` has no pending lead left, as time since `t`,
/// looked at every 50 ms; stops `watch` at that moment.
async fn until_none_pending(pool: PgPool, job_id: Uuid, t: Instant, watch: Arc<CpuWatch>) -> Option<Duration> {
    loop {
        // The job's row and its own counter shards only: the progress
        // view sums every job's shards (a millisecond with thousands of
        // convert-now jobs about), CPU the run would lose to the clock.
        let pending: Option<i64> = sqlx::query_scalar(
            "SELECT j.total_count - j.converted_count - j.skipped_count - j.failed_count
                    - coalesce((SELECT sum(converted + skipped + failed) FROM conversion_job_counters
                                WHERE job_id = $1), 0)
             FROM conversion_jobs j WHERE j.id = $1",
        )
        .bind(job_id)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten();
        if pending == Some(0) {
            let at = t.elapsed();
            tokio::task::spawn_blocking(move || watch.stop()).await.ok()?;
            return Some(at);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `q` quantile of `sorted` (nearest rank), 0 when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0).max(0.0) * q).round() as usize).copied().unwrap_or(0.0)
}

async fn percentiles(pool: &PgPool, job_id: Uuid, expr: &str) -> sqlx::Result<(f64, f64)> {
    let (p50, p99): (Option<f64>, Option<f64>) = sqlx::query_as(&format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY {expr}), percentile_cont(0.99) WITHIN GROUP (ORDER BY {expr})
         FROM conversion_results WHERE job_id = $1 AND outcome <> 'pending' AND duration_ms IS NOT NULL"
    ))
    .bind(job_id)
    .fetch_one(pool)
    .await?;
    Ok((p50.unwrap_or(0.0), p99.unwrap_or(0.0)))
}

/// Peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Follows a child's peak memory until it exits; the kernel keeps the peak,
/// so the last reading before exit is the answer.
async fn watch_rss(pid: u32) -> u64 {
    let mut last = 0;
    while let Some(v) = peak_rss(pid) {
        last = last.max(v);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

struct ApiFigures {
    calls: usize,
    ok: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// The first call of each client, on a serve that has just started.
    cold_p50: f64,
    cold_max: f64,
    bulk_pending_after: i32,
    /// A closed-loop client used up its leads before the deadline.
    ran_out: bool,
    /// When the bulk job was done before the callers: the calls started
    /// while it still had pending leads, and their p50 and p99.
    during_bulk: Option<(usize, f64, f64)>,
    /// The bulk job's leads recorded while the callers called, and for how
    /// long they called while it had pending leads.
    bulk_while: (i64, Duration),
}

/// Leads for `calls` one-lead conversions by `clients` callers, and one
/// more per client (its first call, made on a serve that has just started,
/// is reported apart): made after the seed, so outside its bulk job, in
/// one statement, before the run's clock starts.
async fn caller_leads(pool: &PgPool, acting: i64, calls: usize, clients: u16) -> anyhow::Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO leads (owner_id, last_name, email, company)
         SELECT $1, 'Urgent ' || i, 'urgent' || i || '.' || $3 || '@example.net', 'Urgent Co ' || i
         FROM generate_series(1, $2::int) AS i ORDER BY i RETURNING id",
    )
    .bind(acting)
    .bind(i32::try_from(calls + usize::from(clients.max(1)))?)
    .bind(Uuid::new_v4().simple().to_string())
    .fetch_all(pool)
    .await?)
}

/// Times one-lead conversions through the API while the bulk job `bulk` is
/// being worked on: `clients` callers at once, each one call after another,
/// on leads of their own; `calls` of them in all, or, with `duration`, as
/// many as they make in that time (closed loop).
async fn convert_calls(
    pool: &PgPool,
    mut serve: Command,
    acting: i64,
    leads: Vec<i64>,
    clients: u16,
    bulk: Uuid,
    duration: Option<Duration>,
) -> anyhow::Result<ApiFigures> {
    // Wait until the bulk job is really under way.
    loop {
        let j = job::get(pool, bulk).await?.expect("the job exists");
        if j.converted_count >= 500 || j.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut server = serve.args(["--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn()?;
    let mut lines = BufReader::new(server.stdout.take().expect("piped")).lines();
    let first = lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("serve printed nothing"))?;
    let base = first.trim_start_matches("listening on ").trim().to_owned();
    let token = leadconv::store::auth::create_token(pool, acting, "bench").await?;
    let clients = usize::from(clients.max(1));
    let calls = leads.len().saturating_sub(clients);
    let http = reqwest::Client::new();
    let calling_from = chrono::Utc::now();
    let deadline = duration.map(|d| Instant::now() + d);
    // Each client calls one lead after another; the clients run at once.
    let per_client = leads.len().div_ceil(clients);
    let runs = leads.chunks(per_client.max(1)).map(|mine| {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        let mine = mine.to_vec();
        async move {
            let mut out = Vec::with_capacity(mine.len());
            let mut ran_out = true;
            for (i, id) in mine.into_iter().enumerate() {
                // The first (cold) call always; then until the deadline.
                if i > 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                    ran_out = false;
                    break;
                }
                let (t, began) = (Instant::now(), chrono::Utc::now());
                let resp = http
                    .post(format!("{base}/v1/leads/{id}/convert"))
                    .bearer_auth(&token)
                    .json(&json!({"timeout_ms": 10000}))
                    .send()
                    .await?;
                out.push((resp.status() == reqwest::StatusCode::OK, t.elapsed().as_secs_f64() * 1000.0, began));
            }
            anyhow::Ok((out, ran_out && deadline.is_some()))
        }
    });
    // A client's first call meets a serve process that has just started
    // (connections being opened, statements prepared for the first time):
    // those are the cold figures, and the rest the steady state a workflow
    // caller of a running serve sees.
    let (mut took, mut cold) = (Vec::with_capacity(calls), Vec::with_capacity(clients));
    let (mut ok, mut ran_out) = (0, false);
    let mut began = Vec::with_capacity(calls);
    for (client, out) in futures::future::try_join_all(runs).await? {
        ran_out |= out;
        for (i, (answered, ms, at)) in client.into_iter().enumerate() {
            if i == 0 {
                cold.push(ms);
            } else {
                ok += usize::from(answered);
                took.push(ms);
                began.push((at, ms));
            }
        }
    }
    let calling_until = chrono::Utc::now();
    cold.sort_by(f64::total_cmp);
    let _ = server.start_kill();
    let _ = server.wait().await;
    took.sort_by(f64::total_cmp);
    let at = |q: f64| quantile(&took, q);
    job::rollup(pool, bulk).await?;
    let after = job::get(pool, bulk).await?.expect("the job exists");
    let bulk_pending_after = after.pending_count();
    // Calls made after the bulk job was done were not made during it.
    let during_bulk = after.finished_at.filter(|_| bulk_pending_after == 0).map(|done| {
        let mut during: Vec<f64> = began.iter().filter(|(at, _)| *at < done).map(|(_, ms)| *ms).collect();
        during.sort_by(f64::total_cmp);
        (during.len(), quantile(&during, 0.5), quantile(&during, 0.99))
    });
    // The bulk job's own pace while the callers called (its first leads,
    // before they started, and its last, after they stopped, left out).
    let until = after.finished_at.filter(|_| bulk_pending_after == 0).map_or(calling_until, |f| f.min(calling_until));
    let bulk_while: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversion_results WHERE job_id = $1 AND finished_at >= $2 AND finished_at < $3",
    )
    .bind(bulk)
    .bind(calling_from)
    .bind(until)
    .fetch_one(pool)
    .await?;
    let window = (until - calling_from).to_std().unwrap_or_default();
    Ok(ApiFigures {
        bulk_while: (bulk_while, window),
        during_bulk,
        calls: took.len(),
        ok,
        p50: at(0.5),
        p99: at(0.99),
        max: *took.last().unwrap_or(&0.0),
        cold_p50: cold.get(cold.len() / 2).copied().unwrap_or(0.0),
        cold_max: cold.last().copied().unwrap_or(0.0),
        bulk_pending_after,
        ran_out,
    })
}
