//! RabbitMQ: the topology leadconv declares, and the message it carries.
//!
//! ```text
//!  producer ──► {p}.convert (topic) ──bulk.#──────► {p}.bulk      (quorum) ──► workers
//!                                   └─workflow.#──► {p}.workflow  (quorum) ──► workers, first
//!  worker, transient failure ──► {p}.retry (topic) ──*.rN──► {p}.backoff.N (quorum, TTL) ──expired──► {p}.convert
//!  unreadable message / delivery limit ──► {p}.dead (fanout) ──► {p}.dead (quorum): parked
//! ```
//!
//! Work queues are quorum queues: replicated, durable, with a delivery limit
//! so that a message that crashes every worker that takes it ends parked in
//! `{p}.dead` instead of looping forever. The back-off queues are quorum
//! queues too, dead-lettering at least once: a lead waiting out its back-off
//! survives the loss of a cluster node (issue 23); the classic
//! `{p}.retry.N` queues of earlier versions are retired by
//! [`Topology::retire_classic_retry_queues`]. Workflow-triggered conversions
//! have their own queue and their own share of every worker, so a bulk
//! backlog of a million leads never delays them. Declaring is idempotent;
//! the arguments here must match `deploy/rabbitmq/definitions.json`.

use std::time::Duration;

use crate::store::types::Trigger;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A message: convert this lead as part of this job. Small on purpose: the
/// job's options live in Postgres, read once per job by each worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadMessage {
    pub job_id: Uuid,
    pub lead_id: i64,
    /// When the producer published it: the start of the enqueue→commit
    /// latency, recorded with the result. Absent in hand-made messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Which work queue a job's messages go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    Bulk,
    Workflow,
}

impl Lane {
    pub fn for_trigger(trigger: Trigger) -> Lane {
        match trigger {
            Trigger::Workflow => Lane::Workflow,
            Trigger::Manual | Trigger::Schedule | Trigger::Api => Lane::Bulk,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Bulk => "bulk",
            Lane::Workflow => "workflow",
        }
    }
}

/// How many times RabbitMQ hands a message out before parking it: only
/// crashes count (a retry is a new message), so this is generous.
pub const DELIVERY_LIMIT: i64 = 20;

/// A message handed out this many times before without being settled is
/// taken for one that kills its worker: instead of converting, the worker
/// records its lead as failed (`poison_message`), so the job still
/// completes. Well below [`DELIVERY_LIMIT`], where the broker would park it
/// and leave its lead pending for ever.
pub const POISON_REDELIVERIES: u32 = 10;

/// Back-off for transient failures: the n-th retry waits `RETRY_DELAYS[n]`.
/// After the last one the lead is recorded as failed.
pub const RETRY_DELAYS: &[Duration] = &[
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// Header carrying how many retries a message has been through.
pub const ATTEMPT_HEADER: &str = "x-leadconv-attempt";

/// Header carrying the advisory-lock keys of the message's lead (its
/// normalised e-mail and company, `store::snapshot::lead_lock_keys`), as
/// the producer read them: a worker forms its batches so that batches in
/// flight share none (`queue::batching`). A header, not a field of the
/// body: a worker of an earlier version reads the body only, and the
/// keys only steer the order (the locks themselves are taken again).
pub const KEYS_HEADER: &str = "x-leadconv-keys";

/// Queue and exchange names under one prefix (`leadconv` by default), so
/// that several installations, or tests, share a broker without touching
/// each other's queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Topology {
        Topology { prefix: prefix.into() }
    }

    pub fn convert_exchange(&self) -> String {
        format!("{}.convert", self.prefix)
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn work_queue(&self, lane: Lane) -> String {
        format!("{}.{}", self.prefix, lane.as_str())
    }
    pub fn retry_queue(&self, level: usize) -> String {
        format!("{}.backoff.{}", self.prefix, level + 1)
    }
    /// The classic back-off queue of earlier versions (before issue 23).
    fn classic_retry_queue(&self, level: usize) -> String {
        format!("{}.retry.{}", self.prefix, level + 1)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Routing key of a first delivery, and of the n-th retry.
    pub fn routing_key(lane: Lane, retry: Option<usize>) -> String {
        match retry {
            None => format!("{}.lead", lane.as_str()),
            Some(level) => format!("{}.r{}", lane.as_str(), level + 1),
        }
    }

    /// Every queue with its arguments, as declared (and as the broker
    /// definitions file must state them).
    pub fn queues(&self) -> Vec<(String, FieldTable)> {
        let mut out = Vec::new();
        for lane in [Lane::Workflow, Lane::Bulk] {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
            out.push((self.work_queue(lane), args));
        }
        for (level, delay) in RETRY_DELAYS.iter().enumerate() {
            let mut args = FieldTable::default();
            // Quorum: replicated, so a lost node strands no lead in its
            // back-off. At-least-once dead-lettering keeps an expired
            // message in this queue until the work queue has confirmed it
            // (the default, at-most-once, could drop it on a node loss);
            // RabbitMQ requires reject-publish overflow with it.
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.convert_exchange().into()));
            args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
            args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
            out.push((self.retry_queue(level), args));
        }
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        out.push((self.dead_queue(), args));
        out
    }

    /// Declares exchanges, queues and bindings. Idempotent.
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(&self.convert_exchange(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        ch.exchange_declare(&self.retry_exchange(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        ch.exchange_declare(&self.dead_exchange(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
        for (name, args) in self.queues() {
            ch.queue_declare(&name, QueueDeclareOptions { durable: true, ..Default::default() }, args).await?;
        }
        let bind = |q: String, x: String, key: String| async move {
            ch.queue_bind(&q, &x, &key, QueueBindOptions::default(), FieldTable::default()).await
        };
        for lane in [Lane::Workflow, Lane::Bulk] {
            bind(self.work_queue(lane), self.convert_exchange(), format!("{}.#", lane.as_str())).await?;
        }
        for level in 0..RETRY_DELAYS.len() {
            bind(self.retry_queue(level), self.retry_exchange(), format!("*.r{}", level + 1)).await?;
        }
        bind(self.dead_queue(), self.dead_exchange(), String::new()).await?;
        Ok(())
    }

    /// Unbinds the classic back-off queues of earlier versions from the
    /// retry exchange, so no retry goes there any more, and deletes each
    /// once it is empty. Until then their messages still expire into the
    /// convert exchange as before: an upgrade loses no lead waiting out a
    /// back-off. Unbinding and deleting a queue that does not exist are
    /// no-ops in RabbitMQ (since 3.2); deleting one that still holds
    /// messages is refused, closing its channel, hence one channel each.
    pub async fn retire_classic_retry_queues(&self, conn: &lapin::Connection) -> lapin::Result<()> {
        let ch = conn.create_channel().await?;
        for level in 0..RETRY_DELAYS.len() {
            let name = self.classic_retry_queue(level);
            ch.queue_unbind(&name, &self.retry_exchange(), &format!("*.r{}", level + 1), FieldTable::default()).await?;
        }
        let _ = ch.close(200, "done").await;
        for level in 0..RETRY_DELAYS.len() {
            let name = self.classic_retry_queue(level);
            let ch = conn.create_channel().await?;
            let empty_only = QueueDeleteOptions { if_empty: true, ..Default::default() };
            if ch.queue_delete(&name, empty_only).await.is_ok() {
                let _ = ch.close(200, "done").await;
            } else {
                tracing::info!(queue = %name, "a classic back-off queue of an earlier version still holds messages; they expire into the work queues, and it is deleted once empty");
            }
        }
        Ok(())
    }

    /// Removes everything `declare` made (tests clean up with it).
    pub async fn delete(&self, ch: &Channel) -> lapin::Result<()> {
        for (name, _) in self.queues() {
            ch.queue_delete(&name, QueueDeleteOptions::default()).await?;
        }
        for x in [self.convert_exchange(), self.retry_exchange(), self.dead_exchange()] {
            ch.exchange_delete(&x, ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// Messages ready in `queue` (not counting those handed to consumers).
    pub async fn depth(&self, ch: &Channel, queue: &str) -> lapin::Result<u32> {
        Ok(self.state(ch, queue).await?.messages)
    }

    /// Messages ready in `queue` and consumers attached to it. Fails when
    /// the queue does not exist, closing `ch`: use a channel of its own.
    pub async fn state(&self, ch: &Channel, queue: &str) -> lapin::Result<QueueState> {
        let q = ch
            .queue_declare(
                queue,
                QueueDeclareOptions { passive: true, durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        Ok(QueueState { messages: q.message_count(), consumers: q.consumer_count() })
    }
}

/// What RabbitMQ says of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub messages: u32,
    pub consumers: u32,
}

/// Properties of every leadconv message: persistent JSON and its retry
/// count.
pub fn properties(attempt: u32) -> BasicProperties {
    keyed_properties(attempt, &[])
}

/// [`properties`] with the lock keys of the message's lead (see
/// [`KEYS_HEADER`]; none: unknown).
pub fn keyed_properties(attempt: u32, keys: &[i64]) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from(ATTEMPT_HEADER), AMQPValue::LongUInt(attempt));
    if !keys.is_empty() {
        let keys = keys.iter().map(|&k| AMQPValue::LongLongInt(k)).collect::<Vec<_>>();
        headers.insert(ShortString::from(KEYS_HEADER), AMQPValue::FieldArray(keys.into()));
    }
    BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into()).with_headers(headers)
}

/// The lock keys a delivery carries (empty when it carries none).
pub fn keys_of(props: &BasicProperties) -> Vec<i64> {
    match props.headers().as_ref().and_then(|h| h.inner().get(KEYS_HEADER)) {
        Some(AMQPValue::FieldArray(keys)) => keys
            .as_slice()
            .iter()
            .filter_map(|k| match k {
                AMQPValue::LongLongInt(k) => Some(*k),
                AMQPValue::LongInt(k) => Some(i64::from(*k)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The retry count a delivery carries (0 on its first way through).
pub fn attempt_of(props: &BasicProperties) -> u32 {
    int_header(props, ATTEMPT_HEADER).unwrap_or(0)
}

/// How many times the quorum queue handed this message out before without
/// it being settled (its consumer died or lost its connection): the
/// broker's `x-delivery-count` header, absent on a first delivery.
pub fn redeliveries_of(props: &BasicProperties) -> u32 {
    int_header(props, "x-delivery-count").unwrap_or(0)
}

fn int_header(props: &BasicProperties, name: &str) -> Option<u32> {
    props.headers().as_ref().and_then(|h| h.inner().get(name)).and_then(|v| match v {
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    })
}

/// How long reaching RabbitMQ may take before it is reported unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses of one RabbitMQ cluster that `AMQP_URL` names: one URL,
/// or several separated by commas (as the RabbitMQ Java and Python clients
/// take them), all with the same credentials, vhost, scheme and options,
/// differing only in host and port.
#[derive(Debug, Clone, PartialEq)]
pub struct Brokers {
    /// Each address as given, parsed.
    addresses: Vec<(String, lapin::uri::AMQPUri)>,
}

impl Brokers {
    /// Parses `AMQP_URL`; the error names the address at fault and the fix,
    /// never a password.
    pub fn parse(list: &str) -> Result<Brokers, String> {
        let mut addresses: Vec<(String, lapin::uri::AMQPUri)> = Vec::new();
        for (i, raw) in list.split(',').map(str::trim).enumerate() {
            let n = i + 1;
            if raw.is_empty() {
                return Err(format!(
                    "AMQP_URL: address {n} is empty; separate the cluster's addresses with single commas"
                ));
            }
            let uri = raw.parse::<lapin::uri::AMQPUri>().map_err(|e| {
                format!("AMQP_URL: address {n} is not an AMQP URL ({e}); expected amqp://user:password@host:5672/vhost")
            })?;
            if let Some((_, first)) = addresses.first() {
                let differs = if first.authority.userinfo != uri.authority.userinfo {
                    Some("user or password")
                } else if first.vhost != uri.vhost {
                    Some("vhost")
                } else if first.scheme != uri.scheme {
                    Some("scheme (amqp or amqps)")
                } else if first.query != uri.query {
                    Some("options")
                } else {
                    None
                };
                if let Some(what) = differs {
                    return Err(format!(
                        "AMQP_URL: address {n} ({}:{}) has another {what} than address 1; the addresses of one \
                         cluster share them and differ only in host and port",
                        uri.authority.host, uri.authority.port
                    ));
                }
            }
            addresses.push((raw.to_owned(), uri));
        }
        Ok(Brokers { addresses })
    }

    /// `host:port` of each address.
    pub fn nodes(&self) -> Vec<String> {
        self.addresses.iter().map(|(_, u)| format!("{}:{}", u.authority.host, u.authority.port)).collect()
    }

    /// Where it points, for messages: hosts, ports and vhost, never the
    /// password.
    pub fn describe(&self) -> String {
        let vhost = self.addresses.first().map_or("/", |(_, u)| u.vhost.as_str());
        format!("RabbitMQ at {} (vhost {vhost:?})", self.nodes().join(", "))
    }
}

/// Where an AMQP URL (or list of them) points, for messages: hosts, ports
/// and vhost, never the password.
pub fn describe(url: &str) -> String {
    match Brokers::parse(url) {
        Ok(b) => b.describe(),
        Err(_) => "RabbitMQ (AMQP_URL is not an amqp:// URL)".into(),
    }
}

/// The address this process tries first next time: a random one at
/// start, so that the processes of a deployment spread over the cluster's
/// nodes; after a connection, the one after it, so that a process whose
/// node was lost reconnects to another.
static START: std::sync::LazyLock<std::sync::atomic::AtomicUsize> =
    std::sync::LazyLock::new(|| std::sync::atomic::AtomicUsize::new(rand::random::<u16>().into()));

/// Connects to RabbitMQ, bounded by [`CONNECT_TIMEOUT`]; a failure names the
/// broker's host and port and what to check.
pub async fn connect(url: &str) -> anyhow::Result<lapin::Connection> {
    Ok(connect_to(url).await?.0)
}

/// [`connect`], also saying which node (`host:port`) answered: with
/// several addresses, each is tried in turn from this process's next start
/// (see [`START`]) until one answers.
pub async fn connect_to(url: &str) -> anyhow::Result<(lapin::Connection, String)> {
    let brokers = Brokers::parse(url).map_err(|e| anyhow::anyhow!(e))?;
    let n = brokers.addresses.len();
    let start = START.load(std::sync::atomic::Ordering::Relaxed) % n;
    let mut failures = Vec::new();
    for k in 0..n {
        let i = (start + k) % n;
        let (raw, uri) = &brokers.addresses[i];
        let node = format!("{}:{}", uri.authority.host, uri.authority.port);
        match connect_one(raw).await {
            Ok(conn) => {
                START.store(i + 1, std::sync::atomic::Ordering::Relaxed);
                if n > 1 {
                    tracing::info!(node = %node, "connected to RabbitMQ node {node}");
                }
                return Ok((conn, node));
            }
            Err((reason, hint)) => {
                if n > 1 {
                    tracing::warn!(node = %node, reason = %reason, "RabbitMQ node unreachable; trying the next address");
                }
                failures.push((node, reason, hint));
            }
        }
    }
    let hint = failures.last().map_or("", |f| f.2);
    let reasons: Vec<String> = if n == 1 {
        failures.into_iter().map(|(_, reason, _)| reason).collect()
    } else {
        failures.into_iter().map(|(node, reason, _)| format!("{node} {reason}")).collect()
    };
    Err(anyhow::anyhow!("cannot reach {}: {}; {hint}", brokers.describe(), reasons.join(", ")))
}

/// One address: the connection, or why not and what to check.
async fn connect_one(url: &str) -> Result<lapin::Connection, (String, &'static str)> {
    let props = lapin::ConnectionProperties::default().with_connection_name("leadconv".into());
    match tokio::time::timeout(CONNECT_TIMEOUT, lapin::Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            let reason = match &e {
                lapin::Error::IOError(io) => crate::store::db::io_reason(io),
                other => other.to_string(),
            };
            let hint = match &e {
                lapin::Error::ProtocolError(_) => "check the user, password and vhost in AMQP_URL",
                _ => "check that it runs and that AMQP_URL names the right host and port",
            };
            Err((reason, hint))
        }
        Err(_) => Err((
            format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            "check that it runs and that AMQP_URL names the right host and port",
        )),
    }
}

#[cfg(test)]
mod broker_list_tests {
    use super::Brokers;

    #[test]
    fn a_list_of_one_clusters_addresses_parses_and_names_its_nodes() {
        let b = Brokers::parse(
            "amqp://u:secret@rabbit-0:5672/crm, amqp://u:secret@rabbit-1:5673/crm,amqp://u:secret@rabbit-2/crm",
        )
        .unwrap();
        assert_eq!(b.nodes(), ["rabbit-0:5672", "rabbit-1:5673", "rabbit-2:5672"]);
        assert_eq!(b.describe(), "RabbitMQ at rabbit-0:5672, rabbit-1:5673, rabbit-2:5672 (vhost \"crm\")");
        assert!(!b.describe().contains("secret"));
        assert_eq!(Brokers::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap().nodes(), ["127.0.0.1:5672"]);
    }

    #[test]
    fn addresses_of_different_clusters_or_malformed_ones_are_refused_by_position() {
        let refused = |list: &str| Brokers::parse(list).unwrap_err();
        let e = refused("amqp://u:p@a/crm,amqp://u:p@b/other");
        assert!(e.contains("address 2 (b:5672) has another vhost"), "{e}");
        let e = refused("amqp://u:p@a/crm,amqp://v:secret@b/crm");
        assert!(e.contains("address 2") && e.contains("user or password") && !e.contains("secret"), "{e}");
        let e = refused("amqp://u:p@a/crm,amqps://u:p@b/crm");
        assert!(e.contains("scheme"), "{e}");
        let e = refused("amqp://u:p@a/crm,,amqp://u:p@b/crm");
        assert!(e.contains("address 2 is empty"), "{e}");
        let e = refused("amqp://u:p@a/crm,http://b");
        assert!(e.contains("address 2 is not an AMQP URL"), "{e}");
        // The reported case: a list read as one URL whose vhost is the rest.
        assert!(Brokers::parse("amqp://guest:guest@h1:5672/%2f,amqp://guest:guest@h2:5672/%2f").is_ok());
    }
}
