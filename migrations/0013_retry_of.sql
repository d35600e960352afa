-- A retry job converts again the failed (or skipped) leads of an earlier
-- job, with its options, and names it (SPEC §4). Kept as NULL when the
-- earlier job is deleted by retention.
ALTER TABLE conversion_jobs
    ADD COLUMN retry_of uuid REFERENCES conversion_jobs (id) ON DELETE SET NULL;
CREATE INDEX conversion_jobs_retry_of_idx ON conversion_jobs (retry_of) WHERE retry_of IS NOT NULL;

-- The progress view names where a job came from: the rule, schedule or
-- earlier job that made it (new columns go last, as CREATE OR REPLACE
-- VIEW requires).
CREATE OR REPLACE VIEW conversion_job_progress AS
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
       j.published_at, j.cancelled_at, j.error,
       j.rule_id, j.schedule_id, j.retry_of
FROM conversion_jobs j
LEFT JOIN (SELECT job_id, sum(converted)::int AS converted, sum(merged)::int AS merged,
                  sum(skipped)::int AS skipped, sum(failed)::int AS failed,
                  min(first_at) AS first_at, max(last_at) AS last_at
           FROM conversion_job_counters GROUP BY job_id) s ON s.job_id = j.id;
