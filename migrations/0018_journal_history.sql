-- A record's history (SPEC §4a): every conversion and undo that created or
-- changed it, found through the journal. The records an entry created or
-- filled, as 'module:id', indexed; and the lead's own entries by lead.
CREATE FUNCTION leadconv_journal_records(entry jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(DISTINCT r), '{}') FROM (
        SELECT (c ->> 'module') || ':' || (c ->> 'id') FROM jsonb_array_elements(coalesce(entry -> 'created', '[]')) AS c
        UNION ALL
        SELECT (f ->> 'module') || ':' || (f ->> 'id') FROM jsonb_array_elements(coalesce(entry -> 'filled', '[]')) AS f
    ) AS t(r)
$$;
CREATE INDEX conversion_journal_records_idx ON conversion_journal USING gin (leadconv_journal_records(entry));
CREATE INDEX conversion_journal_lead_idx ON conversion_journal (lead_id);
