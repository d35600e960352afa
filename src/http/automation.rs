//! `/v1/rules` and `/v1/schedules`: conversion rules (workflow triggers) and
//! schedules. They act as the token's user. Creating differs (a schedule
//! has a cron expression); reading, listing, enabling, disabling and
//! deleting are one set of handlers over [`Automation`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_i64, Acting, ApiError, AppState, Body};
use crate::automation::rules::{self, NewRule};
use crate::automation::schedule::{self, NewSchedule};
use crate::automation::{self, Automation};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRule {
    name: String,
    criteria: Value,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// `POST /v1/rules`: 201 with the rule.
pub async fn create_rule(
    State(s): State<AppState>,
    Acting(user): Acting,
    Body(b): Body<CreateRule>,
) -> Result<Response, ApiError> {
    let new = NewRule {
        name: b.name,
        criteria: b.criteria,
        options: b.options.unwrap_or_else(|| json!({})),
        acting_user: user,
        enabled: b.enabled.unwrap_or(true),
    };
    let rule = rules::create(&s.pool, new).await?;
    Ok((StatusCode::CREATED, Json(rule)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    name: String,
    /// 5-field cron expression, UTC.
    cron: String,
    criteria: Value,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    enabled: Option<bool>,
    /// A tick while the previous run is in progress: `skip` (default) or `allow`.
    #[serde(default)]
    overlap: Option<crate::store::types::Overlap>,
}

/// `POST /v1/schedules`: 201 with the schedule.
pub async fn create_schedule(
    State(s): State<AppState>,
    Acting(user): Acting,
    Body(b): Body<CreateSchedule>,
) -> Result<Response, ApiError> {
    let new = NewSchedule {
        name: b.name,
        cron: b.cron,
        criteria: b.criteria,
        options: b.options.unwrap_or_else(|| json!({})),
        acting_user: user,
        enabled: b.enabled.unwrap_or(true),
        overlap: b.overlap.unwrap_or(crate::store::types::Overlap::Skip),
    };
    let created = schedule::create(&s.pool, new).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /v1/rules`, `GET /v1/schedules`: every one, by id.
pub async fn list<T: Automation>(State(s): State<AppState>, _: Acting) -> Result<Json<Value>, ApiError> {
    let all = automation::list::<T>(&s.pool).await?;
    let mut body = serde_json::Map::new();
    body.insert(T::PLURAL.to_owned(), json!(all));
    Ok(Json(Value::Object(body)))
}

/// `GET /v1/rules/{id}`, `GET /v1/schedules/{id}`.
pub async fn read<T: Automation>(
    State(s): State<AppState>,
    _: Acting,
    Path(raw): Path<String>,
) -> Result<Json<T>, ApiError> {
    let id = parse_i64(&raw, &format!("{}_id", T::WHAT))?;
    Ok(Json(automation::get::<T>(&s.pool, id).await?))
}

/// `DELETE …/{id}`: 204.
pub async fn delete<T: Automation>(
    State(s): State<AppState>,
    _: Acting,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_i64(&raw, &format!("{}_id", T::WHAT))?;
    automation::delete::<T>(&s.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST …/{id}/enable`: a schedule's next run is then the first tick after now.
pub async fn enable<T: Automation>(
    State(s): State<AppState>,
    _: Acting,
    Path(raw): Path<String>,
) -> Result<Json<T>, ApiError> {
    let id = parse_i64(&raw, &format!("{}_id", T::WHAT))?;
    Ok(Json(automation::set_enabled::<T>(&s.pool, id, true).await?))
}

/// `POST …/{id}/disable`.
pub async fn disable<T: Automation>(
    State(s): State<AppState>,
    _: Acting,
    Path(raw): Path<String>,
) -> Result<Json<T>, ApiError> {
    let id = parse_i64(&raw, &format!("{}_id", T::WHAT))?;
    Ok(Json(automation::set_enabled::<T>(&s.pool, id, false).await?))
}
