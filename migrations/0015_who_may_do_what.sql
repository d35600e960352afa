-- Who may do what (SPEC §5, issue 20).

-- A token may be narrowed when it is created (`read`: GETs and a read-only
-- console session; `convert`: convert-now and GETs) and given an expiry.
-- Tokens that exist keep doing what they did: `full`, no expiry.
ALTER TABLE api_tokens
    ADD COLUMN scope text NOT NULL DEFAULT 'full' CHECK (scope IN ('full', 'read', 'convert')),
    ADD COLUMN expires_at timestamptz;

-- Who asked for a job when that is not its acting user: a retry keeps the
-- first job's requester (whose rights rules 6 and 7 use) and records here
-- the user who asked for the retry. NULL when they are the same.
ALTER TABLE conversion_jobs ADD COLUMN asked_by bigint REFERENCES users (id);

-- Lists are filtered by the caller's reach (requesters) in SQL.
CREATE INDEX conversion_jobs_requested_by_idx ON conversion_jobs (requested_by, created_at DESC);

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
       j.rule_id, j.schedule_id, j.retry_of, j.asked_by
FROM conversion_jobs j
LEFT JOIN (SELECT job_id, sum(converted)::int AS converted, sum(merged)::int AS merged,
                  sum(skipped)::int AS skipped, sum(failed)::int AS failed,
                  min(first_at) AS first_at, max(last_at) AS last_at
           FROM conversion_job_counters GROUP BY job_id) s ON s.job_id = j.id;
