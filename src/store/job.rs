//! Conversion jobs: a snapshot of leads with options and an acting user.
//!
//! A job is created in one transaction with one `pending` result row per
//! lead, so `total_count` is exact from the start and the result rows double
//! as the list of work still to do.

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ErrorCode, Refusal};
use crate::store::criteria::Criteria;
use crate::store::options::{ConversionOptions, Settings, UnmappedCustomFields};
use crate::store::types::Outcome;

pub use crate::store::types::{JobStatus, Trigger};

/// A `conversion_jobs` row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    pub status: JobStatus,
    pub criteria: sqlx::types::Json<Value>,
    pub options: sqlx::types::Json<Value>,
    pub requested_by: i64,
    pub trigger: Trigger,
    pub total_count: i32,
    pub converted_count: i32,
    pub merged_count: i32,
    pub skipped_count: i32,
    pub failed_count: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The rule that made it (a `workflow` job), if any.
    pub rule_id: Option<i64>,
    /// The schedule that made it, if any.
    pub schedule_id: Option<i64>,
    /// The job whose failed (or skipped) leads this one retries.
    pub retry_of: Option<Uuid>,
    /// Who asked for it, when not its acting user (`requested_by`): a retry
    /// keeps the first job's requester.
    pub asked_by: Option<i64>,
    /// The job whose conversions this one takes back (an undo job).
    pub undo_of: Option<Uuid>,
    /// How many of this job's conversions were taken back since.
    pub undone_count: i32,
    /// The contact custom fields (and their mappings) this job made when it
    /// was created (`unmapped_custom_fields: "create"`).
    pub custom_fields_created: Vec<String>,
}

impl Job {
    pub fn pending_count(&self) -> i32 {
        self.total_count - self.converted_count - self.skipped_count - self.failed_count
    }

    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }
}

/// A job as requested: criteria and options as the caller wrote them.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub criteria: Value,
    pub options: Value,
    pub requested_by: i64,
    pub trigger: Trigger,
}

/// A job whose criteria and options passed every check. Nothing is written
/// until [`create`].
#[derive(Debug, Clone)]
pub struct Checked {
    pub new: NewJob,
    pub criteria: Criteria,
    pub settings: Settings,
}

/// Checks criteria, options and the requester, writing nothing: a job that
/// fails here leaves no row and no message behind.
pub async fn check(pool: &PgPool, new: NewJob) -> Result<Checked, crate::Error> {
    let options = ConversionOptions::from_json(&new.options)?;
    let mut conn = pool.acquire().await?;
    let settings = crate::store::options::prepare(&mut conn, &options, new.requested_by).await?;
    let criteria = Criteria::parse(&new.criteria, &settings.fields.defs)?;
    let requester_is_admin: bool = sqlx::query_scalar("SELECT is_admin FROM users WHERE id = $1")
        .bind(new.requested_by)
        .fetch_one(&mut *conn)
        .await?;
    settings.custom_fields_to_create(requester_is_admin)?;
    if settings.into_contact.is_some() || settings.into_account.is_some() {
        // Records named to convert into are one lead's (convert-now).
        let one_lead = new.criteria.get("ids").and_then(Value::as_array).is_some_and(|ids| ids.len() == 1);
        if !one_lead {
            let field = if settings.into_contact.is_some() { "contact_id" } else { "account_id" };
            return Err(Refusal::new(
                ErrorCode::InvalidOption,
                field,
                "names a record to convert into, which only a conversion of one lead may: convert-now, or \
                 criteria {\"ids\": [LEAD_ID]}",
            )
            .into());
        }
        settings.check_named(crate::store::options::named(&mut conn, &settings).await?)?;
    }
    Ok(Checked { new, criteria, settings })
}

/// The answer for a job that does not exist, and (SPEC §5) for one outside
/// the caller's reach: the same words, so that neither hints at the other.
pub fn not_found() -> Refusal {
    Refusal::new(ErrorCode::JobNotFound, "job_id", "no such job (check the id)")
}

/// A job's publisher lease (see `queue::producer`): who holds it, a token
/// of the publishing process, and how long it lasts without renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub token: Uuid,
    pub length: std::time::Duration,
}

impl Lease {
    /// A lease with a token of its own, for one publishing process.
    pub fn new(length: std::time::Duration) -> Lease {
        Lease { token: Uuid::new_v4(), length }
    }
}

/// The most leads a `workflow` job holds. That lane is for a rule's or
/// convert-now's one lead, or a few leads named by id from the command
/// line; anything larger waits in the bulk lane, so that it never queues
/// in front of a one-lead conversion.
pub const WORKFLOW_MAX_LEADS: usize = 100;

/// Refuses a trigger a caller may not choose for `criteria`. `workflow`
/// jobs are made by rules and convert-now (one lead each), and `schedule`
/// jobs by schedules. The command line (`from_command_line`: a CronJob or
/// an operator) may also say `schedule`, and `workflow` for at most
/// [`WORKFLOW_MAX_LEADS`] leads named by id. An API caller may say neither.
pub fn check_caller_trigger(trigger: Trigger, criteria: &Value, from_command_line: bool) -> Result<Trigger, Refusal> {
    let set_by_leadconv = |by: &str| {
        Refusal::new(
            ErrorCode::InvalidOption,
            "trigger",
            format!("trigger {trigger} is set by leadconv itself ({by}); a caller may ask for manual or api"),
        )
    };
    match trigger {
        Trigger::Manual | Trigger::Api => Ok(trigger),
        Trigger::Schedule if from_command_line => Ok(trigger),
        Trigger::Schedule => Err(set_by_leadconv("schedules")),
        Trigger::Workflow if !from_command_line => Err(set_by_leadconv("rules and convert-now")),
        Trigger::Workflow => {
            let ids = criteria.get("ids").and_then(Value::as_array).map(Vec::len);
            match ids {
                Some(n) if n <= WORKFLOW_MAX_LEADS => Ok(trigger),
                _ => Err(Refusal::new(
                    ErrorCode::InvalidOption,
                    "trigger",
                    format!(
                        "a workflow job converts at most {WORKFLOW_MAX_LEADS} leads named by id \
                         (criteria {{\"ids\": [...]}}), so that it never delays a rule's conversion; \
                         use trigger manual for this one"
                    ),
                )),
            }
        }
    }
}

/// How a job's leads reach a converter.
#[derive(Debug, Clone, Copy)]
pub enum Dispatch {
    /// Through RabbitMQ: the creator holds the publisher lease and is
    /// expected to publish (see `producer`); if it does not, a worker's
    /// sweeper does once the lease runs out or is released.
    Queue { lease: Lease },
    /// Converted by the creating process itself (demo, tests): nothing to
    /// publish.
    InProcess,
}

/// Creates the job and its snapshot: one `pending` result row per
/// matching, unconverted lead, in one statement (a million leads never pass
/// through this process, and a one-lead convert-now job costs one round
/// trip).
pub async fn create(pool: &PgPool, checked: &Checked, dispatch: Dispatch) -> Result<Job, crate::Error> {
    // One transaction: the custom fields a job makes exist only with it.
    let mut tx = pool.begin().await?;
    let job = create_in(&mut tx, checked, dispatch).await?;
    tx.commit().await?;
    Ok(job)
}

/// Makes the contact custom fields and mappings of
/// `unmapped_custom_fields: "create"` (seed 001), once: concurrent jobs
/// take turns (a transaction-scoped lock), each looks at the mapping as it
/// is then, and what exists already is left alone. Returns the fields this
/// job made. Runs in the caller's transaction, with the job's row.
async fn make_custom_fields(tx: &mut sqlx::PgConnection) -> Result<Vec<String>, crate::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('leadconv:unmapped_custom_fields'))").execute(&mut *tx).await?;
    let fields = crate::store::mapping::load(&mut *tx).await?;
    let new = fields.contact_fields_to_create()?;
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = new.iter().map(|f| f.api_name.as_str()).collect();
    sqlx::query(
        "INSERT INTO custom_field_defs (module, api_name, data_type, max_length)
         SELECT 'contact', n, t, l FROM unnest($1::text[], $2::text[], $3::int[]) AS v(n, t, l)
         ON CONFLICT (module, api_name) DO NOTHING",
    )
    .bind(&names)
    .bind(new.iter().map(|f| f.data_type.as_str()).collect::<Vec<_>>())
    .bind(new.iter().map(|f| f.max_length).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    // The mapping trigger judges each mapping as any writer's.
    let made: Vec<String> = sqlx::query_scalar(
        "INSERT INTO conversion_mappings (lead_field, target_module, target_field)
         SELECT n, 'contact', n FROM unnest($1::text[]) AS n
         ON CONFLICT DO NOTHING RETURNING lead_field",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    Ok(made)
}

/// [`create`] inside the caller's transaction, for callers whose own
/// write must commit together with the job (a schedule's next run, a rule
/// relay's outbox row).
pub async fn create_in(
    tx: &mut sqlx::PgConnection,
    checked: &Checked,
    dispatch: Dispatch,
) -> Result<Job, crate::Error> {
    use sqlx::FromRow;
    let id = Uuid::new_v4();
    let (lease, token, published) = match dispatch {
        Dispatch::Queue { lease } => (lease.length.as_secs_f64(), Some(lease.token), false),
        Dispatch::InProcess => (0.0, None, true),
    };
    // The snapshot's rows are inserted first and the job row, which counts
    // them, last: the foreign key is checked at the end of the statement.
    // A job matching nothing is complete at once, with nothing to publish.
    let custom_fields_created = match checked.settings.unmapped_custom_fields {
        UnmappedCustomFields::Create => make_custom_fields(&mut *tx).await?,
        UnmappedCustomFields::KeepOnLead => Vec::new(),
    };
    let mut qb = sqlx::QueryBuilder::new("WITH snapshot AS (INSERT INTO conversion_results (job_id, lead_id) SELECT ");
    qb.push_bind(id).push(", l.id FROM leads l WHERE l.converted_at IS NULL AND ");
    crate::store::criteria::push_sql(&checked.criteria, &mut qb);
    qb.push(
        " RETURNING 1), matched AS (SELECT count(*) AS n FROM snapshot)
         INSERT INTO conversion_jobs (id, criteria, options, requested_by, trigger, total_count, status,
                                      finished_at, published_at, publisher_lease_until, publisher_token,
                                      custom_fields_created)
         SELECT ",
    );
    qb.push_bind(id).push(", ");
    qb.push_bind(&checked.new.criteria).push(", ");
    qb.push_bind(&checked.new.options).push(", ");
    qb.push_bind(checked.new.requested_by).push(", ");
    qb.push_bind(checked.new.trigger).push(
        ", n::int, CASE WHEN n = 0 THEN 'completed' ELSE 'scheduled' END,
           CASE WHEN n = 0 THEN now() END, ",
    );
    qb.push("CASE WHEN n = 0 OR ").push_bind(published).push(" THEN now() END, ");
    qb.push("CASE WHEN n > 0 THEN now() + make_interval(secs => ").push_bind(lease).push(") END, ");
    qb.push_bind(token).push(", ").push_bind(&custom_fields_created).push(
        " FROM matched
         RETURNING id, status, criteria, options, requested_by, trigger, total_count, converted_count,
                   merged_count, skipped_count, failed_count, created_at, started_at, finished_at, rule_id,
                   schedule_id, retry_of, asked_by, undo_of, 0 AS undone_count, custom_fields_created",
    );
    match qb.build().fetch_one(&mut *tx).await {
        Ok(row) => Ok(Job::from_row(&row)?),
        // `n::int` overflowed: the statement failed, nothing was written.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22003") => Err(Refusal::new(
            ErrorCode::InvalidCriteria,
            "criteria",
            format!("more leads match than a job holds (at most {})", i32::MAX),
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// Moves the job's counter shards into its `conversion_jobs` row (counts,
/// status, start and finish times). Idempotent; any process may call it,
/// in a transaction of its own or in the one that wrote the shards.
pub async fn rollup(conn: impl sqlx::PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("SELECT leadconv_rollup_job($1)", id).execute(conn).await?;
    Ok(())
}

/// [`rollup`] of each job of `ids`, in one statement.
pub async fn rollup_each(conn: impl sqlx::PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query("SELECT leadconv_rollup_jobs($1)").bind(ids).execute(conn).await?;
    Ok(())
}

/// Cancels a job: its pending leads become `skipped` (`cancelled`). Waits
/// for conversions of the job that are in flight to commit, so once this
/// returns no lead of the job is converted any more.
pub async fn cancel(pool: &PgPool, id: Uuid) -> Result<Job, crate::Error> {
    // Cancel waits for the conversions in flight; if Postgres picks it as
    // a deadlock victim all the same, it simply tries again.
    let mut tries = 0;
    loop {
        tries += 1;
        match try_cancel(pool, id).await {
            Err(crate::Error::Transient(e)) if tries < 5 => {
                tracing::warn!(job_id = %id, error = %e, "cancel conflicted; trying again");
            }
            other => return other,
        }
    }
}

async fn try_cancel(pool: &PgPool, id: Uuid) -> Result<Job, crate::Error> {
    let mut tx = pool.begin().await?;
    // FOR NO KEY UPDATE, not FOR UPDATE: a conversion in flight that counts
    // itself inserts a counter shard, whose foreign key takes FOR KEY SHARE
    // on this row. FOR UPDATE would make it wait on us while we wait on its
    // result row below: a deadlock.
    let status = sqlx::query_scalar!(
        r#"SELECT status AS "status: JobStatus" FROM conversion_jobs WHERE id = $1 FOR NO KEY UPDATE"#,
        id
    )
    .fetch_optional(&mut *tx)
    .await?;
    match status {
        None => return Err(not_found().into()),
        Some(s) if !s.is_finished() => {}
        Some(s) => {
            return Err(Refusal::new(ErrorCode::JobFinished, "job_id", format!("job {id} is {s} already")).into())
        }
    }
    // Each in-flight conversion holds its result row until it commits; this
    // update waits for those rows and then skips them, as they are no
    // longer pending.
    let skipped = sqlx::query!(
        "UPDATE conversion_results SET outcome = 'skipped', error_code = 'cancelled',
                error_message = 'the job was cancelled before this lead was converted', finished_at = now()
         WHERE job_id = $1 AND outcome = 'pending'",
        id
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query!(
        "UPDATE conversion_jobs SET status = 'cancelled', cancelled_at = now(), finished_at = now(),
                skipped_count = skipped_count + $2, publisher_lease_until = NULL,
                published_at = coalesce(published_at, now())
         WHERE id = $1",
        id,
        i32::try_from(skipped).unwrap_or(i32::MAX)
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    rollup(pool, id).await?;
    Ok(get(pool, id).await?.expect("the job exists"))
}

/// The rule or schedule that made a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Rule(i64),
    Schedule(i64),
    /// A retry of the failed (or skipped) leads of this job.
    Retry(Uuid),
}

/// Records which rule, schedule or earlier job made job `id` (in the
/// transaction that created it). Returns the job's lead count.
pub async fn link_origin(tx: &mut sqlx::PgConnection, id: Uuid, origin: Origin) -> sqlx::Result<i32> {
    let (rule, schedule, retry_of) = match origin {
        Origin::Rule(r) => (Some(r), None, None),
        Origin::Schedule(s) => (None, Some(s), None),
        Origin::Retry(j) => (None, None, Some(j)),
    };
    sqlx::query_scalar!(
        "UPDATE conversion_jobs SET rule_id = $2, schedule_id = $3, retry_of = $4 WHERE id = $1 RETURNING total_count",
        id,
        rule,
        schedule,
        retry_of
    )
    .fetch_one(&mut *tx)
    .await
}

/// Deletes a job that matched no lead, in the transaction that created it.
pub async fn delete_empty(tx: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM conversion_jobs WHERE id = $1 AND total_count = 0", id).execute(&mut *tx).await?;
    Ok(())
}

/// When each rule (or schedule) last made a job and how many leads its
/// jobs converted, by rule (or schedule) id.
pub async fn origin_runs(
    pool: &PgPool,
    of_schedules: bool,
) -> sqlx::Result<std::collections::HashMap<i64, (chrono::DateTime<chrono::Utc>, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT CASE WHEN $1 THEN schedule_id ELSE rule_id END AS "origin!", max(created_at) AS "last_job_at!",
                  sum(converted_count)::bigint AS "converted!"
           FROM conversion_jobs
           WHERE CASE WHEN $1 THEN schedule_id ELSE rule_id END IS NOT NULL
           GROUP BY 1"#,
        of_schedules
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.origin, (r.last_job_at, r.converted))).collect())
}

/// Rewinds the outbox of job `id` to its first lead and takes its
/// publisher lease, so that whoever publishes it next (the caller, or a
/// worker's sweeper when the lease runs out) sends every lead still pending
/// again: for messages lost with the broker. A message that was not lost is
/// then delivered twice, which converts nothing twice. Returns the job's
/// trigger, which names its lane.
pub async fn rewind_outbox(pool: &PgPool, id: Uuid, lease: &Lease) -> Result<Trigger, crate::Error> {
    let trigger = sqlx::query_scalar!(
        r#"UPDATE conversion_jobs SET published_through = 0, published_at = NULL,
                publisher_lease_until = now() + make_interval(secs => $2), publisher_token = $3
         WHERE id = $1 AND status IN ('scheduled', 'in_progress')
         RETURNING trigger AS "trigger: Trigger""#,
        id,
        lease.length.as_secs_f64(),
        lease.token
    )
    .fetch_optional(pool)
    .await?;
    if let Some(t) = trigger {
        return Ok(t);
    }
    Err(match get(pool, id).await? {
        None => not_found(),
        Some(j) => Refusal::new(ErrorCode::JobFinished, "job_id", format!("job {id} is {} already", j.status)),
    }
    .into())
}

/// Creates a job over an explicit list of leads and converts nothing: for
/// in-process conversion (demo, tests).
pub async fn create_for_leads(
    pool: &PgPool,
    requested_by: i64,
    trigger: Trigger,
    options: &Value,
    lead_ids: &[i64],
) -> Result<Uuid, crate::Error> {
    let new = NewJob { criteria: json!({ "ids": lead_ids }), options: options.clone(), requested_by, trigger };
    let checked = check(pool, new).await?;
    Ok(create(pool, &checked, Dispatch::InProcess).await?.id)
}

/// The job with counts exact at this moment (counter shards included).
pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Job>> {
    // A view's columns are all nullable to sqlx: `!` says these are not.
    sqlx::query_as!(
        Job,
        r#"SELECT id AS "id!", status AS "status!: JobStatus", criteria AS "criteria!: Json<Value>",
                options AS "options!: Json<Value>", requested_by AS "requested_by!", trigger AS "trigger!: Trigger",
                total_count AS "total_count!", converted_count AS "converted_count!", merged_count AS "merged_count!",
                skipped_count AS "skipped_count!", failed_count AS "failed_count!", created_at AS "created_at!",
                started_at, finished_at, rule_id, schedule_id, retry_of, asked_by, undo_of,
                undone_count AS "undone_count!", custom_fields_created AS "custom_fields_created!"
         FROM conversion_job_progress WHERE id = $1"#,
        id
    )
    .fetch_optional(pool)
    .await
}

/// Jobs newest first, of `status` and `trigger` when given, asked for by
/// one of `requested_by` (`None`: anyone), a page of `limit` after
/// skipping `offset`; counts exact at this moment. The reach is a filter
/// of the statement, so pages hold only what the caller may see.
pub async fn list(
    pool: &PgPool,
    status: Option<JobStatus>,
    trigger: Option<Trigger>,
    requested_by: Option<&[i64]>,
    limit: i64,
    offset: i64,
) -> sqlx::Result<Vec<Job>> {
    // A view's columns are all nullable to sqlx: `!` says these are not.
    // The column list repeats `get`'s: query_as! takes only a literal.
    sqlx::query_as!(
        Job,
        r#"SELECT id AS "id!", status AS "status!: JobStatus", criteria AS "criteria!: Json<Value>",
                options AS "options!: Json<Value>", requested_by AS "requested_by!", trigger AS "trigger!: Trigger",
                total_count AS "total_count!", converted_count AS "converted_count!", merged_count AS "merged_count!",
                skipped_count AS "skipped_count!", failed_count AS "failed_count!", created_at AS "created_at!",
                started_at, finished_at, rule_id, schedule_id, retry_of, asked_by, undo_of,
                undone_count AS "undone_count!", custom_fields_created AS "custom_fields_created!"
         FROM conversion_job_progress
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR trigger = $2)
           AND ($5::bigint[] IS NULL OR requested_by = ANY($5))
         ORDER BY created_at DESC, id LIMIT $3 OFFSET $4"#,
        status as Option<JobStatus>,
        trigger as Option<Trigger>,
        limit,
        offset,
        requested_by as Option<&[i64]>
    )
    .fetch_all(pool)
    .await
}

/// The validated settings a stored job converts with.
pub async fn settings(pool: &PgPool, job: &Job) -> Result<Settings, crate::Error> {
    let options = ConversionOptions::from_json(&job.options)?;
    let mut conn = pool.acquire().await?;
    crate::store::options::prepare(&mut conn, &options, job.requested_by).await
}

/// Leads still pending in unfinished jobs, by the trigger that decides
/// their lane: what `doctor` and `status` compare with the queues' consumers.
pub async fn pending_by_trigger(pool: &PgPool) -> sqlx::Result<Vec<(Trigger, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT trigger AS "trigger!: Trigger",
                  sum(total_count - converted_count - skipped_count - failed_count)::bigint AS "pending!"
           FROM conversion_job_progress WHERE status IN ('scheduled', 'in_progress') GROUP BY trigger"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.trigger, r.pending)).collect())
}

/// Which leads of an earlier job a retry converts again.
#[derive(Debug, Clone)]
pub struct RetryOf {
    pub job_id: Uuid,
    /// `failed` (the default) or `skipped` (say, the leads a cancel left).
    pub outcome: Outcome,
    /// Only the leads that ended with this error code.
    pub code: Option<String>,
}

/// The new job a retry asks for: the leads of `of` that ended with its
/// outcome (and code) and are still unconverted, as an id list, with the
/// earlier job's options, asked for by `requested_by` (default: whoever
/// asked for the earlier job). Checked like any job before it is created
/// with [`create_retry`].
pub async fn retry_request(
    pool: &PgPool,
    of: &RetryOf,
    requested_by: Option<i64>,
    trigger: Trigger,
) -> Result<NewJob, crate::Error> {
    if !matches!(of.outcome, Outcome::Failed | Outcome::Skipped) {
        return Err(Refusal::new(
            ErrorCode::InvalidOption,
            "outcome",
            format!("a retry takes failed or skipped leads, not {} ones", of.outcome),
        )
        .into());
    }
    if let Some(code) = &of.code {
        if serde_json::from_value::<ErrorCode>(Value::String(code.clone())).is_err() {
            return Err(Refusal::new(
                ErrorCode::InvalidOption,
                "code",
                format!("{code:?} is not an error code; `leadconv results JOB` shows the codes of a job's leads"),
            )
            .into());
        }
    }
    let Some(earlier) = get(pool, of.job_id).await? else {
        return Err(not_found().into());
    };
    let limit = i64::try_from(leadconv_domain::criteria::MAX_LIST).expect("a small constant");
    let ids: Vec<i64> = sqlx::query_scalar!(
        "SELECT r.lead_id FROM conversion_results r JOIN leads l ON l.id = r.lead_id
         WHERE r.job_id = $1 AND r.outcome = $2 AND ($3::text IS NULL OR r.error_code = $3) AND l.converted_at IS NULL
         ORDER BY r.lead_id LIMIT $4",
        of.job_id,
        of.outcome as Outcome,
        of.code,
        limit + 1
    )
    .fetch_all(pool)
    .await?;
    let which = match &of.code {
        Some(code) => format!("{} leads with code {code}", of.outcome),
        None => format!("{} leads", of.outcome),
    };
    if ids.is_empty() {
        return Err(Refusal::new(
            ErrorCode::NothingToRetry,
            "job_id",
            format!("job {} has no unconverted {which}", of.job_id),
        )
        .into());
    }
    if ids.len() as i64 > limit {
        return Err(Refusal::new(
            ErrorCode::InvalidCriteria,
            "job_id",
            format!("job {} has more than {limit} unconverted {which}; retry them a code at a time", of.job_id),
        )
        .into());
    }
    Ok(NewJob {
        criteria: json!({ "ids": ids }),
        options: earlier.options.0,
        requested_by: requested_by.unwrap_or(earlier.requested_by),
        trigger,
    })
}

/// Creates the retry job checked from [`retry_request`], naming the job it
/// retries (`retry_of`) and, when it is not the acting user, who asked for
/// it (`asked_by`).
pub async fn create_retry(
    pool: &PgPool,
    checked: &Checked,
    of: Uuid,
    asked_by: Option<i64>,
    dispatch: Dispatch,
) -> Result<Job, crate::Error> {
    let asked_by = asked_by.filter(|&u| u != checked.new.requested_by);
    let mut tx = pool.begin().await?;
    let mut job = create_in(&mut tx, checked, dispatch).await?;
    link_origin(&mut tx, job.id, Origin::Retry(of)).await?;
    if let Some(user) = asked_by {
        sqlx::query!("UPDATE conversion_jobs SET asked_by = $2 WHERE id = $1", job.id, user).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    job.retry_of = Some(of);
    job.asked_by = asked_by;
    Ok(job)
}

/// Which conversions an undo takes back: the converted leads of `job_id`,
/// or only `lead_ids` among them.
#[derive(Debug, Clone)]
pub struct UndoOf {
    pub job_id: Uuid,
    pub lead_ids: Option<Vec<i64>>,
}

/// Creates an undo job (SPEC §4a) of `of`'s converted leads: its acting
/// user is `requested_by`, by default the converted job's requester (whose
/// reach decides who sees it), `asked_by` who asked; criteria `{"ids": [...]}` of the leads it
/// takes back; `undo_of` names the job. Refused, writing nothing, when the
/// job is still converting (cancel it first), is itself an undo, or has no
/// converted lead among those named.
pub async fn create_undo(
    pool: &PgPool,
    of: &UndoOf,
    requested_by: Option<i64>,
    asked_by: Option<i64>,
    trigger: Trigger,
    dispatch: Dispatch,
) -> Result<Job, crate::Error> {
    let earlier = check_undo(pool, of).await?;
    let requested_by = requested_by.unwrap_or(earlier.requested_by);
    // The acting user must still be allowed to act (as for any job).
    let new = NewJob { criteria: json!({"all_leads": true}), options: json!({}), requested_by, trigger };
    check(pool, new).await?;
    let asked_by = asked_by.filter(|&u| u != requested_by);
    let id = Uuid::new_v4();
    let (lease, token, published) = match dispatch {
        Dispatch::Queue { lease } => (lease.length.as_secs_f64(), Some(lease.token), false),
        Dispatch::InProcess => (0.0, None, true),
    };
    // The converted results of the job, not the leads matching criteria:
    // an undo's leads are converted ones. Result rows first, the job row
    // (which counts them) last, in one statement.
    let row = sqlx::query(
        "WITH snapshot AS (
             INSERT INTO conversion_results (job_id, lead_id)
             SELECT $1, r.lead_id FROM conversion_results r
             WHERE r.job_id = $2 AND r.outcome = 'converted' AND ($3::bigint[] IS NULL OR r.lead_id = ANY($3))
             RETURNING lead_id),
         matched AS (SELECT count(*) AS n, coalesce(jsonb_agg(lead_id ORDER BY lead_id), '[]') AS ids FROM snapshot)
         INSERT INTO conversion_jobs (id, criteria, options, requested_by, trigger, total_count, status, finished_at,
                                      published_at, publisher_lease_until, publisher_token, undo_of, asked_by)
         SELECT $1, jsonb_build_object('ids', ids), '{}'::jsonb, $4, $5, n::int,
                CASE WHEN n = 0 THEN 'completed' ELSE 'scheduled' END, CASE WHEN n = 0 THEN now() END,
                CASE WHEN n = 0 OR $6 THEN now() END,
                CASE WHEN n > 0 THEN now() + make_interval(secs => $7) END, $8, $2, $9
         FROM matched
         RETURNING id, status, criteria, options, requested_by, trigger, total_count, converted_count,
                   merged_count, skipped_count, failed_count, created_at, started_at, finished_at, rule_id,
                   schedule_id, retry_of, asked_by, undo_of, 0 AS undone_count, custom_fields_created",
    )
    .bind(id)
    .bind(of.job_id)
    .bind(of.lead_ids.as_deref())
    .bind(requested_by)
    .bind(trigger)
    .bind(published)
    .bind(lease)
    .bind(token)
    .bind(asked_by)
    .fetch_one(pool)
    .await?;
    use sqlx::FromRow;
    let job = Job::from_row(&row)?;
    if job.total_count == 0 {
        // Nothing was taken: the empty job goes, the caller learns why.
        sqlx::query!("DELETE FROM conversion_jobs WHERE id = $1", job.id).execute(pool).await?;
        return Err(nothing_to_undo(of).into());
    }
    Ok(job)
}

fn nothing_to_undo(of: &UndoOf) -> Refusal {
    let which = if of.lead_ids.is_some() { "of the leads named " } else { "" };
    Refusal::new(ErrorCode::NothingToUndo, "job_id", format!("no lead {which}was converted by job {}", of.job_id))
}

/// The job an undo would take back, if it may be undone now.
pub async fn check_undo(pool: &PgPool, of: &UndoOf) -> Result<Job, crate::Error> {
    let Some(earlier) = get(pool, of.job_id).await? else { return Err(not_found().into()) };
    if earlier.undo_of.is_some() {
        return Err(Refusal::new(
            ErrorCode::InvalidOption,
            "job_id",
            format!("job {} is an undo; its leads convert again with a new job", earlier.id),
        )
        .into());
    }
    if !earlier.is_finished() {
        return Err(Refusal::new(
            ErrorCode::JobInProgress,
            "job_id",
            format!("job {} is {}: cancel it, or wait for it to finish, then undo it", earlier.id, earlier.status),
        )
        .into());
    }
    if let Some(ids) = &of.lead_ids {
        if ids.is_empty() || ids.len() > leadconv_domain::criteria::MAX_LIST {
            return Err(Refusal::new(
                ErrorCode::InvalidCriteria,
                "lead_ids",
                format!("name between 1 and {} leads, or none for all", leadconv_domain::criteria::MAX_LIST),
            )
            .into());
        }
    }
    if earlier.converted_count == 0 {
        return Err(nothing_to_undo(of).into());
    }
    Ok(earlier)
}
