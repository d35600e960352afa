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

    /// RabbitMQ carrying the lead messages.
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
