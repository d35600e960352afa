//! The `leadconv` command line as written in SPEC §6: exit code 2 and a
//! named reason for bad input with nothing written or published; `enqueue`,
//! `worker`, `status`, `results`, `cancel` and `--dry-run` end to end.

mod common;

use std::process::Output;

use common::broker::{amqp_url, TestBroker};
use common::*;
use leadconv::queue::Lane;
use serde_json::{json, Value};

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
async fn bad_input_exits_2_names_the_problem_and_leaves_nothing() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let viewer = crm.user("Viewer", json!({"can_convert": false})).await;
    let gone = crm.user("Gone", json!({"active": false})).await;
    crm.lead(json!({"owner_id": rep, "last_name": "Nowak"})).await;
    let (r, v, g) = (rep.to_string(), viewer.to_string(), gone.to_string());
    let deal = |d: Value| json!({"create_deal": true, "deal": d}).to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--criteria".into(), "{}".into(), "--requested-by".into(), r.clone()], "criteria"),
        (vec!["--criteria".into(), "not json".into(), "--requested-by".into(), r.clone()], "criteria"),
        (
            vec![
                "--criteria".into(),
                r#"{"field":"colour","op":"eq","value":1}"#.into(),
                "--requested-by".into(),
                r.clone(),
            ],
            "criteria.field",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"field":"city","op":"matches","value":"x"}"#.into(),
                "--requested-by".into(),
                r.clone(),
            ],
            "criteria.op",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"field":"no_of_employees","op":"gt","value":"ten"}"#.into(),
                "--requested-by".into(),
                r.clone(),
            ],
            "criteria.value",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"field":"created_at","op":"lt","value":"yesterday"}"#.into(),
                "--requested-by".into(),
                r.clone(),
            ],
            "criteria.value",
        ),
        (vec!["--criteria".into(), r#"{"all_leads":true}"#.into(), "--requested-by".into(), v], "requested_by"),
        (vec!["--criteria".into(), r#"{"all_leads":true}"#.into(), "--requested-by".into(), g.clone()], "requested_by"),
        (
            vec!["--criteria".into(), r#"{"all_leads":true}"#.into(), "--requested-by".into(), "424242".into()],
            "requested_by",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                deal(json!({"stage": "Qualification"})),
                "--requested-by".into(),
                r.clone(),
            ],
            "deal.closing_date",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                deal(json!({"closing_date": "+30d"})),
                "--requested-by".into(),
                r.clone(),
            ],
            "deal.stage",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                deal(json!({"closing_date": "+30d", "stage": "Won"})),
                "--requested-by".into(),
                r.clone(),
            ],
            "deal.stage",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                deal(json!({"closing_date": "soon", "stage": "Qualification"})),
                "--requested-by".into(),
                r.clone(),
            ],
            "deal.closing_date",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                deal(json!({"name": "{{nope}}", "closing_date": "+1m", "stage": "Qualification"})),
                "--requested-by".into(),
                r.clone(),
            ],
            "deal.name",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                json!({"owner_id": gone}).to_string(),
                "--requested-by".into(),
                r.clone(),
            ],
            "owner_id",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                json!({"move_attachments_to": "deal"}).to_string(),
                "--requested-by".into(),
                r.clone(),
            ],
            "move_attachments_to",
        ),
        (
            vec![
                "--criteria".into(),
                r#"{"all_leads":true}"#.into(),
                "--options".into(),
                json!({"create_deals": true}).to_string(),
                "--requested-by".into(),
                r.clone(),
            ],
            "create_deals",
        ),
    ];
    for (args, field) in cases {
        let mut full = vec!["enqueue"];
        full.extend(args.iter().map(String::as_str));
        let out = leadconv(&crm, &broker, &full).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("refused: {field}")), "{args:?} should name {field}: {err}");
        assert!(out.stdout.is_empty(), "no job id printed");
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0, "no job written");
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results").await, 0);
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 0, "nothing published");
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Workflow)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_worker_status_results_cancel_from_the_command_line() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Old", "email": "anna@acme.pl"})).await;
    for (name, email) in [("Anna", "  ANNA@acme.pl"), ("Piotr", "piotr@acme.pl"), ("Zofia", "zofia@acme.pl")] {
        crm.lead(json!({"owner_id": rep, "first_name": name, "last_name": "Nowak", "email": email, "company": "Acme", "lead_status": "Qualified"})).await;
    }
    let criteria = r#"{"field": "lead_status", "op": "eq", "value": "Qualified"}"#;
    let options = json!({"create_deal": true, "deal": {"closing_date": "+2w", "stage": "Qualification"}}).to_string();
    let rep_s = rep.to_string();

    // The dry run tells what would happen and writes nothing.
    let dry = leadconv(
        &crm,
        &broker,
        &["enqueue", "--criteria", criteria, "--options", &options, "--requested-by", &rep_s, "--dry-run", "--json"],
    )
    .await;
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let plans: Vec<Value> = text(&dry.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(plans.len(), 3);
    assert_eq!(plans[0]["outcome"], "convert");
    assert_eq!(plans[0]["contact"]["action"], "merged");
    assert_eq!(plans[0]["contact"]["matched_by"], "email");
    assert_eq!(plans[1]["contact"]["action"], "created");
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0);

    let out = leadconv(
        &crm,
        &broker,
        &["enqueue", "--criteria", criteria, "--options", &options, "--requested-by", &rep_s, "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let job_id = created["job_id"].as_str().unwrap().to_owned();
    assert_eq!(created["total_count"], 3);
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 3);

    let status: Value =
        serde_json::from_slice(&leadconv(&crm, &broker, &["status", &job_id, "--json"]).await.stdout).unwrap();
    assert_eq!((status["status"].as_str(), status["pending_count"].as_i64()), (Some("scheduled"), Some(3)));

    let w = leadconv(&crm, &broker, &["worker", "--concurrency", "2", "--exit-when-idle"]).await;
    assert!(w.status.success(), "{}", text(&w.stderr));

    let status: Value =
        serde_json::from_slice(&leadconv(&crm, &broker, &["status", &job_id, "--json"]).await.stdout).unwrap();
    assert_eq!(status["status"], "completed");
    assert_eq!(
        (status["converted_count"].as_i64(), status["merged_count"].as_i64(), status["pending_count"].as_i64()),
        (Some(3), Some(1), Some(0))
    );
    let human = text(&leadconv(&crm, &broker, &["status", &job_id]).await.stdout);
    assert!(human.contains("completed") && human.contains("converted 3 (merged 1)"), "{human}");

    let jsonl = text(&leadconv(&crm, &broker, &["results", &job_id]).await.stdout);
    let rows: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["outcome"] == "converted" && r["deal_id"].is_i64()));
    let csv =
        text(&leadconv(&crm, &broker, &["results", &job_id, "--format", "csv", "--outcome", "converted"]).await.stdout);
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("job_id,lead_id,outcome,contact_action"));
    assert_eq!(lines.count(), 3);
    let none = text(&leadconv(&crm, &broker, &["results", &job_id, "--outcome", "failed"]).await.stdout);
    assert!(none.is_empty());

    // A finished job cannot be cancelled; an unknown one is reported.
    let c = leadconv(&crm, &broker, &["cancel", &job_id]).await;
    assert_eq!(c.status.code(), Some(2));
    assert!(text(&c.stderr).contains("job_finished"));
    let unknown = leadconv(&crm, &broker, &["status", "00000000-0000-0000-0000-000000000000"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("job_not_found"));
}

#[tokio::test]
async fn cancel_from_the_command_line_skips_the_pending_leads() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    for i in 0..5 {
        crm.lead(json!({"owner_id": rep, "last_name": format!("L{i}")})).await;
    }
    let out = leadconv(
        &crm,
        &broker,
        &["enqueue", "--criteria", r#"{"all_leads": true}"#, "--requested-by", &rep.to_string()],
    )
    .await;
    let job_id = text(&out.stdout).trim().to_owned();
    let c = leadconv(&crm, &broker, &["cancel", &job_id]).await;
    assert!(c.status.success(), "{}", text(&c.stderr));
    assert!(text(&c.stdout).contains("skipped 5"));
    // The messages still queued are consumed without converting anything.
    let w = leadconv(&crm, &broker, &["worker", "--exit-when-idle"]).await;
    assert!(w.status.success());
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 0);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results WHERE error_code = 'cancelled'").await, 5);
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 0);
}

/// RabbitMQ lost a job's messages (its queue was purged): `leadconv
/// republish` sends every pending lead again, and a worker completes the job
/// exactly. An unknown or finished job is refused with exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_sends_the_pending_leads_of_a_job_whose_messages_were_lost() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    for i in 0..40 {
        crm.lead(json!({"owner_id": rep, "last_name": format!("L{i}"), "email": format!("l{}@example.com", i % 30)}))
            .await;
    }
    let rep_s = rep.to_string();
    let out =
        leadconv(&crm, &broker, &["enqueue", "--criteria", r#"{"all_leads": true}"#, "--requested-by", &rep_s]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_id = text(&out.stdout).trim().to_owned();
    let queue = broker.topology.work_queue(Lane::Bulk);
    assert_eq!(broker.depth(&queue).await, 40);

    // The broker loses the queue's contents.
    broker.channel.queue_purge(&queue, lapin::options::QueuePurgeOptions::default()).await.unwrap();
    assert_eq!(broker.depth(&queue).await, 0);

    let out = leadconv(&crm, &broker, &["republish", &job_id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("40 pending leads"), "{}", text(&out.stdout));
    assert_eq!(broker.depth(&queue).await, 40);

    let out = leadconv(&crm, &broker, &["worker", "--exit-when-idle"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 40);
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 30, "shared e-mails merged");
    let status: Value =
        serde_json::from_str(&text(&leadconv(&crm, &broker, &["status", &job_id, "--json"]).await.stdout)).unwrap();
    assert_eq!((&status["status"], &status["converted_count"]), (&json!("completed"), &json!(40)), "{status}");

    for (job, code) in [(job_id.as_str(), "job_finished"), ("8d7ef0a4-40a6-4d4e-9d3b-3f8f1c0d2a11", "job_not_found")] {
        let out = leadconv(&crm, &broker, &["republish", job]).await;
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(code), "{}", text(&out.stderr));
    }
    assert_eq!(broker.depth(&queue).await, 0, "a refused republish publishes nothing");
}

/// SPEC §6 lists `enqueue --trigger workflow`, and §1/§2 keep the workflow
/// lane for rules' few leads: the command line may put at most
/// `WORKFLOW_MAX_LEADS` leads named by id there (converted in the fast
/// lane), and is refused, with nothing written or published, for anything
/// larger or for a filter.
#[tokio::test]
async fn enqueue_with_the_workflow_trigger_takes_a_few_leads_by_id() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let mut leads = Vec::new();
    for i in 0..3 {
        leads.push(crm.lead(json!({"owner_id": rep, "last_name": format!("L{i}"), "lead_status": "Qualified"})).await);
    }
    let rep_s = rep.to_string();
    let too_many = json!({"ids": (1..=leadconv::store::job::WORKFLOW_MAX_LEADS as i64 + 1).collect::<Vec<_>>()});
    for criteria in
        [json!({"all_leads": true}), json!({"field": "lead_status", "op": "eq", "value": "Qualified"}), too_many]
    {
        let c = criteria.to_string();
        let out =
            leadconv(&crm, &broker, &["enqueue", "--criteria", &c, "--requested-by", &rep_s, "--trigger", "workflow"])
                .await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{criteria}: {err}");
        assert!(err.contains("refused: trigger") && err.contains("use trigger manual"), "{err}");
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0, "no job written");
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Workflow)).await, 0, "nothing published");

    let ids = json!({"ids": &leads[..2]}).to_string();
    let out =
        leadconv(&crm, &broker, &["enqueue", "--criteria", &ids, "--requested-by", &rep_s, "--trigger", "workflow"])
            .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_id = text(&out.stdout).trim().to_owned();
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Workflow)).await, 2, "published in the fast lane");
    assert_eq!(broker.depth(&broker.topology.work_queue(Lane::Bulk)).await, 0);
    let w = leadconv(&crm, &broker, &["worker", "--exit-when-idle"]).await;
    assert!(w.status.success(), "{}", text(&w.stderr));
    let status: Value =
        serde_json::from_slice(&leadconv(&crm, &broker, &["status", &job_id, "--json"]).await.stdout).unwrap();
    assert_eq!(
        (status["status"].as_str(), status["trigger"].as_str(), status["converted_count"].as_i64()),
        (Some("completed"), Some("workflow"), Some(2))
    );
}

/// A CSV export is opened in spreadsheets: a cell that would run as a
/// formula is written with a leading `'`, as the console's export does.
#[tokio::test]
async fn results_as_csv_never_write_a_formula() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak"})).await;
    let ids = json!({"ids": [lead]}).to_string();
    let out = leadconv(&crm, &broker, &["enqueue", "--criteria", &ids, "--requested-by", &rep.to_string()]).await;
    let job_id = text(&out.stdout).trim().to_owned();
    // Error messages quote CRM values; this one is as hostile as they come.
    sqlx::query(
        "UPDATE conversion_results SET outcome = 'failed', error_code = 'constraint_violation',
                error_message = '=HYPERLINK(\"http://evil.example\",\"x\")' WHERE lead_id = $1",
    )
    .bind(lead)
    .execute(crm.pool())
    .await
    .unwrap();
    let csv = text(&leadconv(&crm, &broker, &["results", &job_id, "--format", "csv"]).await.stdout);
    let row = csv.lines().nth(1).expect("a row");
    assert!(row.contains(r#""'=HYPERLINK(""http://evil.example"",""x"")""#), "{csv}");
    let jsonl = text(&leadconv(&crm, &broker, &["results", &job_id]).await.stdout);
    assert!(jsonl.contains(r#""error_message":"=HYPERLINK"#), "JSON keeps the value as it is: {jsonl}");
}
