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
pub const CONVERTING_NOW_AT_ONCE: u16 = 8;

/// Most convert-now leads one transaction converts together.
const CONVERTED_TOGETHER_AT_MOST: usize = 16;

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
    /// Conversion transactions of convert-now leads at once.
    converters: Arc<Semaphore>,
}

/// Conversion transactions at once for `n` convert-now calls served at
/// once: a quarter of them, so that most calls wait together and are
/// converted together (BENCHMARKS.md, "Convert-now calls converted
/// together").
fn converters_for(n: usize) -> usize {
    (n / 4).max(1)
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
            converters: Arc::new(Semaphore::new(converters_for(usize::from(CONVERTING_NOW_AT_ONCE)))),
        }
    }

    /// At most `n` convert-now calls are served at once (see
    /// [`Enqueuer::convert_now_turn`]).
    pub fn converting_now_at_once(mut self, n: usize) -> Enqueuer {
        self.here_slots = Arc::new(Semaphore::new(n.max(1)));
        self.converters = Arc::new(Semaphore::new(converters_for(n)));
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
    /// the queue of waiting leads, and whichever waiting call gets one of
    /// the few conversion transactions converts the leads at the front
    /// that have the same settings (at most
    /// [`CONVERTED_TOGETHER_AT_MOST`]) as one batch, the worker's own
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
    /// closed connection) does not cut it short. A deadlock or a database
    /// error converts each lead of the batch alone, as a worker does
    /// (tried again at once; a bad lead's failure recorded as its result).
    /// Anything else (a lock wait past the lock timeout, a lost
    /// connection) rolls back and publishes the leads to the workers'
    /// workflow lane, which retries them (`None` then). Should this process
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
                    converter = this.converters.clone().acquire_owned() => {
                        let _converter = converter.expect("the semaphore is never closed");
                        let together = this.take_together();
                        if together.is_empty() {
                            // Ours is taken: its answer comes.
                            return answered.await.ok().flatten();
                        }
                        this.convert_together(together).await;
                    }
                }
            }
        })
    }

    /// The waiting leads at the front of the queue that one transaction
    /// converts: the first, and after it each one with the same settings,
    /// in the order they came (a lead asked for twice is converted once:
    /// `convert::convert_in` leaves the second to be converted alone).
    fn take_together(&self) -> Vec<Waiting> {
        let mut waiting = self.waiting.lock().expect("not poisoned");
        let Some(first) = waiting.pop_front() else { return Vec::new() };
        let mut together = vec![first];
        let mut i = 0;
        while i < waiting.len() && together.len() < CONVERTED_TOGETHER_AT_MOST {
            let w = &waiting[i];
            if w.settings == together[0].settings {
                together.push(waiting.remove(i).expect("in range"));
            } else {
                i += 1;
            }
        }
        metrics::gauge!(crate::metrics::CONVERT_NOW_WAITING).set(waiting.len() as f64);
        together
    }

    /// Converts `together` in one transaction and answers each waiting
    /// call; see [`Enqueuer::convert_here`] for what a failure does.
    async fn convert_together(&self, together: Vec<Waiting>) {
        let leads: Vec<(&Job, i64)> = together.iter().map(|w| (&w.job, w.lead_id)).collect();
        let results: Vec<Result<LeadResult, ConvertError>> =
            match self.convert_and_count(&leads, &together[0].settings).await {
                Ok(results) => results,
                Err(e) => {
                    // A lock held past the lock timeout, a lost connection:
                    // the workers wait for it, not these callers' turns.
                    // Anything else (a deadlock, a constraint): each lead
                    // alone, the worker's own way.
                    let hand_over = matches!(&e, ConvertError::Transient(e) if !convert::is_lock_conflict(e));
                    tracing::debug!(leads = together.len(), error = %e, hand_over, "converting now failed");
                    let mut answered = Vec::with_capacity(together.len());
                    for w in &together {
                        answered.push(if hand_over {
                            self.hand_over(&w.job, w.lead_id, &e).await
                        } else {
                            self.convert_as_worker(&w.job, &w.settings, w.lead_id).await
                        });
                    }
                    for (w, result) in together.into_iter().zip(answered) {
                        let _ = w.answer.send(result);
                    }
                    return;
                }
            };
        for (w, result) in together.into_iter().zip(results) {
            let result = match result {
                Ok(result) => Some(result),
                // Left pending (its lead converted for another call of the
                // batch): alone, it finds the lead converted.
                Err(_) => self.convert_as_worker(&w.job, &w.settings, w.lead_id).await,
            };
            // The caller's task may be gone (its process stopping): the
            // result is committed all the same.
            let _ = w.answer.send(result);
        }
    }

    /// A convert-now lead converted alone as a worker does
    /// (`convert::convert_batch`: a deadlock tried again at once; a bad
    /// lead's failure recorded), or else handed to the workers.
    async fn convert_as_worker(&self, job: &Job, settings: &Settings, lead_id: i64) -> Option<LeadResult> {
        let item = convert::Item { lead_id, enqueued_at: Some(job.created_at), earlier_attempts: 1 };
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
        self.hand_over(job, lead_id, &e).await
    }

    /// Publishes the convert-now `job` to the workers' workflow lane,
    /// which converts (and retries) it: converting here gave no result.
    async fn hand_over(&self, job: &Job, lead_id: i64, e: &ConvertError) -> Option<LeadResult> {
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
