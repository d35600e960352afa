//! Conversions nobody starts by hand: rules (a lead that starts matching an
//! enabled rule is converted by a one-lead `workflow` job) and schedules
//! (cron ticks that create `schedule` jobs).
//!
//! Both are a named conversion (criteria, options, acting user) that can be
//! enabled or disabled, kept in a table of its own: [`Automation`] says how
//! each is stored, and one CRUD path ([`list`], [`get`], [`delete`],
//! [`check_new`]) serves both, for the CLI and the HTTP API alike.
//!
//! May import: `crate::store`, `crate::queue` (to publish the jobs they
//! make). HTTP and the CLI call into it.

pub mod rules;
pub mod schedule;

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::PgPool;

use crate::error::{ErrorCode, Refusal};
use crate::store::job::{self, NewJob, Trigger};

/// How a kind of automation is stored and named.
pub trait Automation: Serialize + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin {
    /// What it is called in messages: `rule`, `schedule`.
    const WHAT: &'static str;
    /// The key of a list of them in the API: `rules`, `schedules`.
    const PLURAL: &'static str;
    /// Its table and the columns of a row.
    const TABLE: &'static str;
    const COLUMNS: &'static str;
    /// The refusal for an unknown id.
    const NOT_FOUND: ErrorCode;
    /// The trigger of the jobs it makes.
    const TRIGGER: Trigger;

    /// The user it acts as: whose rights rules 6 and 7 use, and whose reach
    /// decides who sees it and the jobs it makes.
    fn acting_user(&self) -> i64;

    fn id(&self) -> i64;

    /// Enables or disables it (a schedule also moves its next run).
    fn set_enabled(
        pool: &PgPool,
        id: i64,
        enabled: bool,
    ) -> impl std::future::Future<Output = Result<Self, crate::Error>> + Send;
}

/// Every row acting as one of `acting_users` (`None`: every row), by id.
pub async fn list<T: Automation>(pool: &PgPool, acting_users: Option<&[i64]>) -> sqlx::Result<Vec<T>> {
    sqlx::query_as(&format!(
        "SELECT {} FROM {} WHERE $1::bigint[] IS NULL OR acting_user = ANY($1) ORDER BY id",
        T::COLUMNS,
        T::TABLE
    ))
    .bind(acting_users)
    .fetch_all(pool)
    .await
}

/// The row, or a `rule_not_found` / `schedule_not_found` refusal.
pub async fn get<T: Automation>(pool: &PgPool, id: i64) -> Result<T, crate::Error> {
    sqlx::query_as(&format!("SELECT {} FROM {} WHERE id = $1", T::COLUMNS, T::TABLE))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| not_found::<T>(id))
}

/// Enables or disables the row (see [`Automation::set_enabled`]).
pub async fn set_enabled<T: Automation>(pool: &PgPool, id: i64, enabled: bool) -> Result<T, crate::Error> {
    T::set_enabled(pool, id, enabled).await
}

/// Deletes the row; jobs it created stay.
pub async fn delete<T: Automation>(pool: &PgPool, id: i64) -> Result<(), crate::Error> {
    let n =
        sqlx::query(&format!("DELETE FROM {} WHERE id = $1", T::TABLE)).bind(id).execute(pool).await?.rows_affected();
    if n == 0 {
        return Err(not_found::<T>(id));
    }
    Ok(())
}

/// The answer for a rule or schedule that does not exist, and for one
/// outside the caller's reach: the same words for both (SPEC §5).
pub fn not_found<T: Automation>(_id: i64) -> crate::Error {
    Refusal::new(T::NOT_FOUND, format!("{}_id", T::WHAT), format!("no such {} (check the id)", T::WHAT)).into()
}

/// Checks what a new rule or schedule shares: its name (not blank, at most
/// 200 characters), and its criteria, options and acting user exactly as a
/// job's (the same refusals). Nothing is written.
pub async fn check_new<T: Automation>(
    pool: &PgPool,
    name: &str,
    criteria: &Value,
    options: &Value,
    acting_user: i64,
) -> Result<(), crate::Error> {
    if name.trim().is_empty() {
        return Err(Refusal::new(ErrorCode::InvalidOption, "name", "must not be blank").into());
    }
    if name.chars().count() > 200 {
        return Err(Refusal::new(ErrorCode::InvalidOption, "name", "is longer than 200 characters").into());
    }
    let new =
        NewJob { criteria: criteria.clone(), options: options.clone(), requested_by: acting_user, trigger: T::TRIGGER };
    job::check(pool, new).await?;
    Ok(())
}

/// A unique violation on the name becomes a `duplicate_name` refusal.
pub(crate) fn duplicate_name<T: Automation>(e: sqlx::Error, name: &str) -> crate::Error {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Refusal::new(ErrorCode::DuplicateName, "name", format!("a {} named {name:?} exists already", T::WHAT))
                .into()
        }
        _ => e.into(),
    }
}
