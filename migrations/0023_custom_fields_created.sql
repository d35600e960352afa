-- `unmapped_custom_fields: "create"` (issue 24, seed 001): a job may make,
-- when it is created, a contact custom field and a mapping for each lead
-- custom field no mapping carries. The job lists the fields it made (its
-- API, `status`, the console); once made they are ordinary mappings.
ALTER TABLE conversion_jobs ADD COLUMN custom_fields_created text[] NOT NULL DEFAULT '{}';

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
       j.rule_id, j.schedule_id, j.retry_of, j.asked_by, j.undo_of,
       (SELECT count(*)::int FROM conversion_journal u WHERE u.job_id = j.id AND u.undone_at IS NOT NULL) AS undone_count,
       j.custom_fields_created
FROM conversion_jobs j
LEFT JOIN (SELECT job_id, sum(converted)::int AS converted, sum(merged)::int AS merged,
                  sum(skipped)::int AS skipped, sum(failed)::int AS failed,
                  min(first_at) AS first_at, max(last_at) AS last_at
           FROM conversion_job_counters GROUP BY job_id) s ON s.job_id = j.id;
