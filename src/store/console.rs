//! What the console's pages read beyond the API's: per-lead results with
//! the lead's name, e-mail and company, failures grouped by code, and the
//! names behind ids (users, rules, schedules).

use std::collections::HashMap;

use futures::stream::BoxStream;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::types::Outcome;

/// One lead's result as the job page shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ResultRow {
    pub lead_id: i64,
    /// NULL when the lead was deleted since.
    pub lead_name: Option<String>,
    pub email: Option<String>,
    pub company: Option<String>,
    pub outcome: Outcome,
    pub contact_action: Option<String>,
    pub contact_id: Option<i64>,
    pub account_action: Option<String>,
    pub account_id: Option<i64>,
    pub deal_action: Option<String>,
    pub deal_id: Option<i64>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// The CSV export's header: [`ResultRow`]'s fields, in order.
pub const RESULT_CSV_COLUMNS: [&str; 13] = [
    "lead_id",
    "lead_name",
    "email",
    "company",
    "outcome",
    "contact_action",
    "contact_id",
    "account_action",
    "account_id",
    "deal_action",
    "deal_id",
    "error_code",
    "error_message",
];

/// Which results a page shows.
#[derive(Debug, Clone, Default)]
pub struct ResultFilter {
    pub outcome: Option<Outcome>,
    pub code: Option<String>,
}

const RESULTS: &str = "SELECT r.lead_id, nullif(concat_ws(' ', l.first_name, l.last_name), '') AS lead_name,
            l.email, l.company, r.outcome, r.contact_action, r.contact_id, r.account_action, r.account_id,
            r.deal_action, r.deal_id, r.error_code, r.error_message
     FROM conversion_results r LEFT JOIN leads l ON l.id = r.lead_id
     WHERE r.job_id = $1 AND ($2::text IS NULL OR r.outcome = $2) AND ($3::text IS NULL OR r.error_code = $3)
       AND r.lead_id > $4
     ORDER BY r.lead_id LIMIT $5";

/// The results of `job_id` matching `filter` after lead `after`, in lead
/// order, at most `limit` (keyset pages; `None`: all, streamed, for the CSV
/// export).
pub fn results<'a>(
    pool: &'a PgPool,
    job_id: Uuid,
    filter: &'a ResultFilter,
    after: i64,
    limit: Option<i64>,
) -> BoxStream<'a, sqlx::Result<ResultRow>> {
    sqlx::query_as(RESULTS)
        .bind(job_id)
        .bind(filter.outcome)
        .bind(filter.code.as_deref())
        .bind(after)
        .bind(limit)
        .fetch(pool)
}

/// The job's failed leads by error code, most frequent first.
pub async fn failures_by_code(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT coalesce(error_code, '') AS "code!", count(*) AS "n!" FROM conversion_results
           WHERE job_id = $1 AND outcome = 'failed' GROUP BY error_code ORDER BY count(*) DESC, error_code"#,
        job_id
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.code, r.n)).collect())
}

/// The names of the users, rules and schedules that jobs name.
#[derive(Debug, Default)]
pub struct Names {
    pub users: HashMap<i64, String>,
    pub rules: HashMap<i64, String>,
    pub schedules: HashMap<i64, String>,
}

pub async fn names(pool: &PgPool, users: &[i64], rules: &[i64], schedules: &[i64]) -> sqlx::Result<Names> {
    let users = sqlx::query!("SELECT id, name FROM users WHERE id = ANY($1)", users).fetch_all(pool).await?;
    let rules = sqlx::query!("SELECT id, name FROM conversion_rules WHERE id = ANY($1)", rules).fetch_all(pool).await?;
    let schedules =
        sqlx::query!("SELECT id, name FROM conversion_schedules WHERE id = ANY($1)", schedules).fetch_all(pool).await?;
    Ok(Names {
        users: users.into_iter().map(|r| (r.id, r.name)).collect(),
        rules: rules.into_iter().map(|r| (r.id, r.name)).collect(),
        schedules: schedules.into_iter().map(|r| (r.id, r.name)).collect(),
    })
}
