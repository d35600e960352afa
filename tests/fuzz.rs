//! The HTTP API against its own OpenAPI document, driven by an
//! OpenAPI-based fuzzer (schemathesis, from PyPI; `scripts/test.sh`
//! installs it): every operation, with a valid token, with generated valid
//! and invalid input, answers no 5xx, only documented status codes, and
//! bodies that match the document (nullable fields, bounds, the recursive
//! `Criteria` and `Options` schemas).

mod common;

use std::process::Stdio;

use common::broker::TestBroker;
use common::server::serve;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_to_its_openapi_document_under_a_fuzzer() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let user = crm.user("Fuzz", json!({})).await;
    for i in 0..20 {
        crm.lead(json!({"owner_id": user, "last_name": format!("L{i}"), "email": format!("l{i}@example.com"), "company": "Acme"})).await;
    }
    let token = leadconv::store::auth::create_token(crm.pool(), user, "fuzz").await.unwrap();
    let server = serve(&crm.db, &broker).await;
    // A worker, so that convert-now answers with a result instead of
    // waiting out its timeout.
    let _worker = leadconv_command(&crm.url(), broker.prefix(), &["worker", "--concurrency", "2"]).spawn().unwrap();

    let fuzzer = std::process::Command::new("schemathesis").arg("--version").output();
    assert!(
        fuzzer.is_ok_and(|o| o.status.success()),
        "schemathesis is missing: run the suite with scripts/test.sh, or `python3 -m pip install schemathesis==4.32.5`"
    );
    let out = tokio::process::Command::new("schemathesis")
        .args([
            "run",
            &format!("{}/openapi.json", server.base),
            "--header",
            &format!("Authorization: Bearer {token}"),
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples",
            "30",
            "--seed",
            "2026",
            "--request-timeout",
            "70",
            "--no-color",
        ])
        .stdin(Stdio::null())
        // Its cache of findings goes under target/, not into the repository.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the fuzzer found problems:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("passed"), "{report}");
}
