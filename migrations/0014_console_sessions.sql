-- Console sign-ins: an API token exchanged for a session cookie. Only the
-- cookie's SHA-256 is stored (like tokens); the CSRF token is per session.
-- A session ends when it expires, when its user signs out, or at once when
-- the token it was made from is revoked (ON DELETE and the lookup's join).
CREATE TABLE console_sessions (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_hash bytea NOT NULL UNIQUE,
    token_id     BIGINT NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
