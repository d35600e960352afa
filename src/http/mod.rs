//! The HTTP API (`leadconv serve`): a thin edge over jobs, conversion and
//! their checks. Every error is JSON `{"error": {"code", "message",
//! "field"}}` with a 4xx status for anything the caller can fix; bodies,
//! paths and queries are parsed here so that no malformed input reaches a
//! handler, and none produces a 500.

pub mod access;
mod automation;
pub mod console;
mod jobs;
pub mod listener;
pub mod serve;

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;

use crate::automation::rules::Rule;
use crate::automation::schedule::Schedule;
use crate::error::Error;
use crate::queue::enqueue::Enqueuer;
use crate::store::auth;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// How much of an oversized body is read and thrown away before answering.
const DRAIN_LIMIT: usize = 64 << 20;

/// The OpenAPI document, kept in the repository and served as is.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route served, as (method, path template): checked against the
/// OpenAPI document by a test.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/results"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("POST", "/v1/jobs/{job_id}/retry"),
    ("POST", "/v1/jobs/{job_id}/undo"),
    ("POST", "/v1/leads/{lead_id}/convert"),
    ("GET", "/v1/records/{module}/{id}/history"),
    ("GET", "/v1/rules"),
    ("POST", "/v1/rules"),
    ("GET", "/v1/rules/{rule_id}"),
    ("DELETE", "/v1/rules/{rule_id}"),
    ("POST", "/v1/rules/{rule_id}/enable"),
    ("POST", "/v1/rules/{rule_id}/disable"),
    ("GET", "/v1/schedules"),
    ("POST", "/v1/schedules"),
    ("GET", "/v1/schedules/{schedule_id}"),
    ("DELETE", "/v1/schedules/{schedule_id}"),
    ("POST", "/v1/schedules/{schedule_id}/enable"),
    ("POST", "/v1/schedules/{schedule_id}/disable"),
];

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Convert-now requests waiting for their job, woken on commit.
    pub finished: Arc<crate::store::finished::Waiters>,
    pub enqueuer: Arc<Enqueuer>,
    pub metrics: PrometheusHandle,
    /// Where the CRM shows a record, `{module}` and `{id}` filled in: the
    /// console links the contacts, accounts and deals a job made to it.
    pub record_url: Option<Arc<str>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{job_id}", get(jobs::read))
        .route("/v1/jobs/{job_id}/results", get(jobs::results))
        .route("/v1/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{job_id}/retry", post(jobs::retry))
        .route("/v1/jobs/{job_id}/undo", post(jobs::undo))
        .route("/v1/leads/{lead_id}/convert", post(jobs::convert_lead))
        .route("/v1/records/{module}/{id}/history", get(jobs::history))
        .route("/v1/rules", get(automation::list::<Rule>).post(automation::create_rule))
        .route("/v1/rules/{rule_id}", get(automation::read::<Rule>).delete(automation::delete::<Rule>))
        .route("/v1/rules/{rule_id}/enable", post(automation::enable::<Rule>))
        .route("/v1/rules/{rule_id}/disable", post(automation::disable::<Rule>))
        .route("/v1/schedules", get(automation::list::<Schedule>).post(automation::create_schedule))
        .route("/v1/schedules/{schedule_id}", get(automation::read::<Schedule>).delete(automation::delete::<Schedule>))
        .route("/v1/schedules/{schedule_id}/enable", post(automation::enable::<Schedule>))
        .route("/v1/schedules/{schedule_id}/disable", post(automation::disable::<Schedule>))
        .merge(console::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "",
                "this route does not take that method",
            )
        })
        .route_layer(axum::middleware::from_fn(note_route))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(access_log))
        .with_state(state)
}

/// What the access log line says of a request beyond its method and status,
/// filled in as the request is routed and authenticated.
#[derive(Default)]
pub(crate) struct AccessNote {
    /// The route template (`/v1/jobs/{job_id}`), not the path: no ids in logs.
    route: std::sync::OnceLock<String>,
    /// The user the bearer token (or console session) stands for.
    user: std::sync::OnceLock<i64>,
    /// Why the request was denied, when it was (SPEC §5): denials are
    /// logged with the user.
    denied: std::sync::OnceLock<&'static str>,
}

/// One log line per request: method, route, status, latency, user id, and
/// the reason of a denial. Never the token, the query or the body.
async fn access_log(mut req: Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let note = Arc::new(AccessNote::default());
    req.extensions_mut().insert(note.clone());
    let res = next.run(req).await;
    tracing::info!(
        target: "leadconv::access",
        method = %method,
        route = note.route.get().map_or("(no route)", String::as_str),
        status = res.status().as_u16(),
        latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        user_id = note.user.get().copied(),
        denied = note.denied.get().copied(),
        "request"
    );
    res
}

async fn note_route(req: Request, next: axum::middleware::Next) -> Response {
    if let (Some(note), Some(route)) =
        (req.extensions().get::<Arc<AccessNote>>(), req.extensions().get::<axum::extract::MatchedPath>())
    {
        let _ = note.route.set(route.as_str().to_owned());
    }
    next.run(req).await
}

async fn readyz(axum::extract::State(s): axum::extract::State<AppState>) -> Response {
    // Ready only on a writable database that matches correctly and has
    // this binary's schema: on a standby or an unmigrated one every
    // conversion would fail.
    let checked = async {
        crate::store::db::require_writable(&s.pool).await?;
        crate::store::db::check_matching_locale(&s.pool).await?;
        crate::store::db::require_schema(&s.pool).await
    };
    let (db, problem) = match checked.await {
        Ok(()) => (true, None),
        Err(e) => (false, Some(format!("{e:#}"))),
    };
    let broker = s.enqueuer.broker_reachable().await;
    let status = if db && broker { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({"postgres": db, "rabbitmq": broker});
    if let Some(p) = problem {
        body["postgres_problem"] = p.into();
    }
    (status, Json(body)).into_response()
}

async fn metrics(axum::extract::State(s): axum::extract::State<AppState>) -> Response {
    if let Err(e) = crate::metrics::refresh_gauges(&s.pool, None).await {
        tracing::warn!(error = %e, "could not refresh job gauges");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

/// An error answer: status, stable code, the field at fault, a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, field: &str, message: impl Into<String>) -> ApiError {
        ApiError { status, code: code.into(), field: field.into(), message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        (self.status, Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        match e {
            Error::Refused(r) => {
                let (http, _) = crate::error::answer(r.code);
                let status = StatusCode::from_u16(http).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
                ApiError::new(status, r.code.as_str(), &r.field, r.message)
            }
            Error::Transient(e) => {
                tracing::warn!(error = %e, "transient error answering a request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "",
                    "the database is unavailable; try again",
                )
            }
            Error::Database(e) => {
                tracing::error!(error = %e, "database error answering a request");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "", "internal error")
            }
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        Error::from(e).into()
    }
}

/// A JSON body parsed strictly: size-limited, UTF-8, every field of the
/// right type, unknown fields refused, with the path of the first problem.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        // Read the body ourselves: an oversized one is read to its end (up to
        // a hard cap) before the 413 goes out, so the client, still sending,
        // gets the answer instead of a broken connection.
        use futures::StreamExt;
        let mut stream = req.into_body().into_data_stream();
        let (mut body, mut seen) = (Vec::new(), 0usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "", e.to_string()))?;
            seen += chunk.len();
            if seen <= MAX_BODY {
                body.extend_from_slice(&chunk);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        if seen > MAX_BODY {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "",
                format!("bodies are limited to {MAX_BODY} bytes"),
            ));
        }
        let bytes = body;
        // An empty body means "no options": `{}`.
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        if let Err(e) = std::str::from_utf8(bytes) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "",
                format!("the body is not UTF-8: {e}"),
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let value = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // Not JSON at all, or JSON of the wrong shape?
            let code = if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
                "invalid_json"
            } else {
                "invalid_body"
            };
            ApiError::new(StatusCode::BAD_REQUEST, code, if path == "." { "" } else { &path }, inner.to_string())
        })?;
        Ok(Body(value))
    }
}

/// Query parameters parsed with a JSON error on failure.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "", e.body_text()))
    }
}

/// The caller, from `Authorization: Bearer <token>`: every handler asks it
/// ([`access::Gate::allow`]) before it reads or changes anything. A missing,
/// unknown, revoked or expired token is a 401; an inactive user a 403.
pub struct Access(pub access::Gate);

impl FromRequestParts<AppState> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let note = parts.extensions.get::<Arc<AccessNote>>().cloned();
        let unauthorized = |m: &str| {
            if let Some(n) = &note {
                let _ = n.denied.set("unauthenticated");
            }
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "authorization", m)
        };
        let Some(header) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("missing Authorization: Bearer <token>"));
        };
        let Some(token) =
            header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|t| !t.is_empty())
        else {
            return Err(unauthorized("expected Authorization: Bearer <token>"));
        };
        let Some(user) = auth::lookup(&state.pool, token).await? else {
            return Err(unauthorized("unknown, revoked or expired token"));
        };
        let gate = access::Gate::new(state.pool.clone(), user, note);
        // The least any act asks (an active user), said at once: an inactive
        // user gets 403 on every route, before anything is read.
        gate.allow(leadconv_domain::access::Act::ListJobs, no_object).await?;
        Ok(Access(gate))
    }
}

/// `ListJobs` is about no object, so its denial is never a 404.
fn no_object() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "authorization", "forbidden")
}

/// A path id, with a JSON 400 when it is not one.
pub fn parse_uuid(raw: &str, field: &str) -> Result<uuid::Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", field, format!("{raw:?} is not a UUID")))
}

pub fn parse_i64(raw: &str, field: &str) -> Result<i64, ApiError> {
    raw.parse().ok().filter(|n: &i64| *n > 0).ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", field, format!("{raw:?} is not a positive integer id"))
    })
}
