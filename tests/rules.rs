//! Conversion rules (issue 4, part 3): a lead inserted or updated so that it
//! matches an enabled rule is converted by a one-lead `workflow` job, with
//! no API call, even when no relay ran at the time of the change; the rule
//! command line and API.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::broker::{amqp_url, wait_for, TestBroker};
use common::server::serve;
use common::*;
use leadconv::automation;
use leadconv::automation::rules::{self, NewRule, Rule};
use leadconv::queue::enqueue::Enqueuer;
use leadconv::queue::worker;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

fn start_worker(crm: &Crm, broker: &TestBroker) -> (JoinHandle<()>, CancellationToken) {
    let mut cfg = worker::WorkerConfig::new(amqp_url(), broker.topology.clone());
    cfg.concurrency = 2;
    cfg.tick = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let (pool, token) = (crm.pool().clone(), stop.clone());
    (tokio::spawn(async move { worker::run(pool, cfg, token).await.expect("worker runs") }), stop)
}

/// The relay as `serve` runs it, in this process.
fn start_relay(crm: &Crm, broker: &TestBroker) -> (JoinHandle<()>, CancellationToken) {
    let enqueuer = Arc::new(Enqueuer::new(crm.pool().clone(), amqp_url(), broker.topology.clone()));
    let stop = CancellationToken::new();
    let token = stop.clone();
    (tokio::spawn(async move { rules::run_relay(enqueuer, token).await.expect("relay runs") }), stop)
}

async fn rule(crm: &Crm, name: &str, criteria: Value, acting: i64, enabled: bool) -> i64 {
    rules::create(
        crm.pool(),
        NewRule { name: name.into(), criteria, options: with_deal(), acting_user: acting, enabled },
    )
    .await
    .expect("rule accepted")
    .id
}

async fn converted(crm: &Crm, lead: i64) -> bool {
    crm.count(&format!("SELECT count(*) FROM leads WHERE id = {lead} AND converted_at IS NOT NULL")).await == 1
}

async fn outbox_empty(crm: &Crm) -> bool {
    crm.count("SELECT count(*) FROM lead_changes").await == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lead_updated_to_match_an_enabled_rule_is_converted_without_an_api_call() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let qualified =
        rule(&crm, "qualified", json!({"field": "lead_status", "op": "eq", "value": "Qualified"}), rep, true).await;
    rule(&crm, "expo (disabled)", json!({"field": "lead_source", "op": "eq", "value": "Expo"}), rep, false).await;
    let matching =
        crm.lead(json!({"owner_id": rep, "last_name": "Match", "company": "Match Co", "lead_status": "New"})).await;
    let other = crm.lead(json!({"owner_id": rep, "last_name": "Other", "lead_status": "New"})).await;
    let disabled_only = crm.lead(json!({"owner_id": rep, "last_name": "Expo", "lead_status": "New"})).await;
    let (_r, _rs) = start_relay(&crm, &broker);
    let (_w, _ws) = start_worker(&crm, &broker);

    // Plain SQL, as any other system writing the CRM would.
    sqlx::query("UPDATE leads SET lead_status = 'Qualified' WHERE id = $1")
        .bind(matching)
        .execute(crm.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE leads SET city = 'Kraków' WHERE id = $1").bind(other).execute(crm.pool()).await.unwrap();
    sqlx::query("UPDATE leads SET lead_source = 'Expo' WHERE id = $1")
        .bind(disabled_only)
        .execute(crm.pool())
        .await
        .unwrap();

    wait_for("the matching lead is converted", LIMIT, || converted(&crm, matching)).await;
    wait_for("every change is relayed", LIMIT, || outbox_empty(&crm)).await;
    assert!(!converted(&crm, other).await, "a lead matching no rule stays");
    assert!(!converted(&crm, disabled_only).await, "a lead matching only a disabled rule stays");
    let (criteria, requested_by, trigger, total): (sqlx::types::Json<Value>, i64, String, i32) =
        sqlx::query_as("SELECT criteria, requested_by, trigger, total_count FROM conversion_jobs")
            .fetch_one(crm.pool())
            .await
            .unwrap();
    assert_eq!((requested_by, trigger.as_str(), total), (rep, "workflow", 1));
    assert_eq!(
        criteria.0,
        json!({"all": [{"field": "lead_status", "op": "eq", "value": "Qualified"}, {"field": "id", "op": "eq", "value": matching}]})
    );
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 1, "the rule's options apply (create_deal)");

    // Disabling the rule stops it; enabling the other one acts on new changes.
    automation::set_enabled::<Rule>(crm.pool(), qualified, false).await.unwrap();
    let late = crm.lead(json!({"owner_id": rep, "last_name": "Late", "lead_status": "Qualified"})).await;
    sqlx::query("UPDATE leads SET city = 'Gdańsk' WHERE id = $1")
        .bind(disabled_only)
        .execute(crm.pool())
        .await
        .unwrap();
    wait_for("every change is relayed", LIMIT, || outbox_empty(&crm)).await;
    assert!(!converted(&crm, late).await, "a disabled rule converts nothing");
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_made_while_serve_is_down_is_converted_once_serve_starts() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    rule(&crm, "webinar", json!({"field": "lead_source", "op": "eq", "value": "Webinar"}), rep, true).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Later", "company": "Later Co"})).await;
    let (_w, _ws) = start_worker(&crm, &broker);

    // No serve runs: the change waits in the outbox.
    sqlx::query("UPDATE leads SET lead_source = 'Webinar' WHERE id = $1").bind(lead).execute(crm.pool()).await.unwrap();
    assert!(crm.count("SELECT count(*) FROM lead_changes").await >= 1);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0);

    let _server = serve(&crm, &broker).await;
    wait_for("the lead is converted once serve runs", LIMIT, || converted(&crm, lead)).await;
    wait_for("every change is relayed", LIMIT, || outbox_empty(&crm)).await;
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs WHERE trigger = 'workflow'").await, 1);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results WHERE outcome = 'converted'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_create_one_job_per_change() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let mut leads = Vec::new();
    for i in 0..40 {
        leads.push(crm.lead(json!({"owner_id": rep, "last_name": format!("L{i}"), "lead_status": "New"})).await);
    }
    rule(&crm, "hot", json!({"field": "rating", "op": "eq", "value": "Hot"}), rep, true).await;
    let (_a, _as) = start_relay(&crm, &broker);
    let (_b, _bs) = start_relay(&crm, &broker);
    for &l in &leads {
        sqlx::query("UPDATE leads SET rating = 'Hot' WHERE id = $1").bind(l).execute(crm.pool()).await.unwrap();
    }
    wait_for("every change is relayed", LIMIT, || outbox_empty(&crm)).await;
    // Jobs are created in the transaction that deletes the outbox rows: none
    // can appear after the outbox is empty.
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 40);
    assert_eq!(crm.count("SELECT count(DISTINCT lead_id) FROM conversion_results").await, 40);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results").await, 40, "one job per lead, not two");

    // Changed again while its job is still pending (no worker runs): no
    // second job for the same lead.
    for &l in &leads {
        sqlx::query("UPDATE leads SET city = 'Łódź' WHERE id = $1").bind(l).execute(crm.pool()).await.unwrap();
    }
    wait_for("every change is relayed", LIMIT, || outbox_empty(&crm)).await;
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 40);

    // A worker converts them all.
    let (_w, _ws) = start_worker(&crm, &broker);
    wait_for("all converted", LIMIT, || async {
        crm.count("SELECT count(*) FROM leads WHERE converted_at IS NULL").await == 0
    })
    .await;
}

async fn leadconv(crm: &Crm, broker: &TestBroker, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_leadconv"))
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
async fn rule_command_line_manages_rules_and_refuses_bad_ones_with_exit_2() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await.to_string();
    let viewer = crm.user("Viewer", json!({"can_convert": false})).await.to_string();
    let good = r#"{"field":"lead_status","op":"eq","value":"Qualified"}"#;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--name", "a", "--criteria", "{}", "--acting-user", &rep], "refused: criteria"),
        (vec!["--name", "a", "--criteria", "not json", "--acting-user", &rep], "refused: criteria"),
        (
            vec!["--name", "a", "--criteria", r#"{"field":"colour","op":"eq","value":1}"#, "--acting-user", &rep],
            "refused: criteria.field",
        ),
        (
            vec![
                "--name",
                "a",
                "--criteria",
                good,
                "--options",
                r#"{"create_deal":true,"deal":{"stage":"Won","closing_date":"+30d"}}"#,
                "--acting-user",
                &rep,
            ],
            "refused: deal.stage",
        ),
        (
            vec!["--name", "a", "--criteria", good, "--options", r#"{"create_deals":true}"#, "--acting-user", &rep],
            "refused: create_deals",
        ),
        (vec!["--name", "a", "--criteria", good, "--acting-user", &viewer], "refused: requested_by"),
        (vec!["--name", "a", "--criteria", good, "--acting-user", "424242"], "refused: requested_by"),
        (vec!["--name", " ", "--criteria", good, "--acting-user", &rep], "refused: name"),
    ];
    for (args, expect) in cases {
        let mut full = vec!["rule", "add"];
        full.extend(args.iter().copied());
        let out = leadconv(&crm, &broker, &full).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?} should say {expect}: {err}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_rules").await, 0, "nothing written");

    let out = leadconv(
        &crm,
        &broker,
        &["rule", "add", "--name", "qualified", "--criteria", good, "--acting-user", &rep, "--disabled"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out =
        leadconv(&crm, &broker, &["rule", "add", "--name", "qualified", "--criteria", good, "--acting-user", &rep])
            .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("duplicate_name"), "{}", text(&out.stderr));

    let out = leadconv(&crm, &broker, &["rule", "list", "--json"]).await;
    let listed: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "qualified");
    assert_eq!(listed[0]["enabled"], false);
    assert_eq!(listed[0]["acting_user"].as_i64().unwrap().to_string(), rep);

    assert!(leadconv(&crm, &broker, &["rule", "enable", &id]).await.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM conversion_rules WHERE enabled").await, 1);
    assert!(leadconv(&crm, &broker, &["rule", "disable", &id]).await.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM conversion_rules WHERE enabled").await, 0);
    assert!(text(&leadconv(&crm, &broker, &["rule", "list"]).await.stdout).contains("qualified\tdisabled"));
    assert!(leadconv(&crm, &broker, &["rule", "delete", &id]).await.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM conversion_rules").await, 0);
    for cmd in ["enable", "disable", "delete"] {
        let out = leadconv(&crm, &broker, &["rule", cmd, &id]).await;
        assert_eq!(out.status.code(), Some(2), "{cmd} of a missing rule");
        assert!(text(&out.stderr).contains("rule_not_found"));
    }
}

/// A client of a running `leadconv serve`.
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
async fn rule_api_endpoints_answer_success_and_each_4xx() {
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
    let body = json!({"name": "qualified", "criteria": {"field": "lead_status", "op": "eq", "value": "Qualified"}, "options": with_deal()});

    // Success.
    let (s, created) = api.call(Method::POST, "/v1/rules", Some(body.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(
        (created["name"].as_str(), created["acting_user"].as_i64(), created["enabled"].as_bool()),
        (Some("qualified"), Some(rep), Some(true))
    );
    let id = created["id"].as_i64().unwrap();
    let (s, v) = api.call(Method::GET, "/v1/rules", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["rules"].as_array().unwrap().len(), 1);
    let (s, v) = api.call(Method::GET, &format!("/v1/rules/{id}"), None).await;
    assert_eq!((s, v["id"].as_i64()), (StatusCode::OK, Some(id)));
    let (s, v) = api.call(Method::POST, &format!("/v1/rules/{id}/disable"), None).await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::OK, Some(false)));
    let (s, v) = api.call(Method::POST, &format!("/v1/rules/{id}/enable"), None).await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::OK, Some(true)));
    let (s, v) = api
        .call(
            Method::POST,
            "/v1/rules",
            Some(json!({"name": "off", "criteria": {"all_leads": true}, "enabled": false})),
        )
        .await;
    assert_eq!((s, v["enabled"].as_bool()), (StatusCode::CREATED, Some(false)));

    // 400, 409, 422 on create; nothing written by any of them.
    let (s, v) = api.raw("/v1/rules", "{not json").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));
    let (s, v) = api
        .call(Method::POST, "/v1/rules", Some(json!({"name": "x", "criteria": {"all_leads": true}, "colour": 1})))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_body"));
    let (s, v) = api.call(Method::POST, "/v1/rules", Some(json!({"criteria": {"all_leads": true}}))).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_body"));
    let (s, v) = api
        .call(
            Method::POST,
            "/v1/rules",
            Some(json!({"name": "x", "criteria": {"field": "colour", "op": "eq", "value": 1}})),
        )
        .await;
    assert_eq!(
        (s, code(&v), v["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_criteria", Some("criteria.field"))
    );
    let (s, v) = api.call(Method::POST, "/v1/rules", Some(json!({"name": "x", "criteria": {}}))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_criteria"));
    let bad_stage = json!({"name": "x", "criteria": {"all_leads": true}, "options": {"create_deal": true, "deal": {"stage": "Won", "closing_date": "+30d"}}});
    let (s, v) = api.call(Method::POST, "/v1/rules", Some(bad_stage)).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "stage_not_in_pipeline"));
    let (s, v) = api.call(Method::POST, "/v1/rules", Some(body.clone())).await;
    assert_eq!((s, code(&v), v["error"]["field"].as_str()), (StatusCode::CONFLICT, "duplicate_name", Some("name")));
    assert_eq!(crm.count("SELECT count(*) FROM conversion_rules").await, 2);

    // Per id: 400 malformed, 404 unknown.
    let id_routes: [(Method, &str); 4] =
        [(Method::GET, ""), (Method::DELETE, ""), (Method::POST, "/enable"), (Method::POST, "/disable")];
    for (m, suffix) in &id_routes {
        let (s, v) = api.call(m.clone(), &format!("/v1/rules/abc{suffix}"), None).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_id"), "{m} abc{suffix}");
        let (s, v) = api.call(m.clone(), &format!("/v1/rules/999999{suffix}"), None).await;
        assert_eq!(
            (s, code(&v), v["error"]["field"].as_str()),
            (StatusCode::NOT_FOUND, "rule_not_found", Some("rule_id")),
            "{m} 999999{suffix}"
        );
    }

    // 401 without a token, everywhere. A read-only user outside the acting
    // user's reach: the list is empty, each one is "not found", creating is
    // 403 (SPEC §5; tests/permissions.rs has the whole matrix).
    let mut all: Vec<(Method, String)> = vec![(Method::GET, "/v1/rules".into()), (Method::POST, "/v1/rules".into())];
    all.extend(id_routes.iter().map(|(m, s)| (m.clone(), format!("/v1/rules/{id}{s}"))));
    for (m, path) in &all {
        let b =
            (*m == Method::POST && path == "/v1/rules").then(|| json!({"name": "y", "criteria": {"all_leads": true}}));
        let (s, v) = anonymous.call(m.clone(), path, b.clone()).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{m} {path}");
        let (s, v) = forbidden.call(m.clone(), path, b).await;
        let expected = match (m.as_str(), path.as_str()) {
            ("GET", "/v1/rules") => (StatusCode::OK, ""),
            ("POST", "/v1/rules") => (StatusCode::FORBIDDEN, "forbidden"),
            _ => (StatusCode::NOT_FOUND, "rule_not_found"),
        };
        assert_eq!((s, code(&v)), expected, "{m} {path}");
        if s == StatusCode::OK {
            assert_eq!(v["rules"], json!([]), "a read-only user outside the reach sees none");
        }
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_rules").await, 2);

    // Delete last: 204, then 404.
    let (s, _) = api.call(Method::DELETE, &format!("/v1/rules/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api.call(Method::GET, &format!("/v1/rules/{id}"), None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "rule_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_matching_rule_by_id_wins_and_an_invalid_rule_is_skipped() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let leaver = crm.user("Leaver", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Both", "lead_status": "New"})).await;
    let other = crm.lead(json!({"owner_id": rep, "last_name": "Stale", "lead_status": "New"})).await;
    // Rule 1 acts as a user deactivated after the rule was saved.
    rule(&crm, "stale", json!({"field": "last_name", "op": "eq", "value": "Stale"}), leaver, true).await;
    let first = rule(&crm, "first", json!({"field": "lead_status", "op": "eq", "value": "Qualified"}), rep, true).await;
    rule(
        &crm,
        "second",
        json!({"field": "lead_status", "op": "in", "value": ["Qualified", "Contacted"]}),
        leaver,
        true,
    )
    .await;
    sqlx::query("UPDATE users SET active = false WHERE id = $1").bind(leaver).execute(crm.pool()).await.unwrap();
    let (_r, _rs) = start_relay(&crm, &broker);

    sqlx::query("UPDATE leads SET lead_status = 'Qualified' WHERE id = ANY($1)")
        .bind(vec![lead, other])
        .execute(crm.pool())
        .await
        .unwrap();
    wait_for("every change is relayed", LIMIT, || outbox_empty(&crm)).await;
    // `other` matches rule 2 ("first") too, once rule 1 is skipped.
    let jobs: Vec<(i64, sqlx::types::Json<Value>)> =
        sqlx::query_as("SELECT requested_by, criteria FROM conversion_jobs ORDER BY criteria->'all'->1->>'value'")
            .fetch_all(crm.pool())
            .await
            .unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let first_criteria = automation::get::<Rule>(crm.pool(), first).await.unwrap().criteria.0;
    for (requested_by, criteria) in &jobs {
        assert_eq!(*requested_by, rep, "the first valid rule by id acts");
        assert_eq!(criteria.0["all"][0], first_criteria);
    }
}

/// Issue 12: a rule whose criteria are `{"all_leads": true}` or `{"ids":
/// [...]}` fires like any other (the relay used to wrap them in an `all`
/// group, which refuses them, and skip every change with a warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rules_over_all_leads_or_ids_fire() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let listed = crm.lead(json!({"owner_id": rep, "last_name": "Listed", "lead_status": "New"})).await;
    let (_r, _rs) = start_relay(&crm, &broker);
    let (_w, _ws) = start_worker(&crm, &broker);
    rule(&crm, "listed leads", json!({"ids": [listed]}), rep, true).await;
    sqlx::query("UPDATE leads SET lead_status = 'Contacted' WHERE id = $1")
        .bind(listed)
        .execute(crm.pool())
        .await
        .unwrap();
    wait_for("the listed lead converts", LIMIT, || async { converted(&crm, listed).await }).await;

    rule(&crm, "every lead", json!({"all_leads": true}), rep, true).await;
    let new = crm.lead(json!({"owner_id": rep, "last_name": "New", "lead_status": "New"})).await;
    wait_for("a new lead converts", LIMIT, || async { converted(&crm, new).await }).await;
    wait_for("the outbox drains", LIMIT, || async { outbox_empty(&crm).await }).await;
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_jobs WHERE trigger = 'workflow'").await,
        2,
        "one workflow job per lead"
    );
    assert_eq!(crm.count("SELECT count(DISTINCT rule_id) FROM conversion_jobs").await, 2, "each job names its rule");
}
