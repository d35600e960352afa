//! Operating leadconv (issue 13): failures that name the service, host and
//! port with the fix; no pod or worker on an unmigrated database; `doctor`;
//! the command line in scripts (pipes, files, CSV, colours, `jobs`); metrics
//! that add up against the database; retention; token list and revoke; the
//! HTTP access log.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::broker::{wait_for, TestBroker};
use common::server::{free_port, serve};
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Runs `leadconv ARGS` against `database_url`, this test's queues and
/// RabbitMQ (unless `amqp` overrides it).
async fn run(database_url: &str, amqp: Option<&str>, prefix: &str, args: &[&str]) -> Output {
    let mut c = leadconv_command(database_url, prefix, args);
    if let Some(amqp) = amqp {
        c.env("AMQP_URL", amqp);
    }
    c.output().await.unwrap()
}

/// A worker serving its metrics on `addr`, for as long as it is kept.
fn worker_with_metrics(crm: &Crm, broker: &TestBroker, addr: &str) -> tokio::process::Child {
    leadconv_command(&crm.url(), broker.prefix(), &["worker", "--metrics", addr]).spawn().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn leads(crm: &Crm, owner: i64, n: i64) {
    sqlx::query("INSERT INTO leads (owner_id, last_name, email) SELECT $1, 'Lead ' || g, 'lead' || g || '@example.com' FROM generate_series(1, $2) g")
        .bind(owner)
        .bind(n)
        .execute(crm.pool())
        .await
        .unwrap();
}

async fn enqueue_all(crm: &Crm, broker: &TestBroker, acting: i64) -> String {
    let out = run(
        &crm.url(),
        None,
        broker.prefix(),
        &["enqueue", "--criteria", r#"{"all_leads": true}"#, "--requested-by", &acting.to_string()],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

// Point 3: connection failures are fast and say what, where and how to fix,
// never with the password; a missing or unmigrated database names the
// command that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_name_the_service_host_port_and_the_fix() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let closed = free_port();

    // Postgres on a port where nothing listens: at once, not after 30 s of
    // "pool timed out".
    let url = format!("postgres://leadconv:s3cret-pw@127.0.0.1:{closed}/crm");
    let started = std::time::Instant::now();
    let out = run(&url, None, broker.prefix(), &["status", "00000000-0000-0000-0000-000000000000"]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("Postgres at 127.0.0.1:{closed}")) && err.contains("connection refused"), "{err}");
    assert!(err.contains("DATABASE_URL") && !err.contains("s3cret-pw"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());

    // A database that does not exist: the command that creates it.
    let missing = crm.url().rsplit_once('/').map(|(base, _)| format!("{base}/leadconv_no_such_db")).unwrap();
    let out = run(&missing, None, broker.prefix(), &["status", "00000000-0000-0000-0000-000000000000"]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("does not exist") && err.contains("leadconv migrate --create-database"), "{err}");

    // RabbitMQ on a port where nothing listens: the worker says so once and
    // leaves, instead of reconnecting in silence.
    let amqp = format!("amqp://guest:s3cret-pw@127.0.0.1:{closed}/%2f");
    let out = run(&crm.url(), Some(&amqp), broker.prefix(), &["worker", "--exit-when-idle"]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("RabbitMQ at 127.0.0.1:{closed}")) && err.contains("connection refused"), "{err}");
    assert!(err.contains("AMQP_URL") && !err.contains("s3cret-pw"), "{err}");
    assert_eq!(err.matches("connection refused").count(), 1, "said once: {err}");
}

// Point 2: an unmigrated database is refused by every command that needs
// the schema, naming `leadconv migrate`; `migrate --check` tells whether the
// schema is there (the pods' init container), and `/readyz` is 503 until it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_runs_on_an_unmigrated_database_and_readyz_waits_for_the_schema() {
    let db = TestDb::blank_with_ctype("C.UTF-8").await;
    let broker = TestBroker::new().await;

    let out = run(&db.url(), None, broker.prefix(), &["worker", "--exit-when-idle"]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("never migrated") && err.contains("leadconv migrate"), "{err}");
    assert!(!err.contains("does not exist"), "no raw Postgres text: {err}");

    let check = run(&db.url(), None, broker.prefix(), &["migrate", "--check"]).await;
    assert_eq!(check.status.code(), Some(1));
    assert!(text(&check.stderr).contains("leadconv migrate"), "{}", text(&check.stderr));

    let server = serve(&db, &broker).await;
    let r = reqwest::get(format!("{}/readyz", server.base)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert!(body["postgres_problem"].as_str().unwrap_or("").contains("leadconv migrate"), "{body}");

    // `migrate --check --wait` waits for the migration that a deploy's
    // migrate Job runs beside it.
    let url = db.url();
    let prefix = broker.prefix().to_owned();
    let waiting = tokio::spawn(async move { run(&url, None, &prefix, &["migrate", "--check", "--wait", "120"]).await });
    let migrated = run(&db.url(), None, broker.prefix(), &["migrate"]).await;
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    let waited = waiting.await.unwrap();
    assert!(waited.status.success(), "{}", text(&waited.stderr));
    let r = reqwest::get(format!("{}/readyz", server.base)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
}

// Point 3: `doctor` checks Postgres, schema, locale, RabbitMQ, queues and
// consumers, one line each with a fix; `status` warns about a job whose
// queue nobody consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_status_say_when_no_worker_consumes_pending_leads() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    leads(&crm, rep, 3).await;

    let healthy = run(&crm.url(), None, broker.prefix(), &["doctor"]).await;
    let report = text(&healthy.stdout);
    assert!(report.contains("ok   Postgres at 127.0.0.1:") && report.contains("ok   schema at version"), "{report}");
    assert!(report.contains("ok   RabbitMQ at 127.0.0.1:") && report.contains("ok   database locale"), "{report}");
    assert!(report.contains(&format!("{}.bulk: 0 ready, 0 consumers", broker.prefix())), "{report}");
    assert!(healthy.status.success(), "nothing pending, nothing failing: {report}");

    let job = enqueue_all(&crm, &broker, rep).await;
    let sick = run(&crm.url(), None, broker.prefix(), &["doctor"]).await;
    let report = text(&sick.stdout);
    assert_eq!(sick.status.code(), Some(1), "{report}");
    let line = report.lines().find(|l| l.contains(&format!("{}.bulk", broker.prefix()))).unwrap();
    assert!(line.starts_with("FAIL") && line.contains("3 leads pending") && line.contains("leadconv worker"), "{line}");

    let status = run(&crm.url(), None, broker.prefix(), &["status", &job]).await;
    assert!(status.status.success());
    let warning = text(&status.stderr);
    assert!(warning.contains("no worker consumes") && warning.contains("leadconv worker"), "{warning}");

    // The broker unreachable: doctor names it and still checks Postgres.
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let out = run(&crm.url(), Some(&closed), broker.prefix(), &["doctor"]).await;
    let report = text(&out.stdout);
    assert!(
        report.contains("ok   Postgres") && report.contains("FAIL cannot reach RabbitMQ at 127.0.0.1:"),
        "{report}"
    );
}

// Point 5: the command line in scripts. A job of 3,000 pending leads: its
// results are far more than a pipe's buffer.
async fn job_of_3000(crm: &Crm, broker: &TestBroker) -> String {
    let rep = crm.user("Rep", json!({})).await;
    leads(crm, rep, 3000).await;
    enqueue_all(crm, broker, rep).await
}

// `results | head -1`: the reader leaves after one line; leadconv ends
// quietly, with no "Broken pipe" error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_into_a_pipe_closed_early_end_quietly() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let job = job_of_3000(&crm, &broker).await;
    let mut child = tokio::process::Command::new(leadconv_bin())
        .args(["results", &job])
        .env("DATABASE_URL", crm.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(first["outcome"], "pending");
    drop(lines);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "exit {:?}: {}", out.status, text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "a closed pipe is not an error");
}

// A CSV with no rows still has its header; `jobs` lists jobs, filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_csv_has_its_header_and_jobs_are_listed() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let job = job_of_3000(&crm, &broker).await;
    let csv =
        run(&crm.url(), None, broker.prefix(), &["results", &job, "--format", "csv", "--outcome", "failed"]).await;
    assert!(csv.status.success());
    assert_eq!(
        text(&csv.stdout).lines().collect::<Vec<_>>(),
        vec![leadconv::store::convert::RESULT_COLUMNS.replace(' ', "")]
    );

    let listed = run(&crm.url(), None, broker.prefix(), &["jobs", "--status", "scheduled", "--json"]).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let rows: Vec<Value> = text(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0]["id"].as_str(), rows[0]["total_count"].as_i64()), (Some(job.as_str()), Some(3000)));
    let none = run(&crm.url(), None, broker.prefix(), &["jobs", "--status", "completed"]).await;
    assert!(none.status.success() && none.stdout.is_empty());
    let human = run(&crm.url(), None, broker.prefix(), &["jobs"]).await;
    assert!(text(&human.stdout).contains(&format!("job {job} scheduled")), "{}", text(&human.stdout));
}

// `status --watch` into a pipe prints the job's lines (not nothing) and
// exits non-zero when the job ends cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_into_a_pipe_prints_lines_and_fails_for_a_cancelled_job() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let job = job_of_3000(&crm, &broker).await;
    let cancel = run(&crm.url(), None, broker.prefix(), &["cancel", &job]).await;
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let watched = run(&crm.url(), None, broker.prefix(), &["status", &job, "--watch"]).await;
    assert!(text(&watched.stdout).contains(&format!("job {job} cancelled")), "{}", text(&watched.stdout));
    assert_eq!(watched.status.code(), Some(1), "{}", text(&watched.stderr));
    assert!(text(&watched.stderr).contains("ended cancelled"), "{}", text(&watched.stderr));
}

// Logs into a file or pipe carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_into_a_pipe_have_no_colour_codes() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let out = leadconv_command(&crm.url(), broker.prefix(), &["worker", "--exit-when-idle"])
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap();
    let logs = text(&out.stderr);
    assert!(out.status.success(), "{logs}");
    assert!(logs.contains("worker consuming"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes in redirected logs: {logs:?}");
}

/// Samples of `name` in a scrape whose labels include `labels`, summed.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

async fn scrape(addr: &str) -> Option<prometheus_parse::Scrape> {
    let body = reqwest::get(format!("http://{addr}/metrics")).await.ok()?.text().await.ok()?;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).ok()
}

/// Scrapes `addr` until a scrape satisfies `done`, for at most 30 s.
async fn scrape_until(
    addr: &str,
    what: &str,
    done: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = scrape(addr).await.filter(|s| done(s)) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `histogram_quantile` as Prometheus computes it from cumulative buckets.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            return lower.0 + (le - lower.0) * (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
        }
        lower = (le, count);
    }
    lower.0
}

// Point 4: every counter's label sets exist at 0 from the start, so that
// `increase()` over a job equals what the database recorded; job and lead
// totals include jobs made by `leadconv enqueue`, a process nobody scrapes;
// the end-to-end p99 read from the histogram is within one bucket of the
// true one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_against_the_database() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    leads(&crm, rep, 200).await;
    crm.lead(json!({"owner_id": rep, "last_name": ""})).await; // fails: missing_mandatory_field

    let addr = format!("127.0.0.1:{}", free_port());
    let mut worker = worker_with_metrics(&crm, &broker, &addr);
    let before = scrape_until(&addr, "the worker's /metrics", |_| true).await;
    let converted =
        [("outcome", "converted"), ("contact_action", "created"), ("account_action", "none"), ("deal_action", "none")];
    assert_eq!(
        sum(&before, "leadconv_conversions_total", &converted),
        Some(0.0),
        "series at 0 before the first conversion"
    );
    assert_eq!(sum(&before, "leadconv_conversions_total", &[("outcome", "failed")]), Some(0.0));
    assert_eq!(sum(&before, "leadconv_conversion_failures_total", &[("code", "missing_mandatory_field")]), Some(0.0));
    assert_eq!(sum(&before, "leadconv_dead_letters_total", &[]), Some(0.0));
    assert_eq!(sum(&before, "leadconv_retries_total", &[]), Some(0.0));

    let job = enqueue_all(&crm, &broker, rep).await;
    wait_for("the job to finish", Duration::from_secs(120), || async {
        crm.count(&format!("SELECT count(*) FROM conversion_jobs WHERE id = '{job}' AND finished_at IS NOT NULL")).await
            == 1
    })
    .await;
    // The last results are counted by the time the job's row says finished;
    // one more scrape after the worker's next maintenance round is enough.
    let after = scrape_until(&addr, "the job's conversions in the worker's /metrics", |s| {
        sum(s, "leadconv_conversions_total", &[]) == Some(201.0)
    })
    .await;
    let _ = worker.kill().await;
    // increase() over the job, by outcome, equals the results.
    for outcome in ["converted", "failed", "skipped"] {
        let increase = sum(&after, "leadconv_conversions_total", &[("outcome", outcome)]).unwrap()
            - sum(&before, "leadconv_conversions_total", &[("outcome", outcome)]).unwrap();
        let recorded = crm
            .count(&format!("SELECT count(*) FROM conversion_results WHERE job_id = '{job}' AND outcome = '{outcome}'"))
            .await;
        assert_eq!(increase, recorded as f64, "{outcome}");
    }
    let failures = sum(&after, "leadconv_conversion_failures_total", &[("code", "missing_mandatory_field")]).unwrap();
    assert_eq!(failures, 1.0);

    // The end-to-end p99 from the histogram is within one bucket of the
    // true p99 of the results.
    let buckets: Vec<(f64, f64)> = after
        .samples
        .iter()
        .find_map(|s| match (&s.metric[..], &s.value) {
            ("leadconv_end_to_end_seconds", prometheus_parse::Value::Histogram(h)) => {
                Some(h.iter().map(|b| (b.less_than, b.count)).collect())
            }
            _ => None,
        })
        .expect("the end-to-end histogram");
    let estimated = histogram_quantile(0.99, &buckets);
    let truth: f64 = sqlx::query_scalar(
        "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - enqueued_at))::float8
         FROM conversion_results WHERE job_id = $1::uuid AND enqueued_at IS NOT NULL AND outcome <> 'pending'",
    )
    .bind(&job)
    .fetch_one(crm.pool())
    .await
    .unwrap();
    let bucket_of = |v: f64| leadconv::metrics::END_TO_END_BUCKETS.iter().position(|&le| v <= le).unwrap_or(usize::MAX);
    assert!(
        bucket_of(estimated).abs_diff(bucket_of(truth)) <= 1,
        "histogram p99 {estimated:.3}s vs true p99 {truth:.3}s"
    );
}

// Point 4: job and lead totals come from the database, so a job made by a
// short-lived `leadconv enqueue` (the CronJob path, never scraped) shows in
// a long-running worker's /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_made_by_the_command_line_count_in_the_metrics() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    leads(&crm, rep, 7).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let _worker = worker_with_metrics(&crm, &broker, &addr);
    scrape_until(&addr, "the worker's /metrics", |_| true).await;
    enqueue_all(&crm, &broker, rep).await;
    let s = scrape_until(&addr, "the job in the worker's totals", |s| {
        sum(s, "leadconv_jobs_created_total", &[("trigger", "manual")]) == Some(1.0)
    })
    .await;
    assert_eq!(sum(&s, "leadconv_leads_enqueued_total", &[]), Some(7.0));
    assert_eq!(sum(&s, "leadconv_jobs_created_total", &[("trigger", "schedule")]), Some(0.0));
}

// Point 6: retention deletes finished jobs past the configured age with
// their results, and keeps the rest; the totals keep counting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_deletes_finished_jobs_past_retention() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    leads(&crm, rep, 12).await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM leads ORDER BY id").fetch_all(crm.pool()).await.unwrap();
    let (old, _) = crm.convert_all(rep, json!({}), &ids[..5]).await;
    let (recent, _) = crm.convert_all(rep, json!({}), &ids[5..8]).await;
    let running = enqueue_all(&crm, &broker, rep).await; // 4 pending leads, never finished here
    sqlx::query("UPDATE conversion_jobs SET finished_at = now() - interval '40 days' WHERE id = $1")
        .bind(old)
        .execute(crm.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE conversion_jobs SET finished_at = now() - interval '20 days' WHERE id = $1")
        .bind(recent)
        .execute(crm.pool())
        .await
        .unwrap();
    // More results than one delete batch, so the batching is exercised.
    sqlx::query(
        "INSERT INTO conversion_results (job_id, lead_id, outcome) SELECT $1, 1000000 + g, 'skipped' FROM generate_series(1, $2) g",
    )
    .bind(old)
    .bind(leadconv::maintenance::RETENTION_BATCH * 2 + 7)
    .execute(crm.pool())
    .await
    .unwrap();
    // Cancel the enqueued job so the worker can go idle, but keep it young.
    let _ = run(&crm.url(), None, broker.prefix(), &["cancel", &running]).await;

    let out = run(&crm.url(), None, broker.prefix(), &["worker", "--exit-when-idle", "--retention-days", "30"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let jobs = |id: String| format!("SELECT count(*) FROM conversion_jobs WHERE id = '{id}'");
    let results = |id: String| format!("SELECT count(*) FROM conversion_results WHERE job_id = '{id}'");
    assert_eq!(crm.count(&jobs(old.to_string())).await, 0, "older than 30 days: deleted");
    assert_eq!(crm.count(&results(old.to_string())).await, 0);
    assert_eq!(crm.count(&jobs(recent.to_string())).await, 1, "20 days old: kept");
    assert_eq!(crm.count(&results(recent.to_string())).await, 3);
    assert_eq!(crm.count(&jobs(running.clone())).await, 1);
    // What was deleted still counts in the totals the metrics export.
    assert_eq!(crm.count("SELECT jobs FROM conversion_totals WHERE trigger = 'manual'").await, 1);
    assert_eq!(crm.count("SELECT leads FROM conversion_totals WHERE trigger = 'manual'").await, 5);

    // 0 keeps everything forever.
    sqlx::query("UPDATE conversion_jobs SET finished_at = now() - interval '400 days'")
        .execute(crm.pool())
        .await
        .unwrap();
    let out = run(&crm.url(), None, broker.prefix(), &["worker", "--exit-when-idle", "--retention-days", "0"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 2);
}

// Point 6: tokens can be listed (never shown again) and revoked, and a
// revoked token stops working at once; every request leaves one access log
// line with method, route, status, latency and user, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_listed_and_revoked_and_requests_are_logged() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let rep_s = rep.to_string();
    let created = run(&crm.url(), None, broker.prefix(), &["token", "create", "--user", &rep_s, "--name", "ci"]).await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let token = text(&created.stdout).trim().to_owned();

    let listed = run(&crm.url(), None, broker.prefix(), &["token", "list", "--json"]).await;
    let tokens: Vec<Value> = text(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(tokens.len(), 1);
    assert_eq!((tokens[0]["user_id"].as_i64(), tokens[0]["name"].as_str()), (Some(rep), Some("ci")));
    assert!(tokens[0]["revoked_at"].is_null());
    assert!(!text(&listed.stdout).contains(&token), "the token is shown once, at creation");

    let mut child = leadconv_command(&crm.url(), broker.prefix(), &["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,leadconv::access=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = stdout.next_line().await.unwrap().unwrap().strip_prefix("listening on ").unwrap().trim().to_owned();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = reqwest::Client::new();
    let job = "7b4f0e43-4c4e-4f43-9a65-0c5d9a3a1e11";
    let r = http.get(format!("{base}/v1/jobs/{job}")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let line = tokio::time::timeout(Duration::from_secs(30), stderr.next_line()).await.unwrap().unwrap().unwrap();
    for part in ["GET", "/v1/jobs/{job_id}", "status=404", "latency_ms=", &format!("user_id={rep}")] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(!line.contains(&token) && !line.contains(job), "{line}");

    let revoked =
        run(&crm.url(), None, broker.prefix(), &["token", "revoke", tokens[0]["id"].to_string().as_str()]).await;
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let r = http.get(format!("{base}/v1/jobs")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let listed = run(&crm.url(), None, broker.prefix(), &["token", "list", "--json"]).await;
    let after: Value = serde_json::from_str(text(&listed.stdout).lines().next().unwrap()).unwrap();
    assert!(after["revoked_at"].is_string(), "{after}");
    let unknown = run(&crm.url(), None, broker.prefix(), &["token", "revoke", "999999"]).await;
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown.stderr));
}
