//! API tokens: random bearer tokens bound to a user, stored only as their
//! SHA-256 hash. A token is 32 random bytes, so a fast hash is safe here
//! (there is nothing to brute-force, unlike a password).

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::error::{ErrorCode, Refusal};
use leadconv_domain::access::{Caller, Reach, Scope};

/// The prefix makes leaked tokens easy to recognise in logs and scanners.
const PREFIX: &str = "lcv_";

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// What a new token may do, and for how long.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenGrant {
    pub scope: Scope,
    /// `None`: until revoked.
    pub expires_in: Option<std::time::Duration>,
}

/// Creates a token for `user_id` with every right of its user and no
/// expiry; the clear token is returned once and never stored.
pub async fn create_token(pool: &PgPool, user_id: i64, name: &str) -> Result<String, crate::Error> {
    create_scoped_token(pool, user_id, name, TokenGrant::default()).await
}

/// Creates a token for `user_id`, narrowed to `grant`; the clear token is
/// returned once and never stored.
pub async fn create_scoped_token(
    pool: &PgPool,
    user_id: i64,
    name: &str,
    grant: TokenGrant,
) -> Result<String, crate::Error> {
    let exists = sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM users WHERE id = $1) AS "exists!""#, user_id)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(Refusal::new(ErrorCode::RequesterNotFound, "user", format!("user {user_id} does not exist")).into());
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    sqlx::query!(
        "INSERT INTO api_tokens (user_id, name, token_hash, scope, expires_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))",
        user_id,
        name,
        hash(&token),
        grant.scope.as_str(),
        grant.expires_in.map(|d| d.as_secs_f64())
    )
    .execute(pool)
    .await?;
    Ok(token)
}

/// The user a token (or a console session) stands for, as the permission
/// check sees them ([`leadconv_domain::access::decide`]).
#[derive(Debug, Clone)]
pub struct TokenUser {
    pub id: i64,
    pub active: bool,
    pub can_convert: bool,
    pub is_admin: bool,
    pub scope: String,
}

impl TokenUser {
    pub fn caller(&self) -> Caller {
        Caller {
            user_id: self.id,
            active: self.active,
            can_convert: self.can_convert,
            is_admin: self.is_admin,
            // The column's CHECK allows only the three; read-only is the
            // safe reading of anything else.
            scope: Scope::parse(&self.scope).unwrap_or(Scope::Read),
        }
    }
}

/// Every (user, manager) pair of the organisation: what a caller's reach
/// ([`Reach::of`]) is computed from.
pub async fn hierarchy(pool: &PgPool) -> sqlx::Result<Vec<(i64, i64)>> {
    let rows = sqlx::query!(r#"SELECT id, manager_id AS "manager_id!" FROM users WHERE manager_id IS NOT NULL"#)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.manager_id)).collect())
}

/// The reach of `caller`: everyone for an admin, without reading the
/// hierarchy.
pub async fn reach(pool: &PgPool, caller: &Caller) -> sqlx::Result<Reach> {
    if caller.is_admin {
        return Ok(Reach::Everyone);
    }
    Ok(Reach::of(caller, hierarchy(pool).await?))
}

/// How stale `last_used_at` may be: writing it on every request would make
/// each authenticated request a write and a WAL flush, and serialise the
/// concurrent requests of one token on its row.
const LAST_USED_PRECISION_SECS: f64 = 60.0;

/// The user of a live token: known, not revoked, not expired. `None`
/// otherwise (all three are a 401, told apart by nobody).
pub async fn lookup(pool: &PgPool, token: &str) -> sqlx::Result<Option<TokenUser>> {
    sqlx::query_as!(
        TokenUser,
        r#"WITH t AS (
               SELECT t.id AS token_id, t.last_used_at, t.scope, u.id, u.active, u.can_convert, u.is_admin
               FROM api_tokens t JOIN users u ON u.id = t.user_id
               WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())),
           used AS (
               UPDATE api_tokens a SET last_used_at = now() FROM t
               WHERE a.id = t.token_id
                 AND (t.last_used_at IS NULL OR t.last_used_at < now() - make_interval(secs => $2))
                 -- Re-checked on the row itself after a lock wait: of the
                 -- concurrent requests at the minute's turn, one writes.
                 AND (a.last_used_at IS NULL OR a.last_used_at < now() - make_interval(secs => $2)))
           SELECT id AS "id!", active AS "active!", can_convert AS "can_convert!", is_admin AS "is_admin!",
                  scope AS "scope!" FROM t"#,
        hash(token),
        LAST_USED_PRECISION_SECS
    )
    .fetch_optional(pool)
    .await
}

/// A token as listed for its administrators: never the token itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenInfo {
    pub id: i64,
    pub user_id: i64,
    pub name: String,
    /// `full`, `read` or `convert`.
    pub scope: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// `None`: until revoked.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every token, newest first; only those of `user_id` when given.
pub async fn list_tokens(pool: &PgPool, user_id: Option<i64>) -> sqlx::Result<Vec<TokenInfo>> {
    sqlx::query_as!(
        TokenInfo,
        "SELECT id, user_id, name, scope, created_at, expires_at, last_used_at, revoked_at FROM api_tokens
         WHERE $1::bigint IS NULL OR user_id = $1 ORDER BY id DESC",
        user_id
    )
    .fetch_all(pool)
    .await
}

/// Revokes a token by its id: it stops working at once. Revoking a revoked
/// token changes nothing (its first revocation time stays).
pub async fn revoke_token(pool: &PgPool, id: i64) -> Result<TokenInfo, crate::Error> {
    sqlx::query_as!(
        TokenInfo,
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()), updated_at = now() WHERE id = $1
         RETURNING id, user_id, name, scope, created_at, expires_at, last_used_at, revoked_at",
        id
    )
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Refusal::new(ErrorCode::NotFound, "token", format!("token {id} does not exist")).into())
}

/// A console session: who acts, and the CSRF token its forms carry.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: i64,
    pub user_name: String,
    pub csrf_token: String,
    /// The user and the scope of the token the session was opened with.
    pub user: TokenUser,
}

/// How long a console sign-in lasts.
pub const SESSION_HOURS: f64 = 12.0;

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Exchanges an API token for a console session: `None` when the token is
/// unknown, revoked or expired. The caller checks the user may sign in
/// ([`leadconv_domain::access::Act::SignIn`]) before [`open_session`].
pub async fn sign_in_user(pool: &PgPool, token: &str) -> sqlx::Result<Option<TokenUser>> {
    sqlx::query_as!(
        TokenUser,
        r#"SELECT u.id, u.active, u.can_convert, u.is_admin, t.scope FROM api_tokens t JOIN users u ON u.id = t.user_id
           WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())"#,
        hash(token)
    )
    .fetch_optional(pool)
    .await
}

/// Opens a console session for `token` (checked by [`sign_in_user`]): the
/// session keeps the token's scope and ends no later than the token does.
/// Returns the cookie value (stored only hashed) and the session; `None`
/// when the token stopped being live in between.
pub async fn open_session(pool: &PgPool, token: &str) -> sqlx::Result<Option<(String, Session)>> {
    let cookie = random_secret();
    let csrf = random_secret();
    let row = sqlx::query!(
        r#"WITH t AS (
               SELECT t.id, t.expires_at, u.id AS user_id FROM api_tokens t JOIN users u ON u.id = t.user_id
               WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())),
           s AS (
               INSERT INTO console_sessions (session_hash, token_id, csrf_token, expires_at)
               SELECT $2, id, $3, least(now() + make_interval(hours => $4::float8::int), expires_at) FROM t),
           -- Expired sessions go at the next sign-in (the index makes it cheap).
           expired AS (DELETE FROM console_sessions WHERE expires_at < now())
           SELECT user_id AS "user_id!" FROM t"#,
        hash(token),
        hash(&cookie),
        csrf,
        SESSION_HOURS
    )
    .fetch_optional(pool)
    .await?;
    if row.is_none() {
        return Ok(None);
    }
    Ok(session(pool, &cookie).await?.map(|s| (cookie, s)))
}

/// The session a cookie stands for, if it is live: not expired, its token
/// neither revoked nor expired. Whether its user may still do anything is
/// the permission check's to say (an inactive user gets 403).
pub async fn session(pool: &PgPool, cookie: &str) -> sqlx::Result<Option<Session>> {
    let row = sqlx::query!(
        r#"SELECT u.id, u.name, u.active, u.can_convert, u.is_admin, t.scope, s.csrf_token
           FROM console_sessions s JOIN api_tokens t ON t.id = s.token_id JOIN users u ON u.id = t.user_id
           WHERE s.session_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL
             AND (t.expires_at IS NULL OR t.expires_at > now())"#,
        hash(cookie)
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Session {
        user_id: r.id,
        user_name: r.name,
        csrf_token: r.csrf_token,
        user: TokenUser {
            id: r.id,
            active: r.active,
            can_convert: r.can_convert,
            is_admin: r.is_admin,
            scope: r.scope,
        },
    }))
}

/// Ends the session of `cookie` (sign-out), and any that have expired.
pub async fn sign_out(pool: &PgPool, cookie: &str) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM console_sessions WHERE session_hash = $1 OR expires_at < now()", hash(cookie))
        .execute(pool)
        .await?;
    Ok(())
}
