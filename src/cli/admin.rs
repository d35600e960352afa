//! Administration: `migrate` and `token create`.

use clap::{Args, Subcommand};
use leadconv::config::Services;
use leadconv::store::db;
use leadconv_domain::access::Scope;

use super::say;

#[derive(Args)]
pub struct Migrate {
    /// Also create the database when it does not exist.
    #[arg(long)]
    pub create_database: bool,
    /// Change nothing: exit 0 when the schema is at this binary's version
    /// (or newer), 1 when it is not. Pods run this before starting.
    #[arg(long, conflicts_with = "create_database")]
    pub check: bool,
    /// With --check: keep checking every 2 seconds for up to this many
    /// seconds, e.g. while the migrate Job of a deploy runs.
    #[arg(long, requires = "check", value_parser = super::parse_secs)]
    pub wait: Option<std::time::Duration>,
}

impl Migrate {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        if self.check {
            return check(s, self.wait.unwrap_or_default()).await;
        }
        if self.create_database && db::create_database_if_missing(&s.database_url).await? {
            say("created the database")?;
        }
        let pool = db::connect(&s.database_url, 2).await?;
        db::migrate(&pool).await?;
        say("migrated")?;
        Ok(())
    }
}

/// `migrate --check [--wait]`: the schema at this binary's version, or
/// a message naming `leadconv migrate`.
async fn check(s: &Services, wait: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let outcome = match db::connect(&s.database_url, 1).await {
            Ok(pool) => {
                let r = db::require_schema(&pool).await;
                pool.close().await;
                r
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                say(format!("schema at version {} or newer", db::expected_schema()))?;
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                eprintln!("waiting: {e:#}");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a bearer token for a user and print it once (only its hash is stored).
    Create {
        /// The user the token acts as (users.id).
        #[arg(long)]
        user: i64,
        /// A label to recognise the token by.
        #[arg(long, default_value = "")]
        name: String,
        /// What the token may do: `full` (everything its user may), `read`
        /// (only reading: GETs and a read-only console session, for
        /// dashboards) or `convert` (convert-now and reading, no console:
        /// for workflow integrations).
        #[arg(long, default_value = "full", value_parser = parse_scope)]
        scope: Scope,
        /// How long the token works, e.g. `90d`, `12h`, `30m`, `2w`; without
        /// it, until revoked.
        #[arg(long, value_parser = parse_expiry)]
        expires_in: Option<std::time::Duration>,
    },
    /// List tokens (id, user, label, scope, created, expires, last used, revoked); never the tokens themselves.
    List {
        /// Only the tokens of this user.
        #[arg(long)]
        user: Option<i64>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (from `token list`): it stops working at once.
    Revoke {
        /// The token's id.
        id: i64,
    },
}

impl TokenCommand {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        match self {
            TokenCommand::Create { user, name, scope, expires_in } => {
                let grant = leadconv::store::auth::TokenGrant { scope, expires_in };
                say(leadconv::store::auth::create_scoped_token(&pool, user, &name, grant).await?)?;
            }
            TokenCommand::List { user, json } => {
                let tokens = leadconv::store::auth::list_tokens(&pool, user).await?;
                if !json {
                    say("id\tuser\tname\tscope\tcreated_at\texpires_at\tlast_used_at\trevoked_at")?;
                }
                for t in tokens {
                    let when = |t: Option<chrono::DateTime<chrono::Utc>>| t.map_or("-".to_owned(), |t| t.to_rfc3339());
                    let line = if json {
                        serde_json::to_string(&t)?
                    } else {
                        format!(
                            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                            t.id,
                            t.user_id,
                            t.name,
                            t.scope,
                            t.created_at.to_rfc3339(),
                            when(t.expires_at),
                            when(t.last_used_at),
                            when(t.revoked_at)
                        )
                    };
                    say(line)?;
                }
            }
            TokenCommand::Revoke { id } => {
                let t = leadconv::store::auth::revoke_token(&pool, id).await?;
                say(format!("revoked token {} of user {}", t.id, t.user_id))?;
            }
        }
        Ok(())
    }
}

fn parse_scope(raw: &str) -> Result<Scope, String> {
    Scope::parse(raw).ok_or_else(|| format!("{raw:?} is not a scope: write full, read or convert"))
}

/// A token's lifetime: a positive duration such as `90d`, `12h` or `30m`.
fn parse_expiry(raw: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(raw.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("a token must live longer than 0: write e.g. 90d, 12h or 30m".into()),
        Err(e) => Err(format!("{raw:?} is not a duration ({e}): write e.g. 90d, 12h or 30m")),
    }
}
