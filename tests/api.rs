//! The HTTP API through a real HTTP client against `leadconv serve` as a
//! process: every jobs/leads endpoint's success and 4xx cases, hostile
//! input, the OpenAPI document against the routes, and /metrics.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::broker::{amqp_url, wait_for, TestBroker};
use common::server::{free_port, serve, serve_with, Server};
use common::*;
use leadconv::queue::Lane;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Fields drop in order: the server stops before its database goes.
struct Api {
    server: Server,
    crm: Crm,
    broker: TestBroker,
    http: reqwest::Client,
    token: String,
    rep: i64,
}

impl Api {
    async fn new() -> Api {
        Api::with_flags(&[]).await
    }

    /// [`Api::new`] with more `serve` flags.
    async fn with_flags(flags: &[&str]) -> Api {
        let crm = Crm::new().await;
        let broker = TestBroker::new().await;
        let server = serve_with(&crm.db, &broker, flags).await;
        let rep = crm.user("Rep", json!({})).await;
        let token = leadconv::store::auth::create_token(crm.pool(), rep, "test").await.unwrap();
        Api { server, crm, broker, http: reqwest::Client::new(), token, rep }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Calls convert-now on `lead` with `body` in a task of its own.
    fn convert_in_background(&self, lead: i64, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value)> {
        let (http, url, token) =
            (self.http.clone(), self.url(&format!("/v1/leads/{lead}/convert")), self.token.clone());
        tokio::spawn(async move {
            let r = http.post(url).bearer_auth(token).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    }

    /// Waits until `n` convert-now calls wait for the conversion
    /// transaction (serve's `leadconv_convert_now_waiting`).
    async fn wait_for_convert_now_waiting(&self, n: usize) {
        let metrics = self.url("/metrics");
        wait_for(&format!("{n} calls waiting for the conversion transaction"), Duration::from_secs(20), || async {
            let text = self.http.get(&metrics).send().await.unwrap().text().await.unwrap();
            sum(&text, "leadconv_convert_now_waiting", &[]) == n as f64
        })
        .await;
    }

    /// Waits until `n` backends of the test's database wait for a lock.
    async fn wait_for_lock_waits(&self, n: i64) {
        wait_for(&format!("{n} transactions waiting for a lock"), Duration::from_secs(20), || async {
            self.crm
                .count(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await
                == n
        })
        .await;
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn leads(&self, n: usize) -> Vec<i64> {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(self.crm.lead(json!({"owner_id": self.rep, "last_name": format!("L{i}"), "email": format!("l{i}@example.com"), "company": "Acme"})).await);
        }
        ids
    }

    async fn jobs(&self) -> i64 {
        self.crm.count("SELECT count(*) FROM conversion_jobs").await
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

#[tokio::test]
async fn probes_document_and_authentication() {
    let api = Api::new().await;
    let plain = |p: &str| api.http.get(api.url(p)).send();
    assert_eq!(plain("/healthz").await.unwrap().status(), StatusCode::OK);
    let ready = plain("/readyz").await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().await.unwrap(), json!({"postgres": true, "rabbitmq": true}));
    assert_eq!(plain("/openapi.json").await.unwrap().json::<Value>().await.unwrap()["openapi"], "3.0.3");

    // Missing, malformed and unknown tokens: 401; a user who may not
    // convert reads (the dashboard role) and gets 403 on anything else.
    let r = plain("/v1/jobs").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(code(&r.json().await.unwrap()), "unauthorized");
    let r = api.http.get(api.url("/v1/jobs")).header("authorization", "Basic abc").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = api.http.get(api.url("/v1/jobs")).bearer_auth("lcv_not-a-token").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let viewer = api.crm.user("Viewer", json!({"can_convert": false})).await;
    let viewer_token = leadconv::store::auth::create_token(api.crm.pool(), viewer, "v").await.unwrap();
    let r = api.http.get(api.url("/v1/jobs")).bearer_auth(&viewer_token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = api
        .http
        .post(api.url("/v1/jobs"))
        .bearer_auth(&viewer_token)
        .json(&json!({"criteria": {"all_leads": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(code(&r.json().await.unwrap()), "forbidden");
    // Tokens are stored hashed, never in clear.
    assert_eq!(
        api.crm
            .count(&format!("SELECT count(*) FROM api_tokens WHERE token_hash::text LIKE '%{}%'", &api.token[4..12]))
            .await,
        0
    );
    assert_eq!(api.crm.count("SELECT count(*) FROM api_tokens WHERE length(token_hash) = 32").await, 2);
    // Unknown routes and methods answer JSON 4xx.
    let (s, v) = api.get("/v1/nothing").await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = api.call(reqwest::Method::DELETE, "/v1/jobs", None).await;
    assert_eq!((s, code(&v)), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
}

#[tokio::test]
async fn create_read_list_results_cancel_a_job() {
    let api = Api::new().await;
    let leads = api.leads(3).await;

    // Dry run: the plan, nothing written.
    let (s, plan) =
        api.post("/v1/jobs?dry_run=true", json!({"criteria": {"ids": leads}, "options": with_deal()})).await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(plan["total_count"], 3);
    // Leads are planned as the job converts them: the second one's account
    // is the one the first creates (all three share a company).
    assert_eq!(plan["plans"][0]["account"]["action"], "created", "{plan}");
    assert_eq!(plan["plans"][1]["account"]["action"], "matched", "{plan}");
    assert_eq!(
        (&plan["plans"][1]["account"]["matched_by"], &plan["plans"][1]["account"]["created_by_lead"]),
        (&json!("company"), &json!(leads[0])),
        "{plan}"
    );
    assert_eq!(plan["summary"], "create 3");
    assert_eq!(api.jobs().await, 0);

    let (s, created) = api.post("/v1/jobs", json!({"criteria": {"ids": leads}, "options": with_deal()})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["total_count"], 3);
    let id = created["job_id"].as_str().unwrap().to_owned();
    assert_eq!(api.broker.depth(&api.broker.topology.work_queue(Lane::Bulk)).await, 3);

    let (s, job) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (s, job["status"].as_str(), job["trigger"].as_str(), job["pending_count"].as_i64()),
        (StatusCode::OK, Some("scheduled"), Some("api"), Some(3))
    );

    let (s, list) = api.get("/v1/jobs?status=scheduled&trigger=api&limit=10").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["jobs"][0]["id"], id.as_str());
    let (_, empty) = api.get("/v1/jobs?status=completed").await;
    assert_eq!(empty["jobs"], json!([]));
    let (_, paged) = api.get("/v1/jobs?limit=1&offset=1").await;
    assert_eq!(paged["jobs"], json!([]));

    let (s, page) = api.get(&format!("/v1/jobs/{id}/results?limit=2")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["results"].as_array().unwrap().len(), 2);
    let after = page["next_after"].as_i64().unwrap();
    let (_, rest) = api.get(&format!("/v1/jobs/{id}/results?limit=2&after={after}")).await;
    assert_eq!(rest["results"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_after"], Value::Null);

    let (s, cancelled) = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(
        (s, cancelled["status"].as_str(), cancelled["skipped_count"].as_i64()),
        (StatusCode::OK, Some("cancelled"), Some(3))
    );
    let (s, again) = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!((s, code(&again)), (StatusCode::CONFLICT, "job_finished"));

    // 4xx on ids and queries.
    let unknown = "00000000-0000-0000-0000-000000000000";
    for path in [format!("/v1/jobs/{unknown}"), format!("/v1/jobs/{unknown}/results")] {
        let (s, v) = api.get(&path).await;
        assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "job_not_found"), "{path}");
    }
    let (s, v) = api.post(&format!("/v1/jobs/{unknown}/cancel"), json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "job_not_found"));
    for path in ["/v1/jobs/not-a-uuid", "/v1/jobs/1/results"] {
        let (s, v) = api.get(path).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_id"), "{path}");
    }
    for path in [
        "/v1/jobs?status=done",
        "/v1/jobs?limit=-1",
        "/v1/jobs?limit=100000",
        "/v1/jobs?limit=abc",
        "/v1/jobs?colour=red",
    ] {
        let (s, v) = api.get(path).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_query"), "{path}");
    }
    let (s, v) = api.get(&format!("/v1/jobs/{id}/results?outcome=won")).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_query"));
}

#[tokio::test]
async fn malformed_and_hostile_input_gets_4xx_and_changes_nothing() {
    let api = Api::new().await;
    let leads = api.leads(2).await;
    let before = (api.jobs().await, api.crm.count("SELECT count(*) FROM leads").await);
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        (vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'], StatusCode::BAD_REQUEST, "invalid_json"),
        (br#"{"criteria": {"ids": [1]}, "colour": "red"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_body"),
        (br#"{"criteria": {"ids": [1]}, "trigger": 5}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_body"),
        (br#"{"options": {}}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_body"),
        (br#"{"criteria": {}}"#.to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_criteria"),
        (
            br#"{"criteria": {"field": "annual_revenue", "op": "gt", "value": 1e400}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_criteria",
        ),
        (
            br#"{"criteria": {"ids": [99999999999999999999999]}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_criteria",
        ),
        (
            br#"{"criteria": {"field": "no_of_employees", "op": "gt", "value": 1.5}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_criteria",
        ),
        (
            br#"{"criteria": {"field": "city; DROP TABLE leads", "op": "eq", "value": "x"}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_criteria",
        ),
        (
            br#"{"criteria": {"all_leads": true}, "options": {"deal": {"amount": "lots"}}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_option",
        ),
        (
            br#"{"criteria": {"all_leads": true}, "options": {"owner_id": 18446744073709551616}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_option",
        ),
        (
            format!("{{\"criteria\": {}{}}}", "{\"all\": [".repeat(20), "]}".repeat(20)).into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_criteria",
        ),
        (
            format!("{{\"criteria\": {}{}}}", "{\"all\": [".repeat(5000), "]}".repeat(5000)).into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            format!("{{\"criteria\": {{\"ids\": [{}1]}}}}", "1, ".repeat(3_000_000)).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (body, status, expected) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let (s, v) = api.raw("/v1/jobs", body).await;
        assert_eq!((s, code(&v)), (status, expected), "{shown}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The refusal names the field.
    let (_, v) =
        api.post("/v1/jobs", json!({"criteria": {"any": [{"field": "city", "op": "like", "value": "x"}]}})).await;
    assert_eq!(v["error"]["field"], "criteria.any[0].op");
    let (_, v) = api.post("/v1/jobs", json!({"criteria": {"all_leads": true}, "options": {"create_deal": true, "deal": {"closing_date": "+1m", "stage": "Won"}}})).await;
    assert_eq!((code(&v), v["error"]["field"].as_str()), ("stage_not_in_pipeline", Some("deal.stage")));
    // SQL in values is data: the job simply matches nothing.
    let (s, v) = api
        .post("/v1/jobs", json!({"criteria": {"field": "lead_source", "op": "eq", "value": "'; DROP TABLE leads; --"}}))
        .await;
    assert_eq!((s, v["total_count"].as_i64()), (StatusCode::ACCEPTED, Some(0)));
    assert_eq!(api.crm.count("SELECT count(*) FROM leads").await, before.1, "leads intact");
    assert_eq!(api.jobs().await, before.0 + 1, "only the harmless job was written");
    assert_eq!(api.crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 0);
    assert_eq!(leads.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_one_lead_now() {
    let api = Api::new().await;
    let leads = api.leads(2).await;
    let existing = api.crm.contact(json!({"owner_id": api.rep, "last_name": "Old", "email": "l1@example.com"})).await;

    // Without a worker the answer is 202 with the job after the timeout.
    let (s, pending) = api.post(&format!("/v1/leads/{}/convert", leads[0]), json!({"timeout_ms": 0})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{pending}");
    assert_eq!(
        api.broker.depth(&api.broker.topology.work_queue(Lane::Workflow)).await,
        1,
        "it went to the workflow lane"
    );

    let mut cfg = leadconv::queue::worker::WorkerConfig::new(amqp_url(), api.broker.topology.clone());
    cfg.tick = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    let w = tokio::spawn(leadconv::queue::worker::run(api.crm.pool().clone(), cfg, stop.clone()));
    wait_for("the pending job completes", Duration::from_secs(30), || async {
        api.crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await == 1
    })
    .await;

    let (s, r) = api
        .post(&format!("/v1/leads/{}/convert", leads[1]), json!({"options": with_deal(), "timeout_ms": 10000}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["outcome"].as_str(), r["contact_action"].as_str(), r["contact_id"].as_i64()),
        (Some("converted"), Some("merged"), Some(existing))
    );
    assert_eq!(r["is_repeat"], true);
    assert!(r["deal_id"].is_i64());

    let (s, v) = api.post(&format!("/v1/leads/{}/convert", leads[1]), json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "already_converted"));
    let (s, v) = api.post("/v1/leads/999999/convert", json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "lead_not_found"));
    let (s, v) = api.post("/v1/leads/abc/convert", json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_id"));
    let third = api.leads(1).await[0];
    let (s, v) = api.post(&format!("/v1/leads/{third}/convert"), json!({"options": {"create_deal": true}})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "missing_mandatory_field"));
    let (s, v) = api.post(&format!("/v1/leads/{third}/convert"), json!({"timeout": 5})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_body"));
    stop.cancel();
    w.await.unwrap().unwrap();
}

// Issue 22: `serve` converts a convert-now lead itself, so the answer
// needs no worker and nothing passes through the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_now_is_converted_by_serve_without_a_worker() {
    let api = Api::new().await;
    let lead = api.leads(1).await[0];
    let (s, r) =
        api.post(&format!("/v1/leads/{lead}/convert"), json!({"options": with_deal(), "timeout_ms": 20000})).await;
    assert_eq!(s, StatusCode::OK, "answered with no worker running: {r}");
    assert_eq!((r["outcome"].as_str(), r["contact_action"].as_str()), (Some("converted"), Some("created")));
    assert!(r["deal_id"].is_i64(), "{r}");
    assert_eq!(api.crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 1);
    assert_eq!(api.broker.depth(&api.broker.topology.work_queue(Lane::Workflow)).await, 0, "nothing published");
    let job: uuid::Uuid = sqlx::query_scalar("SELECT id FROM conversion_jobs").fetch_one(api.crm.pool()).await.unwrap();
    let (s, j) = api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!((s, j["status"].as_str(), j["converted_count"].as_i64()), (StatusCode::OK, Some("completed"), Some(1)));
    // Counted in the conversion's own commit: the job row is complete and
    // no counter shard waits for a worker's rollup sweeper.
    let (status, converted, shards): (String, i32, i64) = sqlx::query_as(
        "SELECT status::text, converted_count, (SELECT count(*) FROM conversion_job_counters)
         FROM conversion_jobs WHERE id = $1",
    )
    .bind(job)
    .fetch_one(api.crm.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), converted, shards), ("completed", 1, 0));
}

// Issue 22: a lead `serve` cannot convert at once (its row locked past the
// lock timeout) goes to the workers' workflow lane; the waiting call gets
// the worker's result, and the lead is converted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_convert_now_lead_serve_cannot_convert_goes_to_the_workers() {
    let api = Api::with_flags(&["--lock-timeout-secs", "1"]).await;
    let lead = api.leads(1).await[0];
    let mut holder = api.crm.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM leads WHERE id = $1 FOR UPDATE").bind(lead).execute(&mut *holder).await.unwrap();
    let call = api.convert_in_background(lead, json!({"timeout_ms": 30000}));
    let workflow = api.broker.topology.work_queue(Lane::Workflow);
    wait_for("the lead handed to the workflow lane", Duration::from_secs(20), || async {
        api.broker.depth(&workflow).await == 1
    })
    .await;
    assert_eq!(api.crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 0);
    holder.rollback().await.unwrap();
    let mut cfg = leadconv::queue::worker::WorkerConfig::new(amqp_url(), api.broker.topology.clone());
    cfg.tick = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    let w = tokio::spawn(leadconv::queue::worker::run(api.crm.pool().clone(), cfg, stop.clone()));
    let (s, r) = call.await.unwrap();
    assert_eq!((s, r["outcome"].as_str()), (StatusCode::OK, Some("converted")), "{r}");
    assert_eq!(api.crm.count("SELECT count(*) FROM contacts").await, 1, "converted once");
    stop.cancel();
    w.await.unwrap().unwrap();
}

// Issue 22: convert-now calls that wait together are converted together,
// in one transaction (a conversion's statements paid once for several
// callers); each lead once, and only leads of equal settings share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_now_calls_waiting_together_are_converted_in_one_transaction() {
    // Seven calls served at once, one conversion transaction at a time.
    let api = Api::with_flags(&["--convert-now-concurrency", "7"]).await;
    let leads = api.leads(4).await;
    let (first, b1, b2, c) = (leads[0], leads[1], leads[2], leads[3]);
    let call =
        |lead: i64, options: Value| api.convert_in_background(lead, json!({"options": options, "timeout_ms": 30000}));
    // The first call holds the one conversion transaction, waiting for its
    // lead's row.
    let mut holder = api.crm.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM leads WHERE id = $1 FOR UPDATE").bind(first).execute(&mut *holder).await.unwrap();
    let first_call = call(first, with_deal());
    api.wait_for_lock_waits(1).await;
    // Meanwhile: two leads with the same options, the first of them again,
    // and a lead with other options.
    let b1_call = call(b1, with_deal());
    let b2_call = call(b2, with_deal());
    let again_call = call(b1, with_deal());
    let c_call = call(c, json!({}));
    api.wait_for_convert_now_waiting(4).await;
    holder.rollback().await.unwrap();
    let mut answers = Vec::new();
    for c in [first_call, b1_call, b2_call, again_call, c_call] {
        answers.push(c.await.unwrap());
    }
    for (s, r) in &answers {
        assert_eq!(*s, StatusCode::OK, "{r}");
    }
    let outcome = |i: usize| answers[i].1["outcome"].as_str().unwrap_or_default().to_owned();
    assert_eq!([outcome(0), outcome(2), outcome(4)], ["converted"; 3].map(String::from), "{answers:?}");
    // The lead asked for twice: converted by whichever call came first.
    let (b1_won, again_won) = (outcome(1) == "converted", outcome(3) == "converted");
    assert!(b1_won != again_won, "the lead asked for twice is converted once: {answers:?}");
    let (won, lost) = if b1_won { (1, 3) } else { (3, 1) };
    assert_eq!(api.crm.count("SELECT count(*) FROM contacts").await, 4, "a contact per lead, none twice");
    // The transaction that wrote each lead's result.
    let tx_of = |job: &Value| {
        let job: uuid::Uuid = job.as_str().unwrap().parse().unwrap();
        let pool = api.crm.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT xmin::text FROM conversion_results WHERE job_id = $1")
                .bind(job)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let txs: Vec<String> = futures::future::join_all(answers.iter().map(|(_, r)| tx_of(&r["job_id"]))).await;
    assert_eq!(txs[won], txs[2], "the two leads with the same options waited together and were converted together");
    assert_ne!(txs[0], txs[2], "the first was converted before they came");
    assert_ne!(txs[4], txs[2], "other options, another transaction");
    assert_ne!(txs[lost], txs[2], "a lead once per transaction");
    // Each job is complete, counted in its conversion's commit.
    assert_eq!(api.crm.count("SELECT count(*) FROM conversion_jobs WHERE status = 'completed'").await, 5);
    assert_eq!(api.crm.count("SELECT count(*) FROM conversion_job_counters").await, 0);
}

// Issue 22: callers converted together do not wait for one another's
// locks: a lead whose row another transaction holds fails its batch soon,
// the others are converted at once, alone, and it waits on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_locked_elsewhere_does_not_hold_up_the_callers_converted_with_it() {
    // One conversion transaction at a time; locks waited for 30 s.
    let api = Api::with_flags(&["--convert-now-concurrency", "7", "--lock-timeout-secs", "30"]).await;
    let leads = api.leads(3).await;
    let (first, locked, free) = (leads[0], leads[1], leads[2]);
    let call = |lead: i64| api.convert_in_background(lead, json!({"timeout_ms": 20000}));
    let (mut holds_first, mut holds_locked) =
        (api.crm.pool().begin().await.unwrap(), api.crm.pool().begin().await.unwrap());
    for (tx, lead) in [(&mut holds_first, first), (&mut holds_locked, locked)] {
        sqlx::query("SELECT 1 FROM leads WHERE id = $1 FOR UPDATE").bind(lead).execute(&mut **tx).await.unwrap();
    }
    // The first call holds the conversion transaction while the two others
    // come and wait together.
    let first_call = call(first);
    api.wait_for_lock_waits(1).await;
    let (locked_call, free_call) = (call(locked), call(free));
    api.wait_for_convert_now_waiting(2).await;
    holds_first.rollback().await.unwrap();
    // The free lead is answered while the other's row is still held.
    let (s, r) = free_call.await.unwrap();
    assert_eq!((s, r["outcome"].as_str()), (StatusCode::OK, Some("converted")), "{r}");
    assert!(!locked_call.is_finished(), "the locked lead waits for its row");
    holds_locked.rollback().await.unwrap();
    for c in [first_call, locked_call] {
        let (s, r) = c.await.unwrap();
        assert_eq!((s, r["outcome"].as_str()), (StatusCode::OK, Some("converted")), "{r}");
    }
    assert_eq!(api.crm.count("SELECT count(*) FROM contacts").await, 3);
}

/// Convert-now of `lead` with `body`, waiting up to 20 s for the result.
async fn convert_now(api: &Api, lead: i64, mut body: Value) -> (StatusCode, Value) {
    body["timeout_ms"] = json!(20000);
    api.post(&format!("/v1/leads/{lead}/convert"), body).await
}

// Issue 24 (seed 000, Salesforce's convertLead): convert-now into the
// account and contact the caller names, merged as rules 4–6 say instead of
// matching; each refusal with its status and code, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_now_into_the_records_the_caller_names() {
    let api = Api::new().await;
    let crm = &api.crm;
    let boss = crm.user("Boss", json!({})).await;
    sqlx::query("UPDATE users SET manager_id = $1 WHERE id = $2")
        .bind(boss)
        .bind(api.rep)
        .execute(crm.pool())
        .await
        .unwrap();
    let mut cfg = leadconv::queue::worker::WorkerConfig::new(amqp_url(), api.broker.topology.clone());
    cfg.tick = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    let w = tokio::spawn(leadconv::queue::worker::run(crm.pool().clone(), cfg, stop.clone()));
    let lead = |email: &str, company: &str| {
        crm.lead(json!({"owner_id": api.rep, "first_name": "Zoë", "last_name": "Çelik", "email": email,
                        "company": company, "phone": "+90 1", "website": "celik.tr"}))
    };
    // Records the lead would never match: other e-mail, other company.
    let account = crm.account(json!({"owner_id": api.rep, "account_name": "Named Ltd"})).await;
    let contact = crm
        .contact(json!({"owner_id": api.rep, "account_id": account, "last_name": "Named", "email": "n@named.tr"}))
        .await;
    let lonely = crm.contact(json!({"owner_id": api.rep, "last_name": "Lonely", "email": "lonely@x.tr"})).await;
    let bosses = crm.account(json!({"owner_id": boss, "account_name": "Boss GmbH"})).await;
    let other = crm.account(json!({"owner_id": api.rep, "account_name": "Other"})).await;
    let elsewhere =
        crm.contact(json!({"owner_id": api.rep, "account_id": other, "last_name": "Else", "email": "else@x.tr"})).await;

    // Into a named account and contact.
    let l1 = lead("l1@firma.tr", "Firma 1").await;
    let (s, r) = convert_now(&api, l1, json!({"account_id": account, "contact_id": contact})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (
            r["contact_action"].as_str(),
            r["contact_id"].as_i64(),
            r["account_action"].as_str(),
            r["account_id"].as_i64()
        ),
        (Some("merged"), Some(contact), Some("matched"), Some(account)),
        "{r}"
    );
    let named = crm.row("contacts", contact).await.unwrap();
    assert_eq!(
        (named["phone"].as_str(), named["email"].as_str()),
        (Some("+90 1"), Some("n@named.tr")),
        "filled, not overwritten"
    );
    assert_eq!(crm.row("accounts", account).await.unwrap()["website"], "celik.tr", "the account filled too");
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 3, "no contact made");

    // A named contact only: its own account stands; one without an account
    // is linked to the account the company decides.
    let l2 = lead("l2@firma.tr", "Other").await;
    let (s, r) = convert_now(&api, l2, json!({"contact_id": lonely})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!((r["contact_id"].as_i64(), r["account_id"].as_i64()), (Some(lonely), Some(other)), "{r}");
    assert_eq!(crm.row("contacts", lonely).await.unwrap()["account_id"].as_i64(), Some(other), "linked");

    // A named account only, of a superior: merged read-only; the contact
    // is matched by e-mail as usual (none here: a new one, in that account).
    let l3 = lead("l3@firma.tr", "Firma 3").await;
    let (s, r) = convert_now(&api, l3, json!({"account_id": bosses})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!((r["account_action"].as_str(), r["account_id"].as_i64()), (Some("matched"), Some(bosses)), "{r}");
    assert!(crm.row("accounts", bosses).await.unwrap()["website"].is_null(), "a superior's account is read-only");
    let made = crm.row("contacts", r["contact_id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(made["account_id"].as_i64(), Some(bosses));

    // Rule 7 looks at the named contact: a superior's lead is not merged
    // into it by a subordinate.
    let bosses_lead = crm.lead(json!({"owner_id": boss, "last_name": "Patron", "email": "p@x.tr"})).await;
    let (s, r) = convert_now(&api, bosses_lead, json!({"contact_id": contact})).await;
    assert_eq!(
        (s, r["outcome"].as_str(), r["error_code"].as_str()),
        (StatusCode::OK, Some("failed"), Some("blocked_by_hierarchy")),
        "{r}"
    );

    // Refusals: nothing created, nothing converted.
    let l4 = lead("else@x.tr", "Firma 4").await;
    let jobs = api.jobs().await;
    for (body, status, want) in [
        (json!({"contact_id": 999_999}), StatusCode::NOT_FOUND, "record_not_found"),
        (json!({"account_id": 999_999}), StatusCode::NOT_FOUND, "record_not_found"),
        (
            json!({"account_id": account, "contact_id": elsewhere}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "contact_in_other_account",
        ),
        // The lead's e-mail matches a contact of another account.
        (json!({"account_id": account}), StatusCode::UNPROCESSABLE_ENTITY, "contact_in_other_account"),
        (
            json!({"contact_id": lonely, "options": {"create_contact": false}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_option",
        ),
        (
            json!({"account_id": account, "options": {"create_account": false}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_option",
        ),
    ] {
        let (s, v) = convert_now(&api, l4, body.clone()).await;
        assert_eq!((s, code(&v)), (status, want), "{body}: {v}");
    }
    assert_eq!(api.jobs().await, jobs, "no job made by a refused call");
    assert!(crm.row("leads", l4).await.unwrap()["converted_at"].is_null());
    // A bulk job may not name records.
    let (s, v) =
        api.post("/v1/jobs", json!({"criteria": {"all_leads": true}, "options": {"contact_id": contact}})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_option"), "{v}");
    stop.cancel();
    w.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let api = Api::new().await;
    let doc: Value = serde_json::from_str(leadconv::http::OPENAPI).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> =
        leadconv::http::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served, "every documented route is served and every served route documented");
    // And the server really routes each one (no fallback "not_found"/405).
    for (method, path) in &served {
        let concrete = path
            .replace("{job_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{lead_id}", "1")
            .replace("{rule_id}", "1")
            .replace("{schedule_id}", "1")
            .replace("{module}", "contact")
            .replace("{id}", "1");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (s, v) = api.call(m, &concrete, if method == "POST" { Some(json!({})) } else { None }).await;
        assert!(
            s != StatusCode::METHOD_NOT_ALLOWED && code(&v) != "not_found",
            "{method} {path} is not routed: {s} {v}"
        );
    }
}

/// Parses Prometheus text and sums a counter's samples whose labels match.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_the_job_did() {
    let api = Api::new().await;
    let rep = api.rep;
    api.crm.contact(json!({"owner_id": rep, "last_name": "Old", "email": "l0@example.com"})).await;
    let leads = api.leads(6).await;
    let converted_elsewhere = leads[5];
    let (_, created) = api.post("/v1/jobs", json!({"criteria": {"ids": leads}, "options": with_deal()})).await;
    let id = created["job_id"].as_str().unwrap().to_owned();
    // One lead is converted by another job meanwhile: it will be skipped.
    api.crm.convert(rep, json!({}), converted_elsewhere).await;

    let port = free_port();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_leadconv"))
        .args(["worker", "--metrics", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", api.crm.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", api.broker.prefix())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let scrape_url = format!("http://127.0.0.1:{port}/metrics");
    wait_for("the job completes", Duration::from_secs(60), || async {
        api.get(&format!("/v1/jobs/{id}")).await.1["status"] == "completed"
    })
    .await;
    let text = api.http.get(&scrape_url).send().await.unwrap().text().await.unwrap();
    let (_, job) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        sum(&text, "leadconv_conversions_total", &[("outcome", "converted")]),
        job["converted_count"].as_f64().unwrap()
    );
    assert_eq!(
        sum(&text, "leadconv_conversions_total", &[("outcome", "skipped")]),
        job["skipped_count"].as_f64().unwrap()
    );
    assert_eq!(
        sum(&text, "leadconv_conversions_total", &[("contact_action", "merged")]),
        job["merged_count"].as_f64().unwrap()
    );
    assert_eq!(sum(&text, "leadconv_conversion_failures_total", &[("code", "already_converted")]), 1.0);
    assert_eq!(
        sum(&text, "leadconv_conversion_duration_seconds_count", &[]),
        6.0,
        "a real histogram, one sample per lead"
    );
    assert!(text.contains("leadconv_conversion_duration_seconds_bucket{le=\"0.005\"}"));
    assert!(text.contains("# TYPE leadconv_conversions_total counter"));
    assert!(!text.contains(&id), "no per-job labels");
    drop(out);

    // The API's own /metrics parses too, with the jobs by status.
    let served = api.http.get(api.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(sum(&served, "leadconv_jobs", &[("status", "completed")]), 2.0);
    // Leads taken into jobs, read from Postgres: the 6 of the API job and
    // the one converted by a job of its own.
    assert_eq!(sum(&served, "leadconv_leads_enqueued_total", &[]), 7.0);
}

// Issue 8: a database where lower() folds only ASCII is not ready: matching
// Polish, Turkish or Vietnamese data would silently degrade there.
#[tokio::test]
async fn readyz_refuses_a_database_whose_lower_is_ascii_only() {
    let db = TestDb::blank_with_ctype("C").await;
    let broker = TestBroker::new().await;
    let server = serve(&db, &broker).await;
    let r = reqwest::get(format!("{}/readyz", server.base)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!((&body["postgres"], &body["rabbitmq"]), (&json!(false), &json!(true)), "{body}");
    let problem = body["postgres_problem"].as_str().unwrap_or("");
    assert!(problem.contains("LC_CTYPE") && problem.contains("C.UTF-8"), "{body}");
}

// Issue 23: a Postgres that cannot take writes (a standby behind the old
// primary's address after a failover, or read only by default) is not
// ready, and says why.
#[tokio::test]
async fn readyz_refuses_a_read_only_database() {
    let crm = Crm::new().await;
    let name = crm.url().rsplit('/').next().unwrap().to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("ALTER DATABASE \"{name}\" SET default_transaction_read_only = on"))
        .execute(&mut admin)
        .await
        .unwrap();
    let broker = TestBroker::new().await;
    let server = serve(&crm.db, &broker).await;
    let r = reqwest::get(format!("{}/readyz", server.base)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!((&body["postgres"], &body["rabbitmq"]), (&json!(false), &json!(true)), "{body}");
    let problem = body["postgres_problem"].as_str().unwrap_or("");
    assert!(problem.contains("read only") && problem.contains("writable primary"), "{body}");
    // Writable again (the endpoint reaches a primary): the pool drops its
    // read-only connections and serve is ready without a restart.
    sqlx::query(&format!("ALTER DATABASE \"{name}\" RESET default_transaction_read_only"))
        .execute(&mut admin)
        .await
        .unwrap();
    wait_for("/readyz is 200 again", Duration::from_secs(30), || async {
        reqwest::get(format!("{}/readyz", server.base)).await.unwrap().status() == StatusCode::OK
    })
    .await;
}

// Issue 12: the workflow lane carries only what rules and convert-now put
// there; an API caller cannot name `workflow` (or `schedule`) and put a
// thousand leads in front of a one-lead conversion.
#[tokio::test]
async fn a_caller_cannot_choose_the_workflow_or_schedule_trigger() {
    let api = Api::new().await;
    let leads = api.leads(3).await;
    for trigger in ["workflow", "schedule"] {
        let (status, body) = api.post("/v1/jobs", json!({"criteria": {"ids": leads}, "trigger": trigger})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(
            (body["error"]["code"].as_str(), body["error"]["field"].as_str()),
            (Some("invalid_option"), Some("trigger"))
        );
    }
    assert_eq!(api.jobs().await, 0, "nothing created");
    let (status, body) = api.post("/v1/jobs", json!({"criteria": {"ids": leads}, "trigger": "manual"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(api.crm.count("SELECT count(*) FROM conversion_jobs WHERE trigger = 'manual'").await, 1);
}

// Issue 12: every field the API answers with null is marked nullable in
// the OpenAPI document (a generated client would otherwise reject real
// answers), checked on a job that has not started and its pending results.
#[tokio::test]
async fn fields_answered_null_are_nullable_in_the_openapi_document() {
    let api = Api::new().await;
    let leads = api.leads(2).await;
    let (status, created) = api.post("/v1/jobs", json!({"criteria": {"ids": leads}})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["job_id"].as_str().unwrap().to_owned();
    let doc: Value = serde_json::from_str(leadconv::http::OPENAPI).unwrap();
    let (_, job) = api.get(&format!("/v1/jobs/{id}")).await;
    let (_, page) = api.get(&format!("/v1/jobs/{id}/results")).await;
    let mut answers = vec![("Job", job)];
    answers.extend(page["results"].as_array().unwrap().iter().map(|r| ("LeadResult", r.clone())));
    let mut checked = 0;
    for (schema, answer) in answers {
        let props = &doc["components"]["schemas"][schema]["properties"];
        for (field, value) in answer.as_object().unwrap() {
            if value.is_null() {
                checked += 1;
                assert_eq!(props[field]["nullable"], json!(true), "{schema}.{field} is answered null but not nullable");
            }
        }
    }
    assert!(checked >= 10, "the answers had null fields to check ({checked})");
}
