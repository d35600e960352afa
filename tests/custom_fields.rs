//! No custom field left behind (issue 24, seed 001): with
//! `unmapped_custom_fields: "create"`, each lead custom field that no
//! mapping carries gets a contact custom field of its type and length and
//! a mapping, made once, listed on the job, and every value is carried;
//! `keep_on_lead` (the default) makes nothing and the dry run lists the
//! fields. Only admins' jobs may ask for it.

mod common;

use std::time::Duration;

use common::broker::{wait_for, TestBroker};
use common::*;
use leadconv::store::job::{self, NewJob, Trigger};
use leadconv::{Error, ErrorCode};
use serde_json::{json, Value};

async fn lead_fields(crm: &Crm) {
    sqlx::query(
        "INSERT INTO custom_field_defs (module, api_name, data_type, max_length) VALUES
             ('lead', 'region', 'text', 40), ('lead', 'budget', 'number', NULL), ('lead', 'expo_day', 'date', NULL),
             ('lead', 'mapped', 'text', 20), ('contact', 'mapped', 'text', 20)",
    )
    .execute(crm.pool())
    .await
    .unwrap();
    sqlx::query("INSERT INTO conversion_mappings VALUES ('mapped', 'contact', 'mapped')")
        .execute(crm.pool())
        .await
        .unwrap();
}

fn custom(i: usize) -> Value {
    json!({"region": format!("Đông Nam Á {i}"), "budget": i * 10, "expo_day": "2026-11-30", "mapped": "m"})
}

async fn definitions(crm: &Crm) -> Vec<(String, String, Option<i32>)> {
    sqlx::query_as("SELECT api_name, data_type, max_length FROM custom_field_defs WHERE module = 'contact' ORDER BY 1")
        .fetch_all(crm.pool())
        .await
        .unwrap()
}

async fn mappings(crm: &Crm) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT lead_field, target_module, target_field FROM conversion_mappings ORDER BY 1")
        .fetch_all(crm.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_each_field_once_and_carries_every_value_with_two_workers() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    lead_fields(&crm).await;
    let admin = crm.user("Admin", json!({"is_admin": true})).await;
    const LEADS: usize = 2000;
    sqlx::query(
        "INSERT INTO leads (owner_id, last_name, email, company, custom_fields)
         SELECT $1, 'Nguyễn ' || i, 'l' || i || '@vi.vn', 'Công ty ' || (i % 50),
                jsonb_build_object('region', 'Đông Nam Á ' || i, 'budget', i * 10, 'expo_day', '2026-11-30', 'mapped', 'm')
         FROM generate_series(1, $2) AS i",
    )
    .bind(admin)
    .bind(LEADS as i64)
    .execute(crm.pool())
    .await
    .unwrap();

    let options = json!({"unmapped_custom_fields": "create"}).to_string();
    let admin_id = admin.to_string();
    let out = leadconv_command(
        &crm.url(),
        broker.prefix(),
        &[
            "enqueue",
            "--criteria",
            r#"{"all_leads": true}"#,
            "--options",
            &options,
            "--requested-by",
            &admin_id,
            "--json",
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job_id: uuid::Uuid = printed["job_id"].as_str().unwrap().parse().unwrap();

    let workers: Vec<_> = (0..2)
        .map(|_| leadconv_command(&crm.url(), broker.prefix(), &["worker", "--exit-when-idle"]).spawn().unwrap())
        .collect();
    wait_for("every lead converted", Duration::from_secs(240), || async {
        crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await == LEADS as i64
    })
    .await;
    for mut w in workers {
        assert!(w.wait().await.unwrap().success());
    }

    assert_eq!(
        definitions(&crm).await,
        vec![
            ("budget".into(), "number".into(), None),
            ("expo_day".into(), "date".into(), None),
            ("mapped".into(), "text".into(), Some(20)),
            ("region".into(), "text".into(), Some(40)),
        ],
        "one contact field per unmapped lead field, of its type and length"
    );
    assert_eq!(
        mappings(&crm).await,
        vec![
            ("budget".into(), "contact".into(), "budget".into()),
            ("expo_day".into(), "contact".into(), "expo_day".into()),
            ("mapped".into(), "contact".into(), "mapped".into()),
            ("region".into(), "contact".into(), "region".into()),
        ]
    );
    assert_eq!(
        crm.count("SELECT count(*) FROM custom_field_defs WHERE module = 'contact' AND is_unique").await,
        0,
        "not unique"
    );
    let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!(job.converted_count, LEADS as i32);
    assert_eq!(job.custom_fields_created, ["budget", "expo_day", "region"], "listed on the job");
    let status =
        leadconv_command(&crm.url(), broker.prefix(), &["status", &job_id.to_string()]).output().await.unwrap();
    let line = String::from_utf8_lossy(&status.stdout);
    assert!(line.contains("contact custom fields made: budget, expo_day, region"), "{line}");
    // Every value carried: each lead's values are on its contact.
    let missing = crm
        .count(
            "SELECT count(*) FROM leads l JOIN contacts c ON c.id = l.converted_contact_id
             WHERE c.custom_fields->>'region' IS DISTINCT FROM l.custom_fields->>'region'
                OR (c.custom_fields->'budget') IS DISTINCT FROM (l.custom_fields->'budget')
                OR c.custom_fields->>'expo_day' IS DISTINCT FROM l.custom_fields->>'expo_day'",
        )
        .await;
    assert_eq!(missing, 0, "every value carried to its contact");
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_contact_id IS NULL").await, 0);
}

#[tokio::test]
async fn jobs_created_together_make_each_field_once() {
    let crm = Crm::new().await;
    lead_fields(&crm).await;
    let admin = crm.user("Admin", json!({"is_admin": true})).await;
    let mut leads = Vec::new();
    for i in 0..8 {
        leads
            .push(crm.lead(json!({"owner_id": admin, "last_name": format!("L{i}"), "custom_fields": custom(i)})).await);
    }
    let made = futures::future::join_all(leads.iter().map(|&l| {
        let pool = crm.pool().clone();
        async move {
            let new = NewJob {
                criteria: json!({"ids": [l]}),
                options: json!({"unmapped_custom_fields": "create"}),
                requested_by: admin,
                trigger: Trigger::Manual,
            };
            let checked = job::check(&pool, new).await.unwrap();
            job::create(&pool, &checked, job::Dispatch::InProcess).await.unwrap().custom_fields_created
        }
    }))
    .await;
    let mut all: Vec<String> = made.into_iter().flatten().collect();
    all.sort();
    assert_eq!(all, ["budget", "expo_day", "region"], "each field made by exactly one job");
    assert_eq!(crm.count("SELECT count(*) FROM custom_field_defs WHERE module = 'contact'").await, 4);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 4);
}

#[tokio::test]
async fn keep_on_lead_makes_nothing_and_the_dry_run_lists_the_fields() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    lead_fields(&crm).await;
    let admin = crm.user("Admin", json!({"is_admin": true})).await;
    let lead = crm.lead(json!({"owner_id": admin, "last_name": "Şahin", "custom_fields": custom(1)})).await;
    let r = crm.convert(admin, json!({}), lead).await;
    assert_eq!(r.outcome.as_str(), "converted");
    assert_eq!(crm.count("SELECT count(*) FROM custom_field_defs WHERE module = 'contact'").await, 1, "nothing made");
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 1);
    let contact = crm.row("contacts", r.contact_id.unwrap()).await.unwrap();
    assert_eq!(contact["custom_fields"], json!({"mapped": "m"}), "only the mapped value travels");

    let other = crm.lead(json!({"owner_id": admin, "last_name": "Kaya", "custom_fields": custom(2)})).await;
    let admin_id = admin.to_string();
    let criteria = json!({"ids": [other]}).to_string();
    for options in ["{}", r#"{"unmapped_custom_fields": "create"}"#] {
        let out = leadconv_command(
            &crm.url(),
            broker.prefix(),
            &["enqueue", "--criteria", &criteria, "--options", options, "--requested-by", &admin_id, "--dry-run"],
        )
        .output()
        .await
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("lead custom fields no mapping carries") && said.contains("budget, expo_day, region"),
            "{said}"
        );
    }
    assert_eq!(
        crm.count("SELECT count(*) FROM custom_field_defs WHERE module = 'contact'").await,
        1,
        "a dry run makes nothing"
    );
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 1);
}

#[tokio::test]
async fn a_non_admin_a_clashing_field_or_no_contact_refuses_the_job_and_changes_nothing() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    lead_fields(&crm).await;
    let rep = crm.user("Rep", json!({})).await;
    let admin = crm.user("Admin", json!({"is_admin": true})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Öz", "custom_fields": custom(3)})).await;
    let refusal = |requested_by: i64, options: Value| {
        let pool = crm.pool().clone();
        async move {
            let new = NewJob { criteria: json!({"ids": [lead]}), options, requested_by, trigger: Trigger::Manual };
            match job::check(&pool, new).await {
                Err(Error::Refused(r)) => r,
                other => panic!("expected a refusal, got {:?}", other.map(|c| c.new)),
            }
        }
    };
    let create = json!({"unmapped_custom_fields": "create"});
    let r = refusal(rep, create.clone()).await;
    assert_eq!((r.code, r.field.as_str()), (ErrorCode::AdminOnly, "unmapped_custom_fields"), "{r:?}");
    assert_eq!(leadconv::error::answer(r.code).0, 403);
    let out = leadconv_command(
        &crm.url(),
        broker.prefix(),
        &[
            "enqueue",
            "--criteria",
            &json!({"ids": [lead]}).to_string(),
            "--options",
            &create.to_string(),
            "--requested-by",
            &rep.to_string(),
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin"));

    let r = refusal(admin, json!({"unmapped_custom_fields": "create", "create_contact": false})).await;
    assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidOption, "unmapped_custom_fields"), "{r:?}");

    // A contact field of the same name and another type.
    sqlx::query("INSERT INTO custom_field_defs (module, api_name, data_type) VALUES ('contact', 'budget', 'text')")
        .execute(crm.pool())
        .await
        .unwrap();
    let r = refusal(admin, create.clone()).await;
    assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidMapping, "unmapped_custom_fields"), "{r:?}");
    assert!(r.message.contains("budget"), "names the field: {r:?}");

    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 0);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 1, "no mapping made");
    assert_eq!(crm.count("SELECT count(*) FROM custom_field_defs WHERE module = 'contact'").await, 2);
}
