-- The CRM tables leadconv works on. Their names and the columns listed in
-- SPEC §2 are a contract with other systems: add, never rename.

-- Normalisation used by matching. Kept in SQL so that indexes, the engine and
-- anyone querying by hand agree on what "the same e-mail" and "the same
-- company" mean.
CREATE FUNCTION leadconv_norm_email(text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT
    AS $$ SELECT NULLIF(lower(btrim($1)), '') $$;

CREATE FUNCTION leadconv_norm_company(text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT
    AS $$ SELECT NULLIF(lower(regexp_replace(btrim($1), '\s+', ' ', 'g')), '') $$;

CREATE FUNCTION leadconv_touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TABLE users (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    email       text,
    manager_id  BIGINT REFERENCES users (id),
    active      boolean NOT NULL DEFAULT true,
    can_convert boolean NOT NULL DEFAULT false,
    is_admin    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (manager_id IS DISTINCT FROM id)
);
CREATE INDEX users_manager_idx ON users (manager_id);

CREATE TABLE leads (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id             BIGINT REFERENCES users (id),
    salutation           text,
    first_name           text,
    last_name            text NOT NULL,
    company              text,
    title                text,
    email                text,
    phone                text,
    mobile               text,
    fax                  text,
    skype_id             text,
    website              text,
    lead_source          text,
    industry             text,
    annual_revenue       numeric,
    no_of_employees      int,
    rating               text,
    email_opt_out        boolean NOT NULL DEFAULT false,
    street               text,
    city                 text,
    state                text,
    zip_code             text,
    country              text,
    lead_status          text,
    description          text,
    custom_fields        jsonb NOT NULL DEFAULT '{}',
    tags                 text[] NOT NULL DEFAULT '{}',
    converted_at         timestamptz,
    converted_account_id BIGINT,
    converted_contact_id BIGINT,
    converted_deal_id    BIGINT,
    is_repeat            boolean NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- Criteria always exclude converted leads; most jobs look only at these.
CREATE INDEX leads_unconverted_idx ON leads (id) WHERE converted_at IS NULL;
CREATE INDEX leads_owner_idx ON leads (owner_id);

CREATE TABLE accounts (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id        BIGINT REFERENCES users (id),
    account_name    text NOT NULL,
    phone           text,
    fax             text,
    website         text,
    industry        text,
    annual_revenue  numeric,
    no_of_employees int,
    street          text,
    city            text,
    state           text,
    zip_code        text,
    country         text,
    custom_fields   jsonb NOT NULL DEFAULT '{}',
    tags            text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Not UNIQUE: existing CRM data may hold duplicates already; the engine
-- prevents new ones with advisory locks instead.
CREATE INDEX accounts_name_norm_idx ON accounts (leadconv_norm_company(account_name), id);
CREATE INDEX accounts_custom_fields_idx ON accounts USING gin (custom_fields jsonb_path_ops);

CREATE TABLE contacts (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id      BIGINT REFERENCES users (id),
    account_id    BIGINT REFERENCES accounts (id),
    salutation    text,
    first_name    text,
    last_name     text NOT NULL,
    title         text,
    email         text,
    phone         text,
    mobile        text,
    fax           text,
    skype_id      text,
    lead_source   text,
    -- Nullable on purpose: NULL is "not set", which a merge may fill.
    email_opt_out boolean,
    street        text,
    city          text,
    state         text,
    zip_code      text,
    country       text,
    custom_fields jsonb NOT NULL DEFAULT '{}',
    tags          text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX contacts_email_norm_idx ON contacts (leadconv_norm_email(email), created_at, id);
CREATE INDEX contacts_account_idx ON contacts (account_id);
CREATE INDEX contacts_custom_fields_idx ON contacts USING gin (custom_fields jsonb_path_ops);

CREATE TABLE pipelines (
    name       text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deal_stages (
    pipeline    text NOT NULL REFERENCES pipelines (name) ON UPDATE CASCADE,
    stage       text NOT NULL,
    probability int CHECK (probability BETWEEN 0 AND 100),
    is_won      boolean NOT NULL DEFAULT false,
    is_lost     boolean NOT NULL DEFAULT false,
    sort_order  int NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, stage),
    CHECK (NOT (is_won AND is_lost))
);

INSERT INTO pipelines (name) VALUES ('Standard');
INSERT INTO deal_stages (pipeline, stage, probability, is_won, is_lost, sort_order) VALUES
    ('Standard', 'Qualification',          10,  false, false, 1),
    ('Standard', 'Needs Analysis',         20,  false, false, 2),
    ('Standard', 'Value Proposition',      40,  false, false, 3),
    ('Standard', 'Id. Decision Makers',    60,  false, false, 4),
    ('Standard', 'Proposal/Price Quote',   75,  false, false, 5),
    ('Standard', 'Negotiation/Review',     90,  false, false, 6),
    ('Standard', 'Closed Won',             100, true,  false, 7),
    ('Standard', 'Closed Lost',            0,   false, true,  8);

CREATE TABLE deals (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id          BIGINT REFERENCES users (id),
    account_id        BIGINT REFERENCES accounts (id),
    contact_id        BIGINT REFERENCES contacts (id),
    deal_name         text NOT NULL,
    closing_date      date NOT NULL,
    stage             text NOT NULL,
    pipeline          text NOT NULL DEFAULT 'Standard',
    amount            numeric,
    lead_source       text,
    contact_role      text,
    campaign_source   text,
    rating            text,
    is_repeat         boolean NOT NULL DEFAULT false,
    is_repeat_inquiry boolean NOT NULL DEFAULT false,
    custom_fields     jsonb NOT NULL DEFAULT '{}',
    tags              text[] NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (pipeline, stage) REFERENCES deal_stages (pipeline, stage) ON UPDATE CASCADE
);
CREATE INDEX deals_account_idx ON deals (account_id);
CREATE INDEX deals_contact_idx ON deals (contact_id);

ALTER TABLE leads
    ADD FOREIGN KEY (converted_account_id) REFERENCES accounts (id),
    ADD FOREIGN KEY (converted_contact_id) REFERENCES contacts (id),
    ADD FOREIGN KEY (converted_deal_id) REFERENCES deals (id);

-- Related records hang off any module through (parent_module, parent_id).
CREATE TABLE notes (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    parent_module text NOT NULL CHECK (parent_module IN ('lead', 'account', 'contact', 'deal')),
    parent_id     BIGINT NOT NULL,
    title         text,
    body          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notes_parent_idx ON notes (parent_module, parent_id);

CREATE TABLE attachments (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    parent_module text NOT NULL CHECK (parent_module IN ('lead', 'account', 'contact', 'deal')),
    parent_id     BIGINT NOT NULL,
    file_name     text NOT NULL,
    content_type  text,
    size_bytes    BIGINT,
    storage_key   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attachments_parent_idx ON attachments (parent_module, parent_id);

CREATE TABLE activities (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    parent_module text NOT NULL CHECK (parent_module IN ('lead', 'account', 'contact', 'deal')),
    parent_id     BIGINT NOT NULL,
    kind          text NOT NULL,
    subject       text,
    due_at        timestamptz,
    status        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX activities_parent_idx ON activities (parent_module, parent_id);

CREATE TABLE custom_field_defs (
    module     text NOT NULL CHECK (module IN ('lead', 'account', 'contact', 'deal')),
    api_name   text NOT NULL CHECK (api_name ~ '^[a-z][a-z0-9_]*$'),
    data_type  text NOT NULL CHECK (data_type IN ('text', 'picklist', 'number', 'date', 'boolean')),
    max_length int CHECK (max_length > 0),
    is_unique  boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (module, api_name)
);

CREATE TABLE conversion_mappings (
    lead_field    text NOT NULL,
    target_module text NOT NULL CHECK (target_module IN ('account', 'contact', 'deal')),
    target_field  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (lead_field, target_module, target_field)
);

-- A mapping is valid only between fields of the same data type, and text
-- only into text at least as long. Enforced here so that a mapping saved by
-- any system, not only by leadconv, is refused when it is wrong.
CREATE FUNCTION leadconv_check_mapping() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    src custom_field_defs;
    dst custom_field_defs;
BEGIN
    SELECT * INTO src FROM custom_field_defs WHERE module = 'lead' AND api_name = NEW.lead_field;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lead custom field "%" does not exist', NEW.lead_field
            USING ERRCODE = 'check_violation', CONSTRAINT = 'mapping_unknown_lead_field';
    END IF;
    SELECT * INTO dst FROM custom_field_defs WHERE module = NEW.target_module AND api_name = NEW.target_field;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% custom field "%" does not exist', NEW.target_module, NEW.target_field
            USING ERRCODE = 'check_violation', CONSTRAINT = 'mapping_unknown_target_field';
    END IF;
    IF src.data_type <> dst.data_type THEN
        RAISE EXCEPTION 'cannot map lead field "%" (%) to %.% (%): data types differ',
            src.api_name, src.data_type, dst.module, dst.api_name, dst.data_type
            USING ERRCODE = 'check_violation', CONSTRAINT = 'mapping_type_mismatch';
    END IF;
    IF src.data_type = 'text' AND dst.max_length IS NOT NULL
       AND (src.max_length IS NULL OR src.max_length > dst.max_length) THEN
        RAISE EXCEPTION 'cannot map lead field "%" (max length %) to %.% (max length %): target is shorter',
            src.api_name, coalesce(src.max_length::text, 'unlimited'), dst.module, dst.api_name, dst.max_length
            USING ERRCODE = 'check_violation', CONSTRAINT = 'mapping_length_mismatch';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER conversion_mappings_check
    BEFORE INSERT OR UPDATE ON conversion_mappings
    FOR EACH ROW EXECUTE FUNCTION leadconv_check_mapping();

CREATE TABLE conversion_jobs (
    id              uuid PRIMARY KEY,
    status          text NOT NULL DEFAULT 'scheduled'
                    CHECK (status IN ('scheduled', 'in_progress', 'completed', 'failed', 'cancelled')),
    criteria        jsonb NOT NULL,
    options         jsonb NOT NULL,
    requested_by    BIGINT NOT NULL REFERENCES users (id),
    trigger         text NOT NULL DEFAULT 'manual'
                    CHECK (trigger IN ('manual', 'schedule', 'workflow', 'api')),
    total_count     int NOT NULL DEFAULT 0,
    converted_count int NOT NULL DEFAULT 0,
    merged_count    int NOT NULL DEFAULT 0,
    skipped_count   int NOT NULL DEFAULT 0,
    failed_count    int NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CHECK (converted_count + skipped_count + failed_count <= total_count),
    CHECK (merged_count <= converted_count)
);
CREATE INDEX conversion_jobs_status_idx ON conversion_jobs (status, created_at);

-- No foreign key on lead_id: a result outlives the lead it speaks of.
CREATE TABLE conversion_results (
    job_id         uuid NOT NULL REFERENCES conversion_jobs (id) ON DELETE CASCADE,
    lead_id        BIGINT NOT NULL,
    outcome        text NOT NULL DEFAULT 'pending'
                   CHECK (outcome IN ('pending', 'converted', 'skipped', 'failed')),
    contact_action text CHECK (contact_action IN ('created', 'merged')),
    account_action text CHECK (account_action IN ('created', 'matched', 'none')),
    deal_action    text CHECK (deal_action IN ('created', 'none')),
    contact_id     BIGINT,
    account_id     BIGINT,
    deal_id        BIGINT,
    is_repeat      boolean,
    error_code     text,
    error_message  text,
    attempts       int NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    PRIMARY KEY (job_id, lead_id)
);
CREATE INDEX conversion_results_pending_idx ON conversion_results (job_id, lead_id) WHERE outcome = 'pending';
CREATE INDEX conversion_results_lead_idx ON conversion_results (lead_id);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'leads', 'accounts', 'contacts', 'pipelines', 'deal_stages',
                             'deals', 'notes', 'attachments', 'activities', 'custom_field_defs',
                             'conversion_mappings', 'conversion_jobs', 'conversion_results']
    LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION leadconv_touch_updated_at()',
                       t || '_updated_at', t);
    END LOOP;
END $$;
