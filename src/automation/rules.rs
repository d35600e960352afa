//! Conversion rules: workflow triggers without an external engine.
//!
//! A rule is criteria, options and an acting user, stored in Postgres. A
//! trigger on `leads` writes every change of an unconverted lead into the
//! `lead_changes` outbox (in the writer's transaction, whoever the writer
//! is) and notifies `leadconv_lead_changes`. [`run_relay`], run by every
//! `serve`, claims outbox rows, creates a one-lead `workflow` job for each
//! changed lead matching an enabled rule, and deletes the rows in the same
//! transaction: a change committed while no `serve` runs is converted once
//! one starts, and a relay that dies mid-way loses nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::automation::{check_new, duplicate_name, not_found, Automation};
use crate::error::ErrorCode;
use crate::queue::enqueue::Enqueuer;
use crate::store::criteria::Criteria;
use crate::store::job::{self, Checked, Dispatch, NewJob, Trigger};

/// The channel the `leads` trigger notifies.
pub const CHANNEL: &str = "leadconv_lead_changes";

/// Outbox rows claimed per transaction.
const BATCH: i64 = 200;

/// A `conversion_rules` row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Rule {
    pub id: i64,
    pub name: String,
    pub criteria: sqlx::types::Json<Value>,
    pub options: sqlx::types::Json<Value>,
    pub acting_user: i64,
    pub enabled: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A rule as requested.
#[derive(Debug, Clone)]
pub struct NewRule {
    pub name: String,
    pub criteria: Value,
    pub options: Value,
    pub acting_user: i64,
    pub enabled: bool,
}

impl Automation for Rule {
    fn acting_user(&self) -> i64 {
        self.acting_user
    }

    fn id(&self) -> i64 {
        self.id
    }

    const WHAT: &'static str = "rule";
    const PLURAL: &'static str = "rules";
    const TABLE: &'static str = "conversion_rules";
    const COLUMNS: &'static str = "id, name, criteria, options, acting_user, enabled, created_at, updated_at";
    const NOT_FOUND: ErrorCode = ErrorCode::RuleNotFound;
    const TRIGGER: Trigger = Trigger::Workflow;

    /// Enables or disables a rule. A rule acts on lead changes made while it
    /// is enabled.
    async fn set_enabled(pool: &PgPool, id: i64, enabled: bool) -> Result<Rule, crate::Error> {
        sqlx::query_as(&format!(
            "UPDATE conversion_rules SET enabled = $2, updated_at = now() WHERE id = $1 RETURNING {}",
            Rule::COLUMNS
        ))
        .bind(id)
        .bind(enabled)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| not_found::<Rule>(id))
    }
}

/// Creates a rule after checking its criteria, options and acting user
/// exactly as a job's (same refusals); nothing is written when refused.
pub async fn create(pool: &PgPool, new: NewRule) -> Result<Rule, crate::Error> {
    check_new::<Rule>(pool, &new.name, &new.criteria, &new.options, new.acting_user).await?;
    sqlx::query_as(&format!(
        "INSERT INTO conversion_rules (name, criteria, options, acting_user, enabled) VALUES ($1, $2, $3, $4, $5) RETURNING {}",
        Rule::COLUMNS
    ))
    .bind(&new.name)
    .bind(&new.criteria)
    .bind(&new.options)
    .bind(new.acting_user)
    .bind(new.enabled)
    .fetch_one(pool)
    .await
    .map_err(|e| duplicate_name::<Rule>(e, &new.name))
}

/// The criteria of the one-lead job a rule creates for `lead_id`, a lead
/// the rule's criteria matched. A filter is narrowed to the lead (and so
/// checked again when the job's snapshot is taken); `all_leads` and `ids`,
/// which cannot be nested in a filter, become the lead's id alone.
pub fn lead_criteria(rule_criteria: &Value, lead_id: i64) -> Value {
    let whole_set = rule_criteria.as_object().is_some_and(|o| o.contains_key("all_leads") || o.contains_key("ids"));
    if whole_set {
        json!({"ids": [lead_id]})
    } else {
        json!({"all": [rule_criteria, {"field": "id", "op": "eq", "value": lead_id}]})
    }
}

/// Relays lead changes into `workflow` jobs until `stop` is cancelled.
/// Woken by the trigger's notification, and polling every second as well
/// (a notification sent while the listener reconnects is lost). Errors are
/// logged and retried with back-off; the loop ends only on `stop`.
pub async fn run_relay(enqueuer: Arc<Enqueuer>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match relay_session(&enqueuer, &stop).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "rule relay failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    Ok(())
}

/// One listening connection: drains the outbox, then waits for a
/// notification or the poll interval. Returns `Ok` only on `stop`.
async fn relay_session(enqueuer: &Enqueuer, stop: &CancellationToken) -> anyhow::Result<()> {
    let mut listener = PgListener::connect_with(&enqueuer.pool).await?;
    listener.listen(CHANNEL).await?;
    tracing::info!("rule relay listening");
    loop {
        // Drain: changes committed before LISTEN, or while polling.
        while relay_batch(enqueuer).await? == BATCH as usize {
            if stop.is_cancelled() {
                return Ok(());
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            n = tokio::time::timeout(Duration::from_secs(1), listener.recv()) => {
                if let Ok(n) = n {
                    n?;
                }
            }
        }
    }
}

/// Claims up to [`BATCH`] outbox rows, creates the jobs they call for and
/// deletes them, in one transaction; then publishes the jobs. Returns how
/// many rows were claimed.
pub async fn relay_batch(enqueuer: &Enqueuer) -> Result<usize, crate::Error> {
    let pool = &enqueuer.pool;
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, i64)> =
        sqlx::query!("SELECT id, lead_id FROM lead_changes ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED", BATCH)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|r| (r.id, r.lead_id))
            .collect();
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut leads: Vec<i64> = rows.iter().map(|r| r.1).collect();
    leads.sort_unstable();
    leads.dedup();
    let rules: Vec<Rule> =
        sqlx::query_as(&format!("SELECT {} FROM conversion_rules WHERE enabled ORDER BY id", Rule::COLUMNS))
            .fetch_all(&mut *tx)
            .await?;
    // Each enabled rule is checked once per batch (the acting user or a
    // custom field may have changed since it was saved: such a rule is
    // skipped, logged), and the batch's leads it matches found in one query.
    let mut valid: Vec<(&Rule, Checked, HashSet<i64>)> = Vec::new();
    for rule in &rules {
        let new = NewJob {
            criteria: rule.criteria.0.clone(),
            options: rule.options.0.clone(),
            requested_by: rule.acting_user,
            trigger: Trigger::Workflow,
        };
        let checked = match job::check(pool, new).await {
            Ok(c) => c,
            Err(crate::Error::Refused(r)) => {
                tracing::warn!(rule_id = rule.id, rule = %rule.name, refusal = %r, "rule no longer valid; skipped");
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut qb = sqlx::QueryBuilder::new("SELECT l.id FROM leads l WHERE l.converted_at IS NULL AND l.id = ANY(");
        qb.push_bind(leads.clone()).push(") AND ");
        crate::store::criteria::push_sql(&checked.criteria, &mut qb);
        let matching: Vec<i64> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
        if !matching.is_empty() {
            valid.push((rule, checked, matching.into_iter().collect()));
        }
    }
    let mut created: Vec<Uuid> = Vec::new();
    for &lead in &leads {
        // The first enabled rule, by id, matching the lead.
        let Some((rule, checked, _)) = valid.iter().find(|(_, _, m)| m.contains(&lead)) else { continue };
        // Changes of one lead claimed by two relays at once (two rows) are
        // serialised here, so the second sees the first's job. In lead
        // order: two relays cannot deadlock on these.
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtext('leadconv_rule_lead'), ($1::bigint % 2147483647)::int)",
            lead
        )
        .execute(&mut *tx)
        .await?;
        let pending = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM conversion_results r JOIN conversion_jobs j ON j.id = r.job_id
                            WHERE r.lead_id = $1 AND r.outcome = 'pending' AND j.trigger = 'workflow'
                              AND j.status IN ('scheduled', 'in_progress')) AS "pending!""#,
            lead
        )
        .fetch_one(&mut *tx)
        .await?;
        if pending {
            continue;
        }
        let criteria = lead_criteria(&rule.criteria, lead);
        // Cannot fail for a rule that passed its check, short of a rule at
        // the nesting limit: such a lead is logged, not retried forever.
        let parsed = match Criteria::parse(&criteria, &checked.settings.fields.defs) {
            Ok(p) => p,
            Err(r) => {
                tracing::warn!(rule_id = rule.id, lead_id = lead, refusal = %r, "rule criteria cannot be narrowed to the lead; skipped");
                continue;
            }
        };
        let one = Checked {
            new: NewJob {
                criteria,
                options: rule.options.0.clone(),
                requested_by: rule.acting_user,
                trigger: Trigger::Workflow,
            },
            criteria: parsed,
            settings: checked.settings.clone(),
        };
        let id = job::create_in(&mut tx, &one, Dispatch::Queue { lease: enqueuer.lease }).await?.id;
        job::link_origin(&mut tx, id, job::Origin::Rule(rule.id)).await?;
        tracing::info!(rule_id = rule.id, rule = %rule.name, lead_id = lead, job_id = %id, "rule matched");
        created.push(id);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    sqlx::query!("DELETE FROM lead_changes WHERE id = ANY($1)", &ids).execute(&mut *tx).await?;
    tx.commit().await?;
    for id in created {
        if let Some(j) = job::get(pool, id).await? {
            enqueuer.publish(&j).await;
        }
    }
    Ok(rows.len())
}
