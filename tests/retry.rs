//! Retrying a job's failed leads (SPEC §4): `leadconv retry` and
//! `POST /v1/jobs/{id}/retry` make a new job of the failed (or skipped)
//! leads that are still unconverted, with the first job's options, naming
//! it (`retry_of`); once the cause is fixed, those leads convert.

mod common;

use std::process::Output;
use std::time::Duration;

use common::broker::{wait_for, TestBroker};
use common::server::serve;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

async fn leadconv(crm: &Crm, broker: &TestBroker, args: &[&str]) -> Output {
    leadconv_command(&crm.url(), broker.prefix(), args).output().await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a worker until no work is left.
async fn work(crm: &Crm, broker: &TestBroker) {
    let out = leadconv(crm, broker, &["worker", "--exit-when-idle"]).await;
    assert!(out.status.success(), "worker: {}", text(&out.stderr));
}

/// Three good leads and two whose last name is blank (they fail with
/// `missing_mandatory_field`, writing nothing).
async fn leads(crm: &Crm, rep: i64) -> (Vec<i64>, Vec<i64>) {
    let mut good = Vec::new();
    for i in 0..3 {
        good.push(
            crm.lead(json!({"owner_id": rep, "last_name": format!("Good {i}"), "email": format!("good{i}@example.com"), "company": "Acme"}))
                .await,
        );
    }
    let mut bad = Vec::new();
    for i in 0..2 {
        bad.push(
            crm.lead(json!({"owner_id": rep, "last_name": " \u{a0}", "first_name": format!("Nameless {i}"), "email": format!("bad{i}@example.com"), "company": "Acme"}))
                .await,
        );
    }
    (good, bad)
}

async fn outcomes(crm: &Crm, job: &str) -> (i64, i64) {
    (
        crm.count(&format!("SELECT count(*) FROM conversion_results WHERE job_id = '{job}' AND outcome = 'converted'"))
            .await,
        crm.count(&format!(
            "SELECT count(*) FROM conversion_results WHERE job_id = '{job}' AND outcome = 'failed' AND error_code = 'missing_mandatory_field'"
        ))
        .await,
    )
}

#[tokio::test]
async fn leadconv_retry_converts_the_failed_leads_once_their_cause_is_fixed() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let other = crm.user("Other", json!({})).await;
    let (_, bad) = leads(&crm, rep).await;
    let ids = json!({"ids": crm_ids(&crm).await}).to_string();
    let out = leadconv(
        &crm,
        &broker,
        &["enqueue", "--criteria", &ids, "--options", &with_deal().to_string(), "--requested-by", &rep.to_string()],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout).trim().to_owned();
    work(&crm, &broker).await;
    assert_eq!(outcomes(&crm, &first).await, (3, 2));

    // Bad input: exit 2, a named reason, no job.
    let jobs = crm.count("SELECT count(*) FROM conversion_jobs").await;
    for (args, expected) in [
        (vec!["retry", first.as_str(), "--code", "poison_message"], "nothing_to_retry"),
        (vec!["retry", first.as_str(), "--code", "no_such_code"], "code"),
        (vec!["retry", first.as_str(), "--outcome", "converted"], "outcome"),
        (vec!["retry", "8d7ef0a4-40a6-4d4e-9d3b-3f8f1c0d2a11"], "job_not_found"),
    ] {
        let out = leadconv(&crm, &broker, &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(expected), "{args:?}: {}", text(&out.stderr));
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, jobs, "a refused retry writes nothing");

    // The cause is fixed; the retry takes exactly the failed leads, with the
    // first job's options, asked for by whoever is named.
    sqlx::query("UPDATE leads SET last_name = 'Fixed' WHERE id = ANY($1)")
        .bind(&bad)
        .execute(crm.pool())
        .await
        .unwrap();
    let out = leadconv(
        &crm,
        &broker,
        &["retry", &first, "--code", "missing_mandatory_field", "--requested-by", &other.to_string(), "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((printed["total_count"].as_i64(), printed["retry_of"].as_str()), (Some(2), Some(first.as_str())));
    let retry = printed["job_id"].as_str().unwrap().to_owned();
    let (retry_of, requested_by, options): (Option<Uuid>, i64, Value) =
        sqlx::query_as("SELECT retry_of, requested_by, options FROM conversion_jobs WHERE id = $1::uuid")
            .bind(&retry)
            .fetch_one(crm.pool())
            .await
            .unwrap();
    assert_eq!((retry_of.map(|u| u.to_string()), requested_by), (Some(first.clone()), other));
    assert_eq!(options, with_deal());
    work(&crm, &broker).await;
    assert_eq!(outcomes(&crm, &retry).await, (2, 0));
    // Converted with the first job's options: each has its deal.
    assert_eq!(
        crm.count(&format!(
            "SELECT count(*) FROM leads WHERE id IN ({}, {}) AND converted_deal_id IS NOT NULL",
            bad[0], bad[1]
        ))
        .await,
        2
    );
    // `status --json` names the job it retries.
    let out = leadconv(&crm, &broker, &["status", &retry, "--json"]).await;
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((status["retry_of"].as_str(), status["status"].as_str()), (Some(first.as_str()), Some("completed")));

    // Nothing is left to retry: converted leads are never taken again.
    let out = leadconv(&crm, &broker, &["retry", &first]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nothing_to_retry"), "{}", text(&out.stderr));
}

async fn crm_ids(crm: &Crm) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM leads ORDER BY id").fetch_all(crm.pool()).await.unwrap()
}

#[tokio::test]
async fn post_retry_makes_a_job_of_the_failed_leads_for_the_caller() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let server = serve(&crm.db, &broker).await;
    let rep = crm.user("Rep", json!({})).await;
    let admin = crm.user("Admin", json!({"is_admin": true})).await;
    let token = leadconv::store::auth::create_token(crm.pool(), admin, "test").await.unwrap();
    let http = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let req = http.post(format!("{}{path}", server.base)).bearer_auth(&token).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (_, bad) = leads(&crm, rep).await;

    let (s, created) =
        post("/v1/jobs".into(), json!({"criteria": {"ids": crm_ids(&crm).await}, "options": with_deal()})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{created}");
    let first = created["job_id"].as_str().unwrap().to_owned();
    work(&crm, &broker).await;
    assert_eq!(outcomes(&crm, &first).await, (3, 2));

    for (path, body, status, code) in [
        (
            format!("/v1/jobs/{first}/retry"),
            json!({"outcome": "converted"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_option",
        ),
        (format!("/v1/jobs/{first}/retry"), json!({"outcome": "skipped"}), StatusCode::CONFLICT, "nothing_to_retry"),
        (
            format!("/v1/jobs/{first}/retry"),
            json!({"code": "bogus"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_option",
        ),
        (
            "/v1/jobs/8d7ef0a4-40a6-4d4e-9d3b-3f8f1c0d2a11/retry".into(),
            json!({}),
            StatusCode::NOT_FOUND,
            "job_not_found",
        ),
        (format!("/v1/jobs/{first}/retry"), json!({"leads": [1]}), StatusCode::BAD_REQUEST, "invalid_body"),
    ] {
        let (s, v) = post(path.clone(), body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{path} {body}: {v}");
    }

    sqlx::query("UPDATE leads SET last_name = 'Fixed' WHERE id = ANY($1)")
        .bind(&bad)
        .execute(crm.pool())
        .await
        .unwrap();
    let (s, r) = post(format!("/v1/jobs/{first}/retry"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    assert_eq!((r["total_count"].as_i64(), r["retry_of"].as_str()), (Some(2), Some(first.as_str())));
    let retry = r["job_id"].as_str().unwrap().to_owned();
    work(&crm, &broker).await;
    wait_for("the retry converts the fixed leads", Duration::from_secs(30), || async {
        outcomes(&crm, &retry).await == (2, 0)
    })
    .await;
    let job: Value = http
        .get(format!("{}/v1/jobs/{retry}", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            job["retry_of"].as_str(),
            job["requested_by"].as_i64(),
            job["trigger"].as_str(),
            job["converted_count"].as_i64()
        ),
        (Some(first.as_str()), Some(admin), Some("api"), Some(2))
    );
}
