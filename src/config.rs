//! What every `leadconv` and `leadconv-dev` command is configured by: where
//! Postgres and RabbitMQ are, the queue name prefix, the log format. Shared
//! so that both binaries read the same flags and environment variables.

use clap::{Args, ValueEnum};

use crate::queue::Topology;

#[derive(Debug, Clone, Args)]
pub struct Services {
    /// Postgres holding the CRM tables.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/leadconv",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,

    /// RabbitMQ carrying the lead messages; a cluster's nodes as a
    /// comma-separated list (same user, password and vhost).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true,
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name, to share a broker.
    #[arg(long, env = "LEADCONV_QUEUE_PREFIX", default_value = "leadconv", global = true)]
    pub queue_prefix: String,

    /// Log lines as text for people or JSON for log collectors.
    #[arg(long, env = "LEADCONV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How long `worker` and `serve` let database work wait (see
/// [`crate::store::db::Limits`]).
#[derive(Debug, Clone, Args)]
pub struct WaitLimits {
    /// Seconds a statement waits for a lock before it fails as transient
    /// (and the lead is retried later): Postgres `lock_timeout`.
    #[arg(long, env = "LEADCONV_LOCK_TIMEOUT_SECS", default_value = "5", value_parser = positive_secs)]
    pub lock_timeout_secs: std::time::Duration,
    /// Seconds any statement may run: Postgres `statement_timeout`.
    #[arg(long, env = "LEADCONV_STATEMENT_TIMEOUT_SECS", default_value = "300", value_parser = positive_secs)]
    pub statement_timeout_secs: std::time::Duration,
    /// Seconds a session may sit idle inside a transaction before Postgres
    /// ends it and releases its locks (a hung or frozen process):
    /// `idle_in_transaction_session_timeout`.
    #[arg(long, env = "LEADCONV_IDLE_IN_TRANSACTION_TIMEOUT_SECS", default_value = "10", value_parser = positive_secs)]
    pub idle_in_transaction_timeout_secs: std::time::Duration,
}

impl WaitLimits {
    pub fn limits(&self) -> crate::store::db::Limits {
        crate::store::db::Limits {
            lock: self.lock_timeout_secs,
            statement: self.statement_timeout_secs,
            idle_in_transaction: self.idle_in_transaction_timeout_secs,
        }
    }
}

fn positive_secs(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Services {
    pub fn topology(&self) -> Topology {
        Topology::new(self.queue_prefix.clone())
    }

    /// Logs to stderr (stdout is for results), filtered by `RUST_LOG`, else
    /// by `default_filter` (e.g. `warn,leadconv=info`).
    pub fn init_logging(&self, default_filter: &str) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
        // Colours only for a person at a terminal, never in a file or a log collector.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
        match self.log_format {
            LogFormat::Json => logs.json().with_current_span(true).init(),
            LogFormat::Text => logs.init(),
        }
    }
}
