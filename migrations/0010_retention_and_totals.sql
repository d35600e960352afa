-- Retention: a maintenance task deletes finished jobs (and, by cascade,
-- their results and counter shards) once they are older than the
-- configured age. What it deletes is added here first, by trigger, so that
-- the job and lead totals exported as metrics keep counting up.
CREATE TABLE conversion_totals (
    trigger text PRIMARY KEY CHECK (trigger IN ('manual', 'schedule', 'workflow', 'api')),
    jobs    bigint NOT NULL DEFAULT 0,
    leads   bigint NOT NULL DEFAULT 0
);

-- The retention task's scan: finished jobs, oldest first.
CREATE INDEX conversion_jobs_finished_idx ON conversion_jobs (finished_at) WHERE finished_at IS NOT NULL;

-- The totals by trigger read by every metrics refresh, from the index alone.
CREATE INDEX conversion_jobs_trigger_idx ON conversion_jobs (trigger) INCLUDE (total_count);
