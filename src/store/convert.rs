//! Converting one lead of a job, in one Postgres transaction (SPEC §3).
//!
//! Follow a lead here: lock its pending result row, gather the facts under
//! locks (`snapshot`), decide (`plan`), write (`apply`), record the result
//! and the job's counts, commit. Either all of it happens or none of it.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{self, Error, ErrorCode};
use crate::plan::{self, Action, Plan, Verdict};
use crate::run::Run;
use crate::store::apply::{apply, Converted};
use crate::store::criteria::Criteria;
use crate::store::options::Settings;
use crate::store::snapshot::{self, Locking};
use crate::store::types::{AccountAction, ContactAction, DealAction, JobStatus, Outcome};

/// A `conversion_results` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LeadResult {
    pub job_id: Uuid,
    pub lead_id: i64,
    pub outcome: Outcome,
    pub contact_action: Option<ContactAction>,
    pub account_action: Option<AccountAction>,
    pub deal_action: Option<DealAction>,
    pub contact_id: Option<i64>,
    pub account_id: Option<i64>,
    pub deal_id: Option<i64>,
    pub is_repeat: Option<bool>,
    /// The lead's e-mail opt-out switched the merged contact's on.
    pub email_opt_out_applied: Option<bool>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub duration_ms: Option<i32>,
    pub enqueued_at: Option<chrono::DateTime<Utc>>,
    pub finished_at: Option<chrono::DateTime<Utc>>,
}

pub const RESULT_COLUMNS: &str = "job_id, lead_id, outcome, contact_action, account_action, deal_action, contact_id, \
     account_id, deal_id, is_repeat, email_opt_out_applied, error_code, error_message, attempts, duration_ms, enqueued_at, finished_at";

/// Deadlocks and serialization failures are resolved by trying again at
/// once; this many tries, then the error goes to the caller as transient.
const LOCAL_TRIES: u32 = 5;

/// Why converting one lead of a job produced no result: what the worker
/// decides on (retry, drop, fail the lead), one case each.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The lead is not part of the job: a stray message, nothing to record.
    #[error("lead {lead_id} is not part of job {job_id}")]
    NotInJob { job_id: Uuid, lead_id: i64 },
    /// Worth retrying later: lost connection, deadlock, serialization
    /// failure, a lock or statement timeout.
    #[error("transient database error: {0}")]
    Transient(#[source] sqlx::Error),
    /// Will recur: the lead fails with `internal_error`.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for ConvertError {
    fn from(e: sqlx::Error) -> Self {
        if error::is_transient(&e) {
            ConvertError::Transient(e)
        } else {
            ConvertError::Database(e)
        }
    }
}

/// Converts `lead_id` as part of job `job_id`. Safe to call again for the
/// same lead (a redelivered message): a lead whose result is recorded is not
/// touched, and its recorded result is returned.
pub async fn convert_lead(
    pool: &PgPool,
    job_id: Uuid,
    settings: &Settings,
    lead_id: i64,
) -> Result<LeadResult, ConvertError> {
    convert_enqueued(pool, job_id, settings, lead_id, None, 0).await
}

/// [`convert_lead`] for a lead that waited in a queue since `enqueued_at`,
/// which is recorded with its result (the enqueue→commit latency).
/// `earlier_attempts` counts the deliveries of this lead's message that
/// reached a conversion before and left nothing (a transient failure sent it
/// through a retry queue, or its worker died): they roll back, so only the
/// message knows them, and `attempts` adds them.
pub async fn convert_enqueued(
    pool: &PgPool,
    job_id: Uuid,
    settings: &Settings,
    lead_id: i64,
    enqueued_at: Option<DateTime<Utc>>,
    earlier_attempts: u32,
) -> Result<LeadResult, ConvertError> {
    let span = tracing::info_span!("convert", %job_id, lead_id);
    async move {
        let mut tries = 0;
        loop {
            tries += 1;
            match try_convert(pool, job_id, settings, lead_id, earlier_attempts + tries, enqueued_at).await {
                Ok(r) => {
                    tracing::debug!(outcome = %r.outcome, "lead done");
                    return Ok(r);
                }
                Err(ConvertError::Transient(e)) if tries < LOCAL_TRIES && is_lock_conflict(&e) => {
                    tracing::debug!(error = %e, tries, "lock conflict, trying again");
                    tokio::time::sleep(Duration::from_millis(5 << tries)).await;
                }
                Err(ConvertError::Database(e)) if error::is_constraint_violation(&e) => {
                    // The transaction rolled back: nothing of the lead was
                    // written. Record why, in a transaction of its own.
                    tracing::warn!(error = %e, "lead failed on a database constraint");
                    return record(
                        pool,
                        job_id,
                        lead_id,
                        &Finish::failed(ErrorCode::ConstraintViolation, e.to_string()),
                        earlier_attempts + tries,
                    )
                    .await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    .instrument(span)
    .await
}

/// Records that `lead_id` failed for good with `code`, unless its result is
/// recorded already. For failures found outside a conversion (a job whose
/// settings stopped validating, retries used up).
pub async fn record_failure(
    pool: &PgPool,
    job_id: Uuid,
    lead_id: i64,
    code: ErrorCode,
    message: &str,
    attempts: u32,
) -> Result<(), ConvertError> {
    record(pool, job_id, lead_id, &Finish::failed(code, message.to_owned()), attempts).await.map(|_| ())
}

async fn record(pool: &PgPool, job_id: Uuid, lead_id: i64, f: &Finish, tries: u32) -> Result<LeadResult, ConvertError> {
    let mut tx = pool.begin().await?;
    let Some(status) = lock_result(&mut tx, job_id, lead_id).await? else {
        return Err(ConvertError::NotInJob { job_id, lead_id });
    };
    let (r, fresh) = match status {
        Pending::Yes { workflow, .. } => {
            (finish(&mut tx, job_id, lead_id, f, tries, None, None, workflow).await?, true)
        }
        Pending::No(r) => (*r, false),
    };
    tx.commit().await?;
    if fresh {
        crate::metrics::record_result(&r, std::time::Duration::ZERO);
    }
    Ok(r)
}

fn is_lock_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

enum Pending {
    /// Still to do; `cancelled`: the job was cancelled meanwhile;
    /// `workflow`: a convert-now request waits on the commit.
    Yes {
        cancelled: bool,
        workflow: bool,
    },
    No(Box<LeadResult>),
}

#[derive(sqlx::FromRow)]
struct Locked {
    #[sqlx(flatten)]
    result: LeadResult,
    job_status: JobStatus,
    workflow: bool,
}

/// Locks the lead's result row, the job's gate for this lead: whoever holds
/// it is the only one converting this lead for this job.
async fn lock_result(conn: &mut PgConnection, job_id: Uuid, lead_id: i64) -> sqlx::Result<Option<Pending>> {
    // The job's status and trigger ride along: one round trip, not two.
    let row: Option<Locked> = sqlx::query_as(&format!(
        "SELECT {RESULT_COLUMNS},
                (SELECT status FROM conversion_jobs WHERE id = $1) AS job_status,
                (SELECT trigger = 'workflow' FROM conversion_jobs WHERE id = $1) AS workflow
         FROM conversion_results WHERE job_id = $1 AND lead_id = $2 FOR UPDATE"
    ))
    .bind(job_id)
    .bind(lead_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|l| match l.result.outcome {
        Outcome::Pending => Pending::Yes { cancelled: l.job_status == JobStatus::Cancelled, workflow: l.workflow },
        _ => Pending::No(Box::new(l.result)),
    }))
}

async fn try_convert(
    pool: &PgPool,
    job_id: Uuid,
    settings: &Settings,
    lead_id: i64,
    tries: u32,
    enqueued_at: Option<DateTime<Utc>>,
) -> Result<LeadResult, ConvertError> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let Some(status) = lock_result(&mut tx, job_id, lead_id).await? else {
        return Err(ConvertError::NotInJob { job_id, lead_id });
    };
    let (cancelled, workflow) = match status {
        Pending::No(done) => return Ok(*done),
        Pending::Yes { cancelled, workflow } => (cancelled, workflow),
    };
    let finish_with = if cancelled {
        Finish::skipped(ErrorCode::Cancelled, format!("job {job_id} was cancelled"))
    } else {
        let facts = snapshot::load(&mut tx, settings, lead_id, Locking::ForUpdate).await?;
        let plan = plan::decide(&facts, settings, Utc::now().date_naive());
        match &plan.verdict {
            Verdict::Convert(c) => {
                let ids = apply(&mut tx, lead_id, c).await?;
                Finish::converted(&plan, ids)
            }
            Verdict::Skipped { code, message } => Finish::skipped(*code, message.clone()),
            Verdict::Failed { code, message } => Finish::failed(*code, message.clone()),
        }
    };
    let result = finish(&mut tx, job_id, lead_id, &finish_with, tries, Some(started), enqueued_at, workflow).await?;
    tx.commit().await?;
    crate::metrics::record_result(&result, started.elapsed());
    Ok(result)
}

/// What goes into the result row.
struct Finish {
    outcome: Outcome,
    contact_action: Option<ContactAction>,
    account_action: Option<AccountAction>,
    deal_action: Option<DealAction>,
    ids: Converted,
    is_repeat: Option<bool>,
    email_opt_out_applied: Option<bool>,
    error: Option<(ErrorCode, String)>,
    merged: bool,
}

impl Finish {
    fn converted(plan: &Plan, ids: Converted) -> Finish {
        let Verdict::Convert(c) = &plan.verdict else { unreachable!("only a conversion has ids") };
        Finish {
            outcome: Outcome::Converted,
            contact_action: Some(match c.contact.action {
                Action::Created => ContactAction::Created,
                Action::Merged | Action::Matched => ContactAction::Merged,
            }),
            account_action: Some(match c.account.as_ref().map(|a| a.action) {
                None => AccountAction::None,
                Some(Action::Created) => AccountAction::Created,
                Some(Action::Matched | Action::Merged) => AccountAction::Matched,
            }),
            deal_action: Some(if c.deal.is_some() { DealAction::Created } else { DealAction::None }),
            ids,
            is_repeat: Some(c.lead_is_repeat),
            email_opt_out_applied: Some(c.contact.email_opt_out_applied),
            error: None,
            merged: c.contact.action == Action::Merged,
        }
    }

    fn without_ids(outcome: Outcome, code: ErrorCode, message: String) -> Finish {
        Finish {
            outcome,
            contact_action: None,
            account_action: None,
            deal_action: None,
            ids: Converted::default(),
            is_repeat: None,
            email_opt_out_applied: None,
            error: Some((code, message)),
            merged: false,
        }
    }

    fn skipped(code: ErrorCode, message: String) -> Finish {
        Finish::without_ids(Outcome::Skipped, code, message)
    }

    fn failed(code: ErrorCode, message: String) -> Finish {
        Finish::without_ids(Outcome::Failed, code, message)
    }
}

/// Records the result and counts it in the job's counter shard of this
/// Postgres backend (migration 0011): a shard row is only ever updated by
/// one transaction at a time, so a conversion never waits for another
/// one's commit, and a stuck one holds up nobody.
/// Writes the result row and counts it in the job's counter shard of this
/// session, in one statement. For a workflow job it also notifies
/// [`finished::CHANNEL`](crate::store::finished::CHANNEL), which Postgres
/// delivers on commit: the waiting convert-now request learns of the
/// result the moment it exists, at no extra round trip.
#[allow(clippy::too_many_arguments)]
async fn finish(
    conn: &mut PgConnection,
    job_id: Uuid,
    lead_id: i64,
    f: &Finish,
    tries: u32,
    started: Option<std::time::Instant>,
    enqueued_at: Option<DateTime<Utc>>,
    workflow: bool,
) -> sqlx::Result<LeadResult> {
    let converted = f.ids.contact_id != 0;
    let duration_ms = started.map(|s| i32::try_from(s.elapsed().as_millis()).unwrap_or(i32::MAX));
    let n = |b: bool| i32::from(b);
    let result: LeadResult = sqlx::query_as(&format!(
        "WITH r AS (
             UPDATE conversion_results SET outcome = $3, contact_action = $4, account_action = $5, deal_action = $6,
                    contact_id = $7, account_id = $8, deal_id = $9, is_repeat = $10, error_code = $11,
                    error_message = $12, attempts = attempts + $13, duration_ms = $14,
                    enqueued_at = coalesce($15, enqueued_at), email_opt_out_applied = $16, finished_at = now()
             WHERE job_id = $1 AND lead_id = $2 AND outcome = 'pending'
             RETURNING {RESULT_COLUMNS}),
         counted AS (
             INSERT INTO conversion_job_counters AS c (job_id, shard, converted, merged, skipped, failed)
             SELECT job_id, pg_backend_pid(), $17, $18, $19, $20 FROM r
             ON CONFLICT (job_id, shard) DO UPDATE SET
                 converted = c.converted + excluded.converted, merged = c.merged + excluded.merged,
                 skipped = c.skipped + excluded.skipped, failed = c.failed + excluded.failed, last_at = now())
         SELECT r.*, CASE WHEN $21 THEN pg_notify($22, r.job_id::text) END AS notified FROM r"
    ))
    .bind(job_id)
    .bind(lead_id)
    .bind(f.outcome)
    .bind(f.contact_action)
    .bind(f.account_action)
    .bind(f.deal_action)
    .bind(converted.then_some(f.ids.contact_id))
    .bind(f.ids.account_id)
    .bind(f.ids.deal_id)
    .bind(f.is_repeat)
    .bind(f.error.as_ref().map(|(c, _)| c.as_str()))
    .bind(f.error.as_ref().map(|(_, m)| m.as_str()))
    .bind(i32::try_from(tries).unwrap_or(i32::MAX))
    .bind(duration_ms)
    .bind(enqueued_at)
    .bind(f.email_opt_out_applied)
    .bind(n(f.outcome == Outcome::Converted))
    .bind(n(f.merged))
    .bind(n(f.outcome == Outcome::Skipped))
    .bind(n(f.outcome == Outcome::Failed))
    .bind(workflow)
    .bind(crate::store::finished::CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(result)
}

/// The plan for each lead matching `criteria`, in lead order, computed from
/// one consistent snapshot of the database and written nowhere: the dry
/// run. Plans are handed to `each` as they are made, so a dry run over a
/// million leads does not hold a million plans.
///
/// Leads are planned as a job converts them one after another: each lead
/// sees what the earlier leads of the run create, fill and link (see
/// [`Run`]), so the plan is what the conversion then does.
pub async fn dry_run(
    pool: &PgPool,
    settings: &Settings,
    criteria: &Criteria,
    mut each: impl FnMut(Plan) -> std::io::Result<()>,
) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let mut qb = sqlx::QueryBuilder::new("SELECT l.id FROM leads l WHERE l.converted_at IS NULL AND ");
    crate::store::criteria::push_sql(criteria, &mut qb);
    qb.push(" ORDER BY l.id");
    let leads: Vec<i64> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
    let deals_are_won = match &settings.deal {
        Some(d) => sqlx::query_scalar!(
            "SELECT is_won FROM deal_stages WHERE pipeline = $1 AND stage = $2",
            d.pipeline,
            d.stage
        )
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(false),
        None => false,
    };
    let today = Utc::now().date_naive();
    let mut run = Run::new(deals_are_won);
    for &id in &leads {
        let mut facts = snapshot::load(&mut tx, settings, id, Locking::None).await?;
        let owners = run.overlay(&mut facts, settings);
        if !owners.is_empty() {
            facts.managers_above.extend(snapshot::managers_above(&mut tx, &owners).await?);
        }
        let plan = plan::decide(&facts, settings, today);
        run.note(&facts, &plan);
        each(plan).map_err(|e| Error::Database(sqlx::Error::Io(e)))?;
    }
    tx.rollback().await?;
    Ok(leads.len() as u64)
}

/// All result rows of a job, in lead order.
pub async fn results(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Vec<LeadResult>> {
    results_page(pool, job_id, None, 0, None).try_collect().await
}

/// The one statement that reads results: a job's rows in lead order, of
/// `outcome` when given, after lead `after`, at most `limit` (keyset pages;
/// `None`: all, streamed so a million rows never sit in memory).
static RESULTS_PAGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {RESULT_COLUMNS} FROM conversion_results
         WHERE job_id = $1 AND ($2::text IS NULL OR outcome = $2) AND lead_id > $3
         ORDER BY lead_id LIMIT $4"
    )
});

pub fn results_page(
    pool: &PgPool,
    job_id: Uuid,
    outcome: Option<Outcome>,
    after: i64,
    limit: Option<i64>,
) -> BoxStream<'_, sqlx::Result<LeadResult>> {
    sqlx::query_as(RESULTS_PAGE.as_str()).bind(job_id).bind(outcome).bind(after).bind(limit).fetch(pool)
}

/// The result of a one-lead job once it is no longer pending (convert-now).
pub async fn finished_result(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Option<LeadResult>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {RESULT_COLUMNS} FROM conversion_results WHERE job_id = $1 AND outcome <> 'pending' LIMIT 1")
    });
    sqlx::query_as(SQL.as_str()).bind(job_id).fetch_optional(pool).await
}

/// Whether the lead exists (outer `Some`) and when it was converted.
pub async fn lead_converted_at(pool: &PgPool, lead_id: i64) -> sqlx::Result<Option<Option<DateTime<Utc>>>> {
    sqlx::query_scalar!("SELECT converted_at FROM leads WHERE id = $1", lead_id).fetch_optional(pool).await
}
