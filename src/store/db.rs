//! Connecting to Postgres and migrating the schema.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool sized for `connections` concurrent conversions.
pub async fn connect(url: &str, connections: u32) -> sqlx::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(connections.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
}

/// Checks the database can match (see [`check_matching_locale`]), then
/// brings its schema up to date.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    check_matching_locale(pool).await?;
    MIGRATOR.run(pool).await?;
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
    let mut admin = options.clone().database("postgres").connect().await?;
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
