//! `/v1/rules`: conversion rules (workflow triggers). The rule acts as the
//! token's user.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_i64, Acting, ApiError, AppState, Body};
use crate::automation::rules::{self, NewRule, Rule};

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
pub async fn create(
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

/// `GET /v1/rules`: every rule, by id.
pub async fn list(State(s): State<AppState>, _: Acting) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"rules": rules::list(&s.pool).await?})))
}

/// `GET /v1/rules/{id}`.
pub async fn read(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<Json<Rule>, ApiError> {
    let id = parse_i64(&raw, "rule_id")?;
    Ok(Json(rules::get(&s.pool, id).await?))
}

/// `DELETE /v1/rules/{id}`: 204.
pub async fn delete(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_i64(&raw, "rule_id")?;
    rules::delete(&s.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/rules/{id}/enable`.
pub async fn enable(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<Json<Rule>, ApiError> {
    let id = parse_i64(&raw, "rule_id")?;
    Ok(Json(rules::set_enabled(&s.pool, id, true).await?))
}

/// `POST /v1/rules/{id}/disable`.
pub async fn disable(State(s): State<AppState>, _: Acting, Path(raw): Path<String>) -> Result<Json<Rule>, ApiError> {
    let id = parse_i64(&raw, "rule_id")?;
    Ok(Json(rules::set_enabled(&s.pool, id, false).await?))
}
