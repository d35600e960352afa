//! Conversion schedules (issue 4, part 4): one `schedule` job per due tick,
//! exactly once with several `serve` processes; missed ticks collapse into
//! one run; the schedule command line and API.

mod common;

use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::broker::{amqp_url, wait_for, TestBroker};
use common::server::serve;
use common::*;
use leadconv::automation;
use leadconv::automation::schedule::{self, NewSchedule, Schedule};
use leadconv::queue::enqueue::Enqueuer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(60);

/// A `leadconv serve` process whose scheduler rounds are counted (from its
/// debug log), to know that it has looked for due schedules since a moment.
struct Replica {
    _child: Child,
    rounds: Arc<AtomicUsize>,
}

async fn replica(crm: &Crm, broker: &TestBroker) -> Replica {
    let mut child = Command::new(env!("CARGO_BIN_EXE_leadconv"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn,leadconv::automation::schedule=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = out.next_line().await.unwrap().expect("serve prints its address");
    assert!(first.starts_with("listening on "), "{first}");
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    let rounds = Arc::new(AtomicUsize::new(0));
    let counter = rounds.clone();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = err.next_line().await {
            if line.contains("scheduler round") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    Replica { _child: child, rounds }
}

async fn add(crm: &Crm, name: &str, cron: &str, acting: i64) -> i64 {
    schedule::create(
        crm.pool(),
        NewSchedule {
            name: name.into(),
            cron: cron.into(),
            criteria: json!({"all_leads": true}),
            options: with_deal(),
            acting_user: acting,
            enabled: true,
            overlap: leadconv::store::types::Overlap::Skip,
        },
    )
    .await
    .expect("schedule accepted")
    .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_due_schedule_with_two_serve_processes_creates_exactly_one_job() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    crm.lead(json!({"owner_id": rep, "last_name": "Nightly", "company": "Nightly Co"})).await;
    // Yearly: once run, not due again while the test lasts. Several
    // schedules make the two replicas compete for several rows.
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(add(&crm, &format!("nightly {i}"), "0 0 1 1 *", rep).await);
    }
    let a = replica(&crm, &broker).await;
    let b = replica(&crm, &broker).await;
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0, "nothing is due yet");

    sqlx::query("UPDATE conversion_schedules SET next_run_at = now() - interval '1 second'")
        .execute(crm.pool())
        .await
        .unwrap();
    wait_for("every schedule has run", LIMIT, || async {
        crm.count("SELECT count(*) FROM conversion_schedules WHERE last_job_id IS NULL").await == 0
    })
    .await;
    // Both replicas look again, twice, after the runs committed.
    let (ra, rb) = (a.rounds.load(Ordering::SeqCst), b.rounds.load(Ordering::SeqCst));
    wait_for("both replicas pass two more scheduler rounds", LIMIT, || async {
        a.rounds.load(Ordering::SeqCst) >= ra + 2 && b.rounds.load(Ordering::SeqCst) >= rb + 2
    })
    .await;
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 12, "exactly one job per schedule");
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_jobs WHERE trigger = 'schedule' AND total_count = 1").await,
        12
    );
    assert_eq!(
        crm.count(
            "SELECT count(*) FROM conversion_schedules s JOIN conversion_jobs j ON j.id = s.last_job_id
             WHERE s.next_run_at > now() AND s.last_run_at IS NOT NULL AND j.requested_by = s.acting_user"
        )
        .await,
        12
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_collapse_into_one_run() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let id = add(&crm, "every minute", "* * * * *", rep).await;
    // Sixty ticks missed (no serve running for an hour).
    sqlx::query("UPDATE conversion_schedules SET next_run_at = now() - interval '1 hour'")
        .execute(crm.pool())
        .await
        .unwrap();
    let enqueuer = Enqueuer::new(crm.pool().clone(), amqp_url(), broker.topology.clone());
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), Some(id));
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), None, "the next run is in the future");
    let s = automation::get::<Schedule>(crm.pool(), id).await.unwrap();
    assert!(s.next_run_at > chrono::Utc::now() && s.next_run_at <= chrono::Utc::now() + chrono::Duration::seconds(61));
    // A tick matching no lead leaves no job (issue 12), only its run time.
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs WHERE trigger = 'schedule'").await, 0);
    assert!(s.last_run_at.is_some() && s.last_job_id.is_none(), "{s:?}");

    // A disabled schedule does not run, and enabling it does not replay the
    // ticks missed meanwhile.
    automation::set_enabled::<Schedule>(crm.pool(), id, false).await.unwrap();
    sqlx::query("UPDATE conversion_schedules SET next_run_at = now() - interval '1 hour'")
        .execute(crm.pool())
        .await
        .unwrap();
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), None);
    let s = automation::set_enabled::<Schedule>(crm.pool(), id, true).await.unwrap();
    assert!(s.next_run_at > chrono::Utc::now());
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), None);
}

#[test]
fn cron_expressions_are_five_field_utc() {
    for ok in ["0 2 * * *", "*/15 * * * 1-5", "0 0 1 1 *", "@daily", "30 4 1,15 * *"] {
        assert!(schedule::parse_cron(ok).is_ok(), "{ok}");
    }
    for bad in ["", "0 2 * *", "0 0 2 * * *", "61 * * * *", "* 25 * * *", "tomorrow", "0 0 30 2 *"] {
        let r = schedule::parse_cron(bad).unwrap_err();
        assert_eq!((r.code, r.field.as_str()), (leadconv::ErrorCode::InvalidCron, "cron"), "{bad}");
    }
    let c = schedule::parse_cron("0 2 * * *").unwrap();
    let t = chrono::DateTime::parse_from_rfc3339("2026-03-01T02:00:00Z").unwrap().with_timezone(&chrono::Utc);
    assert_eq!(schedule::next_after(&c, t).unwrap().to_rfc3339(), "2026-03-02T02:00:00+00:00");
}

async fn leadconv(crm: &Crm, broker: &TestBroker, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leadconv"))
        .args(args)
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn schedule_command_line_manages_schedules_and_refuses_bad_ones_with_exit_2() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await.to_string();
    let all = r#"{"all_leads":true}"#;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--name", "a", "--cron", "0 2 * *", "--criteria", all, "--acting-user", &rep], "refused: cron"),
        (vec!["--name", "a", "--cron", "every night", "--criteria", all, "--acting-user", &rep], "(invalid_cron)"),
        (vec!["--name", "a", "--cron", "0 25 * * *", "--criteria", all, "--acting-user", &rep], "(invalid_cron)"),
        (vec!["--name", "a", "--cron", "0 2 * * *", "--criteria", "{}", "--acting-user", &rep], "refused: criteria"),
        (
            vec![
                "--name",
                "a",
                "--cron",
                "0 2 * * *",
                "--criteria",
                all,
                "--options",
                r#"{"owner_id":424242}"#,
                "--acting-user",
                &rep,
            ],
            "refused: owner_id",
        ),
        (
            vec!["--name", "a", "--cron", "0 2 * * *", "--criteria", all, "--acting-user", "424242"],
            "refused: requested_by",
        ),
    ];
    for (args, expect) in cases {
        let mut full = vec!["schedule", "add"];
        full.extend(args.iter().copied());
        let out = leadconv(&crm, &broker, &full).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?} should say {expect}: {err}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_schedules").await, 0, "nothing written");

    let out = leadconv(
        &crm,
        &broker,
        &["schedule", "add", "--name", "nightly", "--cron", "0 2 * * *", "--criteria", all, "--acting-user", &rep],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = leadconv(
        &crm,
        &broker,
        &["schedule", "add", "--name", "nightly", "--cron", "0 3 * * *", "--criteria", all, "--acting-user", &rep],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("duplicate_name"));

    let out = leadconv(&crm, &broker, &["schedule", "list", "--json"]).await;
    let listed: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0]["name"].as_str(), listed[0]["cron"].as_str(), listed[0]["enabled"].as_bool()),
        (Some("nightly"), Some("0 2 * * *"), Some(true))
    );
    let next: chrono::DateTime<chrono::Utc> = listed[0]["next_run_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(next.format("%H:%M:%S").to_string(), "02:00:00", "UTC");

    assert!(leadconv(&crm, &broker, &["schedule", "disable", &id]).await.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM conversion_schedules WHERE enabled").await, 0);
    assert!(leadconv(&crm, &broker, &["schedule", "enable", &id]).await.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM conversion_schedules WHERE enabled").await, 1);
    assert!(text(&leadconv(&crm, &broker, &["schedule", "list"]).await.stdout).contains("nightly\t0 2 * * *\tenabled"));
    assert!(leadconv(&crm, &broker, &["schedule", "delete", &id]).await.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM conversion_schedules").await, 0);
    for cmd in ["enable", "disable", "delete"] {
        let out = leadconv(&crm, &broker, &["schedule", cmd, &id]).await;
        assert_eq!(out.status.code(), Some(2), "{cmd} of a missing schedule");
        assert!(text(&out.stderr).contains("schedule_not_found"));
    }
}

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
    }

    async fn raw(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token.as_deref().unwrap_or(""))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_api_endpoints_answer_success_and_each_4xx() {
    use reqwest::Method;
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    // Rules and schedules act unattended on every lead: admins make them.
    let rep = crm.user("Admin", json!({"is_admin": true})).await;
    let viewer = crm.user("Viewer", json!({"can_convert": false})).await;
    let server = serve(&crm, &broker).await;
    let http = reqwest::Client::new();
    let api = Api {
        base: server.base.clone(),
        token: Some(leadconv::store::auth::create_token(crm.pool(), rep, "test").await.unwrap()),
        http: http.clone(),
    };
    let anonymous = Api { base: server.base.clone(), token: None, http: http.clone() };
    let forbidden = Api {
        base: server.base.clone(),
        token: Some(leadconv::store::auth::create_token(crm.pool(), viewer, "test").await.unwrap()),
        http,
    };
    let body = json!({"name": "nightly", "cron": "0 2 * * *", "criteria": {"field": "lead_status", "op": "eq", "value": "Qualified"}, "options": with_deal()});

    // Success.
    let (s, created) = api.call(Method::POST, "/v1/schedules", Some(body.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(
        (created["cron"].as_str(), created["acting_user"].as_i64(), created["enabled"].as_bool()),
        (Some("0 2 * * *"), Some(rep), Some(true))
    );
    assert!(created["next_run_at"].as_str().unwrap().contains("T02:00:00"), "{created}");
    let id = created["id"].as_i64().unwrap();
    let (s, v) = api.call(Method::GET, "/v1/schedules", None).await;
    assert_eq!((s, v["schedules"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
    let (s, v) = api.call(Method::GET, &format!("/v1/schedules/{id}"), None).await;
    assert_eq!((s, v["id"].as_i64()), (StatusCode::OK, Some(id)));
    let (s, v) = api.call(Method::POST, &format!("/v1/schedules/{id}/disable"), None).await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::OK, Some(false)));
    let (s, v) = api.call(Method::POST, &format!("/v1/schedules/{id}/enable"), None).await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::OK, Some(true)));

    // 400, 409, 422 on create; nothing written by any of them.
    let (s, v) = api.raw("/v1/schedules", "[1, 2").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));
    let (s, v) = api
        .call(Method::POST, "/v1/schedules", Some(json!({"name": "x", "cron": 5, "criteria": {"all_leads": true}})))
        .await;
    assert_eq!((s, code(&v), v["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, "invalid_body", Some("cron")));
    let (s, v) = api
        .call(
            Method::POST,
            "/v1/schedules",
            Some(json!({"name": "x", "cron": "0 2 * * *", "criteria": {"all_leads": true}, "tz": "CET"})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_body"));
    for cron in ["0 2 * *", "0 2 * * * *", "61 * * * *", "nightly"] {
        let (s, v) = api
            .call(
                Method::POST,
                "/v1/schedules",
                Some(json!({"name": "x", "cron": cron, "criteria": {"all_leads": true}})),
            )
            .await;
        assert_eq!(
            (s, code(&v), v["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_cron", Some("cron")),
            "{cron}"
        );
    }
    let (s, v) = api
        .call(
            Method::POST,
            "/v1/schedules",
            Some(
                json!({"name": "x", "cron": "0 2 * * *", "criteria": {"field": "city", "op": "matches", "value": "x"}}),
            ),
        )
        .await;
    assert_eq!(
        (s, code(&v), v["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_criteria", Some("criteria.op"))
    );
    let (s, v) = api.call(Method::POST, "/v1/schedules", Some(json!({"name": "x", "cron": "0 2 * * *", "criteria": {"all_leads": true}, "options": {"create_deal": true}}))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "missing_mandatory_field"));
    let (s, v) = api.call(Method::POST, "/v1/schedules", Some(body.clone())).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "duplicate_name"));
    assert_eq!(crm.count("SELECT count(*) FROM conversion_schedules").await, 1);

    // Per id: 400 malformed, 404 unknown.
    let id_routes: [(Method, &str); 4] =
        [(Method::GET, ""), (Method::DELETE, ""), (Method::POST, "/enable"), (Method::POST, "/disable")];
    for (m, suffix) in &id_routes {
        let (s, v) = api.call(m.clone(), &format!("/v1/schedules/-3{suffix}"), None).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_id"), "{m} -3{suffix}");
        let (s, v) = api.call(m.clone(), &format!("/v1/schedules/999999{suffix}"), None).await;
        assert_eq!(
            (s, code(&v), v["error"]["field"].as_str()),
            (StatusCode::NOT_FOUND, "schedule_not_found", Some("schedule_id")),
            "{m} 999999{suffix}"
        );
    }

    // 401 without a token, everywhere. A read-only user outside the acting
    // user's reach: the list is empty, each one is "not found", creating is
    // 403 (SPEC §5; tests/permissions.rs has the whole matrix).
    let mut all: Vec<(Method, String)> =
        vec![(Method::GET, "/v1/schedules".into()), (Method::POST, "/v1/schedules".into())];
    all.extend(id_routes.iter().map(|(m, s)| (m.clone(), format!("/v1/schedules/{id}{s}"))));
    for (m, path) in &all {
        let b = (*m == Method::POST && path == "/v1/schedules")
            .then(|| json!({"name": "y", "cron": "0 2 * * *", "criteria": {"all_leads": true}}));
        let (s, v) = anonymous.call(m.clone(), path, b.clone()).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{m} {path}");
        let (s, v) = forbidden.call(m.clone(), path, b).await;
        let expected = match (m.as_str(), path.as_str()) {
            ("GET", "/v1/schedules") => (StatusCode::OK, ""),
            ("POST", "/v1/schedules") => (StatusCode::FORBIDDEN, "forbidden"),
            _ => (StatusCode::NOT_FOUND, "schedule_not_found"),
        };
        assert_eq!((s, code(&v)), expected, "{m} {path}");
        if s == StatusCode::OK {
            assert_eq!(v["schedules"], json!([]), "a read-only user outside the reach sees none");
        }
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_schedules").await, 1);

    let (s, _) = api.call(Method::DELETE, &format!("/v1/schedules/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api.call(Method::GET, &format!("/v1/schedules/{id}"), None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "schedule_not_found"));
}

/// Issue 12: a schedule whose previous run is still in progress skips its
/// tick (the default), instead of starting a second job over the same
/// leads; with `allow` it starts one. Jobs name the schedule that made
/// them, and `schedule list` shows when it last made one and how many
/// leads its jobs converted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_during_the_previous_run_is_skipped_unless_overlap_is_allowed() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    for i in 0..3 {
        crm.lead(json!({"owner_id": rep, "last_name": format!("L{i}")})).await;
    }
    let id = add(&crm, "every minute", "* * * * *", rep).await;
    let enqueuer = Enqueuer::new(crm.pool().clone(), amqp_url(), broker.topology.clone());
    let due = || async {
        sqlx::query("UPDATE conversion_schedules SET next_run_at = now() - interval '1 second'")
            .execute(crm.pool())
            .await
            .unwrap();
    };
    let sql = format!("SELECT count(*) FROM conversion_jobs WHERE schedule_id = {id}");
    let jobs = || crm.count(&sql);

    due().await;
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), Some(id));
    assert_eq!(jobs().await, 1, "the first tick makes a job, linked to the schedule");
    // No worker runs: the job is still scheduled at the next tick.
    due().await;
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), Some(id));
    assert_eq!(jobs().await, 1, "skipped: the previous run is in progress");
    let s = automation::get::<Schedule>(crm.pool(), id).await.unwrap();
    assert!(s.next_run_at > chrono::Utc::now(), "the skipped tick still moves the schedule on");

    sqlx::query("UPDATE conversion_schedules SET overlap = 'allow'").execute(crm.pool()).await.unwrap();
    due().await;
    assert_eq!(schedule::run_due(&enqueuer).await.unwrap(), Some(id));
    assert_eq!(jobs().await, 2, "allowed: a second job");

    let listed = leadconv(&crm, &broker, &["schedule", "list", "--json"]).await;
    let row: Value = serde_json::from_str(text(&listed.stdout).lines().next().unwrap()).unwrap();
    assert_eq!((row["overlap"].as_str(), row["leads_converted"].as_i64()), (Some("allow"), Some(0)), "{row}");
    assert!(row["last_job_at"].is_string(), "{row}");
}
