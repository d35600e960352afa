-- An undo that takes a conversion back (converted_at set → NULL) is not a
-- change of the lead a rule acts on: a rule matching the restored lead
-- would convert it again at once and defeat the undo. Edits people make to
-- the lead afterwards fire rules as before.
CREATE OR REPLACE FUNCTION leadconv_lead_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.converted_at IS NOT NULL AND NEW.converted_at IS NULL THEN
        RETURN NULL;
    END IF;
    IF NEW.converted_at IS NULL AND EXISTS (SELECT 1 FROM conversion_rules WHERE enabled) THEN
        INSERT INTO lead_changes (lead_id) VALUES (NEW.id);
        PERFORM pg_notify('leadconv_lead_changes', '');
    END IF;
    RETURN NULL;
END
$$;
