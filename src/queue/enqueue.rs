//! Submitting jobs from a long-running process (`serve`: the API, rule
//! relay and scheduler): create the job, then publish its leads on a
//! RabbitMQ channel kept open across jobs and reopened when lost.
//!
//! Creating the job commits before publishing, so a publish that fails
//! (broker down) loses nothing: the job's pending rows are its outbox, and
//! a worker's sweeper publishes them once this process's lease runs out.
//! A convert-now job is converted here instead ([`Enqueuer::convert_here`]),
//! and published only when that gives no result.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use sqlx::PgPool;
use tokio::sync::{oneshot, Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::queue::producer;
use crate::queue::{self, Lane, Topology};
use crate::store::convert::{self, ConvertError, LeadResult};
use crate::store::job::{self, Checked, Dispatch, Job, Trigger};
use crate::store::options::Settings;

/// A convert-now call's turn ([`Enqueuer::convert_now_turn`]), given back
/// when dropped.
pub struct ConvertNowTurn {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Convert-now calls served at once by default (`serve
/// --convert-now-concurrency`).
pub const CONVERTING_NOW_AT_ONCE: u16 = 16;

/// Most convert-now leads one transaction converts together.
const CONVERTED_TOGETHER_AT_MOST: usize = 16;

/// The longest a transaction converting several callers' leads together
/// waits for a lock before its leads are converted alone (each with the
/// lock timeout of `--lock-timeout-secs`): one lead whose key is held
/// elsewhere holds up the others no longer than this.
const TOGETHER_LOCK_WAIT: Duration = Duration::from_millis(100);

/// Leads of a failed batch converted alone at once (each on a connection
/// of its own).
const ALONE_AT_ONCE: usize = 4;

/// How a convert-now lead its batch did not convert gets its result.
#[derive(Clone)]
enum Alone {
    /// Converted alone, as a worker does; `earlier_attempts`: tries that
    /// rolled back.
    Convert { earlier_attempts: u32 },
    /// Published to the workers' workflow lane, for this reason.
    HandOver(String),
}

/// A convert-now lead waiting for a conversion transaction
/// ([`Enqueuer::convert_here`]).
struct Waiting {
    job: Job,
    settings: Settings,
    lead_id: i64,
    answer: oneshot::Sender<Option<LeadResult>>,
}

pub struct Enqueuer {
    pub pool: PgPool,
    pub amqp_url: String,
    pub topology: Topology,
    pub lease: producer::Lease,
    broker: Mutex<Option<(Connection, Channel)>>,
    /// Conversions run by [`Enqueuer::convert_here`], waited for on the
    /// way out ([`Enqueuer::drain`]).
    here: TaskTracker,
    /// Convert-now calls' turns: how many are served at once.
    here_slots: Arc<Semaphore>,
    /// Convert-now leads waiting for a conversion transaction, first come
    /// first.
    waiting: std::sync::Mutex<VecDeque<Waiting>>,
    /// The one conversion transaction of convert-now leads at a time
    /// (one permit): calls wait for it together and are converted together.
    /// One, not more: two side by side split the waiting calls into
    /// smaller batches, costing more CPU a call, which bulk jobs pay for
    /// (BENCHMARKS.md, "Convert-now calls converted together").
    converter: Arc<Semaphore>,
    /// Leads of failed batches converted alone at once.
    alone_slots: Arc<Semaphore>,
}

impl Enqueuer {
    pub fn new(pool: PgPool, amqp_url: impl Into<String>, topology: Topology) -> Enqueuer {
        Enqueuer {
            pool,
            amqp_url: amqp_url.into(),
            topology,
            lease: producer::Lease::new(Duration::from_secs(30)),
            broker: Mutex::new(None),
            here: TaskTracker::new(),
            here_slots: Arc::new(Semaphore::new(usize::from(CONVERTING_NOW_AT_ONCE))),
            waiting: std::sync::Mutex::new(VecDeque::new()),
            converter: Arc::new(Semaphore::new(1)),
            alone_slots: Arc::new(Semaphore::new(ALONE_AT_ONCE)),
        }
    }

    /// At most `n` convert-now calls are served at once (see
    /// [`Enqueuer::convert_now_turn`]).
    pub fn converting_now_at_once(mut self, n: usize) -> Enqueuer {
        self.here_slots = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// A confirm-mode channel, connecting (and declaring the topology) when
    /// there is none or the last one died.
    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut broker = self.broker.lock().await;
        if let Some((conn, ch)) = broker.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let conn = queue::connect(&self.amqp_url).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        self.topology.declare(&ch).await?;
        *broker = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// True when RabbitMQ answers (for readiness probes).
    pub async fn broker_reachable(&self) -> bool {
        self.channel().await.is_ok()
    }

    /// Creates the job and publishes its leads. The job exists once this
    /// returns, even when publishing failed (it is then left to the outbox
    /// sweeper and the error is only logged).
    pub async fn submit(&self, checked: &Checked) -> Result<Job, crate::Error> {
        let created = self.create(checked).await?;
        self.publish(&created).await;
        Ok(created)
    }

    /// Retries the leads of `of` as a new job with the first job's acting
    /// user, asked for by `asked_by` (see `job::retry_request`), created
    /// and published like [`submit`].
    ///
    /// [`submit`]: Enqueuer::submit
    pub async fn retry(&self, of: &job::RetryOf, asked_by: i64, trigger: Trigger) -> Result<Job, crate::Error> {
        let new = job::retry_request(&self.pool, of, None, trigger).await?;
        let checked = job::check(&self.pool, new).await?;
        let dispatch = Dispatch::Queue { lease: self.lease };
        let created = job::create_retry(&self.pool, &checked, of.job_id, Some(asked_by), dispatch).await?;
        self.publish(&created).await;
        Ok(created)
    }

    /// Takes back the converted leads of `of` (SPEC §4a) as an undo job
    /// asked for by `asked_by`, created and published like [`submit`].
    ///
    /// [`submit`]: Enqueuer::submit
    pub async fn undo(&self, of: &job::UndoOf, asked_by: i64, trigger: Trigger) -> Result<Job, crate::Error> {
        let dispatch = Dispatch::Queue { lease: self.lease };
        let created = job::create_undo(&self.pool, of, None, Some(asked_by), trigger, dispatch).await?;
        self.publish(&created).await;
        Ok(created)
    }

    /// Creates the job with this process's publisher lease, for a caller
    /// that publishes it itself ([`Enqueuer::publish`]) when it suits it.
    pub async fn create(&self, checked: &Checked) -> Result<Job, crate::Error> {
        job::create(&self.pool, checked, Dispatch::Queue { lease: self.lease }).await
    }

    /// Waits for a convert-now call's turn: at most
    /// [`Enqueuer::converting_now_at_once`] calls check, snapshot and
    /// convert at once, so that callers calling back to back leave CPU to
    /// the bulk jobs converting beside them; the others wait, first come
    /// first served. `None`: no turn came within `within`.
    pub async fn convert_now_turn(&self, within: Duration) -> Option<ConvertNowTurn> {
        let turn = tokio::time::timeout(within, self.here_slots.clone().acquire_owned()).await.ok()?;
        Some(ConvertNowTurn { _permit: turn.expect("the semaphore is never closed") })
    }

    /// Converts `lead_id`, the one lead of the convert-now job `job` (made
    /// by [`Enqueuer::create`], not published), here in this process: a
    /// worker would only add hops (the broker both ways, its own read of
    /// the job's settings, the wake-up of the waiting request), each
    /// costing the caller time and the machine CPU that bulk jobs need.
    ///
    /// Calls that wait together are converted together: the lead joins
    /// the queue of waiting leads, and the waiting call that gets the
    /// conversion transaction (one at a time) converts the waiting leads
    /// that have its lead's settings, its own included (at most
    /// [`CONVERTED_TOGETHER_AT_MOST`]), as one batch, the worker's own
    /// (`convert::convert_in`: the same locks, one atomic commit, the
    /// result rows' guard against converting twice), with the jobs' counts
    /// in the same commit. Most of a conversion's statements are then paid
    /// once for several callers, which is what lets twenty callers calling
    /// back to back leave the machine to the bulk jobs beside them. The
    /// leads are planned in the order they came, each seeing what the
    /// earlier ones do, as if converted one after another.
    ///
    /// `turn` (see [`Enqueuer::convert_now_turn`]) is held until the
    /// conversion ends.
    ///
    /// A task of its own, so a caller that stops waiting (its timeout, a
    /// closed connection) does not cut it short. A batch that waits for a
    /// lock longer than [`TOGETHER_LOCK_WAIT`], a deadlock or a database
    /// error converts each lead alone, as a worker splits a batch (tried
    /// again at once; a bad lead's failure recorded as its result). A lead
    /// alone that waits past the lock timeout, or a lost connection, rolls
    /// back and publishes the lead to the workers' workflow lane, which
    /// retries it (`None` then). Should this process
    /// die first, the jobs are unpublished under its lease: a worker's
    /// outbox sweeper publishes them once the lease runs out.
    pub fn convert_here(
        self: &Arc<Self>,
        turn: ConvertNowTurn,
        job: Job,
        settings: Settings,
        lead_id: i64,
    ) -> JoinHandle<Option<LeadResult>> {
        let this = self.clone();
        self.here.spawn(async move {
            let _turn = turn;
            let (answer, mut answered) = oneshot::channel();
            let call = job.id;
            {
                let mut waiting = this.waiting.lock().expect("not poisoned");
                waiting.push_back(Waiting { job, settings, lead_id, answer });
                metrics::gauge!(crate::metrics::CONVERT_NOW_WAITING).set(waiting.len() as f64);
            }
            loop {
                tokio::select! {
                    biased;
                    // Converted by another call's transaction (or by ours,
                    // below). A sender dropped unanswered: a conversion that
                    // panicked; its job is left to the outbox sweeper.
                    result = &mut answered => return result.ok().flatten(),
                    converter = this.converter.clone().acquire_owned() => {
                        let converter = converter.expect("the semaphore is never closed");
                        let together = this.take_together(call);
                        if together.is_empty() {
                            // Ours is in another call's batch: its answer comes.
                            drop(converter);
                            return answered.await.ok().flatten();
                        }
                        let alone = this.convert_together(together).await;
                        drop(converter);
                        for (w, how) in alone {
                            this.convert_alone(w, how);
                        }
                    }
                }
            }
        })
    }

    /// The waiting leads one transaction converts for the call `call`:
    /// those with the same settings as its lead, its own included, in the
    /// order they came (a lead asked for twice is converted once:
    /// `convert::convert_in` leaves the second to be converted alone).
    /// Empty when the call's lead is in another call's batch already.
    fn take_together(&self, call: uuid::Uuid) -> Vec<Waiting> {
        let mut waiting = self.waiting.lock().expect("not poisoned");
        let Some(own) = waiting.iter().position(|w| w.job.id == call) else { return Vec::new() };
        let settings = &waiting[own].settings;
        let mut taken: Vec<usize> = (0..waiting.len()).filter(|&i| waiting[i].settings == *settings).collect();
        taken.truncate(CONVERTED_TOGETHER_AT_MOST);
        if !taken.contains(&own) {
            taken.pop();
            taken.push(own);
        }
        let mut together: Vec<Waiting> = taken.iter().rev().map(|&i| waiting.remove(i).expect("in range")).collect();
        together.reverse();
        metrics::gauge!(crate::metrics::CONVERT_NOW_WAITING).set(waiting.len() as f64);
        together
    }

    /// Converts `together` in one transaction and answers each waiting
    /// call it converted; returns those it leaves to be converted alone or
    /// handed to the workers (see [`Enqueuer::convert_here`]).
    async fn convert_together(&self, together: Vec<Waiting>) -> Vec<(Waiting, Alone)> {
        let leads: Vec<(&Job, i64)> = together.iter().map(|w| (&w.job, w.lead_id)).collect();
        let results = match self.convert_and_count(&leads, &together[0].settings).await {
            Ok(results) => results,
            Err(e) => {
                // As a worker splits a batch: a lost connection hands the
                // leads to the workers; a lock waited for too long (one
                // lead's key held by another transaction: the short wait of
                // a batch, see `convert_and_count`), a deadlock or a
                // constraint converts each lead alone, so only the lead
                // whose lock is held waits again. A lead alone that waited
                // its whole lock timeout is the workers' to wait for, not
                // its caller's turn.
                let hand_over = matches!(&e, ConvertError::Transient(e)
                    if !convert::is_lock_conflict(e) && (together.len() == 1 || !convert::is_lock_wait(e)));
                tracing::debug!(leads = together.len(), error = %e, hand_over, "converting now failed");
                let how =
                    if hand_over { Alone::HandOver(e.to_string()) } else { Alone::Convert { earlier_attempts: 1 } };
                return together.into_iter().map(|w| (w, how.clone())).collect();
            }
        };
        let mut alone = Vec::new();
        for (w, result) in together.into_iter().zip(results) {
            match result {
                // The caller's task may be gone (its process stopping): the
                // result is committed all the same.
                Ok(result) => drop(w.answer.send(Some(result))),
                // Left pending (its lead converted for another call of the
                // batch): alone, it finds the lead converted.
                Err(_) => alone.push((w, Alone::Convert { earlier_attempts: 0 })),
            }
        }
        alone
    }

    /// Converts `w`'s lead alone (or hands it to the workers), in a task of
    /// its own: a lead whose lock is held waits for it without holding up
    /// a conversion transaction or the other callers.
    fn convert_alone(self: &Arc<Self>, w: Waiting, how: Alone) {
        let this = self.clone();
        self.here.spawn(async move {
            let _slot = this.alone_slots.clone().acquire_owned().await.expect("the semaphore is never closed");
            let result = match how {
                Alone::HandOver(e) => this.hand_over(&w.job, w.lead_id, &e).await,
                Alone::Convert { earlier_attempts } => {
                    this.convert_as_worker(&w.job, &w.settings, w.lead_id, earlier_attempts).await
                }
            };
            let _ = w.answer.send(result);
        });
    }

    /// A convert-now lead converted alone as a worker does
    /// (`convert::convert_batch`: a deadlock tried again at once; a bad
    /// lead's failure recorded), or else handed to the workers.
    async fn convert_as_worker(
        &self,
        job: &Job,
        settings: &Settings,
        lead_id: i64,
        earlier_attempts: u32,
    ) -> Option<LeadResult> {
        let item = convert::Item { lead_id, enqueued_at: Some(job.created_at), earlier_attempts };
        let e = match convert::convert_batch(&self.pool, job.id, settings, &[item]).await {
            Ok(mut results) => match results.pop().expect("one result per lead") {
                Ok(result) => {
                    // Counted at once, as a batch's jobs are (else a
                    // worker's rollup sweeper does it).
                    if let Err(e) = job::rollup(&self.pool, job.id).await {
                        tracing::debug!(job_id = %job.id, error = %e, "could not roll the job's counts up");
                    }
                    return Some(result);
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        self.hand_over(job, lead_id, &e.to_string()).await
    }

    /// Publishes the convert-now `job` to the workers' workflow lane,
    /// which converts (and retries) it: converting here gave no result.
    async fn hand_over(&self, job: &Job, lead_id: i64, e: &str) -> Option<LeadResult> {
        tracing::info!(job_id = %job.id, lead_id, error = %e, "converting now gave no result; handing the lead to the workers");
        self.publish(job).await;
        None
    }

    /// One try of the worker's conversion ([`convert::convert_in`]) of
    /// convert-now `leads` (each the one lead of its job) with the jobs'
    /// counts in the same commit: a convert-now job is done when its one
    /// lead is, so its counter shard is rolled into the job row at once
    /// rather than by a worker's sweeper a tick later. Should another
    /// process hold a job row (a cancel, a rollup), that shard waits for a
    /// worker's rollup sweeper as any other job's.
    #[tracing::instrument(name = "convert", skip_all, fields(lead_id = leads[0].1, leads = leads.len()))]
    async fn convert_and_count(
        &self,
        leads: &[(&Job, i64)],
        settings: &Settings,
    ) -> Result<Vec<Result<LeadResult, ConvertError>>, ConvertError> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        if leads.len() > 1 {
            // Callers converted together share their waits: a lock held
            // elsewhere (a bulk batch holding a shared company's key, a
            // stuck transaction) fails the batch soon, and its leads are
            // converted alone, the others at once.
            sqlx::query(&format!("SET LOCAL lock_timeout = {}", TOGETHER_LOCK_WAIT.as_millis()))
                .execute(&mut *tx)
                .await?;
        }
        let items: Vec<[convert::Item; 1]> = leads
            .iter()
            .map(|(job, lead_id)| {
                [convert::Item { lead_id: *lead_id, enqueued_at: Some(job.created_at), earlier_attempts: 0 }]
            })
            .collect();
        let jobs: Vec<(uuid::Uuid, &[convert::Item])> =
            leads.iter().zip(&items).map(|((job, _), item)| (job.id, &item[..])).collect();
        let (results, fresh) = convert::convert_in(&mut tx, settings, &jobs, 1, started).await?;
        let ids: Vec<uuid::Uuid> = jobs.iter().map(|(id, _)| *id).collect();
        job::rollup_each(&mut *tx, &ids).await?;
        tx.commit().await?;
        for r in &fresh {
            crate::metrics::record_result(r, started.elapsed());
        }
        Ok(results)
    }

    /// Waits (at most `within`) for the conversions [`Enqueuer::convert_here`]
    /// started, on the way out: one whose caller stopped waiting is still
    /// worth its commit. One cut short leaves its job to the outbox sweeper.
    pub async fn drain(&self, within: Duration) {
        self.here.close();
        if tokio::time::timeout(within, self.here.wait()).await.is_err() {
            tracing::warn!(
                left = self.here.len(),
                "convert-now conversions still running at the end of the drain; the workers will convert their leads"
            );
        }
    }

    /// Publishes the leads of a job created (and committed) with
    /// `Dispatch::Queue { lease: self.lease }`. Failure is logged, not
    /// returned: the outbox sweeper publishes what this could not.
    pub async fn publish(&self, created: &Job) {
        if created.total_count > 0 {
            let lane = Lane::for_trigger(created.trigger);
            let published = match self.channel().await {
                Ok(ch) => producer::publish_job(
                    &self.pool,
                    &ch,
                    &self.topology,
                    created.id,
                    lane,
                    &self.lease,
                    producer::BATCH,
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match published {
                Ok(n) => tracing::info!(job_id = %created.id, published = n, "job submitted"),
                Err(e) => {
                    // Released at once: a worker's sweeper publishes the
                    // rest now, not when the lease would have run out.
                    if let Err(e) = producer::release(&self.pool, created.id, &self.lease).await {
                        tracing::debug!(job_id = %created.id, error = %e, "could not release the publisher lease");
                    }
                    tracing::warn!(job_id = %created.id, error = %e, "publishing failed; the workers' outbox sweepers will publish the job")
                }
            }
        }
    }
}
