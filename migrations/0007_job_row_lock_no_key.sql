-- The rollup locks the job row FOR NO KEY UPDATE rather than FOR UPDATE.
-- A conversion that counts itself inserts a counter shard, and the shard's
-- foreign key takes FOR KEY SHARE on the job row: FOR UPDATE conflicts with
-- that and would stall every conversion of the job for the length of the
-- rollup; FOR NO KEY UPDATE does not (it still excludes `cancel` and other
-- rollups, which is all the rollup needs).
CREATE OR REPLACE FUNCTION leadconv_rollup_job(p_job uuid) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    PERFORM 1 FROM conversion_jobs WHERE id = p_job FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    WITH moved AS (
        DELETE FROM conversion_job_counters c
        WHERE (c.job_id, c.shard) IN (SELECT job_id, shard FROM conversion_job_counters
                                      WHERE job_id = p_job FOR UPDATE SKIP LOCKED)
        RETURNING converted, merged, skipped, failed, first_at, last_at
    )
    SELECT coalesce(sum(converted), 0)::int AS converted, coalesce(sum(merged), 0)::int AS merged,
           coalesce(sum(skipped), 0)::int AS skipped, coalesce(sum(failed), 0)::int AS failed,
           min(first_at) AS first_at, max(last_at) AS last_at
    INTO s FROM moved;

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
    WHERE j.id = p_job;
END $$;
