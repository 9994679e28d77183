-- Users: the key directory. Names are unique without regard to case.
CREATE TABLE users (
    id              uuid        PRIMARY KEY,
    name            text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.-]{3,32}$'),
    hashed_password text        NOT NULL CHECK (hashed_password LIKE '$2_$%'),
    public_key      text        NOT NULL CHECK (public_key LIKE '-----BEGIN PUBLIC KEY-----%'
                                                AND octet_length(public_key) <= 8192),
    created_at      timestamptz NOT NULL DEFAULT now(),
    key_updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_name_lower_key ON users (lower(name));

-- Messages: ciphertext held until the recipient confirms it, and never past expires_at.
-- Confirming erases the ciphertext in the same statement; the row stays (without content) until
-- expiry so a repeated confirmation is still answered 204.
CREATE TABLE messages (
    id             uuid        PRIMARY KEY,
    sender_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    recipient_id   uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    encrypted_data bytea       CHECK (octet_length(encrypted_data) >= 1),
    "timestamp"    timestamptz NOT NULL DEFAULT now(),
    is_delivered   boolean     NOT NULL DEFAULT false,
    expires_at     timestamptz NOT NULL,
    CHECK (is_delivered = (encrypted_data IS NULL)),
    CHECK (expires_at > "timestamp")
);
-- Fetch: the recipient's undelivered messages in id (time) order.
CREATE INDEX messages_pending_by_recipient ON messages (recipient_id, id) WHERE NOT is_delivered;
-- Purge: everything past its expiry, oldest first.
CREATE INDEX messages_expires_at ON messages (expires_at);
-- Foreign key on sender_id: deleting a user must not scan the table.
CREATE INDEX messages_sender_id ON messages (sender_id);

-- Login and registration limits, shared by every Lambda instance: one counter per bucket and key
-- (a lower-cased name or a client address) over a fixed window that starts at the first attempt.
CREATE TABLE rate_limits (
    bucket       text        NOT NULL CHECK (bucket IN ('login_name', 'login_address', 'register_address')),
    key          text        NOT NULL,
    window_start timestamptz NOT NULL,
    attempts     integer     NOT NULL CHECK (attempts > 0),
    PRIMARY KEY (bucket, key)
);
-- The purge clears windows that have ended.
CREATE INDEX rate_limits_window_start ON rate_limits (window_start);

-- One row per purge run, for /metrics; the purge keeps only recent rows.
CREATE TABLE purge_runs (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    messages_deleted    bigint      NOT NULL CHECK (messages_deleted >= 0),
    rate_limits_deleted bigint      NOT NULL CHECK (rate_limits_deleted >= 0),
    complete            boolean     NOT NULL
);
CREATE INDEX purge_runs_finished_at ON purge_runs (finished_at);
