//! The one place the API and the console ask "may this caller do that?"
//! ([`leadconv_domain::access::decide`]), and how the answer is told: a 403
//! naming what is missing, or exactly the answer for a missing object.
//!
//! Every denial is noted on the request's access log line with the user.

use std::sync::Arc;

use axum::http::StatusCode;
use leadconv_domain::access::{decide, Act, Caller, Denied, Reach, Verdict};
use sqlx::PgPool;
use tokio::sync::OnceCell;

use super::{AccessNote, ApiError};
use crate::store::auth::{self, TokenUser};

/// A caller and what they reach, read once per request when an act needs it.
pub struct Gate {
    user: TokenUser,
    caller: Caller,
    pool: PgPool,
    reach: OnceCell<Reach>,
    note: Option<Arc<AccessNote>>,
}

impl Gate {
    pub(crate) fn new(pool: PgPool, user: TokenUser, note: Option<Arc<AccessNote>>) -> Gate {
        if let Some(n) = &note {
            let _ = n.user.set(user.id);
        }
        Gate { caller: user.caller(), user, pool, reach: OnceCell::new(), note }
    }

    /// The acting user's id.
    pub fn user_id(&self) -> i64 {
        self.caller.user_id
    }

    pub fn user(&self) -> &TokenUser {
        &self.user
    }

    /// Whether `act` would be allowed, without answering or noting anything:
    /// what a page asks before it shows a button.
    pub async fn may(&self, act: Act) -> Result<bool, ApiError> {
        Ok(decide(&self.caller, self.reach_for(act).await?, act) == Verdict::Allowed)
    }

    /// The caller's reach (read at most once per request).
    pub async fn reach(&self) -> Result<&Reach, ApiError> {
        Ok(self.reach.get_or_try_init(|| auth::reach(&self.pool, &self.caller)).await?)
    }

    /// Acts about no object never read the hierarchy: converting stays one
    /// statement lighter.
    async fn reach_for(&self, act: Act) -> Result<&Reach, ApiError> {
        static NOBODY: std::sync::LazyLock<Reach> = std::sync::LazyLock::new(|| Reach::Users(Default::default()));
        if act.owner().is_some() {
            self.reach().await
        } else {
            Ok(&NOBODY)
        }
    }

    /// Allowed, or the answer for the denial: a 403 naming what is missing,
    /// or `missing()`, the very answer a missing object gets.
    pub async fn allow(&self, act: Act, missing: impl FnOnce() -> ApiError) -> Result<(), ApiError> {
        match decide(&self.caller, self.reach_for(act).await?, act) {
            Verdict::Allowed => Ok(()),
            Verdict::NotFound => {
                self.noted("outside_reach");
                Err(missing())
            }
            Verdict::Forbidden(why) => {
                self.noted(denial_code(why));
                Err(forbidden(why))
            }
        }
    }

    fn noted(&self, why: &'static str) {
        if let Some(n) = &self.note {
            let _ = n.denied.set(why);
        }
    }
}

/// The 403 of a denial.
pub fn forbidden(why: Denied) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "authorization", why.message())
}

/// How a denial reads on the access log.
fn denial_code(why: Denied) -> &'static str {
    match why {
        Denied::Inactive => "inactive_user",
        Denied::ReadOnlyUser => "read_only_user",
        Denied::TokenScope(_) => "token_scope",
        Denied::NotAdmin => "not_admin",
    }
}
