-- Delivery guarantees and quotas (issues 11 and 12).

-- Names compare by a locale-free key: lower() in the C collation maps A-Z only, whatever the
-- database's locale (a Turkish locale would otherwise lower 'I' to a dotless 'ı').
DROP INDEX users_name_lower_key;
CREATE UNIQUE INDEX users_name_key ON users (lower(name COLLATE "C"));

-- The recipient's mailbox cursor: the id of the last message assigned to this user as a
-- recipient. A send locks this row, takes an id above it and commits before the next sender to
-- the same recipient can take one, so per recipient id order is commit order and a client that
-- polls with `after` = the last id it got never skips a message.
ALTER TABLE users ADD COLUMN last_message_id uuid NOT NULL
    DEFAULT '00000000-0000-0000-0000-000000000000';
UPDATE users u SET last_message_id = m.id
FROM (SELECT DISTINCT ON (recipient_id) recipient_id, id FROM messages
      ORDER BY recipient_id, id DESC) AS m
WHERE m.recipient_id = u.id;

-- Idempotent sends: the sender's key and a digest of what it named (recipient and ciphertext),
-- never the ciphertext itself, so the key outlives the erasure at confirmation.
-- size: the ciphertext's length, kept for the recipient's byte quota without reading the heap.
ALTER TABLE messages
    ADD COLUMN idempotency_key text CHECK (idempotency_key ~ '^[A-Za-z0-9_-]{1,64}$'),
    ADD COLUMN request_digest  bytea CHECK (octet_length(request_digest) = 32),
    ADD COLUMN size            integer NOT NULL DEFAULT 0 CHECK (size >= 0),
    ADD CHECK ((idempotency_key IS NULL) = (request_digest IS NULL));
UPDATE messages SET size = octet_length(encrypted_data) WHERE encrypted_data IS NOT NULL;

-- Two racing retries store one row. The recipient leads the key so the rule holds on a database
-- sharded by recipient; a key reused for another recipient is found by the sender's index.
CREATE UNIQUE INDEX messages_idempotency_key
    ON messages (recipient_id, sender_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The sender's own rows: the foreign key's cascade and the reused-key look-up.
DROP INDEX messages_sender_id;
CREATE INDEX messages_sender_key ON messages (sender_id, idempotency_key);
-- Fetch, and the recipient's quota (count and bytes from the index alone).
DROP INDEX messages_pending_by_recipient;
CREATE INDEX messages_pending_by_recipient ON messages (recipient_id, id)
    INCLUDE (expires_at, size) WHERE NOT is_delivered;

-- Login failures counted three ways, and sends per sender. A successful login gives its
-- provisional count back, so a counter may return to 0.
ALTER TABLE rate_limits DROP CONSTRAINT rate_limits_bucket_check;
ALTER TABLE rate_limits ADD CONSTRAINT rate_limits_bucket_check CHECK (bucket IN
    ('login_name_address', 'login_name', 'login_address', 'register_address', 'send_sender'));
ALTER TABLE rate_limits DROP CONSTRAINT rate_limits_attempts_check;
ALTER TABLE rate_limits ADD CONSTRAINT rate_limits_attempts_check CHECK (attempts >= 0);

-- The next UUID after u (u + 1 in its low 64 bits, which keeps the version and variant bits).
CREATE FUNCTION uuid_successor(u uuid) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (left(h, 16) || lpad(to_hex(('x' || right(h, 16))::bit(64)::bigint + 1), 16, '0'))::uuid
    FROM (SELECT replace(u::text, '-', '') AS h) AS hex
$$;

-- POST /messages in one call: replay, sender quota, the recipient's mailbox lock, its quota, the
-- id, the insert. plpgsql because the quota must be counted after the lock is taken, in a
-- snapshot that sees every send committed before it (each statement here gets a new one).
-- outcome: stored | replayed | key_reused | rate_limited | mailbox_full | no_recipient.
CREATE FUNCTION send_message(
    p_proposed_id uuid,
    p_sender uuid,
    p_recipient uuid,
    p_data bytea,
    p_ttl_seconds double precision,
    p_idempotency_key text,
    p_request_digest bytea,
    p_send_max integer,
    p_send_window_seconds double precision,
    p_max_pending integer,
    p_max_pending_bytes bigint
) RETURNS TABLE (
    outcome text,
    id uuid,
    sender_id uuid,
    recipient_id uuid,
    "timestamp" timestamptz,
    expires_at timestamptz,
    retry_after bigint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prior messages%ROWTYPE;
    v_attempts integer;
    v_retry_after bigint;
    v_last uuid;
    v_pending bigint;
    v_pending_bytes bigint;
    v_oldest_expiry timestamptz;
    v_id uuid;
BEGIN
    -- A retry of a stored request gets the first answer, before any quota is spent.
    IF p_idempotency_key IS NOT NULL THEN
        SELECT * INTO v_prior FROM messages m
        WHERE m.sender_id = p_sender AND m.idempotency_key = p_idempotency_key
        LIMIT 1;
        IF FOUND THEN
            RETURN QUERY SELECT
                CASE WHEN v_prior.recipient_id = p_recipient
                          AND v_prior.request_digest = p_request_digest
                     THEN 'replayed' ELSE 'key_reused' END,
                v_prior.id, v_prior.sender_id, v_prior.recipient_id, v_prior."timestamp",
                v_prior.expires_at, 0::bigint;
            RETURN;
        END IF;
    END IF;

    -- The sender's rate, counted whether or not the send goes through.
    INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
    VALUES ('send_sender', p_sender::text, now(), 1)
    ON CONFLICT (bucket, key) DO UPDATE SET
        window_start = CASE WHEN r.window_start <= now() - make_interval(secs => p_send_window_seconds)
                            THEN now() ELSE r.window_start END,
        attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => p_send_window_seconds)
                            THEN 1 ELSE r.attempts + 1 END
    RETURNING r.attempts,
              greatest(1, ceil(extract(epoch FROM r.window_start
                  + make_interval(secs => p_send_window_seconds) - now())))::bigint
    INTO v_attempts, v_retry_after;
    IF v_attempts > p_send_max THEN
        RETURN QUERY SELECT 'rate_limited', NULL::uuid, NULL::uuid, NULL::uuid,
            NULL::timestamptz, NULL::timestamptz, v_retry_after;
        RETURN;
    END IF;

    -- The recipient's mailbox: held until commit, so the next sender to this recipient waits,
    -- then sees this message in its count and takes a larger id.
    SELECT u.last_message_id INTO v_last FROM users u WHERE u.id = p_recipient FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_recipient', NULL::uuid, NULL::uuid, NULL::uuid,
            NULL::timestamptz, NULL::timestamptz, 0::bigint;
        RETURN;
    END IF;

    SELECT count(*), coalesce(sum(m.size), 0), min(m.expires_at)
    INTO v_pending, v_pending_bytes, v_oldest_expiry
    FROM messages m
    WHERE m.recipient_id = p_recipient AND NOT m.is_delivered AND m.expires_at > now();
    IF v_pending + 1 > p_max_pending OR v_pending_bytes + octet_length(p_data) > p_max_pending_bytes THEN
        -- Room is made when the recipient confirms, or at the latest when the oldest expires.
        RETURN QUERY SELECT 'mailbox_full', NULL::uuid, NULL::uuid, NULL::uuid,
            NULL::timestamptz, NULL::timestamptz,
            greatest(1, least(60, ceil(extract(epoch FROM coalesce(v_oldest_expiry, now()) - now()))))::bigint;
        RETURN;
    END IF;

    v_id := CASE WHEN p_proposed_id > v_last THEN p_proposed_id ELSE uuid_successor(v_last) END;
    RETURN QUERY
    INSERT INTO messages AS m (id, sender_id, recipient_id, encrypted_data, size, "timestamp",
                               expires_at, idempotency_key, request_digest)
    VALUES (v_id, p_sender, p_recipient, p_data, octet_length(p_data), now(),
            now() + make_interval(secs => p_ttl_seconds), p_idempotency_key, p_request_digest)
    ON CONFLICT (recipient_id, sender_id, idempotency_key) WHERE idempotency_key IS NOT NULL
    DO NOTHING
    RETURNING 'stored'::text, m.id, m.sender_id, m.recipient_id, m."timestamp", m.expires_at, 0::bigint;
    IF FOUND THEN
        UPDATE users u SET last_message_id = v_id WHERE u.id = p_recipient;
        RETURN;
    END IF;

    -- A racing retry with the same key stored it first (the unique index decided).
    SELECT * INTO v_prior FROM messages m
    WHERE m.recipient_id = p_recipient AND m.sender_id = p_sender
      AND m.idempotency_key = p_idempotency_key;
    RETURN QUERY SELECT
        CASE WHEN v_prior.request_digest = p_request_digest THEN 'replayed' ELSE 'key_reused' END,
        v_prior.id, v_prior.sender_id, v_prior.recipient_id, v_prior."timestamp",
        v_prior.expires_at, 0::bigint;
END
$$;
