//! The worker: consumes lead messages and converts each lead.
//!
//! Every message is acknowledged only after its conversion committed (or
//! its permanent failure was recorded), so a worker killed at any point
//! loses nothing: RabbitMQ hands the unacknowledged message to the next
//! worker, and the conversion's own guard makes a second delivery a no-op.
//! Transient failures go through the TTL retry queues with growing delays;
//! unreadable messages are parked in the dead-letter queue.
//!
//! Besides consuming, each worker runs the maintenance that keeps jobs
//! moving: it publishes the outbox of jobs whose producer died, and rolls
//! job counters up into `conversion_jobs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::Channel;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, ErrorCode};
use crate::queue::acks::Acks;
use crate::queue::batching::{Batcher, Held, Keys};
use crate::queue::priority::Priority;
use crate::queue::{self, Lane, LeadMessage, Topology, RETRY_DELAYS};
use crate::store::convert::{self, ConvertError, Item};
use crate::store::job;
use crate::store::options::Settings;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    /// Bulk conversion transactions in flight at once, each converting a
    /// batch of up to `batch_size` leads. While workflow conversions run,
    /// only a quarter of them start (see [`Priority`]).
    pub concurrency: u16,
    /// Most leads one bulk transaction converts.
    pub batch_size: u16,
    /// How long a bulk batch waits to fill up after its first message
    /// (a job's last few leads, a small job).
    pub batch_wait: Duration,
    /// Workflow conversions in flight at once, on top of the bulk ones.
    pub workflow_concurrency: u16,
    /// Leave when there is nothing left to do (scripts, tests).
    pub exit_when_idle: bool,
    /// How long a publisher lease lasts without renewal.
    pub lease: Duration,
    /// How often maintenance (outbox sweep, counter rollup, idle check) runs.
    pub tick: Duration,
    /// Finished jobs older than this are deleted with their results; `None`
    /// keeps them forever.
    pub retention: Option<Duration>,
    /// How long a stopping worker waits for its conversions in flight.
    pub drain: Duration,
    /// A published job's pending leads are published again when no queue
    /// holds a message and none of its leads was recorded for this long
    /// (see [`crate::maintenance::republish_stranded`]).
    pub stranded_after: Duration,
}

impl WorkerConfig {
    pub fn new(amqp_url: impl Into<String>, topology: Topology) -> WorkerConfig {
        WorkerConfig {
            amqp_url: amqp_url.into(),
            topology,
            concurrency: 8,
            batch_size: 200,
            batch_wait: Duration::from_millis(20),
            workflow_concurrency: 8,
            exit_when_idle: false,
            lease: Duration::from_secs(30),
            tick: Duration::from_millis(500),
            retention: None,
            drain: Duration::from_secs(90),
            stranded_after: crate::maintenance::STRANDED_AFTER,
        }
    }
}

/// Runs until `stop` is cancelled (or, with `exit_when_idle`, until no work
/// is left), reconnecting to RabbitMQ with back-off whenever the connection
/// is lost.
pub async fn run(pool: PgPool, cfg: WorkerConfig, stop: CancellationToken) -> anyhow::Result<()> {
    // A broker that cannot be reached at start is a configuration problem
    // (wrong host, port or password) until proven otherwise: say so and
    // leave, instead of retrying in silence. Later losses are reconnected.
    queue::connect(&cfg.amqp_url).await?.close(200, "bye").await?;
    let cache = Arc::new(SettingsCache::default());
    // One for the worker's life: convert-now calls seen by the watcher
    // below hold bulk batches back across reconnections too.
    let priority = Arc::new(Priority::new(Priority::floor_for(cfg.concurrency)));
    let _watching = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch_convert_now(
        pool.clone(),
        priority.clone(),
        stop.clone(),
    )));
    let mut backoff = Duration::from_millis(100);
    // One warning per outage, not one per back-off step.
    let mut outage: Option<Instant> = None;
    loop {
        let started = Instant::now();
        match session(&pool, &cfg, &stop, &cache, &priority, &mut outage).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if stop.is_cancelled() {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                if outage.is_none() {
                    tracing::warn!(error = %format!("{e:#}"), "worker session ended; reconnecting with back-off");
                    outage = Some(Instant::now());
                } else {
                    tracing::debug!(error = %format!("{e:#}"), retry_in = ?backoff, "still reconnecting");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One connection's life. `Ok` means stop for good; `Err` means reconnect.
async fn session(
    pool: &PgPool,
    cfg: &WorkerConfig,
    stop: &CancellationToken,
    cache: &Arc<SettingsCache>,
    priority: &Arc<Priority>,
    outage: &mut Option<Instant>,
) -> anyhow::Result<()> {
    let conn = queue::connect(&cfg.amqp_url).await?;
    let publisher = conn.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    cfg.topology.declare(&publisher).await?;
    if let Err(e) = cfg.topology.retire_classic_retry_queues(&conn).await {
        tracing::warn!(error = %e, "could not retire the classic back-off queues of an earlier version; will try again on the next connection");
    }
    let sweeper_channel = conn.create_channel().await?;
    // Queue depths are read on a channel of their own: a failed passive
    // declare closes its channel, which must not be one that acks.
    let probe = conn.create_channel().await?;
    sweeper_channel.confirm_select(ConfirmSelectOptions::default()).await?;

    let mut consumers = Vec::new();
    let mut channels = Vec::new();
    // Each lane prefetches one round more than it converts at once, so a
    // slot that frees up finds its next messages already here instead of
    // waiting a round trip to the broker; the semaphores bound the
    // conversions (bulk: batches of up to `batch_size` leads).
    let slots = |n: u16| Arc::new(tokio::sync::Semaphore::new(usize::from(n.max(1))));
    let (workflow_slots, bulk_slots) = (slots(cfg.workflow_concurrency), slots(cfg.concurrency));
    let batch_size = usize::from(cfg.batch_size.max(1));
    // Bulk: the batches in flight, one more, and a quarter as many again
    // waiting, from which the next batches are formed so that they share no
    // lock key with those in flight (see `queue::batching`). Each message
    // held costs the worker memory (about 9 KiB measured, with lapin's
    // buffers), hence no more.
    let bulk_window = {
        let (size, n) = (cfg.batch_size.max(1), cfg.concurrency.max(1));
        size.saturating_mul(n.saturating_add(1)).saturating_add(size.saturating_mul(n / 4))
    };
    // Done messages wait for earlier ones still converting or waiting for
    // their keys, to be acked with them in one frame (see `queue::acks`).
    // Bulk: up to twice as many as the lane holds open, which its prefetch
    // leaves room for. When none wait, that room lets RabbitMQ send more
    // open messages than the window, which the worker then holds too
    // (peak RSS measured 81-87 MiB, against 68-77 before; and a worker
    // takes more of a backlog from the others). Workflow: its prefetch
    // stays small, so that a busy worker does not sit on leads another
    // could convert now; up to half of it waits.
    let workflow_window = cfg.workflow_concurrency.max(1).saturating_mul(2);
    let (bulk_prefetch, bulk_hold) = crate::queue::acks::bulk_room(bulk_window);
    let mut lane_acks = Vec::new();
    for (lane, prefetch, hold) in
        [(Lane::Workflow, workflow_window, usize::from(workflow_window / 2)), (Lane::Bulk, bulk_prefetch, bulk_hold)]
    {
        let ch = conn.create_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let tag = format!("leadconv-{}-{}", lane.as_str(), Uuid::new_v4().simple());
        let consumer = ch
            .basic_consume(&cfg.topology.work_queue(lane), &tag, BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        consumers.push(consumer.map(move |d| (lane, d)));
        lane_acks.push((lane, Arc::new(Acks::new(ch.clone(), hold))));
        channels.push((ch, tag));
    }
    let acks_of =
        |lane: Lane| lane_acks.iter().find(|(l, _)| *l == lane).map(|(_, a)| a.clone()).expect("a channel per lane");
    let mut deliveries = futures::stream::select_all(consumers);
    match outage.take() {
        Some(since) => tracing::info!(down_for = ?since.elapsed(), "worker reconnected; consuming again"),
        None => tracing::info!(queue_prefix = %cfg.topology.prefix, concurrency = cfg.concurrency, "worker consuming"),
    }

    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper: Option<tokio::task::JoinHandle<()>> = None;
    let mut idle_ticks = 0;
    let mut seen_since_tick = false;
    let mut retention_due = Instant::now();
    // This worker's publisher lease, for the jobs its sweeper takes over.
    let lease = crate::queue::producer::Lease::new(cfg.lease);

    // Cancelled by a conversion whose retry could not be published: the
    // broker (or this connection to it) is in trouble, so the session ends
    // and reconnects with back-off, the message going back to the queue
    // once, instead of being handed back and forth at once until it looks
    // like poison.
    let broken = CancellationToken::new();
    // Bulk messages waiting for a batch, and the batches in flight.
    let mut bulk = BulkLane::default();
    let spawn = |tasks: &mut JoinSet<()>, deliveries: Vec<Delivery>, lane: Lane| {
        let ctx = Handler {
            pool: pool.clone(),
            publisher: publisher.clone(),
            topology: cfg.topology.clone(),
            cache: cache.clone(),
            lane,
            acks: acks_of(lane),
            broken: broken.clone(),
        };
        let counter = in_flight.clone();
        let lane_slots = if lane == Lane::Workflow { workflow_slots.clone() } else { bulk_slots.clone() };
        let priority = priority.clone();
        let n = deliveries.len();
        metrics::gauge!(crate::metrics::IN_FLIGHT).set((counter.fetch_add(n, Ordering::SeqCst) + n) as f64);
        let handle = tasks.spawn(async move {
            let _slot = lane_slots.acquire_owned().await.expect("the semaphore is never closed");
            let _turn = match lane {
                Lane::Workflow => priority.workflow_turn(),
                Lane::Bulk => priority.bulk_turn().await,
            };
            ctx.handle(deliveries).await;
            metrics::gauge!(crate::metrics::IN_FLIGHT).set((counter.fetch_sub(n, Ordering::SeqCst) - n) as f64);
        });
        handle.id()
    };
    let concurrency = usize::from(cfg.concurrency.max(1));
    // Starts every bulk batch that may start now: full ones, or with
    // `partial` whatever may go.
    let start_batches = |tasks: &mut JoinSet<()>, bulk: &mut BulkLane, partial: bool| {
        while let Some((batch, held)) = bulk.next(concurrency, priority.batch_size(batch_size), partial) {
            let id = spawn(tasks, batch, Lane::Bulk);
            bulk.started(id, held, cfg.batch_wait);
        }
    };
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = broken.cancelled() => break Err(anyhow::anyhow!("a retry could not be published to RabbitMQ")),
            next = deliveries.next() => match next {
                Some((lane, Ok(delivery))) => {
                    seen_since_tick = true;
                    acks_of(lane).received(&delivery);
                    match lane {
                        // A workflow lead is converted at once, alone: it
                        // never waits for a batch to fill.
                        Lane::Workflow => {
                            spawn(&mut tasks, vec![delivery], lane);
                        }
                        Lane::Bulk => {
                            bulk.arrived(delivery, cfg.batch_wait);
                            start_batches(&mut tasks, &mut bulk, false);
                        }
                    }
                }
                Some((_, Err(e))) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("RabbitMQ closed the consumers")),
            },
            _ = tokio::time::sleep_until(bulk.due.unwrap_or_else(tokio::time::Instant::now)), if bulk.due.is_some() => {
                // No full batch could go for `batch_wait`: what may go goes
                // (a job's last leads, a small job), if a batch may start.
                // Every bulk slot busy, or every waiting lead held back by
                // a batch in flight: look again after another wait (the
                // broker sends more as the running batches ack).
                start_batches(&mut tasks, &mut bulk, true);
                bulk.due = (!bulk.waiting.is_empty()).then(|| tokio::time::Instant::now() + cfg.batch_wait);
            }
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match joined {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "a conversion task panicked; its message will be redelivered");
                        e.id()
                    }
                };
                // A batch that ended frees its keys: the next full batch
                // may be among the leads that waited on them.
                if bulk.ended(id) {
                    start_batches(&mut tasks, &mut bulk, false);
                }
            }
            _ = tick.tick() => {
                if cfg.exit_when_idle {
                    let idle = !seen_since_tick && bulk.waiting.is_empty() && in_flight.load(Ordering::SeqCst) == 0
                        && sweeper.as_ref().is_none_or(|h| h.is_finished())
                        && nothing_left(pool, &probe, &cfg.topology).await.unwrap_or(false);
                    idle_ticks = if idle { idle_ticks + 1 } else { 0 };
                    if idle_ticks >= 2 {
                        tracing::info!("no work left; exiting");
                        break Ok(());
                    }
                }
                // Maintenance runs beside consumption, one round at a time.
                if sweeper.as_ref().is_none_or(|h| h.is_finished()) {
                    let (pool, ch, topology) = (pool.clone(), sweeper_channel.clone(), cfg.topology.clone());
                    let keep = cfg.retention.filter(|_| Instant::now() >= retention_due);
                    if keep.is_some() {
                        retention_due = Instant::now() + crate::maintenance::RETENTION_EVERY;
                    }
                    let stranded = cfg.stranded_after;
                    sweeper = Some(tokio::spawn(async move {
                        crate::maintenance::round(&pool, &ch, &topology, &lease, keep, stranded).await
                    }));
                }
                seen_since_tick = false;
            }
        }
    };

    // Stop taking messages, finish those in flight, then leave: whatever
    // was prefetched but not started goes back to the queue on close. A
    // session that failed does not wait for its conversions: they may be
    // stuck on a database that is gone, and their unacknowledged messages
    // come back to whoever consumes next. A graceful stop waits, bounded by
    // the statement timeout each conversion runs under.
    for (ch, tag) in &channels {
        let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
    }
    if outcome.is_err() {
        tasks.abort_all();
    }
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.drain, drained).await.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "conversions still running at the end of the drain; abandoning them (their messages are redelivered)"
        );
        tasks.abort_all();
    }
    if let Some(h) = sweeper {
        h.abort();
    }
    // Done messages still waiting for an earlier one (prefetched and never
    // started, it goes back to the queue on close) are acked now, after a
    // failure too while the channel lasts: else they come back, each with
    // one more delivery counted. Bounded: the channel may be gone.
    let flushed = async {
        for (_, acks) in &lane_acks {
            acks.flush().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), flushed).await.is_err() {
        tracing::warn!("could not ack the last done messages in time; they will come back and be recognised as done");
    }
    if outcome.is_ok() {
        crate::maintenance::rollup_active(pool).await.ok();
        // Channels first, then the connection: closing a connection with
        // channels still open makes lapin log spurious errors.
        for ch in channels.iter().map(|(ch, _)| ch).chain([&publisher, &sweeper_channel, &probe]) {
            let _ = ch.close(200, "bye").await;
        }
        let _ = conn.close(200, "bye").await;
    }
    outcome
}

/// The bulk lane of a session: messages waiting for a batch, the batches
/// in flight and the keys they hold (see [`Batcher`]).
#[derive(Default)]
struct BulkLane {
    waiting: Batcher<Delivery>,
    running: HashMap<tokio::task::Id, Held>,
    /// When a batch goes even if not full.
    due: Option<tokio::time::Instant>,
    /// A look for a full batch that found none is not made again on every
    /// message that arrives, only once this many wait (or a batch ends).
    look_at: usize,
}

impl BulkLane {
    fn arrived(&mut self, delivery: Delivery, wait: Duration) {
        let keys = Keys::from_header(&queue::keys_of(&delivery.properties));
        self.waiting.push(delivery, keys);
        self.due.get_or_insert_with(|| tokio::time::Instant::now() + wait);
    }

    /// The next batch to start, if fewer than `concurrency` run: a full
    /// one of `size` leads, or with `partial` whatever may go.
    fn next(&mut self, concurrency: usize, size: usize, partial: bool) -> Option<(Vec<Delivery>, Held)> {
        if self.running.len() >= concurrency || (!partial && self.waiting.len() < self.look_at.max(size)) {
            return None;
        }
        let taken = self.waiting.take(size, if partial { 1 } else { size });
        self.look_at = if taken.is_none() && !partial { self.waiting.len() + size / 2 } else { 0 };
        taken
    }

    fn started(&mut self, task: tokio::task::Id, held: Held, wait: Duration) {
        self.running.insert(task, held);
        self.due = (!self.waiting.is_empty()).then(|| tokio::time::Instant::now() + wait);
    }

    /// A task ended; `true` if it was a bulk batch (its keys are free).
    fn ended(&mut self, task: tokio::task::Id) -> bool {
        let Some(held) = self.running.remove(&task) else { return false };
        self.waiting.release(held);
        self.look_at = 0;
        true
    }
}

/// Convert-now leads are converted by `serve` itself, not by a worker
/// (see `Enqueuer::convert_here`), and each commit notifies
/// [`finished::CHANNEL`](crate::store::finished::CHANNEL): heard here, it
/// keeps this worker's bulk batches to their floor while those callers
/// wait, as its own workflow conversions do (see [`Priority`]).
async fn watch_convert_now(pool: PgPool, priority: Arc<Priority>, stop: CancellationToken) {
    crate::store::finished::listen(&pool, &stop, |_| priority.workflow_ended_elsewhere()).await
}

/// True when no queue holds a message for this installation, no job waits
/// to be published, and nothing is in flight.
async fn nothing_left(pool: &PgPool, ch: &Channel, topology: &Topology) -> anyhow::Result<bool> {
    let mut queues = vec![topology.work_queue(Lane::Workflow), topology.work_queue(Lane::Bulk)];
    queues.extend((0..RETRY_DELAYS.len()).map(|l| topology.retry_queue(l)));
    for q in queues {
        if topology.depth(ch, &q).await? > 0 {
            return Ok(false);
        }
    }
    let unpublished = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM conversion_jobs
                          WHERE published_at IS NULL AND status IN ('scheduled', 'in_progress')) AS "unpublished!""#
    )
    .fetch_one(pool)
    .await?;
    Ok(!unpublished)
}

/// Job settings, read once per job and worker rather than per lead.
#[derive(Default)]
struct SettingsCache {
    jobs: Mutex<HashMap<Uuid, (Instant, Arc<JobWork>)>>,
}

/// What a job's leads need: its settings, and for an undo job the job it
/// takes back.
struct JobWork {
    settings: Settings,
    undo_of: Option<Uuid>,
}

/// How long cached settings are trusted (custom field mappings may change).
const SETTINGS_TTL: Duration = Duration::from_secs(60);

impl SettingsCache {
    /// `Ok(None)`: the job does not exist (deleted).
    async fn get(&self, pool: &PgPool, job_id: Uuid) -> Result<Option<Arc<JobWork>>, Error> {
        if let Some((at, s)) = self.jobs.lock().expect("cache lock").get(&job_id) {
            if at.elapsed() < SETTINGS_TTL {
                return Ok(Some(s.clone()));
            }
        }
        let Some(job) = job::get(pool, job_id).await? else { return Ok(None) };
        let settings = Arc::new(JobWork { settings: job::settings(pool, &job).await?, undo_of: job.undo_of });
        let mut jobs = self.jobs.lock().expect("cache lock");
        jobs.retain(|_, (at, _)| at.elapsed() < SETTINGS_TTL);
        jobs.insert(job_id, (Instant::now(), settings.clone()));
        Ok(Some(settings))
    }
}

struct Handler {
    /// Cancelled to end the session (see `broken` in [`session`]).
    broken: CancellationToken,
    pool: PgPool,
    publisher: Channel,
    topology: Topology,
    cache: Arc<SettingsCache>,
    lane: Lane,
    /// The acks of the lane's channel.
    acks: Arc<Acks>,
}

/// A readable message on its way to a conversion.
struct Message {
    delivery: Delivery,
    msg: LeadMessage,
    /// How many retry queues it went through.
    attempt: u32,
}

impl Handler {
    /// Converts the leads of `deliveries` (one workflow message, or a bulk
    /// batch): each job's leads in one batch, every message acknowledged
    /// only once its lead's result is committed.
    async fn handle(&self, deliveries: Vec<Delivery>) {
        let mut jobs: Vec<(Uuid, Vec<Message>)> = Vec::new();
        for delivery in deliveries {
            let Some(m) = self.admit(delivery).await else { continue };
            match jobs.iter_mut().find(|(job, _)| *job == m.msg.job_id) {
                Some((_, group)) => group.push(m),
                None => jobs.push((m.msg.job_id, vec![m])),
            }
        }
        for (job_id, group) in jobs {
            self.convert(job_id, group).await;
        }
    }

    /// Reads a message; parks an unreadable one, and fails the lead of one
    /// handed out again and again (`None` then: it is dealt with).
    async fn admit(&self, delivery: Delivery) -> Option<Message> {
        let msg: LeadMessage = match serde_json::from_slice(&delivery.data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, bytes = delivery.data.len(), "unreadable message; parking it in the dead-letter queue");
                metrics::counter!(crate::metrics::DEAD_LETTERS).increment(1);
                self.acks.reject(&delivery).await;
                return None;
            }
        };
        let attempt = queue::attempt_of(&delivery.properties);
        // The broker's delivery count, only for a delivery the broker says
        // it handed out before (a header alone is anyone's to set).
        let redelivered = if delivery.redelivered { queue::redeliveries_of(&delivery.properties) } else { 0 };
        if redelivered >= queue::POISON_REDELIVERIES {
            // Converting it again would most likely take this worker down
            // too; recording the failure lets the job complete.
            tracing::error!(job_id = %msg.job_id, lead_id = msg.lead_id, redelivered, "message handed out again and again without a result; recording the lead as failed");
            let reason = format!("handed out {redelivered} times before, each time without a result");
            self.fail(Message { delivery, msg, attempt }, ErrorCode::PoisonMessage, &reason).await;
            return None;
        }
        Some(Message { delivery, msg, attempt })
    }

    async fn convert(&self, job_id: Uuid, group: Vec<Message>) {
        let settings = match self.cache.get(&self.pool, job_id).await {
            Ok(Some(settings)) => settings,
            Ok(None) => {
                tracing::warn!(%job_id, leads = group.len(), "messages for a job that no longer exists; dropping them");
                for m in group {
                    self.ack(&m.delivery).await;
                }
                return;
            }
            Err(Error::Transient(e)) => {
                for m in group {
                    self.retry(m, &e.to_string()).await;
                }
                return;
            }
            Err(Error::Refused(r)) => {
                // The job's settings no longer validate (say, the acting
                // user was deactivated): the leads fail with that reason.
                for m in group {
                    self.fail(m, r.code, &r.to_string()).await;
                }
                return;
            }
            Err(Error::Database(e)) => {
                tracing::error!(%job_id, error = %e, "reading the job's settings failed with a database error");
                for m in group {
                    self.fail(m, ErrorCode::InternalError, &e.to_string()).await;
                }
                return;
            }
        };
        let items: Vec<Item> = group
            .iter()
            .map(|m| Item {
                lead_id: m.msg.lead_id,
                enqueued_at: m.msg.enqueued_at,
                // Deliveries of this lead that reached a conversion and left
                // nothing: retries through the delay queues and
                // redeliveries after a crash.
                earlier_attempts: earlier_attempts(&m.delivery),
            })
            .collect();
        let done = match settings.undo_of {
            Some(of) => crate::store::undo::undo_batch(&self.pool, job_id, of, &settings.settings, &items).await,
            None => convert::convert_batch(&self.pool, job_id, &settings.settings, &items).await,
        };
        let results = match done {
            Ok(results) => results,
            Err(e) => {
                // Nothing of the batch was written: each message meets the
                // same error.
                let reason = e.to_string();
                for m in group {
                    match &e {
                        ConvertError::Transient(_) => self.retry(m, &reason).await,
                        _ => {
                            tracing::error!(%job_id, lead_id = m.msg.lead_id, error = %reason, "conversion failed with a database error");
                            self.fail(m, ErrorCode::InternalError, &reason).await
                        }
                    }
                }
                return;
            }
        };
        // The batch's acks go out together, not one round of the channel
        // after another.
        let mut done = Vec::new();
        for (m, result) in group.into_iter().zip(results) {
            match result {
                Ok(_) => done.push(m.delivery),
                Err(ConvertError::Transient(e)) => self.retry(m, &e.to_string()).await,
                Err(e @ ConvertError::Waits(_)) => self.wait(m, &e.to_string()).await,
                Err(e @ ConvertError::NotInJob { .. }) => {
                    // A stray message: nothing to convert, nothing to record.
                    tracing::warn!(%job_id, lead_id = m.msg.lead_id, reason = %e, "dropping message");
                    done.push(m.delivery);
                }
                Err(ConvertError::Database(e)) => {
                    tracing::error!(%job_id, lead_id = m.msg.lead_id, error = %e, "conversion failed with a database error");
                    self.fail(m, ErrorCode::InternalError, &e.to_string()).await;
                }
            }
        }
        self.acks.ack_all(&done).await;
    }

    async fn ack(&self, delivery: &Delivery) {
        self.acks.ack_all(std::slice::from_ref(delivery)).await;
    }

    /// Sends the message around again through the shortest delay queue,
    /// not counted as an attempt: an undo's lead waiting for others of its
    /// job to be taken back first (they are being, by this or another
    /// worker, so the wait ends).
    async fn wait(&self, m: Message, reason: &str) {
        self.requeue(m, 0, reason, false).await
    }

    /// Sends the message around again through the next delay queue, or
    /// records the lead as failed when the delays are used up.
    async fn retry(&self, m: Message, reason: &str) {
        let level = m.attempt as usize;
        if level >= RETRY_DELAYS.len() {
            return self.fail(m, ErrorCode::RetriesExhausted, reason).await;
        }
        self.requeue(m, level, reason, true).await
    }

    /// Publishes the message to the delay queue of `level`, then acks it;
    /// `counted`: the attempt header goes up (a retry).
    async fn requeue(&self, m: Message, level: usize, reason: &str, counted: bool) {
        let Message { delivery, msg, attempt } = m;
        let next = if counted { attempt + 1 } else { attempt };
        tracing::info!(job_id = %msg.job_id, lead_id = msg.lead_id, attempt = next, delay = ?RETRY_DELAYS[level], reason, "retrying later");
        let key = Topology::routing_key(self.lane, Some(level));
        let published = async {
            let confirm = self
                .publisher
                .basic_publish(
                    &self.topology.retry_exchange(),
                    &key,
                    BasicPublishOptions::default(),
                    &delivery.data,
                    queue::keyed_properties(next, &queue::keys_of(&delivery.properties)),
                )
                .await?
                .await?;
            Ok::<_, lapin::Error>(matches!(confirm, Confirmation::Ack(_)))
        }
        .await;
        match published {
            Ok(true) => {
                if counted {
                    metrics::counter!(crate::metrics::RETRIES).increment(1);
                }
                self.ack(&delivery).await
            }
            Ok(false) | Err(_) => {
                // Neither acked nor nacked: the session ends, and RabbitMQ
                // hands the message out again after the reconnect.
                tracing::warn!(job_id = %msg.job_id, lead_id = msg.lead_id, outcome = ?published, "could not publish a retry; reconnecting");
                self.broken.cancel();
            }
        }
    }

    /// Records a permanent failure; if even that cannot be written, parks
    /// the message in the dead-letter queue rather than lose it.
    async fn fail(&self, m: Message, code: ErrorCode, reason: &str) {
        let Message { delivery, msg, .. } = m;
        let attempts = earlier_attempts(&delivery);
        match convert::record_failure(&self.pool, msg.job_id, msg.lead_id, code, reason, attempts).await {
            Ok(()) => self.ack(&delivery).await,
            Err(e) => {
                tracing::error!(job_id = %msg.job_id, lead_id = msg.lead_id, error = %e, "could not record the failure; dead-lettering the message");
                metrics::counter!(crate::metrics::DEAD_LETTERS).increment(1);
                self.acks.reject(&delivery).await;
            }
        }
    }
}

/// Every earlier delivery of a message that got as far as a conversion and
/// left nothing: the retry queues it went through, and the broker's count
/// of redeliveries (only for a delivery the broker says it handed out
/// before: a header alone is anyone's to set).
fn earlier_attempts(delivery: &Delivery) -> u32 {
    queue::attempt_of(&delivery.properties)
        + if delivery.redelivered { queue::redeliveries_of(&delivery.properties) } else { 0 }
}
