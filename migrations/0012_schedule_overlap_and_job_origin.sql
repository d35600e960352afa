-- What a schedule does on a tick while its previous run is still going:
-- `skip` the tick (the default: a nightly job that overruns must not start
-- a second one over the same leads) or `allow` another job.
ALTER TABLE conversion_schedules ADD COLUMN overlap text NOT NULL DEFAULT 'skip'
    CHECK (overlap IN ('skip', 'allow'));

-- Which rule or schedule made a job (NULL for jobs asked for by a person or
-- an API caller); kept when the rule or schedule is deleted, as NULL.
ALTER TABLE conversion_jobs
    ADD COLUMN rule_id bigint REFERENCES conversion_rules (id) ON DELETE SET NULL,
    ADD COLUMN schedule_id bigint REFERENCES conversion_schedules (id) ON DELETE SET NULL;
CREATE INDEX conversion_jobs_rule_idx ON conversion_jobs (rule_id) WHERE rule_id IS NOT NULL;
CREATE INDEX conversion_jobs_schedule_idx ON conversion_jobs (schedule_id, status) WHERE schedule_id IS NOT NULL;
