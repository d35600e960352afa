//! Submitting jobs from a long-running process (`serve`: the API, rule
//! relay and scheduler): create the job, then publish its leads on a
//! RabbitMQ channel kept open across jobs and reopened when lost.
//!
//! Creating the job commits before publishing, so a publish that fails
//! (broker down) loses nothing: the job's pending rows are its outbox, and
//! a worker's sweeper publishes them once this process's lease runs out.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::queue::producer;
use crate::queue::{self, Lane, Topology};
use crate::store::job::{self, Checked, Dispatch, Job, Trigger};

pub struct Enqueuer {
    pub pool: PgPool,
    pub amqp_url: String,
    pub topology: Topology,
    pub lease: producer::Lease,
    broker: Mutex<Option<(Connection, Channel)>>,
}

impl Enqueuer {
    pub fn new(pool: PgPool, amqp_url: impl Into<String>, topology: Topology) -> Enqueuer {
        Enqueuer {
            pool,
            amqp_url: amqp_url.into(),
            topology,
            lease: producer::Lease::new(Duration::from_secs(30)),
            broker: Mutex::new(None),
        }
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
