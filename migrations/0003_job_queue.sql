-- What the queue side of jobs needs: the outbox (which pending leads were
-- published), the publisher's lease, and counters that many workers can
-- update at once.

-- Set once RabbitMQ confirmed the lead's message. Pending rows without it
-- are the outbox: whoever holds the job's publisher lease publishes them.
ALTER TABLE conversion_results ADD COLUMN enqueued_at timestamptz;
CREATE INDEX conversion_results_outbox_idx ON conversion_results (job_id, lead_id)
    WHERE outcome = 'pending' AND enqueued_at IS NULL;

ALTER TABLE conversion_jobs
    ADD COLUMN published_at timestamptz,
    ADD COLUMN publisher_lease_until timestamptz,
    ADD COLUMN cancelled_at timestamptz,
    ADD COLUMN error text;
CREATE INDEX conversion_jobs_unpublished_idx ON conversion_jobs (created_at)
    WHERE published_at IS NULL AND status IN ('scheduled', 'in_progress');

-- Each conversion adds its outcome to one of 16 shards of its job (by lead
-- id), in its own transaction, instead of to the job row that every worker
-- would queue on. A rollup moves the shards into conversion_jobs' columns;
-- conversion_job_progress adds what is not rolled up yet, so it is exact at
-- every moment.
CREATE TABLE conversion_job_counters (
    job_id    uuid NOT NULL REFERENCES conversion_jobs (id) ON DELETE CASCADE,
    shard     smallint NOT NULL,
    converted int NOT NULL DEFAULT 0,
    merged    int NOT NULL DEFAULT 0,
    skipped   int NOT NULL DEFAULT 0,
    failed    int NOT NULL DEFAULT 0,
    first_at  timestamptz NOT NULL DEFAULT now(),
    last_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, shard)
);

CREATE VIEW conversion_job_progress AS
SELECT j.id,
       CASE WHEN j.status IN ('scheduled', 'in_progress')
                 AND j.converted_count + j.skipped_count + j.failed_count
                     + coalesce(s.converted, 0) + coalesce(s.skipped, 0) + coalesce(s.failed, 0) >= j.total_count
            THEN 'completed'
            WHEN j.status = 'scheduled' AND s.first_at IS NOT NULL THEN 'in_progress'
            ELSE j.status END AS status,
       j.criteria, j.options, j.requested_by, j.trigger, j.total_count,
       j.converted_count + coalesce(s.converted, 0) AS converted_count,
       j.merged_count + coalesce(s.merged, 0) AS merged_count,
       j.skipped_count + coalesce(s.skipped, 0) AS skipped_count,
       j.failed_count + coalesce(s.failed, 0) AS failed_count,
       j.created_at,
       coalesce(j.started_at, s.first_at) AS started_at,
       coalesce(j.finished_at, CASE WHEN j.status IN ('scheduled', 'in_progress')
                 AND j.converted_count + j.skipped_count + j.failed_count
                     + coalesce(s.converted, 0) + coalesce(s.skipped, 0) + coalesce(s.failed, 0) >= j.total_count
            THEN s.last_at END) AS finished_at,
       j.published_at, j.cancelled_at, j.error
FROM conversion_jobs j
LEFT JOIN (SELECT job_id, sum(converted)::int AS converted, sum(merged)::int AS merged,
                  sum(skipped)::int AS skipped, sum(failed)::int AS failed,
                  min(first_at) AS first_at, max(last_at) AS last_at
           FROM conversion_job_counters GROUP BY job_id) s ON s.job_id = j.id;

-- Moves a job's shards into its row and sets status and times. Cheap and
-- safe to call any time, from any process: it is how the columns of
-- conversion_jobs catch up.
CREATE FUNCTION leadconv_rollup_job(p_job uuid) RETURNS void
    LANGUAGE sql AS $$
    WITH moved AS (
        DELETE FROM conversion_job_counters WHERE job_id = p_job
        RETURNING converted, merged, skipped, failed, first_at, last_at
    ), s AS (
        SELECT coalesce(sum(converted), 0)::int AS converted, coalesce(sum(merged), 0)::int AS merged,
               coalesce(sum(skipped), 0)::int AS skipped, coalesce(sum(failed), 0)::int AS failed,
               min(first_at) AS first_at, max(last_at) AS last_at
        FROM moved
    )
    UPDATE conversion_jobs j SET
        converted_count = j.converted_count + s.converted,
        merged_count = j.merged_count + s.merged,
        skipped_count = j.skipped_count + s.skipped,
        failed_count = j.failed_count + s.failed,
        started_at = coalesce(j.started_at, s.first_at),
        status = CASE
            WHEN j.status NOT IN ('scheduled', 'in_progress') THEN j.status
            WHEN j.converted_count + j.skipped_count + j.failed_count
                 + s.converted + s.skipped + s.failed >= j.total_count THEN 'completed'
            WHEN coalesce(j.started_at, s.first_at) IS NOT NULL THEN 'in_progress'
            ELSE j.status END,
        finished_at = CASE
            WHEN j.status IN ('scheduled', 'in_progress')
                 AND j.converted_count + j.skipped_count + j.failed_count
                 + s.converted + s.skipped + s.failed >= j.total_count
            THEN coalesce(s.last_at, now()) ELSE j.finished_at END
    FROM s
    WHERE j.id = p_job
$$;

-- How long the conversion's transaction took, for latency reports.
ALTER TABLE conversion_results ADD COLUMN duration_ms int;
