//! Publishing a job's leads to RabbitMQ: the outbox relay.
//!
//! A job's `pending` result rows above its watermark `published_through`
//! are its outbox. Whoever holds the job's publisher lease (the `enqueue`
//! command that created it, or later any worker's sweeper once the lease has
//! run out) publishes them in lead id order (an undo's the other way
//! round), in batches: every message of a
//! batch is sent before any confirm is awaited (pipelined), and the
//! watermark moves to the batch's last lead only once RabbitMQ confirmed all
//! of it. A publisher killed half-way leaves the watermark at its last
//! confirmed batch, and the next lease holder sends the rest again; a message
//! sent twice is harmless, since a lead is converted at most once.
//!
//! One publisher per job: the lease carries its holder's token. The holder
//! renews it while it publishes and waits for confirms (a broker applying
//! flow control can hold a publisher for minutes), re-reads the watermark
//! and checks the token before every batch, and stops as soon as it finds
//! another token: a sweeper took the job over after the lease ran out.

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
    /// Another publisher holds the job's lease now; this one stopped.
    #[error("another publisher took over job {0} (this one's lease had run out)")]
    LeaseLost(Uuid),
}

pub use crate::store::job::Lease;

/// Takes the publisher lease of one job whose leads are not all published
/// and whose lease ran out (its publisher died) or was released. `None`:
/// nothing to do.
pub async fn claim_orphan(pool: &PgPool, lease: &Lease) -> sqlx::Result<Option<(Uuid, Lane)>> {
    let row = sqlx::query!(
        r#"UPDATE conversion_jobs SET publisher_lease_until = now() + make_interval(secs => $1), publisher_token = $2
         WHERE id = (SELECT id FROM conversion_jobs
                     WHERE published_at IS NULL AND status IN ('scheduled', 'in_progress')
                       AND (publisher_lease_until IS NULL OR publisher_lease_until < now())
                     ORDER BY created_at LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING id, trigger AS "trigger: Trigger""#,
        lease.length.as_secs_f64(),
        lease.token
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.id, Lane::for_trigger(r.trigger))))
}

/// Extends the lease of `job_id` if `lease` still holds it; `false` when
/// another publisher took it over.
async fn renew(pool: &PgPool, job_id: Uuid, lease: &Lease) -> sqlx::Result<bool> {
    let renewed = sqlx::query!(
        "UPDATE conversion_jobs SET publisher_lease_until = now() + make_interval(secs => $3)
         WHERE id = $1 AND publisher_token = $2",
        job_id,
        lease.token,
        lease.length.as_secs_f64()
    )
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Gives the lease up at once (the publisher lost RabbitMQ), so that a
/// worker's sweeper publishes the rest now rather than when it runs out.
pub async fn release(pool: &PgPool, job_id: Uuid, lease: &Lease) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE conversion_jobs SET publisher_lease_until = NULL
         WHERE id = $1 AND publisher_token = $2 AND published_at IS NULL",
        job_id,
        lease.token
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Publishes every unpublished pending lead of `job_id` on `ch` (a channel
/// in confirm mode), `batch` messages between waits for confirms, while
/// `lease` holds the job (see the module's notes). Returns how many
/// messages were published.
pub async fn publish_job(
    pool: &PgPool,
    ch: &Channel,
    topology: &Topology,
    job_id: Uuid,
    lane: Lane,
    lease: &Lease,
    batch: i64,
) -> Result<u64, PublishError> {
    let exchange = topology.convert_exchange();
    let key = Topology::routing_key(lane, None);
    let mut published = 0u64;
    // An undo job's leads go out the other way round, the highest lead id
    // first: the latest conversions (a job converts in lead order), taken
    // back first, so a lead rarely waits for one that merged into its
    // records after it (SPEC §4a). Its watermark is then the negated
    // lowest lead published (0: none yet).
    let undo =
        sqlx::query_scalar!("SELECT undo_of IS NOT NULL AS \"undo!\" FROM conversion_jobs WHERE id = $1", job_id)
            .fetch_optional(pool)
            .await?
            .unwrap_or(false);
    loop {
        // The next page past the watermark as it is now, and whether the
        // lease is still ours (no row: another publisher holds it). Keyset
        // pages: memory stays at one batch whatever the job's size.
        let page = if undo {
            sqlx::query_scalar!(
                r#"SELECT ARRAY(SELECT r.lead_id FROM conversion_results r
                                WHERE r.job_id = j.id AND r.outcome = 'pending'
                                  AND r.lead_id < coalesce(-nullif(j.published_through, 0), 9223372036854775807)
                                ORDER BY r.lead_id DESC LIMIT $3) AS "ids!"
                   FROM conversion_jobs j WHERE j.id = $1 AND j.publisher_token = $2"#,
                job_id,
                lease.token,
                batch.max(1)
            )
            .fetch_optional(pool)
            .await?
        } else {
            sqlx::query_scalar!(
                r#"SELECT ARRAY(SELECT r.lead_id FROM conversion_results r
                                WHERE r.job_id = j.id AND r.outcome = 'pending' AND r.lead_id > j.published_through
                                ORDER BY r.lead_id LIMIT $3) AS "ids!"
                   FROM conversion_jobs j WHERE j.id = $1 AND j.publisher_token = $2"#,
                job_id,
                lease.token,
                batch.max(1)
            )
            .fetch_optional(pool)
            .await?
        };
        let Some(ids) = page else {
            return Err(PublishError::LeaseLost(job_id));
        };
        let Some(&last) = ids.last() else { break };
        let mark = if undo { -last } else { last };
        // A bulk message carries its lead's lock keys, by which workers
        // form batches that do not wait on each other (`queue::batching`).
        let keys = match lane {
            Lane::Bulk => crate::store::snapshot::lead_lock_keys(pool, &ids).await?,
            Lane::Workflow => Default::default(),
        };
        let sent = async {
            let enqueued_at = Some(chrono::Utc::now());
            let mut confirms = Vec::with_capacity(ids.len());
            for &lead_id in &ids {
                let body =
                    serde_json::to_vec(&LeadMessage { job_id, lead_id, enqueued_at }).expect("a message serialises");
                let props = queue::keyed_properties(0, keys.get(&lead_id).map_or(&[], Vec::as_slice));
                confirms.push(ch.basic_publish(&exchange, &key, BasicPublishOptions::default(), &body, props).await?);
            }
            for confirmation in try_join_all(confirms).await? {
                if let Confirmation::Nack(_) = confirmation {
                    return Err(PublishError::Nacked(job_id));
                }
            }
            Ok(())
        };
        // Publishing and confirming can be held up by the broker's flow
        // control for longer than the lease: renew it meanwhile, so that no
        // sweeper publishes the same leads beside this publisher.
        tokio::pin!(sent);
        let mut renewal = tokio::time::interval(lease.length / 3);
        renewal.tick().await;
        loop {
            tokio::select! {
                done = &mut sent => { done?; break; }
                _ = renewal.tick() => {
                    if !renew(pool, job_id, lease).await? {
                        return Err(PublishError::LeaseLost(job_id));
                    }
                }
            }
        }
        // Confirmed: move the watermark and renew the lease; a short page
        // was the last one, so the job is published (one statement less
        // for a one-lead convert-now job).
        let last_page = (ids.len() as i64) < batch.max(1);
        let moved = sqlx::query!(
            "UPDATE conversion_jobs
                SET published_through = CASE WHEN published_through = 0 THEN $3 ELSE greatest(published_through, $3) END,
                    publisher_lease_until = CASE WHEN $5 THEN NULL ELSE now() + make_interval(secs => $4) END,
                    published_at = CASE WHEN $5 THEN coalesce(published_at, now()) ELSE published_at END
             WHERE id = $1 AND publisher_token = $2",
            job_id,
            lease.token,
            mark,
            lease.length.as_secs_f64(),
            last_page
        )
        .execute(pool)
        .await?;
        if moved.rows_affected() == 0 {
            return Err(PublishError::LeaseLost(job_id));
        }
        published += ids.len() as u64;
        tracing::debug!(%job_id, published, "batch confirmed");
        if last_page {
            tracing::info!(%job_id, published, "job published");
            return Ok(published);
        }
    }
    sqlx::query!(
        "UPDATE conversion_jobs SET published_at = now(), publisher_lease_until = NULL
         WHERE id = $1 AND publisher_token = $2 AND published_at IS NULL",
        job_id,
        lease.token
    )
    .execute(pool)
    .await?;
    tracing::info!(%job_id, published, "job published");
    Ok(published)
}
