-- Rolling several jobs up in one statement (issue 22). Convert-now calls
-- converted together roll their one-lead jobs up in their own commit; one
-- function call per job cost 2.0 ms for eight jobs (pg_stat_statements,
-- calls alone), a sixth of Postgres' time per call. The same rules as
-- leadconv_rollup_job (0007), now for a set of jobs: a job row held
-- elsewhere (a cancel, another rollup) is skipped, and so are counter
-- shards a conversion still holds; job rows are locked in id order.
CREATE FUNCTION leadconv_rollup_jobs(p_jobs uuid[]) RETURNS void
    LANGUAGE sql AS $$
    WITH jobs AS MATERIALIZED (
        SELECT id FROM conversion_jobs WHERE id = ANY(p_jobs) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
    ), moved AS (
        DELETE FROM conversion_job_counters c
        WHERE (c.job_id, c.shard) IN (SELECT job_id, shard FROM conversion_job_counters
                                      WHERE job_id IN (SELECT id FROM jobs) FOR UPDATE SKIP LOCKED)
        RETURNING job_id, converted, merged, skipped, failed, first_at, last_at
    ), s AS (
        SELECT jobs.id AS job_id, coalesce(sum(m.converted), 0)::int AS converted,
               coalesce(sum(m.merged), 0)::int AS merged, coalesce(sum(m.skipped), 0)::int AS skipped,
               coalesce(sum(m.failed), 0)::int AS failed, min(m.first_at) AS first_at, max(m.last_at) AS last_at
        FROM jobs LEFT JOIN moved m ON m.job_id = jobs.id
        GROUP BY jobs.id
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
    FROM s WHERE j.id = s.job_id;
$$;

-- One way to roll up: a job alone is a set of one.
CREATE OR REPLACE FUNCTION leadconv_rollup_job(p_job uuid) RETURNS void
    LANGUAGE sql AS $$ SELECT leadconv_rollup_jobs(ARRAY[p_job]) $$;
