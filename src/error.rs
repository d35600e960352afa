//! Errors at the database boundary. The codes and refusals are the domain's
//! ([`leadconv_domain::error`]); this adds what a call that reaches Postgres
//! can meet besides a refusal.

pub use leadconv_domain::error::{ErrorCode, Refusal};

/// How the edges answer a refusal: the HTTP status and the command line's
/// exit code. The one table for both; every refusal means nothing was
/// written, so the CLI exits 2 for all of them.
pub fn answer(code: ErrorCode) -> (u16, u8) {
    use ErrorCode::*;
    let http = match code {
        JobNotFound | NotFound | RuleNotFound | ScheduleNotFound | RecordNotFound => 404,
        RequesterCannotConvert | AdminOnly => 403,
        JobFinished | AlreadyConverted | DuplicateName | NothingToRetry | JobInProgress | NothingToUndo => 409,
        _ => 422,
    };
    (http, 2)
}

/// Why a call into the engine did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: nothing was written.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Worth retrying later: lost connection, deadlock, serialization failure.
    #[error("transient database error: {0}")]
    Transient(#[source] sqlx::Error),
    #[error(transparent)]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            Error::Transient(e)
        } else {
            Error::Database(e)
        }
    }
}

/// Errors that a retry may cure, as opposed to ones that will recur.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            matches!(
                db.code().as_deref(),
                // serialization_failure, deadlock_detected, lock_not_available
                // (lock_timeout), query_canceled (statement_timeout),
                // admin_shutdown, crash_shutdown, cannot_connect_now,
                // idle_in_transaction_session_timeout (the session of a process
                // that froze mid-transaction, ended by the server),
                // idle_session_timeout, and the whole connection-exception class.
                Some("40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25P03" | "57P05")
            ) || db.code().is_some_and(|c| c.starts_with("08"))
                || read_only(db.code().as_deref())
        }
        _ => false,
    }
}

/// read_only_sql_transaction: the connection leads to a Postgres that takes
/// no writes (a standby after a failover moved the primary). Worth retrying
/// on another connection: the pool checks its connections for a while and
/// drops those (see [`crate::store::db::read_only_seen`]).
fn read_only(code: Option<&str>) -> bool {
    let seen = code == Some("25006");
    if seen {
        crate::store::db::read_only_seen();
    }
    seen
}

/// Integrity errors (class 23) mean this lead's data breaks a rule of the
/// database: the lead fails for good instead of being retried.
pub fn is_constraint_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("23")))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
