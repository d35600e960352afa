//! Long-running services: `worker` and `serve`.

use std::time::Duration;

use clap::Args;
use leadconv::config::Services;
use leadconv::http::{listener, serve};
use leadconv::queue::worker;
use leadconv::shutdown;
use leadconv::store::db;

use super::parse_secs;

#[derive(Args)]
pub struct Worker {
    /// Bulk conversion transactions in flight at once, each converting a
    /// batch of up to --batch-size leads. Eight keep both cores busy while
    /// some batches wait on others' locks (BENCHMARKS.md, 2026-11-27).
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
    /// Most leads one bulk transaction converts (1 converts lead by lead).
    #[arg(long, env = "LEADCONV_BATCH_SIZE", default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
    /// How long a bulk batch waits to fill up after its first message, in
    /// milliseconds.
    #[arg(long, env = "LEADCONV_BATCH_WAIT_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_wait_ms: u64,
    /// Workflow-triggered conversions (rules, convert-now) in flight at once,
    /// reserved beside the bulk ones: sized for concurrent convert-now callers.
    #[arg(long, env = "LEADCONV_WORKFLOW_CONCURRENCY", default_value_t = 8)]
    pub workflow_concurrency: u16,
    /// Exit once the queues are empty and no job waits to be published.
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Publisher lease used when this worker takes over an orphaned job's outbox.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub lease_secs: Duration,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Delete finished jobs and their results this many days after they
    /// finished (checked once a minute, in small batches); 0 keeps them forever.
    #[arg(long, env = "LEADCONV_RETENTION_DAYS", default_value_t = 30.0)]
    pub retention_days: f64,
    /// Publish again a job's pending leads when no queue holds a message and
    /// none of its leads was recorded for this many seconds: leads whose
    /// commit a failed-over Postgres lost after their message was acked
    /// (deploy/README.md, "A failover Postgres endpoint"). Above the longest
    /// a batch may take.
    #[arg(long, env = "LEADCONV_STRANDED_AFTER_SECS", default_value = "600", value_parser = parse_secs)]
    pub stranded_after_secs: Duration,
    #[command(flatten)]
    pub limits: leadconv::config::WaitLimits,
}

impl Worker {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let Worker {
            concurrency,
            batch_size,
            batch_wait_ms,
            workflow_concurrency,
            exit_when_idle,
            lease_secs,
            metrics,
            retention_days,
            stranded_after_secs,
            limits,
        } = self;
        anyhow::ensure!(
            retention_days.is_finite() && retention_days >= 0.0,
            "--retention-days must be a number of days, 0 or more (0 keeps jobs forever); got {retention_days}"
        );
        let topology = s.topology();
        // Besides the conversions: the sweeper, and the listener that hears
        // serve's convert-now commits (see `worker::run`), and one spare.
        let connections = u32::from(concurrency) + u32::from(workflow_concurrency) + 3;
        let pool = db::connect_service(&s.database_url, connections, &limits.limits()).await?;
        let mut cfg = worker::WorkerConfig::new(s.amqp_url.clone(), topology);
        cfg.concurrency = concurrency;
        cfg.batch_size = batch_size;
        cfg.batch_wait = Duration::from_millis(batch_wait_ms);
        cfg.workflow_concurrency = workflow_concurrency;
        cfg.exit_when_idle = exit_when_idle;
        cfg.lease = lease_secs;
        cfg.stranded_after = stranded_after_secs;
        cfg.retention = (retention_days > 0.0).then(|| Duration::from_secs_f64(retention_days * 86_400.0));
        let stop = shutdown::on_signal();
        if let Some(addr) = metrics {
            leadconv::metrics::install();
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = serve::metrics_only(addr, stop).await {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            });
        }
        worker::run(pool, cfg, stop).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct Serve {
    /// Address to listen on for HTTP.
    #[arg(long, env = "LEADCONV_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Where the CRM shows a record, with `{module}` (contact, account,
    /// deal) and `{id}` filled in, e.g. https://crm.example.com/{module}s/{id}:
    /// the console links the records a job created or merged into to it.
    #[arg(long, env = "LEADCONV_CRM_RECORD_URL", value_parser = parse_record_url)]
    pub crm_record_url: Option<String>,
    /// Convert-now calls this process serves at once (checked,
    /// snapshotted, converted); more wait their turn. Their conversions
    /// run one transaction at a time, each converting the calls waiting
    /// with the same options together. Bounds the CPU they take from bulk
    /// jobs converting beside them (the pool holds 24 connections).
    #[arg(long, env = "LEADCONV_CONVERT_NOW_CONCURRENCY", default_value_t = leadconv::queue::enqueue::CONVERTING_NOW_AT_ONCE, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub convert_now_concurrency: u16,
    #[command(flatten)]
    pub clients: ClientLimits,
    #[command(flatten)]
    pub limits: leadconv::config::WaitLimits,
}

/// What a slow or idle HTTP client may hold, and how many connections are
/// served (`leadconv::http::listener`; its `Limits::DEFAULT` is these
/// defaults, checked by a test).
#[derive(Args)]
pub struct ClientLimits {
    /// Seconds a client has to send a request's head (request line and
    /// headers), from its connection's accept, or on a kept-alive connection
    /// from the next request's first byte.
    #[arg(long, env = "LEADCONV_HEADER_TIMEOUT_SECS", default_value = "10", value_parser = parse_secs)]
    pub header_timeout_secs: Duration,
    /// Seconds a client has to send a whole request body, however slowly
    /// it trickles in.
    #[arg(long, env = "LEADCONV_BODY_TIMEOUT_SECS", default_value = "30", value_parser = parse_secs)]
    pub body_timeout_secs: Duration,
    /// Seconds a response may wait for a client that does not read (no
    /// byte written) before its connection is closed.
    #[arg(long, env = "LEADCONV_WRITE_TIMEOUT_SECS", default_value = "30", value_parser = parse_secs)]
    pub write_timeout_secs: Duration,
    /// Seconds a whole request may take, from its head to its response's
    /// last byte: long enough for a large CSV export to a slow reader, and
    /// for convert-now's wait (up to 60 s).
    #[arg(long, env = "LEADCONV_RESPONSE_TIMEOUT_SECS", default_value = "600", value_parser = parse_secs)]
    pub response_timeout_secs: Duration,
    /// Seconds a kept-alive connection may wait for its next request (at
    /// most 60).
    #[arg(long, env = "LEADCONV_IDLE_TIMEOUT_SECS", default_value = "30", value_parser = parse_idle_secs)]
    pub idle_timeout_secs: Duration,
    /// Connections served at once. Above it, --reserved-connections more
    /// are accepted for /healthz, /readyz and /metrics only; beyond those,
    /// new connections are closed at once. The limit on open files is
    /// raised to fit (up to its hard limit, with a warning if that is too low).
    #[arg(long, env = "LEADCONV_MAX_CONNECTIONS", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections kept above --max-connections for /healthz, /readyz and
    /// /metrics: one request each, anything else answered 503 overloaded.
    #[arg(long, env = "LEADCONV_RESERVED_CONNECTIONS", default_value_t = 64)]
    pub reserved_connections: u32,
}

impl ClientLimits {
    pub fn limits(&self) -> listener::Limits {
        listener::Limits {
            header: self.header_timeout_secs,
            body: self.body_timeout_secs,
            write: self.write_timeout_secs,
            response: self.response_timeout_secs,
            idle: self.idle_timeout_secs,
            max_connections: self.max_connections as usize,
            reserved_connections: self.reserved_connections as usize,
        }
    }
}

/// An idle timeout: load balancers and clients expect a minute at most.
fn parse_idle_secs(raw: &str) -> Result<Duration, String> {
    let d = parse_secs(raw)?;
    if d > listener::MAX_IDLE {
        return Err(format!("{raw:?} is more than {} seconds", listener::MAX_IDLE.as_secs()));
    }
    Ok(d)
}

impl Serve {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        // Sized for a few dozen concurrent callers; a few connections stay
        // open so that the first burst of convert-now calls finds them.
        let pool = db::connect_warm(&s.database_url, 24, 4, Some(&self.limits.limits())).await?;
        let cfg = serve::ServeConfig {
            listen: self.listen,
            amqp_url: s.amqp_url.clone(),
            topology: s.topology(),
            record_url: self.crm_record_url,
            limits: self.clients.limits(),
            convert_now_concurrency: usize::from(self.convert_now_concurrency),
        };
        serve::run(pool, cfg, shutdown::on_signal()).await
    }
}

/// A record URL template must name the record's id, and be a web address.
fn parse_record_url(raw: &str) -> Result<String, String> {
    if !raw.contains("{id}") {
        return Err(format!("{raw:?} has no {{id}}: write e.g. https://crm.example.com/{{module}}s/{{id}}"));
    }
    if !(raw.starts_with("https://") || raw.starts_with("http://")) {
        return Err(format!(
            "{raw:?} is not an http(s) address: write e.g. https://crm.example.com/{{module}}s/{{id}}"
        ));
    }
    Ok(raw.to_owned())
}
