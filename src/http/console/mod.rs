//! The console: web pages on `serve` where an admin watches jobs move,
//! reads which leads failed and why, retries or cancels, previews a dry
//! run, and switches rules and schedules on and off (SPEC §5).
//!
//! Server-rendered HTML (maud escapes every value it prints, so a lead
//! named `<script>` is text), one small script for live numbers, no build
//! step. Security, the same as the API's and then some:
//! - sign-in exchanges an API token for a session cookie (`HttpOnly`,
//!   `SameSite=Strict`, `Secure` behind TLS); the token's user acts, with
//!   the token's scope, until the token expires at the latest;
//! - every page and form asks the API's permission check
//!   ([`super::access::Gate`]): a user sees the jobs, rules and schedules of
//!   their reach, buttons they may not use are not shown, and their forms
//!   are refused anyway;
//! - every state-changing form carries the session's CSRF token;
//! - every answer carries a `Content-Security-Policy` that allows only
//!   this origin's script and style, and no framing.

mod pages;

use axum::extract::{Form, FromRequestParts, Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::access::Gate;
use super::AppState;
use crate::automation::{self, rules::Rule, schedule::Schedule, Automation};
use crate::report::{spreadsheet_safe, PlanSummary, Progress};
use crate::store::auth::{self, Session};
use crate::store::console::{self as store, ResultFilter};
use crate::store::convert;
use crate::store::job::{self, JobStatus, NewJob, Trigger};
use crate::store::types::Outcome;
use leadconv_domain::access::Act;
use pages::Viewer;

/// The session cookie's name.
const COOKIE: &str = "leadconv_session";
/// Results per page on a job's page.
const PAGE: i64 = 50;
/// Plans shown by a dry-run preview.
const PREVIEW_PLANS: usize = 50;

/// Only this origin's script and style; no inline script, no framing, forms
/// post only here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(jobs_page))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/jobs", post(create_job))
        .route("/console/jobs/{job_id}", get(job_page))
        .route("/console/jobs/{job_id}/results.csv", get(results_csv))
        .route("/console/jobs/{job_id}/cancel", post(cancel))
        .route("/console/jobs/{job_id}/retry", post(retry))
        .route("/console/jobs/{job_id}/undo", get(undo_page).post(undo))
        .route("/console/records/{module}/{id}/history", get(history_page))
        .route("/console/preview", get(preview_page).post(preview))
        .route("/console/automation", get(automation_page))
        .route("/console/rules/{id}/{switch}", post(switch::<Rule>))
        .route("/console/schedules/{id}/{switch}", post(switch::<Schedule>))
        .route("/console/app.js", get(|| async { asset("text/javascript", include_str!("app.js")) }))
        .route("/console/app.css", get(|| async { asset("text/css", include_str!("app.css")) }))
        .layer(axum::middleware::from_fn(security_headers))
}

/// The console's routes, for the route list the OpenAPI test compares.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/console"),
    ("GET", "/console/login"),
    ("POST", "/console/login"),
    ("POST", "/console/logout"),
    ("POST", "/console/jobs"),
    ("GET", "/console/jobs/{job_id}"),
    ("GET", "/console/jobs/{job_id}/results.csv"),
    ("POST", "/console/jobs/{job_id}/cancel"),
    ("POST", "/console/jobs/{job_id}/retry"),
    ("GET", "/console/jobs/{job_id}/undo"),
    ("POST", "/console/jobs/{job_id}/undo"),
    ("GET", "/console/records/{module}/{id}/history"),
    ("GET", "/console/preview"),
    ("POST", "/console/preview"),
    ("GET", "/console/automation"),
    ("POST", "/console/rules/{id}/{switch}"),
    ("POST", "/console/schedules/{id}/{switch}"),
    ("GET", "/console/app.js"),
    ("GET", "/console/app.css"),
];

async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// A page, or why there is none.
type Page = Result<Response, Problem>;

/// What went wrong, as a page.
pub enum Problem {
    /// No session cookie: sign in first.
    SignIn,
    /// A session cookie that names no live session: 401, and the cookie
    /// is cleared.
    StaleSession,
    /// A page with a status and a message.
    Status(StatusCode, String),
}

/// Clears the session cookie in the browser.
const CLEAR_COOKIE: &str = "leadconv_session=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0";

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        match self {
            Problem::SignIn => Redirect::to("/console/login").into_response(),
            Problem::StaleSession => {
                let message = "this session is not valid (expired, signed out, or its token revoked): sign in again";
                let page = pages::problem(StatusCode::UNAUTHORIZED, message);
                (StatusCode::UNAUTHORIZED, [(header::SET_COOKIE, CLEAR_COOKIE)], page).into_response()
            }
            Problem::Status(status, message) => (status, pages::problem(status, &message)).into_response(),
        }
    }
}

impl From<crate::Error> for Problem {
    fn from(e: crate::Error) -> Problem {
        let api = super::ApiError::from(e);
        Problem::Status(api.status, format!("{} ({})", api.message, api.code))
    }
}

impl From<super::ApiError> for Problem {
    fn from(api: super::ApiError) -> Problem {
        Problem::Status(api.status, format!("{} ({})", api.message, api.code))
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Problem {
        crate::Error::from(e).into()
    }
}

/// The signed-in user: from the session cookie, with the permission check
/// every page and form asks. No cookie: a redirect to the sign-in page; a
/// cookie that names no live session (forged, expired, its token revoked
/// or expired): 401; an inactive user: 403.
pub struct Console {
    pub viewer: Viewer,
    pub gate: Gate,
}

impl FromRequestParts<AppState> for Console {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let Some(cookie) = session_cookie(&parts.headers) else { return Err(Problem::SignIn) };
        let Some(session) = auth::session(&state.pool, &cookie).await? else { return Err(Problem::StaleSession) };
        let note = parts.extensions.get::<std::sync::Arc<super::AccessNote>>().cloned();
        let gate = Gate::new(state.pool.clone(), session.user.clone(), note);
        gate.allow(Act::SignIn, missing_job).await?;
        let viewer = Viewer {
            may_create_jobs: gate.may(Act::CreateJob).await?,
            may_change_automation: gate.may(Act::CreateAutomation).await?,
            session,
        };
        Ok(Console { viewer, gate })
    }
}

/// The page for a job that does not exist or that the viewer does not
/// reach: one and the same.
fn missing_job() -> super::ApiError {
    crate::Error::from(job::not_found()).into()
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

fn defused(mut row: store::ResultRow) -> store::ResultRow {
    row.lead_name = row.lead_name.map(spreadsheet_safe);
    row.email = row.email.map(spreadsheet_safe);
    row.company = row.company.map(spreadsheet_safe);
    row.error_message = row.error_message.map(spreadsheet_safe);
    row
}

/// Refuses a form whose CSRF token is not the session's (compared in
/// constant time).
fn check_csrf(session: &Session, sent: &str) -> Result<(), Problem> {
    let (a, b) = (session.csrf_token.as_bytes(), sent.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(Problem::Status(StatusCode::FORBIDDEN, "the form's CSRF token is missing or wrong: reload the page".into()))
    }
}

/// Behind a TLS-terminating proxy the cookie is `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

// --- sign-in -------------------------------------------------------------

async fn login_page() -> Response {
    pages::login(None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// A sign-in posted from another site is refused: it has no session to
/// carry a CSRF token yet, so the browser's `Origin` (sent with every POST)
/// must be this host. Without the check a page elsewhere could sign a
/// visitor in as the attacker's user.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // Browsers of this decade say where a request comes from, whatever a
    // proxy does to the Host header.
    if let Some(site) = text("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    let Some(origin) = text("origin") else {
        return true; // not a browser: nothing to protect
    };
    let host = text("x-forwarded-host").or(text("host")).unwrap_or("");
    origin.split_once("://").is_some_and(|(_, rest)| rest == host)
}

async fn login(State(s): State<AppState>, headers: HeaderMap, Form(f): Form<LoginForm>) -> Page {
    if !same_origin(&headers) {
        return Err(Problem::Status(StatusCode::FORBIDDEN, "a sign-in from another site is refused".into()));
    }
    let token = f.token.trim();
    let Some(user) = auth::sign_in_user(&s.pool, token).await? else {
        return Ok((StatusCode::UNAUTHORIZED, pages::login(Some("unknown, revoked or expired token"))).into_response());
    };
    if let leadconv_domain::access::Verdict::Forbidden(why) =
        leadconv_domain::access::decide(&user.caller(), &leadconv_domain::access::Reach::Everyone, Act::SignIn)
    {
        return Ok((StatusCode::FORBIDDEN, pages::login(Some(why.message()))).into_response());
    }
    let Some((cookie, _)) = auth::open_session(&s.pool, token).await? else {
        return Ok((StatusCode::UNAUTHORIZED, pages::login(Some("unknown, revoked or expired token"))).into_response());
    };
    let secure = if over_tls(&headers) { "; Secure" } else { "" };
    let max_age = (auth::SESSION_HOURS * 3600.0) as u64;
    let set = format!("{COOKIE}={cookie}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    let mut res = see_other("/console");
    res.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&set).expect("a cookie is ASCII"));
    Ok(res)
}

/// A form's CSRF token; a form without one gets the 403 a wrong one gets.
#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(s): State<AppState>, c: Console, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    if let Some(cookie) = session_cookie(&headers) {
        auth::sign_out(&s.pool, &cookie).await?;
    }
    let mut res = see_other("/console/login");
    res.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
    Ok(res)
}

// --- jobs ----------------------------------------------------------------

#[derive(Deserialize, Default)]
struct JobsQuery {
    status: Option<String>,
    trigger: Option<String>,
}

fn parse_filter<T: Copy>(raw: Option<&str>, what: &str, parse: fn(&str) -> Option<T>) -> Result<Option<T>, Problem> {
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .ok_or_else(|| Problem::Status(StatusCode::BAD_REQUEST, format!("{what} {v:?} is not one of the choices"))),
    }
}

async fn jobs_page(State(s): State<AppState>, c: Console, Query(q): Query<JobsQuery>) -> Page {
    c.gate.allow(Act::ListJobs, missing_job).await?;
    let status = parse_filter(q.status.as_deref(), "status", JobStatus::parse)?;
    let trigger = parse_filter(q.trigger.as_deref(), "trigger", Trigger::parse)?;
    let reach = c.gate.reach().await?.users();
    let jobs = job::list(&s.pool, status, trigger, reach.as_deref(), 100, 0).await?;
    let names = names_of(&s, &jobs).await?;
    let progress: Vec<Progress> = jobs.into_iter().map(Progress::of).collect();
    Ok(pages::jobs(&c.viewer, &progress, &names, status, trigger).into_response())
}

async fn names_of(s: &AppState, jobs: &[job::Job]) -> Result<store::Names, Problem> {
    let users: Vec<i64> = jobs.iter().map(|j| j.requested_by).collect();
    let rules: Vec<i64> = jobs.iter().filter_map(|j| j.rule_id).collect();
    let schedules: Vec<i64> = jobs.iter().filter_map(|j| j.schedule_id).collect();
    Ok(store::names(&s.pool, &users, &rules, &schedules).await?)
}

#[derive(Deserialize, Default)]
struct ResultsQuery {
    outcome: Option<String>,
    code: Option<String>,
    after: Option<i64>,
}

impl ResultsQuery {
    fn filter(&self) -> Result<ResultFilter, Problem> {
        Ok(ResultFilter {
            outcome: parse_filter(self.outcome.as_deref(), "outcome", Outcome::parse)?,
            code: self.code.clone().filter(|c| !c.is_empty()),
        })
    }
}

/// The job `raw` names, if the viewer may do `act` (given its requester) to it.
async fn load_job(s: &AppState, gate: &Gate, raw: &str, act: fn(i64) -> Act) -> Result<job::Job, Problem> {
    let id: Uuid =
        raw.parse().map_err(|_| Problem::Status(StatusCode::BAD_REQUEST, format!("{raw:?} is not a job id")))?;
    let job = job::get(&s.pool, id).await?.ok_or_else(missing_job)?;
    gate.allow(act(job.requested_by), missing_job).await?;
    Ok(job)
}

fn read_job(requested_by: i64) -> Act {
    Act::ReadJob { requested_by }
}

fn steer_job(requested_by: i64) -> Act {
    Act::SteerJob { requested_by }
}

async fn job_page(
    State(s): State<AppState>,
    c: Console,
    Path(raw): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Page {
    let job = load_job(&s, &c.gate, &raw, read_job).await?;
    let may_steer = c.gate.may(steer_job(job.requested_by)).await?;
    let filter = q.filter()?;
    let after = q.after.unwrap_or(0).max(0);
    let rows: Vec<store::ResultRow> = store::results(&s.pool, job.id, &filter, after, Some(PAGE)).try_collect().await?;
    let next = (rows.len() as i64 == PAGE).then(|| rows.last().map(|r| r.lead_id)).flatten();
    let failures = store::failures_by_code(&s.pool, job.id).await?;
    let names = names_of(&s, std::slice::from_ref(&job)).await?;
    let record_url = s.record_url.clone();
    let view = pages::JobView {
        progress: Progress::of(job),
        names,
        failures,
        rows,
        filter,
        after,
        next,
        record_url,
        may_steer,
    };
    Ok(pages::job(&c.viewer, &view).into_response())
}

async fn results_csv(
    State(s): State<AppState>,
    c: Console,
    Path(raw): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Page {
    let job = load_job(&s, &c.gate, &raw, read_job).await?;
    let filter = q.filter()?;
    // Streamed: a million-lead job's export never sits in memory.
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let (pool, job_id) = (s.pool.clone(), job.id);
    tokio::spawn(async move {
        use futures::SinkExt;
        // The header is written by hand: serde writes one only with a first row.
        let mut out = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
        let mut rows = store::results(&pool, job_id, &filter, 0, None);
        let mut in_chunk = 0;
        let mut failed = out.write_record(store::RESULT_CSV_COLUMNS).err().map(std::io::Error::other);
        while failed.is_none() {
            match rows.try_next().await {
                Ok(Some(row)) => {
                    if let Err(e) = out.serialize(defused(row)) {
                        failed = Some(std::io::Error::other(e));
                    }
                    in_chunk += 1;
                    if in_chunk < 500 {
                        continue;
                    }
                }
                Ok(None) => break,
                Err(e) => failed = Some(std::io::Error::other(e)),
            }
            let full =
                std::mem::replace(&mut out, csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new()));
            in_chunk = 0;
            match full.into_inner() {
                Ok(bytes) => {
                    if tx.send(Ok(bytes)).await.is_err() {
                        return; // the client went away
                    }
                }
                Err(e) => failed = Some(std::io::Error::other(e.to_string())),
            }
        }
        let last = match failed {
            Some(e) => Err(e),
            None => out.into_inner().map_err(|e| std::io::Error::other(e.to_string())),
        };
        let _ = tx.send(last).await;
    });
    let body = axum::body::Body::from_stream(rx);
    let disposition = format!("attachment; filename=\"job-{}-results.csv\"", job.id);
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8")),
            (header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).expect("ASCII")),
        ],
        body,
    )
        .into_response())
}

async fn cancel(State(s): State<AppState>, c: Console, Path(raw): Path<String>, Form(f): Form<CsrfForm>) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    let job = load_job(&s, &c.gate, &raw, steer_job).await?;
    job::cancel(&s.pool, job.id).await?;
    Ok(see_other(&format!("/console/jobs/{}", job.id)))
}

#[derive(Deserialize)]
struct RetryForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
}

async fn retry(State(s): State<AppState>, c: Console, Path(raw): Path<String>, Form(f): Form<RetryForm>) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    let earlier = load_job(&s, &c.gate, &raw, steer_job).await?;
    let of = job::RetryOf {
        job_id: earlier.id,
        outcome: Outcome::Failed,
        code: Some(f.code).filter(|code| !code.is_empty()),
    };
    let created = s.enqueuer.retry(&of, c.gate.user_id(), Trigger::Manual).await?;
    Ok(see_other(&format!("/console/jobs/{}", created.id)))
}

/// Undo lines a confirmation page shows.
const UNDO_LINES: usize = 50;

/// The undo's dry run, to confirm: what taking the job's conversions back
/// would do, lead by lead (the first of them), and a button that does it.
async fn undo_page(State(s): State<AppState>, c: Console, Path(raw): Path<String>) -> Page {
    let converted = load_job(&s, &c.gate, &raw, steer_job).await?;
    let of = job::UndoOf { job_id: converted.id, lead_ids: None };
    let (status, shown) = match crate::store::undo::dry_run(&s.pool, &of).await {
        Ok(verdicts) => {
            let lines = verdicts.iter().take(UNDO_LINES).map(|(l, v)| crate::report::undo_line(*l, v)).collect();
            (StatusCode::OK, Ok((crate::report::undo_summary(&verdicts), lines)))
        }
        Err(crate::Error::Refused(r)) => (StatusCode::CONFLICT, Err(r.to_string())),
        Err(e) => return Err(e.into()),
    };
    Ok((status, pages::undo(&c.viewer, &Progress::of(converted), shown)).into_response())
}

async fn undo(State(s): State<AppState>, c: Console, Path(raw): Path<String>, Form(f): Form<CsrfForm>) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    let converted = load_job(&s, &c.gate, &raw, steer_job).await?;
    let of = job::UndoOf { job_id: converted.id, lead_ids: None };
    let created = s.enqueuer.undo(&of, c.gate.user_id(), Trigger::Manual).await?;
    Ok(see_other(&format!("/console/jobs/{}", created.id)))
}

/// A record's history: the conversions and undos of the jobs the viewer sees.
async fn history_page(State(s): State<AppState>, c: Console, Path((module, id)): Path<(String, i64)>) -> Page {
    c.gate.allow(Act::ListJobs, missing_job).await?;
    let m = crate::record::Module::parse(&module)
        .ok_or_else(|| Problem::Status(StatusCode::NOT_FOUND, format!("no module {module:?}")))?;
    let reach = c.gate.reach().await?.users();
    let events = crate::store::history::of(&s.pool, m, id, reach.as_deref()).await?;
    Ok(pages::history(&c.viewer, m, id, &events).into_response())
}

// --- preview and create --------------------------------------------------

#[derive(Deserialize, Default)]
pub struct JobForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    criteria: String,
    #[serde(default)]
    options: String,
}

async fn preview_page(c: Console) -> Page {
    c.gate.allow(Act::CreateJob, missing_job).await?;
    let form = JobForm {
        criteria: r#"{"field": "lead_status", "op": "eq", "value": "Qualified"}"#.into(),
        options: "{}".into(),
        ..Default::default()
    };
    Ok(pages::preview(&c.viewer, &form, None, None).into_response())
}

/// The form's criteria and options as a job to check, or what is wrong.
fn new_job(session: &Session, f: &JobForm) -> Result<NewJob, String> {
    let parse = |what: &str, text: &str| -> Result<Value, String> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        serde_json::from_str(text).map_err(|e| format!("{what}: not JSON ({e})"))
    };
    Ok(NewJob {
        criteria: parse("criteria", &f.criteria)?,
        options: parse("options", &f.options)?,
        requested_by: session.user_id,
        trigger: Trigger::Manual,
    })
}

async fn preview(State(s): State<AppState>, c: Console, Form(f): Form<JobForm>) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    c.gate.allow(Act::CreateJob, missing_job).await?;
    let refused = |message: String| {
        Ok((StatusCode::UNPROCESSABLE_ENTITY, pages::preview(&c.viewer, &f, Some(&message), None)).into_response())
    };
    let new = match new_job(&c.viewer.session, &f) {
        Ok(n) => n,
        Err(m) => return refused(m),
    };
    let checked = match job::check(&s.pool, new).await {
        Ok(c) => c,
        Err(crate::Error::Refused(r)) => return refused(r.to_string()),
        Err(e) => return Err(e.into()),
    };
    let mut plans = Vec::new();
    let mut summary = PlanSummary::default();
    let total = convert::dry_run(&s.pool, &checked.settings, &checked.criteria, |p| {
        summary.add(&p);
        if plans.len() < PREVIEW_PLANS {
            plans.push(crate::report::plan_line(&p));
        }
        Ok(())
    })
    .await?;
    let unmapped = crate::report::unmapped_line(&checked.settings);
    let shown = pages::Preview { total, summary: summary.to_string(), plans, unmapped };
    Ok(pages::preview(&c.viewer, &f, None, Some(&shown)).into_response())
}

async fn create_job(State(s): State<AppState>, c: Console, Form(f): Form<JobForm>) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    c.gate.allow(Act::CreateJob, missing_job).await?;
    let new = new_job(&c.viewer.session, &f).map_err(|m| Problem::Status(StatusCode::UNPROCESSABLE_ENTITY, m))?;
    let checked = job::check(&s.pool, new).await?;
    let created = s.enqueuer.submit(&checked).await?;
    Ok(see_other(&format!("/console/jobs/{}", created.id)))
}

// --- rules and schedules -------------------------------------------------

async fn automation_page(State(s): State<AppState>, c: Console) -> Page {
    c.gate.allow(Act::ListAutomations, missing_job).await?;
    let reach = c.gate.reach().await?.users();
    let rules = automation::list::<Rule>(&s.pool, reach.as_deref()).await?;
    let schedules = automation::list::<Schedule>(&s.pool, reach.as_deref()).await?;
    let rule_runs = job::origin_runs(&s.pool, false).await?;
    let schedule_runs = job::origin_runs(&s.pool, true).await?;
    Ok(pages::automation(&c.viewer, &rules, &rule_runs, &schedules, &schedule_runs).into_response())
}

async fn switch<T: Automation>(
    State(s): State<AppState>,
    c: Console,
    Path((id, switch)): Path<(i64, String)>,
    Form(f): Form<CsrfForm>,
) -> Page {
    check_csrf(&c.viewer.session, &f.csrf)?;
    let enabled = match switch.as_str() {
        "enable" => true,
        "disable" => false,
        other => return Err(Problem::Status(StatusCode::NOT_FOUND, format!("no action {other:?}"))),
    };
    let missing = || super::ApiError::from(automation::not_found::<T>(id));
    let found = automation::get::<T>(&s.pool, id).await?;
    c.gate.allow(Act::ChangeAutomation { acting_user: found.acting_user() }, missing).await?;
    automation::set_enabled::<T>(&s.pool, id, enabled).await?;
    Ok(see_other("/console/automation"))
}
