-- Devices, link codes and prekeys (API.md "Devices" and "Prekeys").
--
-- Safe to apply while the previous functions still serve: every new column has a constant
-- default (no table rewrite), device 1 is made for every account by a trigger (so a registration
-- by an old `register` gets one too), an old `update-key` still keeps device 1 in step, and the old
-- `send_message(...)` signature stays as a wrapper of the new send. The indexes on `messages` are
-- built CONCURRENTLY by the migrations after this one (each its own file: CONCURRENTLY cannot run
-- in a transaction), so no write to `messages` waits for an index build. The statements are in
-- the order that holds the strongest locks for the least time (all are held to the commit):
-- writes to `users` wait from the first foreign key to it (SHARE ROW EXCLUSIVE) through the
-- backfill; `messages` is altered last (ACCESS EXCLUSIVE, a catalogue change only).

-- Each device's own key and mailbox. key_fingerprint is ENVELOPE.md's fingerprint (SHA-256 of
-- the SPKI DER, the PEM's base64 body) computed by the database, so it can never disagree with
-- the key it describes. last_message_id is the device mailbox's cursor (see send_envelopes).
-- signing_key and binding_sig come and go together (API.md "Prekeys"); prekey_high_water is the
-- highest key id uploaded under the current signing key, claimed or not.
CREATE TABLE devices (
    user_id           uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id         integer     NOT NULL CHECK (device_id >= 1),
    label             text        NOT NULL CHECK (char_length(label) BETWEEN 1 AND 64),
    public_key        text        NOT NULL CHECK (public_key LIKE '-----BEGIN PUBLIC KEY-----%'
                                                  AND octet_length(public_key) <= 8192),
    key_fingerprint   text        NOT NULL GENERATED ALWAYS AS (encode(sha256(decode(
                                      regexp_replace(public_key, '-----[A-Z ]+-----|\s', '', 'g'),
                                      'base64')), 'hex')) STORED,
    created_at        timestamptz NOT NULL DEFAULT now(),
    key_updated_at    timestamptz NOT NULL DEFAULT now(),
    last_message_id   uuid        NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    signing_key       text        CHECK (signing_key LIKE '-----BEGIN PUBLIC KEY-----%'
                                         AND octet_length(signing_key) <= 512),
    binding_sig       bytea       CHECK (octet_length(binding_sig) = 64),
    signing_key_reset boolean     NOT NULL DEFAULT false,
    prekey_high_water bigint      CHECK (prekey_high_water BETWEEN 0 AND 4294967295),
    PRIMARY KEY (user_id, device_id),
    CHECK ((signing_key IS NULL) = (binding_sig IS NULL))
);

-- Device 1 of every existing account: its key, its creation time, its mailbox cursor.
INSERT INTO devices (user_id, device_id, label, public_key, created_at, key_updated_at, last_message_id)
SELECT id, 1, 'device 1', public_key, created_at, key_updated_at, last_message_id FROM users;

-- Device 1 of every new account, whoever registers it.
CREATE FUNCTION users_add_device_one() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO devices (user_id, device_id, label, public_key, created_at, key_updated_at)
    VALUES (NEW.id, 1, 'device 1', NEW.public_key, NEW.created_at, NEW.key_updated_at);
    RETURN NULL;
END
$$;
CREATE TRIGGER users_add_device_one AFTER INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION users_add_device_one();

-- users.public_key is device 1's key as GET /me, /public-key and /users show it. The new
-- `update-key` writes both in one statement; this keeps device 1 in step when only users changes
-- (an `update-key` of the previous release, while a deployment rolls out): a new key with no
-- binding signature drops the device's signing key and prekeys, as the contract says.
CREATE FUNCTION users_sync_device_one() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE devices d SET public_key = NEW.public_key, key_updated_at = NEW.key_updated_at,
        signing_key = NULL, binding_sig = NULL, signing_key_reset = false, prekey_high_water = NULL
    WHERE d.user_id = NEW.id AND d.device_id = 1 AND d.public_key <> NEW.public_key;
    IF FOUND THEN
        DELETE FROM prekeys p WHERE p.user_id = NEW.id AND p.device_id = 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER users_sync_device_one AFTER UPDATE OF public_key ON users
    FOR EACH ROW WHEN (OLD.public_key IS DISTINCT FROM NEW.public_key)
    EXECUTE FUNCTION users_sync_device_one();

-- The device counter: ids are never reused within an account (next_device_id only grows), and
-- device_count is the limit's count. Both are changed only with the users row locked, so the
-- limit and the id are decided by one row lock however many links race.
-- The checks are NOT VALID here (validating scans the table under this lock) and validated by
-- a later migration, which blocks no reads or writes.
ALTER TABLE users
    ADD COLUMN next_device_id integer NOT NULL DEFAULT 2,
    ADD COLUMN device_count   integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT users_next_device_id_check CHECK (next_device_id >= 2) NOT VALID,
    ADD CONSTRAINT users_device_count_check CHECK (device_count >= 1) NOT VALID;

-- Link codes, kept only as SHA-256 of the normalised code. Keyed by the account first (the new
-- device names the account, and the password is checked before the code), so it shards by user.
CREATE TABLE link_codes (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  bytea       NOT NULL CHECK (octet_length(code_hash) = 32),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, code_hash)
);
-- The purge clears expired codes.
CREATE INDEX link_codes_expires_at ON link_codes (expires_at);

-- One-time prekeys and the one last-resort prekey of each device. claims counts the claims a
-- last-resort key answered since it was uploaded. A claim takes the lowest one-time key id with
-- DELETE ... RETURNING on the primary key, so a one-time key leaves in at most one claim.
CREATE TABLE prekeys (
    user_id     uuid    NOT NULL,
    device_id   integer NOT NULL,
    last_resort boolean NOT NULL,
    key_id      bigint  NOT NULL CHECK (key_id BETWEEN 0 AND 4294967295),
    public_key  bytea   NOT NULL CHECK (octet_length(public_key) = 32),
    signature   bytea   NOT NULL CHECK (octet_length(signature) = 64),
    claims      integer NOT NULL DEFAULT 0 CHECK (claims >= 0),
    PRIMARY KEY (user_id, device_id, last_resort, key_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX prekeys_one_last_resort ON prekeys (user_id, device_id) WHERE last_resort;

-- Limits of devices and prekeys, counted like the others.
ALTER TABLE rate_limits DROP CONSTRAINT rate_limits_bucket_check;
ALTER TABLE rate_limits ADD CONSTRAINT rate_limits_bucket_check CHECK (bucket IN
    ('login_name_address', 'login_name', 'login_address', 'register_address', 'send_sender',
     'link_code_account', 'link_failure_account', 'prekey_claim_requester', 'prekey_claim_target'));

-- One send, to one device (POST /messages: device 1) or to every device of the recipient
-- (POST /messages/devices, p_fan_out), in one call:
--   1. the sender's account row, locked: a sender's sends run one at a time, so the replay check
--      below sees every earlier send under the same key, whichever recipient it named; and the
--      sender's device must exist (a removed device's token is 401);
--   2. an earlier answer to this Idempotency-Key, before any quota is spent;
--   3. the sender's rate, once per request;
--   4. the recipient's mailboxes (device rows), locked in device order: a re-key or removal of a
--      device waits for this send, or this send waits for it and sees it (then devices_changed);
--   5. for a fan-out, the envelopes against the current devices and fingerprints;
--   6. each mailbox's quotas, counted after the lock in a snapshot that sees every send
--      committed before it;
--   7. the ids (above each mailbox's cursor) and the insert of every envelope.
-- Lock order, everywhere: a users row before device rows, device rows in device_id order.
-- outcome: stored | replayed | key_reused | rate_limited | mailbox_full | no_recipient |
--          unauthorized | devices_changed (one row per current device, with the differences).
CREATE FUNCTION send_envelopes(
    p_sender uuid,
    p_sender_device integer,
    p_recipient uuid,
    p_fan_out boolean,
    p_proposed_ids uuid[],
    p_device_ids integer[],
    p_fingerprints text[],
    p_data bytea[],
    p_ttl_seconds double precision,
    p_idempotency_key text,
    p_request_digest bytea,
    p_send_max integer,
    p_send_window_seconds double precision,
    p_max_pending integer,
    p_max_pending_bytes bigint,
    p_max_from_one_sender integer
) RETURNS TABLE (
    outcome text,
    device_id integer,
    id uuid,
    sender_device_id integer,
    "timestamp" timestamptz,
    expires_at timestamptz,
    retry_after bigint,
    public_key text,
    key_fingerprint text,
    key_updated_at timestamptz,
    missing integer[],
    extra integer[],
    stale integer[]
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_attempts integer;
    v_retry_after bigint;
    v_missing integer[];
    v_extra integer[];
    v_stale integer[];
    v_current integer[];
    v_fingerprints text[];
    v_expected integer[];
    v_full_retry bigint;
BEGIN
    PERFORM 1 FROM users u WHERE u.id = p_sender FOR NO KEY UPDATE;
    PERFORM 1 FROM devices d WHERE d.user_id = p_sender AND d.device_id = p_sender_device;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unauthorized', NULL::integer, NULL::uuid, NULL::integer, NULL::timestamptz,
            NULL::timestamptz, 0::bigint, NULL::text, NULL::text, NULL::timestamptz,
            NULL::integer[], NULL::integer[], NULL::integer[];
        RETURN;
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        -- The sender's own rows under this key (messages_sender_key).
        RETURN QUERY
        SELECT CASE WHEN bool_and(m.recipient_id = p_recipient AND m.request_digest = p_request_digest)
                         OVER () THEN 'replayed' ELSE 'key_reused' END,
               m.recipient_device_id, m.id, m.sender_device_id, m."timestamp", m.expires_at, 0::bigint,
               NULL::text, NULL::text, NULL::timestamptz,
               NULL::integer[], NULL::integer[], NULL::integer[]
        FROM messages m
        WHERE m.sender_id = p_sender AND m.idempotency_key = p_idempotency_key
        ORDER BY m.recipient_device_id;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;

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
        RETURN QUERY SELECT 'rate_limited', NULL::integer, NULL::uuid, NULL::integer, NULL::timestamptz,
            NULL::timestamptz, v_retry_after, NULL::text, NULL::text, NULL::timestamptz,
            NULL::integer[], NULL::integer[], NULL::integer[];
        RETURN;
    END IF;

    -- The mailboxes this send may write, locked in device order. A plain send reaches device 1;
    -- a fan-out every device but the sending one.
    SELECT array_agg(t.device_id ORDER BY t.device_id), array_agg(t.key_fingerprint ORDER BY t.device_id)
    INTO v_current, v_fingerprints
    FROM (SELECT d.device_id, d.key_fingerprint FROM devices d
          WHERE d.user_id = p_recipient AND (p_fan_out OR d.device_id = 1)
          ORDER BY d.device_id
          FOR NO KEY UPDATE) AS t;
    IF v_current IS NULL THEN
        RETURN QUERY SELECT 'no_recipient', NULL::integer, NULL::uuid, NULL::integer, NULL::timestamptz,
            NULL::timestamptz, 0::bigint, NULL::text, NULL::text, NULL::timestamptz,
            NULL::integer[], NULL::integer[], NULL::integer[];
        RETURN;
    END IF;

    IF p_fan_out THEN
        v_expected := array_remove(v_current,
            CASE WHEN p_recipient = p_sender THEN p_sender_device END);
        v_missing := ARRAY(SELECT x FROM unnest(v_expected) AS x
                           WHERE x <> ALL (p_device_ids) ORDER BY x);
        v_extra := ARRAY(SELECT x FROM unnest(p_device_ids) AS x
                         WHERE x <> ALL (v_expected) ORDER BY x);
        v_stale := ARRAY(SELECT e.device_id
                         FROM unnest(p_device_ids, p_fingerprints) AS e(device_id, fingerprint)
                         JOIN unnest(v_current, v_fingerprints) AS c(device_id, fingerprint)
                           ON c.device_id = e.device_id
                         WHERE e.device_id = ANY (v_expected)
                           AND c.fingerprint IS DISTINCT FROM lower(e.fingerprint)
                         ORDER BY e.device_id);
        IF cardinality(v_missing) + cardinality(v_extra) + cardinality(v_stale) > 0 THEN
            RETURN QUERY
            SELECT 'devices_changed', d.device_id, NULL::uuid, NULL::integer, NULL::timestamptz,
                   NULL::timestamptz, 0::bigint, d.public_key, d.key_fingerprint,
                   d.key_updated_at, v_missing, v_extra, v_stale
            FROM devices d WHERE d.user_id = p_recipient ORDER BY d.device_id;
            RETURN;
        END IF;
    END IF;

    -- Each mailbox's quotas (messages_pending_by_device, from the index alone). Room is made
    -- when the recipient confirms, or at the latest when the oldest message expires.
    SELECT greatest(1, least(60, ceil(extract(epoch FROM coalesce(min(q.oldest), now()) - now()))))::bigint
    INTO v_full_retry
    FROM unnest(p_device_ids, p_data) AS e(device_id, data)
    CROSS JOIN LATERAL (
        SELECT count(*) AS pending, coalesce(sum(m.size), 0) AS bytes,
               count(*) FILTER (WHERE m.sender_id = p_sender) AS from_sender,
               min(m.expires_at) AS oldest
        FROM messages m
        WHERE m.recipient_id = p_recipient AND m.recipient_device_id = e.device_id
          AND NOT m.is_delivered AND m.expires_at > now()
    ) AS q
    WHERE q.pending + 1 > p_max_pending
       OR q.bytes + octet_length(e.data) > p_max_pending_bytes
       OR q.from_sender + 1 > p_max_from_one_sender
    HAVING count(*) > 0;
    IF v_full_retry IS NOT NULL THEN
        RETURN QUERY SELECT 'mailbox_full', NULL::integer, NULL::uuid, NULL::integer, NULL::timestamptz,
            NULL::timestamptz, v_full_retry, NULL::text, NULL::text, NULL::timestamptz,
            NULL::integer[], NULL::integer[], NULL::integer[];
        RETURN;
    END IF;

    -- Each id above its mailbox's cursor; the cursor moves with the insert.
    RETURN QUERY
    WITH envelope AS (
        SELECT e.device_id, e.data,
               CASE WHEN e.proposed > d.last_message_id THEN e.proposed
                    ELSE uuid_successor(d.last_message_id) END AS new_id
        FROM unnest(p_device_ids, p_proposed_ids, p_data) AS e(device_id, proposed, data)
        JOIN devices d ON d.user_id = p_recipient AND d.device_id = e.device_id
    ), stored AS (
        INSERT INTO messages AS m (id, sender_id, sender_device_id, recipient_id,
                                   recipient_device_id, encrypted_data, size, "timestamp",
                                   expires_at, idempotency_key, request_digest)
        SELECT e.new_id, p_sender, p_sender_device, p_recipient, e.device_id, e.data,
               octet_length(e.data), now(), now() + make_interval(secs => p_ttl_seconds),
               p_idempotency_key, p_request_digest
        FROM envelope e
        RETURNING m.recipient_device_id, m.id, m."timestamp", m.expires_at
    ), cursor_moved AS (
        UPDATE devices d SET last_message_id = e.new_id
        FROM envelope e WHERE d.user_id = p_recipient AND d.device_id = e.device_id
    )
    SELECT 'stored', s.recipient_device_id, s.id, p_sender_device, s."timestamp", s.expires_at, 0::bigint,
           NULL::text, NULL::text, NULL::timestamptz,
           NULL::integer[], NULL::integer[], NULL::integer[]
    FROM stored s ORDER BY s.recipient_device_id;
END
$$;

-- The previous release's call, for its functions still serving while a deployment rolls out:
-- a plain send to device 1. Drop it in a later release.
CREATE OR REPLACE FUNCTION send_message(
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
LANGUAGE sql AS $$
    SELECT s.outcome, s.id, p_sender, p_recipient, s."timestamp", s.expires_at, s.retry_after
    FROM send_envelopes(p_sender, 1, p_recipient, false, ARRAY[p_proposed_id], ARRAY[1], NULL,
                        ARRAY[p_data], p_ttl_seconds, p_idempotency_key, p_request_digest,
                        p_send_max, p_send_window_seconds, p_max_pending, p_max_pending_bytes,
                        2147483647) AS s
$$;

-- POST /devices, after the password (link_device.rs). The account row is locked first (the lock
-- order), so one account's links, removals and wrong codes run one at a time, and each step
-- below reads in a snapshot that sees every one committed before:
--   1. LINK_MAX_FAILURES wrong codes within the window: rate_limited, whatever the code;
--   2. the code: taken (DELETE, single use) only when the account has room, so a 409 leaves it
--      usable (a code is used up only by a link);
--   3. the id from the account's counter (next_device_id only grows: never reused), the count,
--      and the device row.
-- A wrong, used, expired or foreign code (or NULL) counts one failure; the p_max_failures-th
-- voids every open code of the account.
-- outcome: linked | invalid | device_limit | rate_limited | no_account
CREATE FUNCTION link_device(
    p_user uuid,
    p_code_hash bytea,
    p_label text,
    p_public_key text,
    p_max_devices integer,
    p_max_failures integer,
    p_window_seconds double precision
) RETURNS TABLE (outcome text, device_id integer, created_at timestamptz, retry_after bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_count integer;
    v_device integer;
    v_created timestamptz;
    v_attempts integer;
    v_retry_after bigint;
BEGIN
    SELECT u.device_count INTO v_count FROM users u WHERE u.id = p_user FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_account', NULL::integer, NULL::timestamptz, 0::bigint;
        RETURN;
    END IF;

    SELECT greatest(1, ceil(extract(epoch FROM r.window_start
               + make_interval(secs => p_window_seconds) - now())))::bigint
    INTO v_retry_after
    FROM rate_limits r
    WHERE r.bucket = 'link_failure_account' AND r.key = p_user::text
      AND r.attempts >= p_max_failures
      AND r.window_start > now() - make_interval(secs => p_window_seconds);
    IF FOUND THEN
        RETURN QUERY SELECT 'rate_limited', NULL::integer, NULL::timestamptz, v_retry_after;
        RETURN;
    END IF;

    IF v_count < p_max_devices THEN
        DELETE FROM link_codes c
        WHERE c.user_id = p_user AND c.code_hash = p_code_hash AND c.expires_at > now();
    ELSE
        PERFORM 1 FROM link_codes c
        WHERE c.user_id = p_user AND c.code_hash = p_code_hash AND c.expires_at > now();
    END IF;
    IF FOUND THEN
        IF v_count >= p_max_devices THEN
            RETURN QUERY SELECT 'device_limit', NULL::integer, NULL::timestamptz, 0::bigint;
            RETURN;
        END IF;
        UPDATE users u
        SET device_count = u.device_count + 1, next_device_id = u.next_device_id + 1
        WHERE u.id = p_user
        RETURNING u.next_device_id - 1 INTO v_device;
        INSERT INTO devices AS d (user_id, device_id, label, public_key)
        VALUES (p_user, v_device, p_label, p_public_key)
        RETURNING d.created_at INTO v_created;
        RETURN QUERY SELECT 'linked', v_device, v_created, 0::bigint;
        RETURN;
    END IF;

    INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
    VALUES ('link_failure_account', p_user::text, now(), 1)
    ON CONFLICT (bucket, key) DO UPDATE SET
        window_start = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                            THEN now() ELSE r.window_start END,
        attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                            THEN 1 ELSE r.attempts + 1 END
    RETURNING r.attempts INTO v_attempts;
    IF v_attempts >= p_max_failures THEN
        DELETE FROM link_codes c WHERE c.user_id = p_user;
    END IF;
    RETURN QUERY SELECT 'invalid', NULL::integer, NULL::timestamptz, 0::bigint;
END
$$;

-- DELETE /devices/{id}, after the password (remove_device.rs). The account row, then the device
-- row (the lock order): a removal waits for a send that holds the mailbox, then erases what it
-- stored (the mail DELETE runs in a snapshot taken after the device lock); a send after it finds
-- the device gone. The prekeys go with the row (cascade), the undelivered mail on
-- messages_pending_by_device. Device 1 leaves only with the account.
-- outcome: removed | not_found | unauthorized (the caller's own device or account is gone)
CREATE FUNCTION remove_device(p_user uuid, p_caller_device integer, p_device integer)
RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM users u WHERE u.id = p_user FOR NO KEY UPDATE;
    PERFORM 1 FROM devices d WHERE d.user_id = p_user AND d.device_id = p_caller_device;
    IF NOT FOUND THEN
        RETURN 'unauthorized';
    END IF;
    DELETE FROM devices d WHERE d.user_id = p_user AND d.device_id = p_device AND d.device_id <> 1;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    UPDATE users u SET device_count = u.device_count - 1 WHERE u.id = p_user;
    DELETE FROM messages m
    WHERE m.recipient_id = p_user AND m.recipient_device_id = p_device AND NOT m.is_delivered;
    RETURN 'removed';
END
$$;

-- PUT /keys/signing-key, after the signatures and the password (set_signing_key.rs). The device
-- row first, locked: its key and signing key must still be the ones the request was checked
-- against (else 'changed'; the very key asked for, already set, is 'unchanged'). The prekeys
-- are deleted by a statement of their own, whose snapshot is taken after the lock, so it sees
-- every upload that committed before it; an upload waiting on the lock then finds the new key
-- and stores nothing. (In one statement the DELETE would run in a snapshot taken before the
-- lock was granted, and miss prekeys an upload committed meanwhile.)
-- outcome: set | unchanged | changed | unauthorized
CREATE FUNCTION set_signing_key(
    p_user uuid,
    p_device integer,
    p_public_key text,
    p_seen_signing_key text,
    p_signing_key text,
    p_binding_sig bytea,
    p_reset boolean
) RETURNS TABLE (outcome text, signing_key_reset boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_public_key text;
    v_signing_key text;
    v_reset boolean;
BEGIN
    SELECT d.public_key, d.signing_key, d.signing_key_reset
    INTO v_public_key, v_signing_key, v_reset
    FROM devices d WHERE d.user_id = p_user AND d.device_id = p_device
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unauthorized'::text, false;
        RETURN;
    END IF;
    IF v_public_key = p_public_key AND v_signing_key IS NOT DISTINCT FROM p_signing_key THEN
        RETURN QUERY SELECT 'unchanged'::text, v_reset;
        RETURN;
    END IF;
    IF v_public_key <> p_public_key OR v_signing_key IS DISTINCT FROM p_seen_signing_key THEN
        RETURN QUERY SELECT 'changed'::text, v_reset;
        RETURN;
    END IF;
    UPDATE devices d
    SET signing_key = p_signing_key, binding_sig = p_binding_sig, signing_key_reset = p_reset,
        prekey_high_water = NULL
    WHERE d.user_id = p_user AND d.device_id = p_device;
    DELETE FROM prekeys p WHERE p.user_id = p_user AND p.device_id = p_device;
    RETURN QUERY SELECT 'set'::text, p_reset;
END
$$;

-- POST /keys/prekeys, after the signatures (upload_prekeys.rs). The device row, locked: uploads
-- and signing-key changes of one device take turns, so the key the signatures were checked
-- against is still the device's, and the high-water mark and the stored count are the ones the
-- previous upload left (each statement after the lock has a snapshot that sees it). So no key
-- id is stored twice, none at or below the mark, and never more than p_max_stored one-time keys.
-- Checks first, then the writes: a refusal stores nothing.
-- outcome: stored | unauthorized | no_signing_key | signing_key_changed | not_rising | too_many
-- (high_water: the device's mark, for the message of not_rising)
CREATE FUNCTION store_prekeys(
    p_user uuid,
    p_device integer,
    p_signing_key text,
    p_key_ids bigint[],
    p_public_keys bytea[],
    p_signatures bytea[],
    p_last_resort_key_id bigint,
    p_last_resort_public_key bytea,
    p_last_resort_signature bytea,
    p_max_stored integer
) RETURNS TABLE (outcome text, available bigint, lowest_key_id bigint, high_water bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_signing_key text;
    v_high_water bigint;
    v_lowest_new bigint;
    v_highest_new bigint;
    v_stored bigint;
BEGIN
    SELECT d.signing_key, d.prekey_high_water INTO v_signing_key, v_high_water
    FROM devices d WHERE d.user_id = p_user AND d.device_id = p_device
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unauthorized'::text, 0::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF v_signing_key IS NULL THEN
        RETURN QUERY SELECT 'no_signing_key'::text, 0::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF v_signing_key <> p_signing_key THEN
        RETURN QUERY SELECT 'signing_key_changed'::text, 0::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;

    SELECT min(k), max(k) INTO v_lowest_new, v_highest_new
    FROM unnest(array_append(p_key_ids, p_last_resort_key_id)) AS k;
    IF v_lowest_new <= v_high_water THEN
        RETURN QUERY SELECT 'not_rising'::text, 0::bigint, NULL::bigint, v_high_water;
        RETURN;
    END IF;
    -- On the primary key (user_id, device_id, last_resort, key_id).
    SELECT count(*) INTO v_stored
    FROM prekeys p WHERE p.user_id = p_user AND p.device_id = p_device AND NOT p.last_resort;
    IF v_stored + cardinality(p_key_ids) > p_max_stored THEN
        RETURN QUERY SELECT 'too_many'::text, v_stored, NULL::bigint, v_high_water;
        RETURN;
    END IF;

    INSERT INTO prekeys (user_id, device_id, last_resort, key_id, public_key, signature)
    SELECT p_user, p_device, false, k.key_id, k.public_key, k.signature
    FROM unnest(p_key_ids, p_public_keys, p_signatures) AS k(key_id, public_key, signature);
    IF p_last_resort_key_id IS NOT NULL THEN
        -- The one last-resort key (prekeys_one_last_resort) is replaced, its claims from zero.
        INSERT INTO prekeys AS p (user_id, device_id, last_resort, key_id, public_key, signature)
        VALUES (p_user, p_device, true, p_last_resort_key_id, p_last_resort_public_key,
                p_last_resort_signature)
        ON CONFLICT (user_id, device_id) WHERE last_resort DO UPDATE SET
            key_id = EXCLUDED.key_id, public_key = EXCLUDED.public_key,
            signature = EXCLUDED.signature, claims = 0;
    END IF;
    IF v_highest_new IS NOT NULL THEN
        UPDATE devices d SET prekey_high_water = v_highest_new
        WHERE d.user_id = p_user AND d.device_id = p_device;
        v_high_water := v_highest_new;
    END IF;
    RETURN QUERY
    SELECT 'stored'::text, count(*), min(p.key_id), v_high_water
    FROM prekeys p WHERE p.user_id = p_user AND p.device_id = p_device AND NOT p.last_resort;
END
$$;

-- POST /keys/claim (claim_prekeys.rs): one prekey of each device asked for, in device order.
--   1. the requester's device must exist (401 before anything is counted);
--   2. the target's devices: all of them, or exactly those named (else nothing is claimed);
--   3. the requester's quota, counted by devices (p_requester_bucket, keyed by its user id); a
--      refused request gives its count back, since it claimed nothing;
--   4. per device: its handout counter (p_target_bucket, keyed 'user/device'), locked until
--      commit, so the claims of one device take turns from here: each sees the keys and the
--      count the claim before it left (every statement after the lock has a later snapshot).
--      Under the per-target limit, the lowest one-time key leaves by DELETE ... RETURNING, so
--      it is handed out at most once however many claims race; with the turns, a claim never
--      answers the last-resort key while a one-time key is left and the limit is not reached.
--      Otherwise the last-resort key, which stays (its claims + 1); neither: a row with no key.
-- Locks: the requester's counter, then each target device's counter and prekeys in device order
-- (no device row is locked, so uploads and key changes never wait on a claim's device lock).
-- outcome: one_time | last_resort | none (one row per device) | unauthorized | no_user |
--          no_device | rate_limited
CREATE FUNCTION claim_prekeys(
    p_requester uuid,
    p_requester_device integer,
    p_target uuid,
    p_device_ids integer[],
    p_requester_bucket text,
    p_requester_max integer,
    p_target_bucket text,
    p_target_max integer,
    p_window_seconds double precision
) RETURNS TABLE (
    outcome text,
    device_id integer,
    key_id bigint,
    public_key bytea,
    signature bytea,
    retry_after bigint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_all integer;
    v_devices integer[];
    v_device integer;
    v_attempts integer;
    v_retry_after bigint;
    v_handed integer;
    v_key_id bigint;
    v_public_key bytea;
    v_signature bytea;
BEGIN
    PERFORM 1 FROM devices d WHERE d.user_id = p_requester AND d.device_id = p_requester_device;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unauthorized'::text, NULL::integer, NULL::bigint, NULL::bytea,
            NULL::bytea, 0::bigint;
        RETURN;
    END IF;

    SELECT count(*), array_agg(d.device_id ORDER BY d.device_id)
               FILTER (WHERE p_device_ids IS NULL OR d.device_id = ANY (p_device_ids))
    INTO v_all, v_devices
    FROM devices d WHERE d.user_id = p_target;
    IF v_all = 0 THEN
        -- Device 1 lives as long as the account: no device, no user.
        RETURN QUERY SELECT 'no_user'::text, NULL::integer, NULL::bigint, NULL::bytea,
            NULL::bytea, 0::bigint;
        RETURN;
    END IF;
    IF p_device_ids IS NOT NULL
       AND coalesce(cardinality(v_devices), 0) <> cardinality(p_device_ids) THEN
        RETURN QUERY SELECT 'no_device'::text, NULL::integer, NULL::bigint, NULL::bytea,
            NULL::bytea, 0::bigint;
        RETURN;
    END IF;

    INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
    VALUES (p_requester_bucket, p_requester::text, now(), cardinality(v_devices))
    ON CONFLICT (bucket, key) DO UPDATE SET
        window_start = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                            THEN now() ELSE r.window_start END,
        attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                            THEN EXCLUDED.attempts ELSE r.attempts + EXCLUDED.attempts END
    RETURNING r.attempts,
              greatest(1, ceil(extract(epoch FROM r.window_start
                  + make_interval(secs => p_window_seconds) - now())))::bigint
    INTO v_attempts, v_retry_after;
    IF v_attempts > p_requester_max THEN
        UPDATE rate_limits r SET attempts = r.attempts - cardinality(v_devices)
        WHERE r.bucket = p_requester_bucket AND r.key = p_requester::text;
        RETURN QUERY SELECT 'rate_limited'::text, NULL::integer, NULL::bigint, NULL::bytea,
            NULL::bytea, v_retry_after;
        RETURN;
    END IF;

    FOREACH v_device IN ARRAY v_devices LOOP
        INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
        VALUES (p_target_bucket, p_target::text || '/' || v_device, now(), 0)
        ON CONFLICT (bucket, key) DO UPDATE SET
            window_start = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                                THEN now() ELSE r.window_start END,
            attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                                THEN 0 ELSE r.attempts END
        RETURNING r.attempts INTO v_handed;

        v_key_id := NULL;
        IF v_handed < p_target_max THEN
            DELETE FROM prekeys p
            WHERE (p.user_id, p.device_id, p.last_resort, p.key_id) = (
                SELECT q.user_id, q.device_id, q.last_resort, q.key_id
                FROM prekeys q
                WHERE q.user_id = p_target AND q.device_id = v_device AND NOT q.last_resort
                ORDER BY q.key_id
                LIMIT 1
                FOR UPDATE)
            RETURNING p.key_id, p.public_key, p.signature
            INTO v_key_id, v_public_key, v_signature;
        END IF;
        IF v_key_id IS NOT NULL THEN
            UPDATE rate_limits r SET attempts = r.attempts + 1
            WHERE r.bucket = p_target_bucket AND r.key = p_target::text || '/' || v_device;
            RETURN QUERY SELECT 'one_time'::text, v_device, v_key_id, v_public_key, v_signature,
                0::bigint;
            CONTINUE;
        END IF;

        UPDATE prekeys p SET claims = least(p.claims, 2147483646) + 1
        WHERE p.user_id = p_target AND p.device_id = v_device AND p.last_resort
        RETURNING p.key_id, p.public_key, p.signature
        INTO v_key_id, v_public_key, v_signature;
        IF FOUND THEN
            RETURN QUERY SELECT 'last_resort'::text, v_device, v_key_id, v_public_key,
                v_signature, 0::bigint;
        ELSE
            RETURN QUERY SELECT 'none'::text, v_device, NULL::bigint, NULL::bytea, NULL::bytea,
                0::bigint;
        END IF;
    END LOOP;
END
$$;

-- Every message is for one device; the sender's device is recorded for the recipient (it names
-- the key that sealed the message). Constant defaults: no rewrite of the table. No foreign key
-- to devices: removing a device erases its undelivered mail explicitly (on the pending index),
-- and the account's cascade still erases everything.
-- PUT /update-key: the token's device gets a new key. With a binding signature (p_binding) made
-- under signing key p_signing_key, which must still be the device's, the signing key and prekeys
-- stay; without one they go. The device row is locked first and the prekeys deleted in a
-- statement of their own, so an upload that committed while this waited for the lock is deleted
-- too (one statement's snapshot would predate it). Device 1's key is the account's as well.
-- outcome: updated | no_device | signing_key_changed.
CREATE FUNCTION rekey_device(
    p_user uuid,
    p_device integer,
    p_public_key text,
    p_binding bytea,
    p_signing_key text
) RETURNS TABLE (
    outcome text,
    id uuid,
    name text,
    public_key text,
    created_at timestamptz,
    key_updated_at timestamptz
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_signing_key text;
BEGIN
    SELECT d.signing_key INTO v_signing_key FROM devices d
    WHERE d.user_id = p_user AND d.device_id = p_device FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_device', NULL::uuid, NULL::text, NULL::text, NULL::timestamptz,
            NULL::timestamptz;
        RETURN;
    END IF;
    IF p_binding IS NOT NULL AND v_signing_key IS DISTINCT FROM p_signing_key THEN
        RETURN QUERY SELECT 'signing_key_changed', NULL::uuid, NULL::text, NULL::text,
            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE devices d SET public_key = p_public_key, key_updated_at = now(),
        signing_key       = CASE WHEN p_binding IS NULL THEN NULL ELSE d.signing_key END,
        binding_sig       = p_binding,
        signing_key_reset = CASE WHEN p_binding IS NULL THEN false ELSE d.signing_key_reset END,
        prekey_high_water = CASE WHEN p_binding IS NULL THEN NULL ELSE d.prekey_high_water END
    WHERE d.user_id = p_user AND d.device_id = p_device;
    IF p_binding IS NULL THEN
        DELETE FROM prekeys p WHERE p.user_id = p_user AND p.device_id = p_device;
    END IF;
    IF p_device = 1 THEN
        UPDATE users u SET public_key = p_public_key, key_updated_at = now() WHERE u.id = p_user;
    END IF;
    RETURN QUERY
    SELECT 'updated', u.id, u.name, d.public_key, u.created_at, d.key_updated_at
    FROM devices d JOIN users u ON u.id = d.user_id
    WHERE d.user_id = p_user AND d.device_id = p_device;
END
$$;

-- Checks NOT VALID, as for users above: validating 1,000,000 rows here held ACCESS EXCLUSIVE
-- for 271 ms; migrations/20261204000006 validates them without blocking.
ALTER TABLE messages
    ADD COLUMN recipient_device_id integer NOT NULL DEFAULT 1,
    ADD COLUMN sender_device_id    integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT messages_recipient_device_id_check CHECK (recipient_device_id >= 1) NOT VALID,
    ADD CONSTRAINT messages_sender_device_id_check CHECK (sender_device_id >= 1) NOT VALID;
