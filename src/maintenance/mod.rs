//! Background upkeep, each a small idempotent service that any number of
//! workers may run at once (River style): [`sweep_outbox`] publishes the
//! outbox of a job whose publisher stopped, [`rollup_active`] rolls counter
//! shards into their jobs, `metrics::refresh_gauges` refreshes the gauges.
//! The worker runs a [`round`] of all three on a timer.
//!
//! May import: `crate::store`, `crate::queue`, `crate::metrics`.

use std::time::Duration;

use lapin::Channel;
use sqlx::PgPool;
use uuid::Uuid;

use crate::queue::{producer, Topology};
use crate::store::job;

/// One round of maintenance, run by each worker on a timer: the three
/// services below, each failing on its own without stopping the others.
pub async fn round(pool: &PgPool, ch: &Channel, topology: &Topology, lease: Duration) {
    sweep_outbox(pool, ch, topology, lease).await;
    if let Err(e) = rollup_active(pool).await {
        tracing::warn!(error = %e, "counter rollup failed");
    }
    if let Err(e) = crate::metrics::refresh_gauges(pool, Some((ch, topology))).await {
        tracing::debug!(error = %e, "gauge refresh failed");
    }
}

/// Outbox sweeper: takes over publishing one job whose publisher stopped
/// (its lease ran out), so no job waits forever for its messages.
pub async fn sweep_outbox(pool: &PgPool, ch: &Channel, topology: &Topology, lease: Duration) {
    match producer::claim_orphan(pool, lease).await {
        Ok(Some((job_id, lane))) => {
            tracing::info!(%job_id, "publishing the rest of a job whose publisher stopped");
            if let Err(e) = producer::publish_job(pool, ch, topology, job_id, lane, lease, producer::BATCH).await {
                tracing::warn!(%job_id, error = %e, "outbox sweep failed; will try again");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "outbox sweep failed"),
    }
}

/// Moves counter shards into their jobs' rows. Jobs are taken with SKIP
/// LOCKED so several workers never queue on the same job row.
pub async fn rollup_active(pool: &PgPool) -> sqlx::Result<()> {
    let jobs: Vec<Uuid> =
        sqlx::query_scalar!("SELECT DISTINCT job_id FROM conversion_job_counters").fetch_all(pool).await?;
    for id in jobs {
        job::rollup(pool, id).await?;
    }
    Ok(())
}
