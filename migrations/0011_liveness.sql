-- One publisher per job: the lease names its holder. A publisher checks the
-- token before every batch and when it renews; one that finds another
-- token (a sweeper took over after its lease ran out) stops.
ALTER TABLE conversion_jobs ADD COLUMN publisher_token uuid;

-- Counter shards by Postgres backend instead of by lead: no two
-- transactions running at the same time ever update the same shard row, so
-- no conversion waits for another's commit (a frozen worker holding its
-- shard stalled a sixteenth of every job before).
ALTER TABLE conversion_job_counters ALTER COLUMN shard TYPE int;
