-- The journal is written with every conversion, so its cost is the
-- conversion's (issue 21: at most a tenth of its speed). Two costs go:
-- * the history index evaluated `leadconv_journal_records(entry)`, an SQL
--   function walking the JSON, for every row written: the records an
--   entry touched are now computed by the worker
--   (`leadconv_domain::journal::Entry::records`) and stored beside it;
-- * `entry` was parsed into jsonb on every insert, though only leadconv
--   reads it, whole, and never queries inside it: it is now json (stored
--   as written; checked as JSON on insert).
ALTER TABLE conversion_journal ADD COLUMN records text[];
UPDATE conversion_journal SET records = leadconv_journal_records(entry);
ALTER TABLE conversion_journal ALTER COLUMN records SET NOT NULL;
DROP INDEX conversion_journal_records_idx;
DROP FUNCTION leadconv_journal_records(jsonb);
CREATE INDEX conversion_journal_records_idx ON conversion_journal USING gin (records);
ALTER TABLE conversion_journal ALTER COLUMN entry TYPE json USING entry::json;
