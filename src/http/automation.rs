//! `/v1/rules` and `/v1/schedules`: conversion rules (workflow triggers) and
//! schedules. They act unattended on every lead, so only admins create,
//! enable, disable or delete them, naming the user they act as (default:
//! the admin); others read those whose acting user they reach (SPEC §5).
//! Creating differs (a schedule has a cron expression); reading, listing,
//! enabling, disabling and deleting are one set of handlers over
//! [`Automation`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use leadconv_domain::access::Act;
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::Gate;
use super::{parse_i64, Access, ApiError, AppState, Body};
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
    /// The user the rule acts as (active, may convert); default: the caller.
    #[serde(default)]
    acting_user: Option<i64>,
}

/// `POST /v1/rules`: 201 with the rule.
pub async fn create_rule(
    State(s): State<AppState>,
    Access(caller): Access,
    Body(b): Body<CreateRule>,
) -> Result<Response, ApiError> {
    caller.allow(Act::CreateAutomation, missing::<rules::Rule>).await?;
    let new = NewRule {
        name: b.name,
        criteria: b.criteria,
        options: b.options.unwrap_or_else(|| json!({})),
        acting_user: b.acting_user.unwrap_or(caller.user_id()),
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
    /// The user the schedule acts as (active, may convert); default: the caller.
    #[serde(default)]
    acting_user: Option<i64>,
}

/// `POST /v1/schedules`: 201 with the schedule.
pub async fn create_schedule(
    State(s): State<AppState>,
    Access(caller): Access,
    Body(b): Body<CreateSchedule>,
) -> Result<Response, ApiError> {
    caller.allow(Act::CreateAutomation, missing::<schedule::Schedule>).await?;
    let new = NewSchedule {
        name: b.name,
        cron: b.cron,
        criteria: b.criteria,
        options: b.options.unwrap_or_else(|| json!({})),
        acting_user: b.acting_user.unwrap_or(caller.user_id()),
        enabled: b.enabled.unwrap_or(true),
        overlap: b.overlap.unwrap_or(crate::store::types::Overlap::Skip),
    };
    let created = schedule::create(&s.pool, new).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The answer for a rule or schedule that does not exist or that the
/// caller does not reach: one and the same.
fn missing<T: Automation>() -> ApiError {
    automation::not_found::<T>(0).into()
}

/// The rule or schedule `raw` names, if the caller may do `act` (given its
/// acting user) to it.
async fn visible<T: Automation>(s: &AppState, caller: &Gate, raw: &str, act: fn(i64) -> Act) -> Result<T, ApiError> {
    let id = parse_i64(raw, &format!("{}_id", T::WHAT))?;
    let found = automation::get::<T>(&s.pool, id).await?;
    caller.allow(act(found.acting_user()), missing::<T>).await?;
    Ok(found)
}

fn change(acting_user: i64) -> Act {
    Act::ChangeAutomation { acting_user }
}

/// `GET /v1/rules`, `GET /v1/schedules`: those the caller sees, by id.
pub async fn list<T: Automation>(State(s): State<AppState>, Access(caller): Access) -> Result<Json<Value>, ApiError> {
    caller.allow(Act::ListAutomations, missing::<T>).await?;
    let reach = caller.reach().await?.users();
    let all = automation::list::<T>(&s.pool, reach.as_deref()).await?;
    let mut body = serde_json::Map::new();
    body.insert(T::PLURAL.to_owned(), json!(all));
    Ok(Json(Value::Object(body)))
}

/// `GET /v1/rules/{id}`, `GET /v1/schedules/{id}`.
pub async fn read<T: Automation>(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
) -> Result<Json<T>, ApiError> {
    Ok(Json(visible::<T>(&s, &caller, &raw, |acting_user| Act::ReadAutomation { acting_user }).await?))
}

/// `DELETE …/{id}`: 204.
pub async fn delete<T: Automation>(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let found = visible::<T>(&s, &caller, &raw, change).await?;
    automation::delete::<T>(&s.pool, found.id()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST …/{id}/enable`: a schedule's next run is then the first tick after now.
pub async fn enable<T: Automation>(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
) -> Result<Json<T>, ApiError> {
    let found = visible::<T>(&s, &caller, &raw, change).await?;
    Ok(Json(automation::set_enabled::<T>(&s.pool, found.id(), true).await?))
}

/// `POST …/{id}/disable`.
pub async fn disable<T: Automation>(
    State(s): State<AppState>,
    Access(caller): Access,
    Path(raw): Path<String>,
) -> Result<Json<T>, ApiError> {
    let found = visible::<T>(&s, &caller, &raw, change).await?;
    Ok(Json(automation::set_enabled::<T>(&s.pool, found.id(), false).await?))
}
