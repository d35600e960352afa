-- Lenient casts for custom field values in criteria: custom_fields is free
-- JSON written by many systems, and one malformed value must make its lead
-- not match, not abort the whole job's snapshot.

CREATE FUNCTION leadconv_try_numeric(text) RETURNS numeric
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN $1::numeric;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;

CREATE FUNCTION leadconv_try_date(text) RETURNS date
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF $1 !~ '^\d{4}-\d{2}-\d{2}' THEN
        RETURN NULL;
    END IF;
    RETURN substr($1, 1, 10)::date;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;

CREATE FUNCTION leadconv_try_bool(text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE lower($1) WHEN 'true' THEN true WHEN 'false' THEN false END
$$;

CREATE INDEX leads_tags_idx ON leads USING gin (tags);
CREATE INDEX leads_created_at_idx ON leads (created_at) WHERE converted_at IS NULL;
