//! Converting one lead of a job, in one Postgres transaction (SPEC §3).
//!
//! Follow a lead here: lock its pending result row, gather the facts under
//! locks (`snapshot`), decide (`plan`), write (`apply`), record the result
//! and the job's counts, commit. Either all of it happens or none of it.

use std::collections::HashMap;
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
use crate::plan::{self, Action, Facts, Plan, Verdict};
use crate::run::Run;
use crate::store::apply::{apply_batch, Converted};
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
    /// An undo's lead that must wait until leads converted after it into
    /// the same records are taken back (SPEC §4a: a lead that merged into
    /// another's records goes first): nothing was written; try it again
    /// shortly, without counting it as a failed attempt.
    #[error("waiting for leads {0:?} of the same job to be taken back first")]
    Waits(Vec<i64>),
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
    let item = Item { lead_id, enqueued_at: None, earlier_attempts: 0 };
    convert_batch(pool, job_id, settings, &[item]).await?.pop().expect("one result per lead")
}

/// A lead to convert, as a message brings it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub lead_id: i64,
    /// When the message was published: the enqueue→commit latency is
    /// recorded with the result.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// The deliveries of this lead's message that reached a conversion
    /// before and left nothing (a transient failure sent it through a retry
    /// queue, or its worker died): they roll back, so only the message
    /// knows them, and `attempts` adds them.
    pub earlier_attempts: u32,
}

/// Converts the leads of `items`, all of job `job_id`, in one transaction:
/// their facts gathered together, each planned in batch order seeing what
/// the earlier ones do (as a dry run does, see [`Run`]), written with a
/// fixed number of multi-row statements, their results and the job's
/// counts recorded, one commit (SPEC §3).
///
/// One lead's failure never costs its neighbours: if the batch's
/// transaction fails on a database error (a constraint, a bad value), it
/// is rolled back and its leads are converted again one by one, so the bad
/// lead fails alone with its code. A transient error (a lost connection, a
/// timeout) fails the whole batch (`Err`): nothing of it was written, and
/// every message is worth retrying. Otherwise each item gets its result, in
/// `items`' order: a lead already recorded gets its recorded result (a
/// redelivered message), a lead the job does not hold
/// [`ConvertError::NotInJob`].
pub async fn convert_batch(
    pool: &PgPool,
    job_id: Uuid,
    settings: &Settings,
    items: &[Item],
) -> Result<Vec<Result<LeadResult, ConvertError>>, ConvertError> {
    let span = tracing::info_span!("convert", %job_id, lead_id = items.first().map(|i| i.lead_id), leads = items.len());
    async move {
        let mut tries = 0;
        loop {
            tries += 1;
            let e = match try_batch(pool, job_id, settings, items, tries).await {
                Ok(results) => return Ok(results),
                Err(e) => e,
            };
            match e {
                ConvertError::Transient(e) if tries < LOCAL_TRIES && is_lock_conflict(&e) => {
                    tracing::debug!(error = %e, tries, "lock conflict, trying again");
                    tokio::time::sleep(Duration::from_millis(5 << tries)).await;
                }
                // Lost connections and a server going away fail the whole
                // batch: lead by lead would fail the same way, slower. A
                // lock or statement timeout splits it instead: only the
                // leads whose keys a stuck transaction holds wait again.
                ConvertError::Transient(e) if items.len() == 1 || !is_lock_wait(&e) => {
                    return Err(ConvertError::Transient(e))
                }
                e if items.len() > 1 => {
                    // Rolled back: nothing of the batch was written. Lead by
                    // lead, each failure stays with its own lead.
                    tracing::warn!(error = %e, leads = items.len(), "batch failed; converting its leads one by one");
                    metrics::counter!(crate::metrics::BATCH_SPLITS).increment(1);
                    let mut results = Vec::with_capacity(items.len());
                    for item in items {
                        results.push(match Box::pin(convert_batch(pool, job_id, settings, &[*item])).await {
                            Ok(mut one) => one.pop().expect("one result per lead"),
                            Err(e) => Err(e),
                        });
                    }
                    return Ok(results);
                }
                ConvertError::Database(e) if error::is_constraint_violation(&e) => {
                    // The transaction rolled back: nothing of the lead was
                    // written. Record why, in a transaction of its own.
                    tracing::warn!(error = %e, "lead failed on a database constraint");
                    let item = &items[0];
                    let failed = Finish::failed(ErrorCode::ConstraintViolation, e.to_string());
                    return Ok(vec![record(pool, job_id, item.lead_id, &failed, item.earlier_attempts + tries).await]);
                }
                e @ ConvertError::NotInJob { .. } => return Ok(vec![Err(e)]),
                e => return Err(e),
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

pub(crate) async fn record(
    pool: &PgPool,
    job_id: Uuid,
    lead_id: i64,
    f: &Finish,
    tries: u32,
) -> Result<LeadResult, ConvertError> {
    let mut tx = pool.begin().await?;
    let Some(locked) = lock_results(&mut tx, job_id, &[lead_id]).await?.pop() else {
        return Err(ConvertError::NotInJob { job_id, lead_id });
    };
    if locked.result.outcome != Outcome::Pending {
        return Ok(locked.result);
    }
    let done =
        [Done { job_id, lead_id, row: &locked.row, finish: f, tries, enqueued_at: None, workflow: locked.workflow }];
    let r = finish(&mut tx, &done, None).await?.pop().expect("a pending row is recorded");
    tx.commit().await?;
    crate::metrics::record_result(&r, std::time::Duration::ZERO);
    Ok(r)
}

/// A deadlock, a serialization failure, or a lock or statement timeout:
/// the transaction waited on others, the connection is fine.
pub(crate) fn is_lock_wait(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01" | "55P03" | "57014")))
}

pub(crate) fn is_lock_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

#[derive(sqlx::FromRow)]
pub(crate) struct Locked {
    #[sqlx(flatten)]
    pub(crate) result: LeadResult,
    pub(crate) job_status: JobStatus,
    /// A convert-now request waits on the commit.
    pub(crate) workflow: bool,
    /// Where the row lies (its `ctid`, as text): [`finish`] updates it
    /// there. It holds while the row is locked, until the transaction ends.
    pub(crate) row: String,
}

/// Locks the result rows of `lead_ids` in job `job_id`, the job's gate for
/// those leads: whoever holds a row is the only one converting its lead
/// for this job. Rows are locked in lead order, so two batches never wait
/// on each other in a cycle.
pub(crate) async fn lock_results(conn: &mut PgConnection, job_id: Uuid, lead_ids: &[i64]) -> sqlx::Result<Vec<Locked>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        // The job's status and trigger ride along: one round trip, not two.
        format!(
            "SELECT {RESULT_COLUMNS},
                    (SELECT status FROM conversion_jobs WHERE id = $1) AS job_status,
                    (SELECT trigger = 'workflow' FROM conversion_jobs WHERE id = $1) AS workflow,
                    ctid::text AS row
             FROM conversion_results WHERE job_id = $1 AND lead_id = ANY($2) ORDER BY lead_id FOR UPDATE"
        )
    });
    sqlx::query_as(SQL.as_str()).bind(job_id).bind(lead_ids).fetch_all(conn).await
}

/// [`lock_results`] for leads of several jobs (convert-now calls converted
/// together, each the one lead of its job), in one statement: one round
/// trip for the batch, not one per call. Rows are locked in lead order
/// (then job order), as [`lock_results`] locks them.
async fn lock_results_of_jobs(conn: &mut PgConnection, leads: &[(Uuid, i64)]) -> sqlx::Result<Vec<Locked>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let columns = RESULT_COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ");
        format!(
            "SELECT {columns}, j.status AS job_status, j.trigger = 'workflow' AS workflow, r.ctid::text AS row
             FROM unnest($1::uuid[], $2::bigint[]) AS v(job_id, lead_id)
             JOIN conversion_results r ON r.job_id = v.job_id AND r.lead_id = v.lead_id
             JOIN conversion_jobs j ON j.id = r.job_id
             ORDER BY r.lead_id, r.job_id FOR UPDATE OF r"
        )
    });
    sqlx::query_as(SQL.as_str())
        .bind(leads.iter().map(|(job_id, _)| *job_id).collect::<Vec<_>>())
        .bind(leads.iter().map(|(_, lead_id)| *lead_id).collect::<Vec<_>>())
        .fetch_all(conn)
        .await
}

/// Plans each lead of `facts` (read from the database before any of them
/// is converted) in order, each seeing what the earlier ones of `run` do.
/// The one planning loop of a conversion batch and a dry run.
async fn plan_in_order(
    conn: &mut PgConnection,
    settings: &Settings,
    run: &mut Run,
    facts: Vec<Facts>,
    today: chrono::NaiveDate,
) -> sqlx::Result<Vec<Plan>> {
    let mut plans = Vec::with_capacity(facts.len());
    for mut facts in facts {
        let owners = run.overlay(&mut facts, settings);
        if !owners.is_empty() {
            facts.managers_above.extend(snapshot::managers_above(conn, &owners).await?);
        }
        let plan = plan::decide(&facts, settings, today);
        run.note(&facts, &plan);
        plans.push(plan);
    }
    Ok(plans)
}

async fn try_batch(
    pool: &PgPool,
    job_id: Uuid,
    settings: &Settings,
    items: &[Item],
    tries: u32,
) -> Result<Vec<Result<LeadResult, ConvertError>>, ConvertError> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let (results, fresh) = convert_in(&mut tx, settings, &[(job_id, items)], tries, started).await?;
    tx.commit().await?;
    for r in &fresh {
        crate::metrics::record_result(r, started.elapsed());
    }
    Ok(results)
}

/// A pending lead a try converts (or skips, its job cancelled).
struct Todo<'a> {
    job_id: Uuid,
    item: &'a Item,
    row: String,
    cancelled: bool,
    workflow: bool,
}

/// One try of [`convert_batch`] inside the caller's transaction, which
/// commits it (or rolls it back: then nothing of it was written). Returns
/// each item's result, in `jobs`' order, and, apart, the results recorded
/// by this try (for the metrics, once committed).
///
/// `jobs` are the items of each job: one job for a bulk batch; several
/// one-lead jobs of equal settings for convert-now calls converted
/// together (`Enqueuer::convert_here`). Their leads are planned in that
/// order, as one batch; a lead in two jobs of one try is converted for the
/// first only (the other gets [`ConvertError::NotInJob`], its row still
/// pending, for its caller to convert it again alone).
pub(crate) async fn convert_in(
    tx: &mut PgConnection,
    settings: &Settings,
    jobs: &[(Uuid, &[Item])],
    tries: u32,
    started: std::time::Instant,
) -> Result<(Vec<Result<LeadResult, ConvertError>>, Vec<LeadResult>), ConvertError> {
    let mut recorded: HashMap<(Uuid, i64), LeadResult> = HashMap::new();
    // The pending leads in batch order, each once per job (a message
    // published twice may bring a lead twice).
    let mut todo: Vec<Todo> = Vec::new();
    let mut converting_leads = std::collections::HashSet::new();
    // Each job's result rows, locked: one statement for a job, one for
    // several (convert-now calls converted together).
    let mut locked_of: HashMap<Uuid, Vec<Locked>> = HashMap::new();
    if let [(job_id, items)] = jobs {
        let mut ids: Vec<i64> = items.iter().map(|i| i.lead_id).collect();
        ids.sort_unstable();
        ids.dedup();
        locked_of.insert(*job_id, lock_results(&mut *tx, *job_id, &ids).await?);
    } else if !jobs.is_empty() {
        let mut leads: Vec<(Uuid, i64)> =
            jobs.iter().flat_map(|&(job_id, items)| items.iter().map(move |i| (job_id, i.lead_id))).collect();
        leads.sort_unstable();
        leads.dedup();
        for l in lock_results_of_jobs(&mut *tx, &leads).await? {
            locked_of.entry(l.result.job_id).or_default().push(l);
        }
    }
    for &(job_id, items) in jobs {
        let locked = locked_of.remove(&job_id).unwrap_or_default();
        let (cancelled, workflow) =
            locked.first().map(|l| (l.job_status == JobStatus::Cancelled, l.workflow)).unwrap_or((false, false));
        let mut pending: HashMap<i64, String> = HashMap::new();
        for l in locked {
            if l.result.outcome == Outcome::Pending {
                pending.insert(l.result.lead_id, l.row);
            } else {
                recorded.insert((job_id, l.result.lead_id), l.result);
            }
        }
        for item in items {
            // A lead another job of this try converts already is left
            // pending (its result `NotInJob` here): planned twice over the
            // same facts, it would be converted twice.
            if !cancelled && converting_leads.contains(&item.lead_id) {
                continue;
            }
            if let Some(row) = pending.remove(&item.lead_id) {
                if !cancelled {
                    converting_leads.insert(item.lead_id);
                }
                todo.push(Todo { job_id, item, row, cancelled, workflow });
            }
        }
    }

    let converting: Vec<&Todo> = todo.iter().filter(|t| !t.cancelled).collect();
    let mut finishes: HashMap<(Uuid, i64), Finish> = HashMap::new();
    if !converting.is_empty() {
        let lead_ids: Vec<i64> = converting.iter().map(|t| t.item.lead_id).collect();
        let facts = snapshot::load_batch(&mut *tx, settings, &lead_ids, Locking::ForUpdate).await?;
        // The fields conversion sets on each lead, as read (and locked):
        // the journal's "before".
        let before: HashMap<i64, crate::record::Record> =
            facts.iter().filter_map(|f| Some((f.lead_id, crate::journal::lead_marks(f.lead.as_ref()?)))).collect();
        let mut run = Run::new(settings);
        let plans = plan_in_order(&mut *tx, settings, &mut run, facts, Utc::now().date_naive()).await?;
        let job_of: HashMap<i64, Uuid> = converting.iter().map(|t| (t.item.lead_id, t.job_id)).collect();
        let conversions: Vec<(i64, &crate::plan::Conversion)> = plans
            .iter()
            .filter_map(|p| match &p.verdict {
                Verdict::Convert(c) => Some((p.lead_id, c.as_ref())),
                _ => None,
            })
            .collect();
        let applied = apply_batch(&mut *tx, &conversions, &before).await?;
        let leads: Vec<(Uuid, i64)> = conversions.iter().map(|(lead_id, _)| (job_of[lead_id], *lead_id)).collect();
        write_journal(&mut *tx, &leads, applied.iter().map(|(_, entry)| entry)).await?;
        let mut ids = applied.into_iter().map(|(ids, _)| ids);
        for plan in &plans {
            let finish = match &plan.verdict {
                Verdict::Convert(_) => Finish::converted(plan, ids.next().expect("ids per conversion")),
                Verdict::Skipped { code, message } => Finish::skipped(*code, message.clone()),
                Verdict::Failed { code, message } => Finish::failed(*code, message.clone()),
            };
            finishes.insert((job_of[&plan.lead_id], plan.lead_id), finish);
        }
    }
    for t in todo.iter().filter(|t| t.cancelled) {
        let finish = Finish::skipped(ErrorCode::Cancelled, format!("job {} was cancelled", t.job_id));
        finishes.insert((t.job_id, t.item.lead_id), finish);
    }
    let mut fresh = Vec::new();
    if !todo.is_empty() {
        let done: Vec<Done> = todo
            .iter()
            .map(|t| Done {
                job_id: t.job_id,
                lead_id: t.item.lead_id,
                row: &t.row,
                finish: &finishes[&(t.job_id, t.item.lead_id)],
                tries: t.item.earlier_attempts + tries,
                enqueued_at: t.item.enqueued_at,
                workflow: t.workflow,
            })
            .collect();
        fresh = finish(&mut *tx, &done, Some(started)).await?;
        for r in &fresh {
            recorded.insert((r.job_id, r.lead_id), r.clone());
        }
    }
    let results = jobs
        .iter()
        .flat_map(|&(job_id, items)| items.iter().map(move |i| (job_id, i.lead_id)))
        .map(|(job_id, lead_id)| {
            recorded.get(&(job_id, lead_id)).cloned().ok_or(ConvertError::NotInJob { job_id, lead_id })
        })
        .collect();
    Ok((results, fresh))
}

/// Writes the journal entries of a batch's converted `leads` (SPEC §4a), in
/// the transaction of their conversion: one statement for the batch.
async fn write_journal<'a>(
    conn: &mut PgConnection,
    leads: &[(Uuid, i64)],
    entries: impl Iterator<Item = &'a crate::journal::Entry>,
) -> sqlx::Result<()> {
    if leads.is_empty() {
        return Ok(());
    }
    // Each entry as JSON text, and the records it touched as one
    // `{module:id,…}` array literal each (an array of arrays of different
    // lengths cannot be bound).
    let (mut texts, mut records) = (Vec::with_capacity(leads.len()), Vec::with_capacity(leads.len()));
    for entry in entries {
        texts.push(serde_json::to_string(entry).expect("a journal entry serialises"));
        records.push(format!("{{{}}}", entry.records().join(",")));
    }
    sqlx::query(
        // clock_timestamp(), not now(): a batch that waited on another's
        // locks started before it committed, yet converted after it; the
        // undo's dry run takes the latest conversions back first.
        "INSERT INTO conversion_journal (job_id, lead_id, entry, records, created_at)
         SELECT job_id, lead_id, entry::json, records::text[], clock_timestamp()
         FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY AS v(job_id, lead_id, entry, records, ord)
         ORDER BY ord",
    )
    .bind(leads.iter().map(|(job_id, _)| *job_id).collect::<Vec<_>>())
    .bind(leads.iter().map(|(_, lead_id)| *lead_id).collect::<Vec<_>>())
    .bind(texts)
    .bind(records)
    .execute(conn)
    .await?;
    Ok(())
}

/// What goes into the result row.
pub(crate) struct Finish {
    outcome: Outcome,
    contact_action: Option<ContactAction>,
    account_action: Option<AccountAction>,
    deal_action: Option<DealAction>,
    ids: Converted,
    is_repeat: Option<bool>,
    email_opt_out_applied: Option<bool>,
    error: Option<(ErrorCode, String)>,
    merged: bool,
    /// A message without an error code (an undo's "the opt-out stays").
    note: Option<String>,
}

impl Finish {
    fn converted(plan: &Plan, ids: Converted) -> Finish {
        let Verdict::Convert(c) = &plan.verdict else { unreachable!("only a conversion has ids") };
        Finish {
            outcome: Outcome::Converted,
            contact_action: Some(match c.contact.as_ref().map(|t| t.action) {
                None => ContactAction::None,
                Some(Action::Created) => ContactAction::Created,
                Some(Action::Merged | Action::Matched) => ContactAction::Merged,
            }),
            account_action: Some(match c.account.as_ref().map(|a| a.action) {
                None => AccountAction::None,
                Some(Action::Created) => AccountAction::Created,
                Some(Action::Matched | Action::Merged) => AccountAction::Matched,
            }),
            deal_action: Some(if c.deal.is_some() { DealAction::Created } else { DealAction::None }),
            ids,
            is_repeat: Some(c.lead_is_repeat),
            email_opt_out_applied: Some(c.contact.as_ref().is_some_and(|t| t.email_opt_out_applied)),
            error: None,
            merged: c.contact.as_ref().is_some_and(|t| t.action == Action::Merged),
            note: None,
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
            note: None,
        }
    }

    pub(crate) fn skipped(code: ErrorCode, message: String) -> Finish {
        Finish::without_ids(Outcome::Skipped, code, message)
    }

    /// A lead an undo took back: the records its conversion had, and a
    /// note (the opt-out kept) when there is one.
    pub(crate) fn undone(ids: Converted, note: Option<String>) -> Finish {
        Finish {
            outcome: Outcome::Undone,
            contact_action: None,
            account_action: None,
            deal_action: None,
            ids,
            is_repeat: None,
            email_opt_out_applied: None,
            error: None,
            merged: false,
            note,
        }
    }

    fn failed(code: ErrorCode, message: String) -> Finish {
        Finish::without_ids(Outcome::Failed, code, message)
    }
}

/// A lead's result to record.
pub(crate) struct Done<'a> {
    pub(crate) job_id: Uuid,
    pub(crate) lead_id: i64,
    /// The result row's place, as [`lock_results`] found it.
    pub(crate) row: &'a str,
    pub(crate) finish: &'a Finish,
    pub(crate) tries: u32,
    pub(crate) enqueued_at: Option<DateTime<Utc>>,
    /// Its job is a convert-now call's, whose request waits on the commit.
    pub(crate) workflow: bool,
}

/// Writes the result rows of a batch and counts them in the job's counter
/// shard of this Postgres backend (migration 0011), in one statement. A
/// shard row is only ever updated by one transaction at a time, so a
/// conversion never waits for another one's commit, and a stuck one holds
/// up nobody. For a workflow job it also notifies
/// [`finished::CHANNEL`](crate::store::finished::CHANNEL), which Postgres
/// delivers on commit: the waiting convert-now request learns of the
/// result the moment it exists, at no extra round trip.
pub(crate) async fn finish(
    conn: &mut PgConnection,
    done: &[Done<'_>],
    started: Option<std::time::Instant>,
) -> sqlx::Result<Vec<LeadResult>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH v AS MATERIALIZED (
                 SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                                      $7::bigint[], $8::bigint[], $9::bigint[], $10::bool[], $11::text[], $12::text[],
                                      $13::int[], $14::timestamptz[], $15::bool[], $16::bool[], $18::bool[],
                                      $20::text[]::tid[])
                     AS v(job_id, lead_id, outcome, contact_action, account_action, deal_action, contact_id,
                          account_id, deal_id, is_repeat, error_code, error_message, attempts, enqueued_at,
                          email_opt_out_applied, merged, workflow, row)),
             r AS (
                 UPDATE conversion_results c SET outcome = v.outcome, contact_action = v.contact_action,
                        account_action = v.account_action, deal_action = v.deal_action, contact_id = v.contact_id,
                        account_id = v.account_id, deal_id = v.deal_id, is_repeat = v.is_repeat,
                        error_code = v.error_code, error_message = v.error_message,
                        attempts = c.attempts + v.attempts, duration_ms = $17,
                        enqueued_at = coalesce(v.enqueued_at, c.enqueued_at),
                        email_opt_out_applied = v.email_opt_out_applied, finished_at = now()
                 FROM v WHERE c.ctid = v.row AND c.lead_id = v.lead_id AND c.outcome = 'pending'
                 RETURNING c.*, v.merged, v.workflow),
             counted AS (
                 INSERT INTO conversion_job_counters AS c (job_id, shard, converted, merged, skipped, failed)
                 SELECT job_id, pg_backend_pid(), count(*) FILTER (WHERE outcome IN ('converted', 'undone')),
                        count(*) FILTER (WHERE merged), count(*) FILTER (WHERE outcome = 'skipped'),
                        count(*) FILTER (WHERE outcome = 'failed')
                 FROM r GROUP BY job_id
                 ON CONFLICT (job_id, shard) DO UPDATE SET
                     converted = c.converted + excluded.converted, merged = c.merged + excluded.merged,
                     skipped = c.skipped + excluded.skipped, failed = c.failed + excluded.failed, last_at = now())
             SELECT {RESULT_COLUMNS}, CASE WHEN workflow THEN pg_notify($19, job_id::text) END AS notified FROM r
             ORDER BY lead_id"
        )
    });
    // The rows are found where `lock_results` found them (`ctid`, stable
    // while they are locked): a plan that reads just them, whatever the
    // statistics say. By key, the planner (expecting one pending row for
    // a job its statistics did not know yet) hashed every pending row of
    // the job for each batch: a cost that grew with the job (165-450 ms a
    // batch at 100,000 leads); statistics that know the job instead make
    // other statements scan it for each one-lead job. No condition on
    // `job_id` for that reason (the places are this job's locked rows): it
    // would let the planner pick the job's index again: each row of `v`
    // finds its result row by its place.
    let duration_ms = started.map(|s| i32::try_from(s.elapsed().as_millis()).unwrap_or(i32::MAX));
    let col = |f: &dyn Fn(&Finish) -> Option<&'static str>| done.iter().map(|d| f(d.finish)).collect::<Vec<_>>();
    let id = |f: &dyn Fn(&Finish) -> Option<i64>| done.iter().map(|d| f(d.finish)).collect::<Vec<_>>();
    sqlx::query_as(SQL.as_str())
        .bind(done.iter().map(|d| d.job_id).collect::<Vec<_>>())
        .bind(done.iter().map(|d| d.lead_id).collect::<Vec<_>>())
        .bind(col(&|f| Some(f.outcome.as_str())))
        .bind(col(&|f| f.contact_action.map(|a| a.as_str())))
        .bind(col(&|f| f.account_action.map(|a| a.as_str())))
        .bind(col(&|f| f.deal_action.map(|a| a.as_str())))
        .bind(id(&|f| f.ids.contact_id))
        .bind(id(&|f| f.ids.account_id))
        .bind(id(&|f| f.ids.deal_id))
        .bind(done.iter().map(|d| d.finish.is_repeat).collect::<Vec<_>>())
        .bind(col(&|f| f.error.as_ref().map(|(c, _)| c.as_str())))
        .bind(
            done.iter()
                .map(|d| d.finish.error.as_ref().map(|(_, m)| m.clone()).or_else(|| d.finish.note.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(done.iter().map(|d| i32::try_from(d.tries).unwrap_or(i32::MAX)).collect::<Vec<_>>())
        .bind(done.iter().map(|d| d.enqueued_at).collect::<Vec<_>>())
        .bind(done.iter().map(|d| d.finish.email_opt_out_applied).collect::<Vec<_>>())
        .bind(done.iter().map(|d| d.finish.merged).collect::<Vec<_>>())
        .bind(duration_ms)
        .bind(done.iter().map(|d| d.workflow).collect::<Vec<_>>())
        .bind(crate::store::finished::CHANNEL)
        .bind(done.iter().map(|d| d.row).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await
}

/// Leads a dry run reads facts for at once.
const DRY_RUN_CHUNK: usize = 500;

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
    let today = Utc::now().date_naive();
    let mut run = Run::new(settings);
    for chunk in leads.chunks(DRY_RUN_CHUNK) {
        let facts = snapshot::load_batch(&mut tx, settings, chunk, Locking::None).await?;
        for plan in plan_in_order(&mut tx, settings, &mut run, facts, today).await? {
            each(plan).map_err(|e| Error::Database(sqlx::Error::Io(e)))?;
        }
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
