//! The developer tools, run as their binary against the real Postgres and
//! RabbitMQ: the benchmark and the demo.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::broker::amqp_url;
use common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `leadconv-dev bench` (the command BENCHMARKS.md is made with) runs the
/// four conversions for real, each in a fresh database of its own: direct,
/// set-based (its own ceiling), the reference ceiling of `../shared/bench`
/// (vendored, checked by checksum, `psql` loops), and through the real
/// `enqueue` and `worker` processes, with convert-now callers in a closed
/// loop for a duration; it prints their figures and ratios, and its
/// ceiling makes the very records the queue run makes. One conversion (batch) in flight:
/// concurrent batches convert leads in another order than the ceiling's
/// single pass, and a lead without e-mail that is matched by name within
/// its account merges or not depending on which lead of the account came
/// first (seen at 100,000 leads: one contact apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_the_direct_baseline_the_ceiling_and_the_queue_and_prints_their_ratios() {
    let crm = Crm::new().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_leadconv-dev"))
        .args(["bench", "--leads", "300", "--workers", "1", "--api-clients", "2", "--api-seconds", "2"])
        .env("LEADCONV_BIN", leadconv_bin())
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}{}", text(&out.stderr));
    assert!(stdout.contains("direct: 300 leads in"), "{stdout}");
    assert!(stdout.contains("through RabbitMQ: 300 of 300 leads in"), "{stdout}");
    // A queue run's clock stops at its job's last result, not when the
    // worker, idle, exits after it.
    let secs = |d: &str| match d.strip_suffix("ms") {
        Some(ms) => ms.parse::<f64>().unwrap() / 1000.0,
        None => d.strip_suffix('s').unwrap().parse::<f64>().unwrap(),
    };
    let clocks: Vec<(f64, f64)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("through RabbitMQ: 300 of 300 leads in "))
        .map(|l| {
            let (done, rest) = l.split_once(" (to the last result; the worker exited at ").expect(l);
            (secs(done), secs(rest.trim_end_matches(')')))
        })
        .collect();
    assert_eq!(clocks.len(), 2, "{stdout}");
    assert!(clocks.iter().all(|(done, exited)| done < exited), "{clocks:?}");
    assert!(stdout.contains("| direct to Postgres (baseline) | 300 |"), "{stdout}");
    assert!(stdout.contains("| enqueue → RabbitMQ → worker | 300 |"), "{stdout}");
    assert!(stdout.contains("set-based: 300 of 300 leads in"), "{stdout}");
    assert!(stdout.contains("| set-based in SQL alone (ceiling) | 300 |"), "{stdout}");
    assert!(stdout.contains("psql loops): 300 of 300 leads in"), "{stdout}");
    assert!(stdout.contains("| reference ceiling (../shared/bench, psql loops) | 300 |"), "{stdout}");
    assert!(stdout.contains("2 concurrent clients calling back to back for 2 s"), "{stdout}");
    // The bulk job alone too, in the same run, and what the callers cost it.
    assert!(stdout.contains("| enqueue → RabbitMQ → worker, no convert-now callers | 300 |"), "{stdout}");
    assert!(stdout.contains("bulk job with convert-now callers / without (job created to last result, "), "{stdout}");
    assert!(stdout.contains("bulk job while the convert-now callers called / without: "), "{stdout}");
    assert!(stdout.contains("  the bulk job while they called: "), "{stdout}");
    for of in [
        "direct to Postgres (baseline)",
        "set-based in SQL alone (ceiling)",
        "reference ceiling (../shared/bench, psql loops)",
    ] {
        let ratio = stdout
            .lines()
            .find(|l| l.starts_with(&format!("through RabbitMQ / {of}: ")))
            .unwrap_or_else(|| panic!("a ratio line against {of}: {stdout}"));
        assert!(ratio.ends_with('%'), "{ratio}");
    }
    // Where each run's CPU went, by process, per lead: the queue run's
    // worker and Postgres have figures of their own.
    let cpu = stdout
        .split("CPU per lead while each run's clock ran")
        .nth(1)
        .unwrap_or_else(|| panic!("a CPU table: {stdout}"));
    let row = cpu
        .lines()
        .find(|l| l.starts_with("| enqueue → RabbitMQ → worker |"))
        .unwrap_or_else(|| panic!("the queue run's CPU: {stdout}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert!(cells[2].parse::<f64>().is_ok_and(|ms| ms > 0.0), "Postgres: {row}");
    assert!(cells[4].parse::<f64>().is_ok(), "the worker: {row}");
    let made = |run: &str| {
        let line = stdout.lines().find(|l| l.starts_with(&format!("records made by {run}: "))).expect("a records line");
        line.split_once(": ").unwrap().1.to_owned()
    };
    assert_eq!(
        made("set-based in SQL alone (ceiling)"),
        made("enqueue → RabbitMQ → worker"),
        "the same work: {stdout}"
    );

    // The queue run's bulk job is in its own database, completed, every lead
    // converted once, each result stamped with its message's publication;
    // every convert-now call made a one-lead workflow job beside it.
    let queue_db = format!("{}_bench_queue", crm.url());
    let pool = sqlx::PgPool::connect(&queue_db).await.unwrap();
    let (status, converted, stamped): (String, i64, i64) = sqlx::query_as(
        "SELECT j.status, count(*) FILTER (WHERE r.outcome = 'converted'), count(r.enqueued_at)
         FROM conversion_job_progress j JOIN conversion_results r ON r.job_id = j.id
         WHERE j.trigger <> 'workflow' GROUP BY j.status",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), converted, stamped), ("completed", 300, 300));
    let calls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversion_job_progress WHERE trigger = 'workflow' AND status = 'completed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(calls >= 4, "two clients calling for 2 s: {calls} calls");
    pool.close().await;

    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url()).await.unwrap();
    for run in ["direct", "ceiling", "reference", "queue"] {
        let name = format!("{}_bench_{run}", crm.url().rsplit('/').next().unwrap());
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await.unwrap();
    }
}

/// The bench runs the reference ceiling only unchanged: a copy with one
/// byte changed is refused by its checksum, before anything is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_refuses_a_changed_reference_ceiling() {
    let crm = Crm::new().await;
    let dir = std::env::temp_dir().join(format!("leadconv_ref_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let changed = dir.join("pg-limit-set-based.sql");
    let original =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/reference/pg-limit-set-based.sql")).unwrap();
    std::fs::write(&changed, original.replace("LIMIT 1000", "LIMIT 2000")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_leadconv-dev"))
        .args(["bench", "--leads", "10", "--skip-direct", "--skip-ceiling", "--reference-sql"])
        .arg(&changed)
        .env("LEADCONV_BIN", leadconv_bin())
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .output()
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not the reference ceiling (SHA-256"), "{stderr}");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url()).await.unwrap();
    let name = format!("{}_bench_%", crm.url().rsplit('/').next().unwrap());
    let made: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(made, 0, "nothing run before the check");
}

/// `leadconv-dev demo` (the README's first command) creates its database,
/// seeds sample leads and converts them all through RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_seeds_and_converts_every_sample_lead() {
    let crm = Crm::new().await;
    // Queues of its own, deleted when the test ends.
    let broker = common::broker::TestBroker::new().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_leadconv-dev"))
        .args(["demo", "--leads", "200", "--concurrency", "4"])
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "demo failed: {}{}", text(&out.stdout), text(&out.stderr));
    let pending = crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'pending'").await;
    let converted = crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await;
    assert_eq!((pending, converted), (0, 200));
}
