//! The HTTP API against its own OpenAPI document, driven by an
//! OpenAPI-based fuzzer (schemathesis, from PyPI; `scripts/test.sh`
//! installs it): every operation, with generated valid and invalid input,
//! answers no 5xx, only documented status codes, and bodies that match the
//! document (nullable fields, bounds, the recursive `Criteria` and
//! `Options` schemas) — as an admin, as a rep (whose reach is themselves:
//! 403s and 404s where the admin gets answers), and with a `read` token.

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
    let admin = crm.user("Fuzz Admin", json!({"is_admin": true})).await;
    let manager = crm.user("Fuzz Manager", json!({})).await;
    let rep = crm.user("Fuzz Rep", json!({"manager_id": manager})).await;
    for i in 0..20 {
        let owner = if i % 2 == 0 { rep } else { admin };
        crm.lead(json!({"owner_id": owner, "last_name": format!("L{i}"), "email": format!("l{i}@example.com"), "company": "Acme"})).await;
    }
    use leadconv::store::auth::{create_scoped_token, TokenGrant};
    use leadconv_domain::access::Scope;
    let pool = crm.pool().clone();
    let token = |user, scope| {
        let pool = pool.clone();
        async move { create_scoped_token(&pool, user, "fuzz", TokenGrant { scope, expires_in: None }).await.unwrap() }
    };
    let callers = [
        ("admin", token(admin, Scope::Full).await),
        ("rep", token(rep, Scope::Full).await),
        ("read token", token(manager, Scope::Read).await),
    ];
    let server = serve(&crm.db, &broker).await;
    // A worker, so that convert-now answers with a result instead of
    // waiting out its timeout.
    let _worker = leadconv_command(&crm.url(), broker.prefix(), &["worker", "--concurrency", "2"]).spawn().unwrap();

    let fuzzer = std::process::Command::new("schemathesis").arg("--version").output();
    assert!(
        fuzzer.is_ok_and(|o| o.status.success()),
        "schemathesis is missing: run the suite with scripts/test.sh, or `python3 -m pip install schemathesis==4.32.5`"
    );
    for (who, token) in callers {
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
        assert!(
            out.status.success(),
            "the fuzzer found problems as {who}:\n{report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains("passed"), "{who}: {report}");
    }
}
