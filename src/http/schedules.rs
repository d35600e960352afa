//! `/v1/schedules`: conversion schedules. The schedule acts as the token's
//! user.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_i64, Acting, ApiError, AppState, Body};
use crate::automation::schedule::{self, NewSchedule, Schedule};

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
}

/// `POST /v1/schedules`: 201 with the schedule.
pub async fn create(
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
    };
    let created = schedule::create(&s.pool, new).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /v1/schedules`: every schedule, by id.
pub async fn list(State(s): State<AppState>, _: Acting) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"schedules": schedule::list(&s.pool).await?})))
}

/// `GET /v1/schedules/{id}`.
pub async fn read(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<Json<Schedule>, ApiError> {
    let id = parse_i64(&raw, "schedule_id")?;
    Ok(Json(schedule::get(&s.pool, id).await?))
}

/// `DELETE /v1/schedules/{id}`: 204.
pub async fn delete(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_i64(&raw, "schedule_id")?;
    schedule::delete(&s.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/schedules/{id}/enable`: the next run is the first tick after now.
pub async fn enable(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<Json<Schedule>, ApiError> {
    let id = parse_i64(&raw, "schedule_id")?;
    Ok(Json(schedule::set_enabled(&s.pool, id, true).await?))
}

/// `POST /v1/schedules/{id}/disable`.
pub async fn disable(
    State(s): State<AppState>,
    _: Acting,
    Path(raw): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    let id = parse_i64(&raw, "schedule_id")?;
    Ok(Json(schedule::set_enabled(&s.pool, id, false).await?))
}
