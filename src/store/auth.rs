//! API tokens: random bearer tokens bound to a user, stored only as their
//! SHA-256 hash. A token is 32 random bytes, so a fast hash is safe here
//! (there is nothing to brute-force, unlike a password).

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::error::{ErrorCode, Refusal};

/// The prefix makes leaked tokens easy to recognise in logs and scanners.
const PREFIX: &str = "lcv_";

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token for `user_id`; the clear token is returned once and
/// never stored.
pub async fn create_token(pool: &PgPool, user_id: i64, name: &str) -> Result<String, crate::Error> {
    let exists = sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM users WHERE id = $1) AS "exists!""#, user_id)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(Refusal::new(ErrorCode::RequesterNotFound, "user", format!("user {user_id} does not exist")).into());
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    sqlx::query!("INSERT INTO api_tokens (user_id, name, token_hash) VALUES ($1, $2, $3)", user_id, name, hash(&token))
        .execute(pool)
        .await?;
    Ok(token)
}

/// The user a token stands for.
#[derive(Debug, Clone)]
pub struct TokenUser {
    pub id: i64,
    pub active: bool,
    pub can_convert: bool,
}

/// How stale `last_used_at` may be: writing it on every request would make
/// each authenticated request a write and a WAL flush, and serialise the
/// concurrent requests of one token on its row.
const LAST_USED_PRECISION_SECS: f64 = 60.0;

pub async fn lookup(pool: &PgPool, token: &str) -> sqlx::Result<Option<TokenUser>> {
    sqlx::query_as!(
        TokenUser,
        r#"WITH t AS (
               SELECT t.id AS token_id, t.last_used_at, u.id, u.active, u.can_convert
               FROM api_tokens t JOIN users u ON u.id = t.user_id
               WHERE t.token_hash = $1 AND t.revoked_at IS NULL),
           used AS (
               UPDATE api_tokens a SET last_used_at = now() FROM t
               WHERE a.id = t.token_id
                 AND (t.last_used_at IS NULL OR t.last_used_at < now() - make_interval(secs => $2))
                 -- Re-checked on the row itself after a lock wait: of the
                 -- concurrent requests at the minute's turn, one writes.
                 AND (a.last_used_at IS NULL OR a.last_used_at < now() - make_interval(secs => $2)))
           SELECT id AS "id!", active AS "active!", can_convert AS "can_convert!" FROM t"#,
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
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every token, newest first; only those of `user_id` when given.
pub async fn list_tokens(pool: &PgPool, user_id: Option<i64>) -> sqlx::Result<Vec<TokenInfo>> {
    sqlx::query_as!(
        TokenInfo,
        "SELECT id, user_id, name, created_at, last_used_at, revoked_at FROM api_tokens
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
         RETURNING id, user_id, name, created_at, last_used_at, revoked_at",
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
}

/// How long a console sign-in lasts.
pub const SESSION_HOURS: f64 = 12.0;

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Exchanges an API token for a console session: `None` when the token is
/// unknown, revoked, or its user may not convert. Returns the cookie value
/// (stored only hashed) and the session.
pub async fn sign_in(pool: &PgPool, token: &str) -> sqlx::Result<Option<(String, Session)>> {
    let cookie = random_secret();
    let csrf = random_secret();
    let row = sqlx::query!(
        r#"WITH t AS (
               SELECT t.id, u.id AS user_id, u.name FROM api_tokens t JOIN users u ON u.id = t.user_id
               WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND u.active AND u.can_convert),
           s AS (
               INSERT INTO console_sessions (session_hash, token_id, csrf_token, expires_at)
               SELECT $2, id, $3, now() + make_interval(hours => $4::float8::int) FROM t),
           -- Expired sessions go at the next sign-in (the index makes it cheap).
           expired AS (DELETE FROM console_sessions WHERE expires_at < now())
           SELECT user_id AS "user_id!", name AS "name!" FROM t"#,
        hash(token),
        hash(&cookie),
        csrf,
        SESSION_HOURS
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (cookie, Session { user_id: r.user_id, user_name: r.name, csrf_token: csrf })))
}

/// The session a cookie stands for, if it is live: not expired, its token
/// not revoked, its user still active and allowed to convert.
pub async fn session(pool: &PgPool, cookie: &str) -> sqlx::Result<Option<Session>> {
    sqlx::query_as!(
        Session,
        "SELECT u.id AS user_id, u.name AS user_name, s.csrf_token
         FROM console_sessions s JOIN api_tokens t ON t.id = s.token_id JOIN users u ON u.id = t.user_id
         WHERE s.session_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL AND u.active AND u.can_convert",
        hash(cookie)
    )
    .fetch_optional(pool)
    .await
}

/// Ends the session of `cookie` (sign-out), and any that have expired.
pub async fn sign_out(pool: &PgPool, cookie: &str) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM console_sessions WHERE session_hash = $1 OR expires_at < now()", hash(cookie))
        .execute(pool)
        .await?;
    Ok(())
}
