//! Publishing a job's leads to RabbitMQ: the outbox relay.
//!
//! A job's `pending` result rows without `enqueued_at` are its outbox.
//! Whoever holds the job's publisher lease (the `enqueue` command that
//! created it, or later any worker's sweeper once the lease has run out)
//! publishes them in batches: every message of a batch is sent before any
//! confirm is awaited (pipelined), and the batch is marked `enqueued_at`
//! only once RabbitMQ confirmed all of it. A publisher killed half-way
//! leaves unmarked rows that the next lease holder sends again; a message
//! sent twice is harmless, since a lead is converted at most once.

use std::time::Duration;

use futures::future::try_join_all;
use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::Channel;
use sqlx::PgPool;
use uuid::Uuid;

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
    let row: Option<(Uuid, String)> = sqlx::query_as(
        "UPDATE conversion_jobs SET publisher_lease_until = now() + make_interval(secs => $1)
         WHERE id = (SELECT id FROM conversion_jobs
                     WHERE published_at IS NULL AND status IN ('scheduled', 'in_progress')
                       AND (publisher_lease_until IS NULL OR publisher_lease_until < now())
                     ORDER BY created_at LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING id, trigger",
    )
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, trigger)| (id, Lane::for_trigger(&trigger))))
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
    let mut after: i64 = 0;
    let mut published = 0u64;
    loop {
        // Keyset pages: memory stays at one batch whatever the job's size.
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT lead_id FROM conversion_results
             WHERE job_id = $1 AND outcome = 'pending' AND enqueued_at IS NULL AND lead_id > $2
             ORDER BY lead_id LIMIT $3",
        )
        .bind(job_id)
        .bind(after)
        .bind(batch.max(1))
        .fetch_all(pool)
        .await?;
        let Some(&last) = ids.last() else { break };
        let mut confirms = Vec::with_capacity(ids.len());
        for &lead_id in &ids {
            let body = serde_json::to_vec(&LeadMessage { job_id, lead_id }).expect("a message serialises");
            confirms.push(
                ch.basic_publish(&exchange, &key, BasicPublishOptions::default(), &body, queue::properties(0)).await?,
            );
        }
        for confirmation in try_join_all(confirms).await? {
            if let Confirmation::Nack(_) = confirmation {
                return Err(PublishError::Nacked(job_id));
            }
        }
        // Rows a worker holds are being converted, so their message is
        // plainly out: SKIP LOCKED marks the others without queueing behind
        // conversions (which would also risk deadlocks with them).
        sqlx::query(
            // One index probe per lead (LATERAL), then a TID scan: the cost
            // is the batch's, whatever the job's size. (A plain IN over the
            // ids may be planned as a scan of the whole job.)
            "UPDATE conversion_results SET enqueued_at = now()
             WHERE ctid = ANY(ARRAY(
                 SELECT r.ctid FROM unnest($2::bigint[]) AS u(lead_id),
                 LATERAL (SELECT ctid FROM conversion_results
                          WHERE job_id = $1 AND lead_id = u.lead_id AND enqueued_at IS NULL AND outcome = 'pending'
                          FOR UPDATE SKIP LOCKED) r))",
        )
        .bind(job_id)
        .bind(&ids)
        .execute(pool)
        .await?;
        // Renewing the lease keeps sweepers away while this publisher lives;
        // if it stalls past the lease, a sweeper publishes the rest too,
        // which costs duplicates, never lost or doubled conversions.
        sqlx::query(
            "UPDATE conversion_jobs SET publisher_lease_until = now() + make_interval(secs => $2) WHERE id = $1",
        )
        .bind(job_id)
        .bind(lease.as_secs_f64())
        .execute(pool)
        .await?;
        published += ids.len() as u64;
        metrics::counter!(crate::metrics::LEADS_ENQUEUED).increment(ids.len() as u64);
        after = last;
        tracing::debug!(%job_id, published, "batch confirmed");
    }
    sqlx::query("UPDATE conversion_jobs SET published_at = now(), publisher_lease_until = NULL WHERE id = $1 AND published_at IS NULL")
        .bind(job_id)
        .execute(pool)
        .await?;
    tracing::info!(%job_id, published, "job published");
    Ok(published)
}
