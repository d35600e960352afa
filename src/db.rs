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

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Creates the database named in `url` when it does not exist, in UTF-8 with
/// the C.UTF-8 locale, so that `lower()` folds non-ASCII letters (Ł, Ệ, İ)
/// the way matching needs whatever the server's default locale is.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<bool> {
    use sqlx::{ConnectOptions, Connection};
    let options: PgConnectOptions = url.parse()?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.clone().database("postgres").connect().await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
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
