-- The journal (SPEC §4a, issue 21): what each lead's conversion changed,
-- written in the transaction of the conversion, one row per converted
-- lead. `entry` is `leadconv_domain::journal::Entry` as JSON: the records
-- created (as stored), each field filled on records that existed (its
-- exact value before, and the value written; custom field keys, links,
-- tags and the opt-out included), the notes, attachments and activities
-- moved and the note copies made, and the lead's own fields before and
-- after. It lives as long as the lead's result (retention deletes both).
CREATE TABLE conversion_journal (
    job_id     uuid NOT NULL,
    lead_id    bigint NOT NULL,
    entry      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, lead_id),
    FOREIGN KEY (job_id, lead_id) REFERENCES conversion_results (job_id, lead_id) ON DELETE CASCADE
);
