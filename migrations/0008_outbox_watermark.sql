-- A job's outbox becomes a watermark instead of a mark on every row.
--
-- The producer publishes a job's pending leads in lead id order and, once
-- RabbitMQ confirmed a batch, records the batch's last lead id in
-- `published_through`: one update of the job row per batch, where marking
-- `enqueued_at` on each result row cost a second (non-HOT) update of every
-- row of the job and its index entries, in the run's busiest seconds.
-- The outbox is now: pending rows of the job with lead_id > published_through.
-- `enqueued_at` stays, written by the conversion from the message itself
-- (the time it was published), for the enqueue→commit latency.
ALTER TABLE conversion_jobs ADD COLUMN published_through bigint NOT NULL DEFAULT 0;

-- Jobs being published during the upgrade resume after the last lead the
-- old producer marked: it marked whole confirmed batches in lead id order.
UPDATE conversion_jobs j
SET published_through = coalesce((SELECT max(r.lead_id) FROM conversion_results r
                                  WHERE r.job_id = j.id AND r.enqueued_at IS NOT NULL), 0)
WHERE j.published_at IS NULL;

DROP INDEX conversion_results_outbox_idx;
