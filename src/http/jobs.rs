//! `/v1/jobs` and `/v1/leads/{id}/convert`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_i64, parse_uuid, Access, ApiError, AppState, Body, Query};
use crate::report::{PlanSummary, Progress};
use futures::TryStreamExt;
use leadconv_domain::access::Act;

use crate::store::convert::{self, LeadResult};
use crate::store::job::{self, NewJob, Trigger};
use crate::store::types::{JobStatus, Outcome};
use crate::{ErrorCode, Refusal};
use leadconv_domain::plan::Verdict;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    criteria: Value,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    trigger: Option<Trigger>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    #[serde(default)]
    dry_run: bool,
    /// How many plans a dry run returns (the summary covers every lead).
    #[serde(default)]
    limit: Option<usize>,
}

/// `POST /v1/jobs`: 202 with the job, or with `?dry_run=true` 200 and the plan.
pub async fn create(
    State(s): State<AppState>,
    Access(caller): Access,
    Query(q): Query<CreateQuery>,
    Body(b): Body<CreateJob>,
) -> Result<Response, ApiError> {
    caller.allow(Act::CreateJob, missing).await?;
    let user = caller.user_id();
    let trigger =
        job::check_caller_trigger(b.trigger.unwrap_or(Trigger::Api), &b.criteria, false).map_err(crate::Error::from)?;
    let new =
        NewJob { criteria: b.criteria, options: b.options.unwrap_or_else(|| json!({})), requested_by: user, trigger };
    let checked = job::check(&s.pool, new).await?;
    if q.dry_run {
        let limit = q.limit.unwrap_or(100).min(1000);
        let mut plans = Vec::new();
        let mut summary = PlanSummary::default();
        let total = convert::dry_run(&s.pool, &checked.settings, &checked.criteria, |p| {
            summary.add(&p);
            if plans.len() < limit {
                plans.push(p);
            }
            Ok(())
        })
        .await?;
        return Ok(Json(json!({"dry_run": true, "total_count": total, "summary": summary.to_string(), "plans": plans,
                   "unmapped_custom_fields": crate::report::unmapped_fields(&checked.settings)}))
        .into_response());
    }
    let created = s.enqueuer.submit(&checked).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": created.id, "status": created.status, "total_count": created.total_count})),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryJob {
    /// `failed` (default) or `skipped`.
    #[serde(default)]
    outcome: Option<Outcome>,
    /// Only the leads that ended with this error code.
    #[serde(default)]
    code: Option<String>,
}

/// `POST /v1/jobs/{id}/retry`: the failed (or skipped) leads of a job,
/// still unconverted, as a new job with its options and its acting user,
/// asked for by the caller (`asked_by`) and naming the first (`retry_of`).
pub async fn retry(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
    Body(b): Body<RetryJob>,
) -> Result<Response, ApiError> {
    let earlier = visible(&s, &caller, &raw, |requested_by| Act::SteerJob { requested_by }).await?;
    let of = job::RetryOf { job_id: earlier.id, outcome: b.outcome.unwrap_or(Outcome::Failed), code: b.code };
    let created = s.enqueuer.retry(&of, caller.user_id(), Trigger::Api).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": created.id, "status": created.status, "total_count": created.total_count, "retry_of": of.job_id})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    trigger: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    offset: Option<i64>,
}

fn bounded(v: Option<i64>, default: i64, max: i64, field: &str) -> Result<i64, ApiError> {
    match v {
        None => Ok(default),
        Some(n) if (0..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            field,
            format!("{n} is not between 0 and {max}"),
        )),
    }
}

/// A query filter that must name one of `all` (a status, trigger, outcome).
fn one_of<T: Copy + std::fmt::Display>(
    raw: Option<&str>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    all: &[T],
) -> Result<Option<T>, ApiError> {
    match raw {
        None => Ok(None),
        Some(v) => parse(v).map(Some).ok_or_else(|| {
            let names: Vec<String> = all.iter().map(T::to_string).collect();
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                field,
                format!("{v:?} is not one of {}", names.join(", ")),
            )
        }),
    }
}

/// `GET /v1/jobs`: newest first, filtered, paged; only the jobs whose
/// requester the caller reaches.
pub async fn list(
    State(s): State<AppState>,
    Access(caller): Access,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.allow(Act::ListJobs, missing).await?;
    let status = one_of(q.status.as_deref(), "status", JobStatus::parse, JobStatus::ALL)?;
    let trigger = one_of(q.trigger.as_deref(), "trigger", Trigger::parse, Trigger::ALL)?;
    let limit = bounded(q.limit, 50, 500, "limit")?;
    let offset = bounded(q.offset, 0, i64::from(i32::MAX), "offset")?;
    let reach = caller.reach().await?.users();
    let jobs = job::list(&s.pool, status, trigger, reach.as_deref(), limit, offset).await?;
    let jobs: Vec<Progress> = jobs.into_iter().map(Progress::of).collect();
    Ok(Json(json!({"jobs": jobs, "limit": limit, "offset": offset})))
}

/// The answer for a job that does not exist or that the caller does not
/// reach: one and the same.
fn missing() -> ApiError {
    crate::Error::from(job::not_found()).into()
}

/// The job `raw` names, if the caller may do `act` (given its requester)
/// to it.
async fn visible(
    s: &AppState,
    caller: &super::access::Gate,
    raw: &str,
    act: fn(i64) -> Act,
) -> Result<job::Job, ApiError> {
    let id = parse_uuid(raw, "job_id")?;
    let job = job::get(&s.pool, id).await?.ok_or_else(missing)?;
    caller.allow(act(job.requested_by), missing).await?;
    Ok(job)
}

fn read_job(requested_by: i64) -> Act {
    Act::ReadJob { requested_by }
}

/// `GET /v1/jobs/{id}`: status, counts, rate, ETA.
pub async fn read(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    Ok(Json(Progress::of(visible(&s, &caller, &raw, read_job).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsQuery {
    outcome: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    /// Results after this lead id (keyset paging: pass `next_after`).
    #[serde(default)]
    after: Option<i64>,
}

/// `GET /v1/jobs/{id}/results`: per-lead results in lead order, paged.
pub async fn results(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    let job = visible(&s, &caller, &raw, read_job).await?;
    let outcome = one_of(q.outcome.as_deref(), "outcome", Outcome::parse, Outcome::ALL)?;
    let limit = bounded(q.limit, 100, 1000, "limit")?;
    let rows: Vec<LeadResult> =
        convert::results_page(&s.pool, job.id, outcome, q.after.unwrap_or(0), Some(limit)).try_collect().await?;
    let next = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.lead_id)).flatten();
    Ok(Json(json!({"results": rows, "next_after": next})))
}

/// `POST /v1/jobs/{id}/cancel`: by its requester, those above them, admins.
pub async fn cancel(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    let job = visible(&s, &caller, &raw, |requested_by| Act::SteerJob { requested_by }).await?;
    Ok(Json(Progress::of(job::cancel(&s.pool, job.id).await?)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConvertLead {
    #[serde(default)]
    options: Option<Value>,
    /// The existing account and contact to convert into, instead of
    /// matching (SPEC §4): merged into as rules 4 and 5 say.
    #[serde(default)]
    account_id: Option<i64>,
    #[serde(default)]
    contact_id: Option<i64>,
    /// How long to wait for the commit before answering 202 (default 5000,
    /// at most 60000).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// How long a convert-now call waits for its turn at least, even one that
/// will not wait for the commit (`timeout_ms: 0`).
const TURN_WAIT_AT_LEAST: Duration = Duration::from_secs(1);

/// `POST /v1/leads/{id}/convert`: a one-lead `workflow` job, converted by
/// this process at once and answered with the result once committed (or
/// 202 when `timeout_ms` runs out first); with `timeout_ms: 0`, left to the
/// workers' priority lane.
pub async fn convert_lead(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
    Body(b): Body<ConvertLead>,
) -> Result<Response, ApiError> {
    caller.allow(Act::ConvertNow, missing).await?;
    let user = caller.user_id();
    let lead_id = parse_i64(&raw, "lead_id")?;
    let timeout = Duration::from_millis(b.timeout_ms.unwrap_or(5000).min(60_000));
    let mut options = b.options.unwrap_or_else(|| json!({}));
    for (key, named) in [("account_id", b.account_id), ("contact_id", b.contact_id)] {
        if let (Some(id), Some(o)) = (named, options.as_object_mut()) {
            o.insert(key.into(), id.into());
        }
    }
    let new = NewJob { criteria: json!({"ids": [lead_id]}), options, requested_by: user, trigger: Trigger::Workflow };
    let Some(turn) = s.enqueuer.convert_now_turn(timeout.max(TURN_WAIT_AT_LEAST)).await else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "",
            "convert-now calls are at this server's limit (serve --convert-now-concurrency) and none ended in time; nothing was written, try again",
        ));
    };
    // Both only read: asked at once, they cost the caller one wait.
    let (converted, checked) = tokio::join!(convert::lead_converted_at(&s.pool, lead_id), job::check(&s.pool, new));
    match converted? {
        None => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "lead_not_found", "lead_id", format!("no lead {lead_id}")))
        }
        Some(Some(at)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_converted",
                "lead_id",
                format!("lead {lead_id} was converted at {at}"),
            ))
        }
        Some(None) => {}
    }
    let checked = checked?;
    if checked.settings.into_contact.is_some() || checked.settings.into_account.is_some() {
        // A named record the lead cannot go into (a matched contact of
        // another account than the one named) refuses the call, as the
        // named records' existence did: planned now, nothing written.
        let mut refusal = None;
        convert::dry_run(&s.pool, &checked.settings, &checked.criteria, |p| {
            if let Verdict::Failed {
                code: code @ (ErrorCode::ContactInOtherAccount | ErrorCode::RecordNotFound),
                message,
            } = p.verdict
            {
                let field = if code == ErrorCode::ContactInOtherAccount { "contact_id" } else { "account_id" };
                refusal = Some(Refusal::new(code, field, message));
            }
            Ok(())
        })
        .await?;
        if let Some(r) = refusal {
            return Err(crate::Error::from(r).into());
        }
    }
    let created = s.enqueuer.create(&checked).await?;
    let pending = || (StatusCode::ACCEPTED, Json(json!({"job_id": created.id, "status": "pending"}))).into_response();
    if created.total_count == 0 {
        // Converted by someone else between the look above and the snapshot.
        return Ok(pending());
    }
    if timeout.is_zero() {
        // The caller will not wait: the workers' workflow lane converts it.
        s.enqueuer.publish(&created).await;
        return Ok(pending());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Registered before the lead can reach a worker (when converting here
    // hands it over), so the worker's notification cannot come first.
    let mut waiting = s.finished.wait(created.id);
    let here = s.enqueuer.convert_here(turn, created.clone(), checked.settings, lead_id);
    tokio::select! {
        // Otherwise handed to the workers (or the task panicked, its job
        // left to the outbox sweeper): their result is waited for below.
        done = here => if let Ok(Some(result)) = done {
            return Ok(Json(result).into_response());
        },
        // Still converting (waiting for a lock): it goes on without us.
        _ = tokio::time::sleep_until(deadline) => return Ok(pending()),
    }
    loop {
        // Woken by the worker's notification on commit (registered before
        // the lead was published, so it cannot come first); the slow poll
        // covers a notification lost while the listener reconnects.
        let poll = tokio::time::sleep(Duration::from_millis(250));
        match waiting.woken.as_mut() {
            Some(rx) => tokio::select! {
                _ = rx => waiting.woken = None,
                _ = poll => {}
                _ = tokio::time::sleep_until(deadline) => {}
            },
            None => tokio::select! {
                _ = poll => {}
                _ = tokio::time::sleep_until(deadline) => {}
            },
        }
        if let Some(r) = convert::finished_result(&s.pool, created.id).await? {
            return Ok(Json(r).into_response());
        }
        if tokio::time::Instant::now() >= deadline {
            // Published (or left to the sweepers): a worker converts it.
            return Ok(pending());
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UndoJob {
    /// Only these leads of the job (default: every lead it converted).
    #[serde(default)]
    lead_ids: Option<Vec<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndoQuery {
    #[serde(default)]
    dry_run: bool,
    /// How many leads' plans a dry run returns (the summary covers all).
    #[serde(default)]
    limit: Option<usize>,
}

/// `POST /v1/jobs/{id}/undo`: takes back the job's conversions as an undo
/// job (SPEC §4a) → 202; `?dry_run=true` → 200 with what each lead's undo
/// would do. By the requester, those above them, admins.
pub async fn undo(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
    Query(q): Query<UndoQuery>,
    Body(b): Body<UndoJob>,
) -> Result<Response, ApiError> {
    let converted = visible(&s, &caller, &raw, |requested_by| Act::SteerJob { requested_by }).await?;
    let of = job::UndoOf { job_id: converted.id, lead_ids: b.lead_ids };
    if q.dry_run {
        let verdicts = crate::store::undo::dry_run(&s.pool, &of).await?;
        let limit = q.limit.unwrap_or(100).min(1000);
        let plans: Vec<Value> = verdicts
            .iter()
            .take(limit)
            .map(|(lead_id, v)| {
                let mut p = serde_json::to_value(v).unwrap_or(Value::Null);
                p["lead_id"] = (*lead_id).into();
                p
            })
            .collect();
        return Ok(Json(json!({
            "dry_run": true,
            "total_count": verdicts.len(),
            "summary": crate::report::undo_summary(&verdicts),
            "plans": plans
        }))
        .into_response());
    }
    let created = s.enqueuer.undo(&of, caller.user_id(), Trigger::Api).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": created.id, "status": created.status, "total_count": created.total_count, "undo_of": converted.id})),
    )
        .into_response())
}

/// `GET /v1/records/{module}/{id}/history`: every conversion and undo that
/// created or changed the record, of the jobs the caller sees.
pub async fn history(
    State(s): State<AppState>,
    Access(caller): Access,
    Path((module, raw)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.allow(Act::ListJobs, missing).await?;
    let m = crate::record::Module::parse(&module).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "module",
            format!("{module:?} is not a module: lead, account, contact or deal"),
        )
    })?;
    let id = parse_i64(&raw, "id")?;
    let reach = caller.reach().await?.users();
    let events = crate::store::history::of(&s.pool, m, id, reach.as_deref()).await?;
    Ok(Json(json!({"module": m.as_str(), "id": id, "events": events})))
}
