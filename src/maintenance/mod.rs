//! Background upkeep, each a small idempotent service that any number of
//! workers may run at once (River style): [`sweep_outbox`] publishes the
//! outbox of a job whose publisher stopped, [`rollup_active`] rolls counter
//! shards into their jobs, [`retention`] deletes old finished jobs,
//! `metrics::refresh_gauges` refreshes the gauges. The worker runs a
//! [`round`] of them on a timer.
//!
//! May import: `crate::store`, `crate::queue`, `crate::metrics`.

use std::time::Duration;

use lapin::Channel;
use sqlx::PgPool;
use uuid::Uuid;

use crate::queue::{producer, Topology};
use crate::store::job;

/// One round of maintenance, run by each worker on a timer: the services
/// below, each failing on its own without stopping the others. `retention`
/// is given only on the rounds where it is due (see [`RETENTION_EVERY`]).
pub async fn round(
    pool: &PgPool,
    ch: &Channel,
    topology: &Topology,
    lease: &producer::Lease,
    retention_keep: Option<Duration>,
    stranded_after: Duration,
) {
    sweep_outbox(pool, ch, topology, lease).await;
    if let Err(e) = republish_stranded(pool, ch, topology, lease, stranded_after).await {
        tracing::warn!(error = %e, "looking for stranded leads failed; will try again");
    }
    if let Some(keep) = retention_keep {
        if let Err(e) = retention(pool, keep).await {
            tracing::warn!(error = %e, "retention failed; will try again");
        }
    }
    if let Err(e) = rollup_active(pool).await {
        tracing::warn!(error = %e, "counter rollup failed");
    }
    if let Err(e) = crate::metrics::refresh_gauges(pool, Some((ch, topology))).await {
        tracing::debug!(error = %e, "gauge refresh failed");
    }
}

/// Outbox sweeper: takes over publishing one job whose publisher stopped
/// (its lease ran out), so no job waits forever for its messages.
pub async fn sweep_outbox(pool: &PgPool, ch: &Channel, topology: &Topology, lease: &producer::Lease) {
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

/// See [`republish_stranded`]: ten minutes, twice the longest a batch can
/// hold a message (statement timeout aside, its lock and idle timeouts are
/// seconds).
pub const STRANDED_AFTER: Duration = Duration::from_secs(600);

/// Leads left pending with no message anywhere, published again. A message
/// is acknowledged only after its lead's commit, but with asynchronous
/// replication a primary that crashes can lose a commit it had confirmed:
/// the lead stays `pending` with its message gone, and the outbox (leads
/// never published) does not cover it. So: when no queue of this
/// installation holds a message, a published job that still has pending
/// leads and recorded none of them for `after` has its outbox rewound and
/// published again (a message sent twice converts nothing twice). One job
/// per round; the lease keeps other workers off it meanwhile.
pub async fn republish_stranded(
    pool: &PgPool,
    ch: &Channel,
    topology: &Topology,
    lease: &producer::Lease,
    after: Duration,
) -> anyhow::Result<()> {
    use crate::queue::{Lane, RETRY_DELAYS};
    let mut queues = vec![topology.work_queue(Lane::Workflow), topology.work_queue(Lane::Bulk)];
    queues.extend((0..RETRY_DELAYS.len()).map(|l| topology.retry_queue(l)));
    for q in queues {
        if topology.depth(ch, &q).await? > 0 {
            return Ok(());
        }
    }
    let stranded: Option<(Uuid, i64)> = sqlx::query_as(
        "SELECT j.id, (SELECT count(*) FROM conversion_results r WHERE r.job_id = j.id AND r.outcome = 'pending')
         FROM conversion_jobs j
         WHERE j.status IN ('scheduled', 'in_progress') AND j.published_at < now() - make_interval(secs => $1)
           AND (j.publisher_lease_until IS NULL OR j.publisher_lease_until < now())
           AND EXISTS (SELECT 1 FROM conversion_results r WHERE r.job_id = j.id AND r.outcome = 'pending')
           AND NOT EXISTS (SELECT 1 FROM conversion_results r
                           WHERE r.job_id = j.id AND r.finished_at > now() - make_interval(secs => $1))
         ORDER BY j.created_at LIMIT 1",
    )
    .bind(after.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let Some((job_id, pending)) = stranded else { return Ok(()) };
    tracing::warn!(
        %job_id,
        pending,
        "leads pending with no message in any queue and none recorded for {after:?}; publishing them again"
    );
    let trigger = job::rewind_outbox(pool, job_id, lease).await?;
    producer::publish_job(pool, ch, topology, job_id, Lane::for_trigger(trigger), lease, producer::BATCH).await?;
    Ok(())
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

/// How often a worker runs [`retention`]: old jobs are no emergency.
pub const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Rows of `conversion_results` deleted per statement by [`retention`]: a
/// million-lead job is removed in many short transactions, never one that
/// holds locks and bloats WAL for minutes.
pub const RETENTION_BATCH: i64 = 5_000;

/// Jobs looked at per round of [`retention`].
const RETENTION_JOBS: i64 = 50;

/// Deletes jobs that finished more than `keep` ago, with their results, in
/// small batches: first the results, `RETENTION_BATCH` rows per statement,
/// then the job rows, adding them to `conversion_totals` in the same
/// transaction so that the metrics totals never go down. Returns the number
/// of jobs deleted. Idempotent and safe to run from every worker at once
/// (jobs are taken with SKIP LOCKED; a result row deleted twice is not an
/// error).
pub async fn retention(pool: &PgPool, keep: Duration) -> sqlx::Result<u64> {
    let keep_secs = keep.as_secs_f64();
    let jobs: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM conversion_jobs
         WHERE finished_at IS NOT NULL AND finished_at < now() - make_interval(secs => $1)
         ORDER BY finished_at LIMIT $2",
        keep_secs,
        RETENTION_JOBS
    )
    .fetch_all(pool)
    .await?;
    if jobs.is_empty() {
        return Ok(0);
    }
    loop {
        let deleted = sqlx::query!(
            "DELETE FROM conversion_results r
             USING (SELECT job_id, lead_id FROM conversion_results WHERE job_id = ANY($1) LIMIT $2) d
             WHERE r.job_id = d.job_id AND r.lead_id = d.lead_id",
            &jobs,
            RETENTION_BATCH
        )
        .execute(pool)
        .await?
        .rows_affected();
        if deleted == 0 {
            break;
        }
    }
    let deleted = sqlx::query_scalar!(
        r#"WITH old AS (
               SELECT id FROM conversion_jobs
               WHERE id = ANY($1) AND finished_at IS NOT NULL AND finished_at < now() - make_interval(secs => $2)
               FOR UPDATE SKIP LOCKED
           ), gone AS (
               DELETE FROM conversion_jobs j USING old WHERE j.id = old.id RETURNING j.trigger, j.total_count
           ), totals AS (
               INSERT INTO conversion_totals AS t (trigger, jobs, leads)
               SELECT trigger, count(*), sum(total_count) FROM gone GROUP BY trigger
               ON CONFLICT (trigger) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs, leads = t.leads + EXCLUDED.leads
           )
           SELECT count(*) AS "n!" FROM gone"#,
        &jobs,
        keep_secs
    )
    .fetch_one(pool)
    .await?;
    if deleted > 0 {
        tracing::info!(jobs = deleted, "deleted finished jobs past retention");
    }
    Ok(deleted as u64)
}
