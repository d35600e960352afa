//! Connecting to Postgres and migrating the schema.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long reaching a service may take before we say it cannot be reached:
/// long enough for a busy server, short enough that a wrong port or host is
/// reported while the operator still looks at the terminal.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a Postgres URL points, for messages: host, port and database, never
/// the user's password.
pub fn describe(options: &PgConnectOptions) -> String {
    format!(
        "Postgres at {}:{} (database {:?})",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// A pool sized for `connections` concurrent conversions. One connection is
/// made first, bounded by [`CONNECT_TIMEOUT`], so that an unreachable server,
/// a missing database or a refused login is reported at once with what and
/// where, instead of after the pool's acquire timeout as "pool timed out".
/// Does not look at the schema: see [`connect_migrated`].
pub async fn connect(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    connect_limited(url, connections, None).await
}

/// How long a long-running service's database work may wait, so that a
/// stuck participant (a frozen worker holding locks "idle in transaction",
/// a half-open connection) delays others by seconds, not hours: Postgres
/// itself cancels a lock wait or a statement that runs out, and ends a
/// session that sits idle inside a transaction, releasing its locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `lock_timeout`: a conversion waiting longer for a row or advisory
    /// lock fails as transient and is retried through a delay queue.
    pub lock: Duration,
    /// `statement_timeout`: no statement runs longer (a job's snapshot of
    /// a million leads takes seconds, a conversion milliseconds).
    pub statement: Duration,
    /// `idle_in_transaction_session_timeout`: leadconv never idles inside a
    /// transaction, so a session that does belongs to a process that hung.
    pub idle_in_transaction: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            lock: Duration::from_secs(5),
            statement: Duration::from_secs(300),
            idle_in_transaction: Duration::from_secs(10),
        }
    }
}

/// [`connect_migrated`] for a long-running service: every connection of
/// the pool runs under `limits`.
pub async fn connect_service(url: &str, connections: u32, limits: &Limits) -> anyhow::Result<PgPool> {
    let pool = connect_limited(url, connections, Some(limits)).await?;
    require_schema(&pool).await?;
    Ok(pool)
}

/// [`connect`] with every connection under `limits` (for `serve`, which
/// starts on an unmigrated database and says so on `/readyz`).
pub async fn connect_limited(url: &str, connections: u32, limits: Option<&Limits>) -> anyhow::Result<PgPool> {
    connect_warm(url, connections, 0, limits).await
}

/// [`connect_limited`] keeping `warm` connections open even when idle: a
/// burst of requests after a quiet spell (or right after start) then finds
/// them ready instead of each paying for a new connection.
pub async fn connect_warm(url: &str, connections: u32, warm: u32, limits: Option<&Limits>) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse().map_err(|e| {
        anyhow::anyhow!("DATABASE_URL is not a Postgres URL ({e}); expected postgres://user@host:port/database")
    })?;
    let options = match limits {
        Some(l) => {
            let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
            options.options([
                ("lock_timeout", ms(l.lock)),
                ("statement_timeout", ms(l.statement)),
                ("idle_in_transaction_session_timeout", ms(l.idle_in_transaction)),
            ])
        }
        None => options,
    };
    // A connection of its own, not the pool's first: the pool retries a
    // refused connection until its acquire timeout and then reports only
    // "pool timed out".
    use sqlx::{ConnectOptions, Connection};
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(first)) => first.close().await?,
        Ok(Err(e)) => return Err(explain_connect_error(&options, &e)),
        Err(_) => anyhow::bail!(
            "cannot reach {}: no answer within {}s; check that it runs and that DATABASE_URL names the right host and port",
            describe(&options),
            CONNECT_TIMEOUT.as_secs()
        ),
    }
    Ok(PgPoolOptions::new()
        .max_connections(connections.max(1))
        .min_connections(warm.min(connections))
        .acquire_timeout(Duration::from_secs(10))
        .before_acquire(|conn, _| Box::pin(async move { Ok(!read_only_lately() || writable(conn).await) }))
        .connect_lazy_with(options))
}

/// How long after a write refused as read only (25006) the pool checks each
/// connection before handing it out.
const READ_ONLY_WATCH: Duration = Duration::from_secs(30);

/// When a write was last refused as read only, in ms since the Unix epoch.
static READ_ONLY_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A write was refused because the server is read only: after a failover
/// the pool's connections may still lead to the old primary, now a standby
/// (or through an endpoint that has not moved yet). For [`READ_ONLY_WATCH`]
/// each pooled connection is checked before use and dropped when it leads
/// to a server that takes no writes, so the pool opens new ones (through
/// the moved endpoint, to the new primary) instead of failing on the same
/// connections again and again.
pub fn read_only_seen() {
    READ_ONLY_AT.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
}

fn read_only_lately() -> bool {
    let at = READ_ONLY_AT.load(std::sync::atomic::Ordering::Relaxed);
    at != 0 && now_ms().saturating_sub(at) < READ_ONLY_WATCH.as_millis() as u64
}

/// Whether `conn` leads to a server that takes writes; a connection that
/// cannot even answer is not worth keeping either.
async fn writable(conn: &mut sqlx::PgConnection) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'")
        .fetch_one(conn)
        .await
        .unwrap_or(false)
}

/// [`connect`], then refuses a database whose schema is not the one this
/// binary was built for (see [`require_schema`]). Every command but
/// `migrate`, `doctor` and `serve` (whose `/readyz` reports it) uses this.
pub async fn connect_migrated(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    let pool = connect(url, connections).await?;
    require_schema(&pool).await?;
    Ok(pool)
}

fn explain_connect_error(options: &PgConnectOptions, e: &sqlx::Error) -> anyhow::Error {
    let at = describe(options);
    let code = match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    match (code.as_deref(), e) {
        // invalid_catalog_name
        (Some("3D000"), _) => {
            anyhow::anyhow!("{at}: the database does not exist; create it with `leadconv migrate --create-database`")
        }
        // invalid_password, invalid_authorization_specification
        (Some("28P01" | "28000"), sqlx::Error::Database(db)) => anyhow::anyhow!(
            "{at} refused the login of user {:?}: {}; check the user and password in DATABASE_URL",
            options.get_username(),
            db.message()
        ),
        (_, sqlx::Error::Io(io)) => anyhow::anyhow!(
            "cannot reach {at}: {}; check that it runs and that DATABASE_URL names the right host and port",
            io_reason(io)
        ),
        _ => anyhow::anyhow!("cannot connect to {at}: {e}"),
    }
}

/// An I/O error said the way an operator reads it.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::TimedOut => "connection timed out".into(),
        _ => {
            let text = e.to_string();
            // "Connection refused (os error 111)" reads better without the number.
            text.split(" (os error").next().unwrap_or(&text).to_owned()
        }
    }
}

/// The schema version this binary was built with: its newest migration.
pub fn expected_schema() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The newest migration applied to the database, `None` when it was never
/// migrated. A migration that failed half-way does not count.
pub async fn schema_version(pool: &PgPool) -> sqlx::Result<Option<i64>> {
    let exists = sqlx::query_scalar!(r#"SELECT to_regclass('_sqlx_migrations') IS NOT NULL AS "exists!""#)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar!(r#"SELECT max(version) AS "version" FROM _sqlx_migrations WHERE success"#).fetch_one(pool).await
}

/// Refuses a database that was never migrated or is behind this binary,
/// naming the command that fixes it. A database ahead of the binary (a newer
/// release migrated it during a rolling update) is accepted: migrations only
/// add.
pub async fn require_schema(pool: &PgPool) -> anyhow::Result<()> {
    let expected = expected_schema();
    match schema_version(pool).await? {
        Some(v) if v >= expected => Ok(()),
        found => {
            let db: String = sqlx::query_scalar!(r#"SELECT current_database() AS "name!""#).fetch_one(pool).await?;
            Err(anyhow::anyhow!("{}", schema_problem(&db, found, expected)))
        }
    }
}

/// What is wrong with a schema at `found` for a binary expecting `expected`.
pub fn schema_problem(database: &str, found: Option<i64>, expected: i64) -> String {
    match found {
        None => format!(
            "database {database:?} has no leadconv schema (it was never migrated); run `leadconv migrate` with the same DATABASE_URL"
        ),
        Some(v) => format!(
            "database {database:?} is at schema version {v}, this leadconv needs {expected}; run `leadconv migrate` with the same DATABASE_URL"
        ),
    }
}

/// Checks the database can match (see [`check_matching_locale`]), then
/// brings its schema up to date.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    check_matching_locale(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Refuses a Postgres that cannot take writes: a standby (after a
/// failover, the old primary's address may lead to one) or a session
/// that is read only by default. Every conversion would fail there.
pub async fn require_writable(pool: &PgPool) -> anyhow::Result<()> {
    let (standby, read_only, name): (bool, bool, String) = sqlx::query_as(
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', current_database()::text",
    )
    .fetch_one(pool)
    .await?;
    if standby || read_only {
        // The pool's connections may outlive a failover: have them checked
        // and the read-only ones dropped, so the next look reconnects.
        read_only_seen();
        let why = if standby { "a standby in recovery" } else { "read only (default_transaction_read_only)" };
        anyhow::bail!(
            "Postgres database {name:?} is {why}: leadconv writes every conversion there; point DATABASE_URL at the \
             writable primary (after a failover, the endpoint that follows it)"
        );
    }
    Ok(())
}

/// Refuses a database where `lower()` folds only ASCII (`LC_CTYPE` `C` or
/// `POSIX`) or that is not UTF-8: there "ŁÓDŹ" and "łódź", "İPEK" and "ipek"
/// are different, so matching silently creates duplicates of Polish,
/// Turkish, Greek and Vietnamese contacts and accounts. Such a database
/// cannot be changed in place (`LC_CTYPE` is fixed at creation).
pub async fn check_matching_locale(pool: &PgPool) -> anyhow::Result<()> {
    let r = sqlx::query!(
        r#"SELECT getdatabaseencoding() = 'UTF8' AND lower('ĄΣÀ') = 'ąσà' AS "ok!", current_database() AS "name!",
                  getdatabaseencoding() AS "encoding!",
                  (SELECT datctype FROM pg_database WHERE datname = current_database()) AS "ctype!""#
    )
    .fetch_one(pool)
    .await?;
    let (ok, name, encoding, ctype) = (r.ok, r.name, r.encoding, r.ctype);
    if !ok {
        anyhow::bail!(
            "Postgres database {name:?} has encoding {encoding} and LC_CTYPE {ctype:?}, where lower() folds only ASCII \
             letters: e-mails and companies in Polish, Turkish, Greek or Vietnamese would not match. Create a database \
             with ENCODING 'UTF8' LC_CTYPE 'C.UTF-8' TEMPLATE template0 (`leadconv migrate --create-database` with a \
             new database name in DATABASE_URL does), then migrate and move the data there"
        );
    }
    Ok(())
}

/// Creates the database named in `url` when it does not exist, in UTF-8 with
/// the C.UTF-8 locale, so that `lower()` folds non-ASCII letters (Ł, Ệ, İ)
/// the way matching needs whatever the server's default locale is.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<bool> {
    use sqlx::{ConnectOptions, Connection};
    let options: PgConnectOptions = url.parse()?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let admin_options = options.clone().database("postgres");
    let mut admin = match tokio::time::timeout(CONNECT_TIMEOUT, admin_options.connect()).await {
        Ok(connected) => connected.map_err(|e| explain_connect_error(&admin_options, &e))?,
        Err(_) => {
            anyhow::bail!("cannot reach {}: no answer within {}s", describe(&admin_options), CONNECT_TIMEOUT.as_secs())
        }
    };
    let exists =
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS "exists!""#, name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::query(&format!(
            "CREATE DATABASE {quoted} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
        ))
        .execute(&mut admin)
        .await?;
    }
    admin.close().await?;
    Ok(!exists)
}
