//! Conversion schedules: a cron expression (5 fields, UTC), criteria,
//! options and an acting user, stored in Postgres. [`run_scheduler`], run
//! by every `serve`, creates one `schedule` job per due tick.
//!
//! Exactly once across replicas: a replica locks one due schedule with
//! `FOR UPDATE SKIP LOCKED`, creates its job and moves `next_run_at` to the
//! next tick in the same transaction; another replica skips the locked row
//! and, after the commit, no longer finds it due.
//!
//! Missed ticks (no `serve` running, or a run that took longer than the
//! interval) collapse into one run: a due schedule runs once and its next
//! run is the first tick after now, not the ticks it missed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::automation::{check_new, duplicate_name, not_found, Automation};
use crate::error::{ErrorCode, Refusal};
use crate::queue::enqueue::Enqueuer;
use crate::store::job::{self, Dispatch, NewJob, Trigger};
use crate::store::types::Overlap;

/// How often each replica looks for due schedules.
pub const TICK: Duration = Duration::from_secs(1);

/// A `conversion_schedules` row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Schedule {
    pub id: i64,
    pub name: String,
    pub cron: String,
    pub criteria: sqlx::types::Json<Value>,
    pub options: sqlx::types::Json<Value>,
    pub acting_user: i64,
    pub enabled: bool,
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub overlap: Overlap,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A schedule as requested.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub name: String,
    pub cron: String,
    pub criteria: Value,
    pub options: Value,
    pub acting_user: i64,
    pub enabled: bool,
    pub overlap: Overlap,
}

impl Automation for Schedule {
    fn acting_user(&self) -> i64 {
        self.acting_user
    }

    fn id(&self) -> i64 {
        self.id
    }

    const WHAT: &'static str = "schedule";
    const PLURAL: &'static str = "schedules";
    const TABLE: &'static str = "conversion_schedules";
    const COLUMNS: &'static str =
        "id, name, cron, criteria, options, acting_user, enabled, next_run_at, last_run_at, last_job_id, overlap, created_at, updated_at";
    const NOT_FOUND: ErrorCode = ErrorCode::ScheduleNotFound;
    const TRIGGER: Trigger = Trigger::Schedule;

    /// Enables or disables a schedule. Enabling moves the next run to the first
    /// tick after now, so ticks missed while disabled do not fire.
    async fn set_enabled(pool: &PgPool, id: i64, enabled: bool) -> Result<Schedule, crate::Error> {
        let mut tx = pool.begin().await?;
        let current: Schedule =
            sqlx::query_as(&format!("SELECT {} FROM conversion_schedules WHERE id = $1 FOR UPDATE", Schedule::COLUMNS))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| not_found::<Schedule>(id))?;
        let next = if enabled && !current.enabled {
            match parse_cron(&current.cron).ok().and_then(|c| next_after(&c, Utc::now()).ok()) {
                Some(n) => n,
                None => {
                    return Err(Refusal::new(
                        ErrorCode::InvalidCron,
                        "cron",
                        format!("{:?} no longer fires", current.cron),
                    )
                    .into())
                }
            }
        } else {
            current.next_run_at
        };
        let s = sqlx::query_as(&format!(
            "UPDATE conversion_schedules SET enabled = $2, next_run_at = $3, updated_at = now() WHERE id = $1 RETURNING {}", Schedule::COLUMNS
        ))
        .bind(id)
        .bind(enabled)
        .bind(next)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(s)
    }
}

/// Parses a standard 5-field cron expression (minute hour day-of-month
/// month day-of-week; `@daily` and the like too), evaluated in UTC.
pub fn parse_cron(expr: &str) -> Result<Cron, Refusal> {
    let refuse = |m: String| Refusal::new(ErrorCode::InvalidCron, "cron", m);
    if expr.split_whitespace().count() != 5 && !expr.trim_start().starts_with('@') {
        return Err(refuse(format!("{expr:?} is not a 5-field cron expression (minute hour day month weekday)")));
    }
    let cron = Cron::new(expr.trim()).parse().map_err(|e| refuse(format!("{expr:?}: {e}")))?;
    // An expression that parses but never fires (30 February) is refused too.
    next_after(&cron, Utc::now()).map_err(|e| refuse(format!("{expr:?} never fires: {e}")))?;
    Ok(cron)
}

/// The first tick strictly after `t`.
pub fn next_after(cron: &Cron, t: DateTime<Utc>) -> Result<DateTime<Utc>, croner::errors::CronError> {
    cron.find_next_occurrence(&t, false)
}

/// Creates a schedule after checking its cron expression, criteria,
/// options and acting user (the same refusals as a job); nothing is
/// written when refused. Its first run is the first tick after now.
pub async fn create(pool: &PgPool, new: NewSchedule) -> Result<Schedule, crate::Error> {
    let cron = parse_cron(&new.cron)?;
    check_new::<Schedule>(pool, &new.name, &new.criteria, &new.options, new.acting_user).await?;
    let next =
        next_after(&cron, Utc::now()).map_err(|e| Refusal::new(ErrorCode::InvalidCron, "cron", e.to_string()))?;
    sqlx::query_as(&format!(
        "INSERT INTO conversion_schedules (name, cron, criteria, options, acting_user, enabled, next_run_at, overlap)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {}",
        Schedule::COLUMNS
    ))
    .bind(&new.name)
    .bind(new.cron.trim())
    .bind(&new.criteria)
    .bind(&new.options)
    .bind(new.acting_user)
    .bind(new.enabled)
    .bind(next)
    .bind(new.overlap)
    .fetch_one(pool)
    .await
    .map_err(|e| duplicate_name::<Schedule>(e, &new.name))
}

/// Creates the jobs of due schedules every [`TICK`] until `stop` is
/// cancelled. Errors are logged and retried with back-off; the loop ends
/// only on `stop`.
pub async fn run_scheduler(enqueuer: Arc<Enqueuer>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    let mut rounds: u64 = 0;
    while !stop.is_cancelled() {
        let wait = loop {
            match run_due(&enqueuer).await {
                Ok(Some(_)) if !stop.is_cancelled() => continue,
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    break TICK;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "scheduler failed; retrying");
                    let b = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    break b;
                }
            }
        };
        rounds += 1;
        tracing::debug!(rounds, "scheduler round");
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    Ok(())
}

/// Runs one due schedule, if any: in one transaction, locks it (skipping
/// schedules another replica holds), creates its `schedule` job, moves its
/// next run to the first tick after now; then publishes the job. Returns
/// the schedule's id, `None` when nothing is due.
pub async fn run_due(enqueuer: &Enqueuer) -> Result<Option<i64>, crate::Error> {
    let pool = &enqueuer.pool;
    let mut tx = pool.begin().await?;
    let due: Option<Schedule> = sqlx::query_as(&format!(
        "SELECT {} FROM conversion_schedules WHERE enabled AND next_run_at <= now()
         ORDER BY next_run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
        Schedule::COLUMNS
    ))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(s) = due else {
        tx.commit().await?;
        return Ok(None);
    };
    let now = sqlx::query_scalar!(r#"SELECT now() AS "now!""#).fetch_one(&mut *tx).await?;
    let next = match parse_cron(&s.cron).ok().and_then(|c| next_after(&c, now).ok()) {
        Some(n) => n,
        None => {
            // Cannot happen for a schedule created through `create`; a row
            // written by hand with a bad expression is disabled, not retried
            // every second.
            tracing::error!(schedule_id = s.id, cron = %s.cron, "invalid cron expression; schedule disabled");
            sqlx::query!("UPDATE conversion_schedules SET enabled = false, updated_at = now() WHERE id = $1", s.id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Some(s.id));
        }
    };
    let new = NewJob {
        criteria: s.criteria.0.clone(),
        options: s.options.0.clone(),
        requested_by: s.acting_user,
        trigger: Trigger::Schedule,
    };
    // The previous run still going: with `skip`, this tick only moves the
    // schedule on (no second job over the same leads).
    let running = s.overlap == Overlap::Skip
        && sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM conversion_jobs
                              WHERE schedule_id = $1 AND status IN ('scheduled', 'in_progress')) AS "running!""#,
            s.id
        )
        .fetch_one(&mut *tx)
        .await?;
    let job_id = match job::check(pool, new).await {
        _ if running => {
            tracing::info!(schedule_id = s.id, schedule = %s.name, "the previous run is still in progress; tick skipped");
            None
        }
        Ok(checked) => {
            let id = job::create_in(&mut tx, &checked, Dispatch::Queue { lease: enqueuer.lease }).await?.id;
            // A tick matching no lead leaves no job, only its run time.
            let total = job::link_origin(&mut tx, id, job::Origin::Schedule(s.id)).await?;
            if total == 0 {
                job::delete_empty(&mut tx, id).await?;
                tracing::info!(schedule_id = s.id, schedule = %s.name, "no lead matches; no job for this tick");
                None
            } else {
                Some(id)
            }
        }
        Err(crate::Error::Refused(r)) => {
            // The acting user or a custom field changed since the schedule
            // was saved: this tick is skipped (logged), the next one tried.
            tracing::warn!(schedule_id = s.id, schedule = %s.name, refusal = %r, "schedule no longer valid; tick skipped");
            None
        }
        Err(e) => return Err(e),
    };
    sqlx::query!(
        "UPDATE conversion_schedules SET next_run_at = $2, last_run_at = $3,
                last_job_id = coalesce($4, last_job_id), updated_at = now()
         WHERE id = $1",
        s.id,
        next,
        now,
        job_id
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if let Some(id) = job_id {
        tracing::info!(schedule_id = s.id, schedule = %s.name, job_id = %id, next_run_at = %next, "schedule ran");
        if let Some(j) = job::get(pool, id).await? {
            enqueuer.publish(&j).await;
        }
    }
    Ok(Some(s.id))
}
