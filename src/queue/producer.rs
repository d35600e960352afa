//! Publishing a job's leads to RabbitMQ: the outbox relay.
//!
//! A job's `pending` result rows above its watermark `published_through`
//! are its outbox. Whoever holds the job's publisher lease (the `enqueue`
//! command that created it, or later any worker's sweeper once the lease has
//! run out) publishes them in lead id order, in batches: every message of a
//! batch is sent before any confirm is awaited (pipelined), and the
//! watermark moves to the batch's last lead only once RabbitMQ confirmed all
//! of it. A publisher killed half-way leaves the watermark at its last
//! confirmed batch, and the next lease holder sends the rest again; a message
//! sent twice is harmless, since a lead is converted at most once.

use std::time::Duration;

use futures::future::try_join_all;
use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::Channel;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::types::Trigger;

use crate::queue::{self, Lane, LeadMessage, Topology};

/// Messages sent before their confirms are awaited.
pub const BATCH: i64 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused (nack) a message of job {0}")]
    Nacked(Uuid),
}

/// Takes the publisher lease of one job whose leads are not all published
/// and whose lease ran out (its publisher died). `None`: nothing to do.
pub async fn claim_orphan(pool: &PgPool, lease: Duration) -> sqlx::Result<Option<(Uuid, Lane)>> {
    let row = sqlx::query!(
        r#"UPDATE conversion_jobs SET publisher_lease_until = now() + make_interval(secs => $1)
         WHERE id = (SELECT id FROM conversion_jobs
                     WHERE published_at IS NULL AND status IN ('scheduled', 'in_progress')
                       AND (publisher_lease_until IS NULL OR publisher_lease_until < now())
                     ORDER BY created_at LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING id, trigger AS "trigger: Trigger""#,
        lease.as_secs_f64()
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.id, Lane::for_trigger(r.trigger))))
}

/// Publishes every unpublished pending lead of `job_id` on `ch` (a channel
/// in confirm mode), `batch` messages between waits for confirms, renewing
/// the lease after each batch. Returns how many messages were published.
pub async fn publish_job(
    pool: &PgPool,
    ch: &Channel,
    topology: &Topology,
    job_id: Uuid,
    lane: Lane,
    lease: Duration,
    batch: i64,
) -> Result<u64, PublishError> {
    let exchange = topology.convert_exchange();
    let key = Topology::routing_key(lane, None);
    let mut after: i64 = sqlx::query_scalar!("SELECT published_through FROM conversion_jobs WHERE id = $1", job_id)
        .fetch_optional(pool)
        .await?
        .unwrap_or(i64::MAX);
    let mut published = 0u64;
    loop {
        // Keyset pages: memory stays at one batch whatever the job's size.
        let ids: Vec<i64> = sqlx::query_scalar!(
            "SELECT lead_id FROM conversion_results
             WHERE job_id = $1 AND outcome = 'pending' AND lead_id > $2
             ORDER BY lead_id LIMIT $3",
            job_id,
            after,
            batch.max(1)
        )
        .fetch_all(pool)
        .await?;
        let Some(&last) = ids.last() else { break };
        let enqueued_at = Some(chrono::Utc::now());
        let mut confirms = Vec::with_capacity(ids.len());
        for &lead_id in &ids {
            let body = serde_json::to_vec(&LeadMessage { job_id, lead_id, enqueued_at }).expect("a message serialises");
            confirms.push(
                ch.basic_publish(&exchange, &key, BasicPublishOptions::default(), &body, queue::properties(0)).await?,
            );
        }
        for confirmation in try_join_all(confirms).await? {
            if let Confirmation::Nack(_) = confirmation {
                return Err(PublishError::Nacked(job_id));
            }
        }
        // Confirmed: move the watermark and renew the lease, which keeps
        // sweepers away while this publisher lives. If it stalls past the
        // lease, a sweeper publishes the rest too, which costs duplicates,
        // never lost or doubled conversions.
        sqlx::query!(
            "UPDATE conversion_jobs SET published_through = greatest(published_through, $2),
                    publisher_lease_until = now() + make_interval(secs => $3)
             WHERE id = $1",
            job_id,
            last,
            lease.as_secs_f64()
        )
        .execute(pool)
        .await?;
        published += ids.len() as u64;
        after = last;
        tracing::debug!(%job_id, published, "batch confirmed");
    }
    sqlx::query!(
        "UPDATE conversion_jobs SET published_at = now(), publisher_lease_until = NULL
         WHERE id = $1 AND published_at IS NULL",
        job_id
    )
    .execute(pool)
    .await?;
    tracing::info!(%job_id, published, "job published");
    Ok(published)
}
