//! The console in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, which
//! `scripts/test.sh` installs) against a real `serve`, worker, Postgres and
//! RabbitMQ. Signs in, starts a job from the preview form, cancels it,
//! starts another with a worker running and watches its progress bar reach
//! 100 % without reloading, opens its failures, retries them once fixed,
//! and checks that a lead named `<script>…` is shown as text. Leaves a
//! screenshot of the job page at `target/tmp/console-job.png`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::broker::{wait_for, TestBroker};
use common::server::{free_port, serve};
use common::*;
use fantoccini::elements::Element;
use fantoccini::error::{CmdError, ErrorStatus};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// How long the browser waits for a page to show something.
const PATIENCE: Duration = Duration::from_secs(60);

async fn browser() -> (tokio::process::Child, Client) {
    let port = free_port();
    let driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver is missing: run scripts/test.sh, which installs chromium and chromium-driver");
    wait_for("chromedriver listens", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let caps = json!({"goog:chromeOptions": {
        "binary": "/usr/bin/chromium",
        "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000", "--lang=en-US"]
    }});
    // chromedriver speaks plain HTTP, but the builder wants a TLS provider
    // chosen (more than one is compiled in).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session");
    (driver, client)
}

/// Does `f` with the element `css` finds, waiting for it to appear. Pages
/// that show a running job replace their main part every two seconds, so
/// an element found a moment ago can be gone: then it is found again.
async fn on<T, F, Fut>(c: &Client, css: &str, f: F) -> T
where
    F: Fn(Element) -> Fut,
    Fut: std::future::Future<Output = Result<T, CmdError>>,
{
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let el =
            c.wait().at_most(PATIENCE).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        match f(el).await {
            Ok(v) => return v,
            Err(CmdError::Standard(e))
                if e.error == ErrorStatus::StaleElementReference && std::time::Instant::now() < deadline => {}
            Err(e) => panic!("{css}: {e}"),
        }
    }
}

async fn text(c: &Client, css: &str) -> String {
    on(c, css, |e| async move { e.text().await }).await
}

async fn click(c: &Client, css: &str) {
    on(c, css, |e| async move { e.click().await }).await
}

/// Waits until the job page's status reads `status` (the page refreshes
/// itself while the job runs: no reload here).
async fn status_becomes(c: &Client, status: &str) {
    c.wait()
        .at_most(PATIENCE)
        .every(Duration::from_millis(200))
        .for_element(Locator::XPath(&format!("//span[@id='job-status' and normalize-space()='{status}']")))
        .await
        .unwrap_or_else(|e| panic!("the job page never showed {status}: {e}"));
}

/// Fills the preview form with `criteria`, previews, checks the dry run's
/// count, creates the job and lands on its page.
async fn create_job(c: &Client, base: &str, criteria: &serde_json::Value, expect: usize) {
    c.goto(&format!("{base}/console/preview")).await.unwrap();
    let field = c.find(Locator::Id("criteria")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(&criteria.to_string()).await.unwrap();
    click(c, "#preview").await;
    let summary = text(c, "#preview-summary").await;
    assert!(summary.starts_with(&format!("{expect} leads would be processed")), "{summary}");
    click(c, "#create").await;
    c.wait().at_most(PATIENCE).for_element(Locator::Id("job-id")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_runs_watches_retries_and_cancels_jobs_in_the_browser() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let server = serve(&crm.db, &broker).await;
    let base = server.base.clone();
    let admin = crm.user("Ada Admin", json!({"is_admin": true})).await;
    let token = leadconv::store::auth::create_token(crm.pool(), admin, "browser").await.unwrap();
    let lead = |first: &str, last: &str, email: &str, company: &str| {
        crm.lead(json!({"owner_id": admin, "first_name": first, "last_name": last, "email": email, "company": company}))
    };
    let mut to_cancel = Vec::new();
    for i in 0..3 {
        to_cancel.push(lead("Later", &format!("Lead {i}"), &format!("later{i}@example.com"), "Later GmbH").await);
    }
    let good = lead("Ana", "Kowalska", "ana@example.com", "Acme").await;
    let chinese = lead("小明", "王", "wang@example.cn", "北京科技有限公司").await;
    let script = lead("<script>alert(1)</script>", "Hacker", "h@example.com", "<b>Evil</b> Ltd").await;
    let nameless = lead("Nameless", " ", "nameless@example.com", "Acme").await;

    let (_driver, c) = browser().await;
    // Without a session: the sign-in page.
    c.goto(&format!("{base}/console")).await.unwrap();
    c.wait().at_most(PATIENCE).for_element(Locator::Id("token")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/console/login"));
    c.find(Locator::Id("token")).await.unwrap().send_keys(&token).await.unwrap();
    click(&c, "#sign-in").await;
    // Waited for, not read at once: the click only starts the navigation.
    c.wait().at_most(PATIENCE).for_element(Locator::XPath("//main/h1[normalize-space()='Jobs']")).await.unwrap();

    // A job started with no worker running stays pending; cancel it.
    create_job(&c, &base, &json!({"ids": to_cancel}), 3).await;
    status_becomes(&c, "scheduled").await;
    click(&c, "#cancel").await;
    status_becomes(&c, "cancelled").await;
    assert!(text(&c, "#job-counts").await.contains("3 skipped"));

    // With a worker: the progress bar reaches 100 % on its own.
    let mut worker = leadconv_command(&crm.url(), broker.prefix(), &["worker"]).spawn().unwrap();
    create_job(&c, &base, &json!({"ids": [good, chinese, script, nameless]}), 4).await;
    let job_url = c.current_url().await.unwrap().to_string();
    status_becomes(&c, "completed").await;
    let (value, max) =
        on(&c, "progress.bar", |e| async move { Ok((e.attr("value").await?, e.attr("max").await?)) }).await;
    assert_eq!(value, max);
    assert_eq!(text(&c, "#job-progress .pct").await, "100 %");
    assert!(text(&c, "#job-counts").await.contains("3 converted"), "{}", text(&c, "#job-counts").await);

    // The lead named like a script is text, and nothing ran.
    let cell = text(&c, &format!("tr[data-lead='{script}'] td.lead")).await;
    assert!(cell.contains("<script>alert(1)</script> Hacker"), "{cell}");
    assert!(c.get_alert_text().await.is_err(), "no alert was raised");
    assert!(text(&c, &format!("tr[data-lead='{chinese}']")).await.contains("北京科技有限公司"));
    // The screenshot CI keeps: the job page, Chinese names included.
    let shot = c.screenshot().await.unwrap();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-job.png");
    std::fs::write(&path, shot).unwrap();

    // The failures, grouped by code; open them.
    let failures = text(&c, "#failures").await;
    assert!(failures.contains("missing_mandatory_field"), "{failures}");
    click(&c, "#failures a").await;
    // The filtered page: "failed" chosen in its outcome filter.
    c.wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("select[name='outcome'] option[value='failed'][selected]"))
        .await
        .unwrap();
    assert!(text(&c, "#results tbody tr").await.contains("Nameless"));
    assert_eq!(c.find_all(Locator::Css("#results tbody tr")).await.unwrap().len(), 1, "only the failed lead");

    // Fixed in the CRM, retried from the page: a new job naming the first.
    sqlx::query("UPDATE leads SET last_name = 'Bezimienny' WHERE id = $1")
        .bind(nameless)
        .execute(crm.pool())
        .await
        .unwrap();
    click(&c, "#retry").await;
    c.wait()
        .at_most(PATIENCE)
        .for_element(Locator::XPath("//p[contains(@class, 'summary') and contains(., 'retry of')]"))
        .await
        .unwrap();
    status_becomes(&c, "completed").await;
    assert_ne!(c.current_url().await.unwrap().to_string(), job_url.split('?').next().unwrap());
    assert!(text(&c, "p.summary").await.contains("retry of"));
    assert!(text(&c, "#job-counts").await.contains("1 converted"));
    let converted: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT converted_at FROM leads WHERE id = $1")
            .bind(nameless)
            .fetch_one(crm.pool())
            .await
            .unwrap();
    assert!(converted.is_some());

    // The jobs list shows all three.
    c.goto(&format!("{base}/console")).await.unwrap();
    assert_eq!(c.find_all(Locator::Css("table.jobs tbody tr")).await.unwrap().len(), 3);
    c.close().await.unwrap();
    let _ = worker.start_kill();
    let _ = worker.wait().await;
}

/// Signs in with `token` from the sign-in page and waits for the jobs list.
async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/console/login")).await.unwrap();
    c.wait().at_most(PATIENCE).for_element(Locator::Id("token")).await.unwrap();
    c.find(Locator::Id("token")).await.unwrap().send_keys(token).await.unwrap();
    click(c, "#sign-in").await;
    c.wait().at_most(PATIENCE).for_element(Locator::XPath("//main/h1[normalize-space()='Jobs']")).await.unwrap();
}

/// The ids of the jobs the jobs list shows.
async fn listed_jobs(c: &Client) -> Vec<String> {
    let mut ids = Vec::new();
    for row in c.find_all(Locator::Css("table.jobs tbody tr td a")).await.unwrap() {
        if let Some(href) = row.attr("href").await.unwrap() {
            ids.push(href.trim_start_matches("/console/jobs/").to_owned());
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rep_and_an_admin_see_different_jobs_in_the_browser() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let server = serve(&crm.db, &broker).await;
    let base = server.base.clone();
    let admin = crm.user("Ada Admin", json!({"is_admin": true})).await;
    let manager = crm.user("Mia Manager", json!({})).await;
    let rep = crm.user("Rex Rep", json!({"manager_id": manager})).await;
    let peer = crm.user("Pia Peer", json!({"manager_id": manager})).await;
    let mut jobs = Vec::new();
    for owner in [rep, peer, admin] {
        let lead = crm.lead(json!({"owner_id": owner, "last_name": "Lead", "company": "Acme"})).await;
        let new = leadconv::store::job::NewJob {
            criteria: json!({"ids": [lead]}),
            options: json!({}),
            requested_by: owner,
            trigger: leadconv::store::job::Trigger::Manual,
        };
        let checked = leadconv::store::job::check(crm.pool(), new).await.unwrap();
        let lease = leadconv::store::job::Lease::new(Duration::from_secs(30));
        let dispatch = leadconv::store::job::Dispatch::Queue { lease };
        jobs.push(leadconv::store::job::create(crm.pool(), &checked, dispatch).await.unwrap().id.to_string());
    }
    let (rep_job, admin_job) = (jobs[0].clone(), jobs[2].clone());
    let rep_token = leadconv::store::auth::create_token(crm.pool(), rep, "browser").await.unwrap();
    let admin_token = leadconv::store::auth::create_token(crm.pool(), admin, "browser").await.unwrap();

    let (_driver, c) = browser().await;
    // The rep sees their own job only, and the admin's is "not found".
    sign_in(&c, &base, &rep_token).await;
    assert_eq!(listed_jobs(&c).await, vec![rep_job.clone()]);
    c.goto(&format!("{base}/console/jobs/{admin_job}")).await.unwrap();
    c.wait().at_most(PATIENCE).for_element(Locator::XPath("//h1[contains(., '404')]")).await.unwrap();
    c.goto(&format!("{base}/console/jobs/{rep_job}")).await.unwrap();
    assert!(text(&c, "#job-status").await.contains("scheduled"));
    c.find(Locator::Id("cancel")).await.expect("the rep may cancel their own job");
    click(&c, "form.signout button").await;
    c.wait().at_most(PATIENCE).for_element(Locator::Id("token")).await.unwrap();

    // The admin sees all three.
    sign_in(&c, &base, &admin_token).await;
    let mut all = jobs.clone();
    all.sort();
    assert_eq!(listed_jobs(&c).await, all);
    c.close().await.unwrap();
}
