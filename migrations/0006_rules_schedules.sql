-- Conversion rules (workflow triggers) and schedules (issue 4).

-- A rule: when an unconverted lead is inserted or updated so that it matches
-- the criteria of an enabled rule, a one-lead `workflow` job converts it
-- with the rule's options, acting as the rule's user.
CREATE TABLE conversion_rules (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    criteria    jsonb NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}',
    acting_user BIGINT NOT NULL REFERENCES users (id),
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The outbox of lead changes, written by the trigger below in the writer's
-- own transaction (any writer, not only leadconv), so a change committed
-- while no `serve` runs is picked up when one starts. `serve`'s relay claims
-- rows with FOR UPDATE SKIP LOCKED and deletes them in the transaction that
-- creates the jobs.
CREATE TABLE lead_changes (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lead_id    BIGINT NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

-- Only unconverted leads, and only while some rule is enabled: a rule acts
-- on changes made after it was enabled, and bulk loads without rules leave
-- no outbox behind. The notification (one per transaction: Postgres folds
-- identical ones) wakes the relay at once; it polls as well.
CREATE FUNCTION leadconv_lead_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.converted_at IS NULL AND EXISTS (SELECT 1 FROM conversion_rules WHERE enabled) THEN
        INSERT INTO lead_changes (lead_id) VALUES (NEW.id);
        PERFORM pg_notify('leadconv_lead_changes', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER leads_changed_outbox AFTER INSERT OR UPDATE ON leads
    FOR EACH ROW EXECUTE FUNCTION leadconv_lead_changed();

-- A schedule: `serve` creates one `schedule` job per due tick. The row lock
-- taken with FOR UPDATE SKIP LOCKED and the move of next_run_at in the
-- job's transaction make that exactly once across replicas.
CREATE TABLE conversion_schedules (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    cron        text NOT NULL,
    criteria    jsonb NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}',
    acting_user BIGINT NOT NULL REFERENCES users (id),
    enabled     boolean NOT NULL DEFAULT true,
    next_run_at timestamptz NOT NULL,
    last_run_at timestamptz,
    last_job_id uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversion_schedules_due_idx ON conversion_schedules (next_run_at) WHERE enabled;
