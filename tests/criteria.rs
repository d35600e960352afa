//! Criteria select exactly the leads they describe (SPEC §4, §6), with every
//! value bound as a parameter and converted leads never matching.

mod common;

use common::*;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use serde_json::{json, Value};

struct Leads {
    crm: Crm,
    acting: i64,
    ids: Vec<i64>,
}

/// Five leads with distinct shapes; the fifth is already converted.
async fn leads() -> Leads {
    let crm = Crm::new().await;
    let acting = crm.user("Rep", json!({})).await;
    sqlx::query("INSERT INTO custom_field_defs (module, api_name, data_type) VALUES ('lead', 'region', 'picklist'), ('lead', 'score', 'number')")
        .execute(crm.pool())
        .await
        .unwrap();
    let rows = [
        json!({"last_name": "A", "lead_status": "Qualified", "lead_source": "Webinar", "tags": ["expo-2026", "vip"],
               "annual_revenue": 1000.5, "city": "Kraków", "created_at": "2026-01-15T10:00:00Z",
               "custom_fields": {"region": "EMEA", "score": 90}}),
        json!({"last_name": "B", "lead_status": "Contacted", "lead_source": "Referral", "tags": ["expo-2026"],
               "annual_revenue": 50, "created_at": "2026-06-30T23:00:00Z", "custom_fields": {"region": "APAC", "score": "oops"}}),
        json!({"last_name": "C", "lead_status": "New", "lead_source": null, "tags": [], "created_at": "2026-07-01T00:00:00Z",
               "company": "100% Real_Co", "custom_fields": {}}),
        json!({"last_name": "D", "lead_status": "Qualified", "lead_source": "Webinar", "email_opt_out": true,
               "created_at": "2025-12-31T23:59:59Z", "custom_fields": {"region": "EMEA", "score": 10}}),
        json!({"last_name": "E", "lead_status": "Qualified", "lead_source": "Webinar", "converted_at": "2026-02-01T00:00:00Z",
               "custom_fields": {"region": "EMEA"}}),
    ];
    let mut ids = Vec::new();
    for mut r in rows {
        merge(&mut r, json!({"owner_id": acting}));
        ids.push(crm.lead(r).await);
    }
    Leads { crm, acting, ids }
}

impl Leads {
    /// Last names of the leads a job with `criteria` snapshots.
    async fn matching(&self, criteria: Value) -> Vec<String> {
        let checked = job::check(
            self.crm.pool(),
            NewJob {
                criteria: criteria.clone(),
                options: json!({}),
                requested_by: self.acting,
                trigger: Trigger::Manual,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{criteria} refused: {e}"));
        let j = job::create(self.crm.pool(), &checked, Dispatch::InProcess).await.unwrap();
        sqlx::query_scalar(
            "SELECT l.last_name FROM conversion_results r JOIN leads l ON l.id = r.lead_id WHERE r.job_id = $1 ORDER BY l.last_name",
        )
        .bind(j.id)
        .fetch_all(self.crm.pool())
        .await
        .unwrap()
    }

    async fn refused(&self, criteria: Value) -> leadconv::Refusal {
        let jobs_before = self.crm.count("SELECT count(*) FROM conversion_jobs").await;
        let e = job::check(
            self.crm.pool(),
            NewJob { criteria, options: json!({}), requested_by: self.acting, trigger: Trigger::Manual },
        )
        .await
        .unwrap_err();
        assert_eq!(self.crm.count("SELECT count(*) FROM conversion_jobs").await, jobs_before);
        match e {
            leadconv::Error::Refused(r) => r,
            other => panic!("expected a refusal, got {other}"),
        }
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn each_operator_selects_what_it_says() {
    let l = leads().await;
    let f = |field: &str, op: &str, value: Value| json!({"field": field, "op": op, "value": value});
    assert_eq!(
        l.matching(f("lead_status", "eq", json!("Qualified"))).await,
        names(&["A", "D"]),
        "converted E never matches"
    );
    assert_eq!(
        l.matching(f("lead_source", "ne", json!("Webinar"))).await,
        names(&["B", "C"]),
        "ne keeps empty sources"
    );
    assert_eq!(l.matching(f("lead_status", "in", json!(["Contacted", "New"]))).await, names(&["B", "C"]));
    assert_eq!(l.matching(f("lead_status", "not_in", json!(["Qualified"]))).await, names(&["B", "C"]));
    assert_eq!(l.matching(f("tags", "contains", json!("expo-2026"))).await, names(&["A", "B"]));
    assert_eq!(l.matching(f("annual_revenue", "gt", json!(100))).await, names(&["A"]));
    assert_eq!(l.matching(f("annual_revenue", "lt", json!(1000.5))).await, names(&["B"]));
    assert_eq!(l.matching(f("annual_revenue", "between", json!([50, 1000.5]))).await, names(&["A", "B"]));
    assert_eq!(l.matching(json!({"field": "lead_source", "op": "is_null"})).await, names(&["C"]));
    assert_eq!(l.matching(f("lead_source", "is_null", json!(false))).await, names(&["A", "B", "D"]));
    assert_eq!(l.matching(f("email_opt_out", "eq", json!(true))).await, names(&["D"]));
    assert_eq!(l.matching(f("company", "contains", json!("100%"))).await, names(&["C"]), "% matches literally");
    assert_eq!(l.matching(f("city", "contains", json!("KRAK"))).await, names(&["A"]), "contains ignores case");
}

#[tokio::test]
async fn dates_cover_whole_days() {
    let l = leads().await;
    let f = |op: &str, value: Value| json!({"field": "created_at", "op": op, "value": value});
    assert_eq!(
        l.matching(f("between", json!(["2026-01-01", "2026-06-30"]))).await,
        names(&["A", "B"]),
        "the last day is included"
    );
    assert_eq!(l.matching(f("eq", json!("2026-06-30"))).await, names(&["B"]));
    assert_eq!(l.matching(f("gt", json!("2026-06-30"))).await, names(&["C"]));
    assert_eq!(l.matching(f("lt", json!("2026-01-01"))).await, names(&["D"]));
    assert_eq!(l.matching(f("gt", json!("2026-06-30T22:00:00Z"))).await, names(&["B", "C"]));
}

#[tokio::test]
async fn groups_custom_fields_ids_and_all_leads() {
    let l = leads().await;
    let spec_example = json!({"all": [
        {"field": "lead_status", "op": "in", "value": ["Qualified", "Contacted"]},
        {"any": [{"field": "lead_source", "op": "eq", "value": "Webinar"},
                 {"field": "tags", "op": "contains", "value": "expo-2026"}]},
        {"field": "created_at", "op": "between", "value": ["2026-01-01", "2026-06-30"]},
        {"field": "custom.region", "op": "eq", "value": "EMEA"}]});
    assert_eq!(l.matching(spec_example).await, names(&["A"]));
    assert_eq!(
        l.matching(json!({"any": [{"field": "custom.region", "op": "eq", "value": "APAC"}, {"field": "lead_status", "op": "eq", "value": "New"}]})).await,
        names(&["B", "C"])
    );
    // A malformed custom value makes its lead not match; it does not break the job.
    assert_eq!(l.matching(json!({"field": "custom.score", "op": "gt", "value": 50})).await, names(&["A"]));
    assert_eq!(l.matching(json!({"ids": [l.ids[1], l.ids[4], l.ids[1], 999_999]})).await, names(&["B"]));
    assert_eq!(l.matching(json!({"all_leads": true})).await, names(&["A", "B", "C", "D"]));
}

#[tokio::test]
async fn values_are_bound_never_spliced() {
    let l = leads().await;
    let hostile = "x'; DROP TABLE leads; --";
    assert!(l.matching(json!({"field": "lead_source", "op": "eq", "value": hostile})).await.is_empty());
    assert!(l.matching(json!({"field": "city", "op": "contains", "value": "' OR 1=1 --"})).await.is_empty());
    assert_eq!(l.crm.count("SELECT count(*) FROM leads").await, 5, "leads table intact");
    // Custom field names are checked against the definitions, so none can smuggle SQL either.
    let r = l.refused(json!({"field": "custom.region') OR (1=1", "op": "eq", "value": "x"})).await;
    assert_eq!(r.field, "criteria.field");
}

#[tokio::test]
async fn bad_criteria_are_refused_naming_the_problem() {
    let l = leads().await;
    let cases = [
        (json!({}), "criteria", "all_leads"),
        (json!({"all_leads": false}), "criteria.all_leads", "true"),
        (
            json!({"all": [{"field": "colour", "op": "eq", "value": "red"}]}),
            "criteria.all[0].field",
            "not a lead field",
        ),
        (json!({"any": [{"field": "city", "op": "like", "value": "K%"}]}), "criteria.any[0].op", "not an operator"),
        (json!({"field": "annual_revenue", "op": "gt", "value": "a lot"}), "criteria.value", "not a number"),
        (json!({"field": "created_at", "op": "gt", "value": "2026-02-31"}), "criteria.value", "date"),
        (json!({"field": "tags", "op": "eq", "value": "vip"}), "criteria.op", "does not apply"),
        (json!({"field": "custom.nothing", "op": "eq", "value": "x"}), "criteria.field", "no lead custom field"),
        (json!({"ids": ["1"]}), "criteria.ids[0]", "lead id"),
        (json!({"field": "lead_status", "op": "in", "value": "Qualified"}), "criteria.value", "array"),
        (json!([1, 2]), "criteria", "object"),
    ];
    for (criteria, field, words) in cases {
        let r = l.refused(criteria.clone()).await;
        assert_eq!(r.code, leadconv::ErrorCode::InvalidCriteria, "{criteria}");
        assert_eq!(r.field, field, "{criteria}: {}", r.message);
        assert!(r.message.contains(words), "{criteria}: {:?} should mention {words:?}", r.message);
    }
}

// Issue 12: an `in` list is one array parameter, not one parameter per
// value: 70,000 values (over Postgres' 65,535 parameters a statement) run,
// as do `not_in` and a numeric list mixing integers and decimals.
#[tokio::test]
async fn in_lists_longer_than_the_parameter_limit_run() {
    let l = leads().await;
    let mut sources: Vec<Value> = (0..70_000).map(|i| json!(format!("Source {i}"))).collect();
    sources.push(json!("Referral"));
    assert_eq!(l.matching(json!({"field": "lead_source", "op": "in", "value": sources})).await, names(&["B"]));
    let mut statuses: Vec<Value> = (0..70_000).map(|i| json!(format!("Status {i}"))).collect();
    statuses.push(json!("Qualified"));
    assert_eq!(
        l.matching(json!({"field": "lead_status", "op": "not_in", "value": statuses})).await,
        names(&["B", "C"])
    );
    assert_eq!(
        l.matching(json!({"field": "annual_revenue", "op": "in", "value": [50, 1000.5, 7]})).await,
        names(&["A", "B"])
    );
}
