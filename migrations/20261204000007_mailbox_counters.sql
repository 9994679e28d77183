-- A send that costs the same whatever the mailbox holds (issue 21, item 5).
--
-- send_envelopes() counted and summed the recipient device's pending mail on every send (the
-- quotas of API.md "Quotas": MAX_PENDING_PER_RECIPIENT, MAX_PENDING_BYTES_PER_RECIPIENT,
-- MAX_PENDING_FROM_ONE_SENDER, per device): O(pending). Now each mailbox keeps counters, read
-- and written only by sends, under the device row lock a send already takes:
--   - devices.pending_messages and pending_bytes: the device's mail;
--   - mailbox_senders.pending: one sender's share of it (no row: none).
-- A send adds its envelope; nothing else touches them: a confirmation, an expiry, the purge, a
-- sender's account deletion only make the mail they count smaller, so a counter is never below
-- the exact count (undelivered, unexpired mail) and may be above it. Under its limit, the send
-- is one the exact count allows too; a counter at its limit (or unknown: NULL, as every
-- counter starts) has the mail counted exactly, as before, which decides and sets the counters
-- to the exact figures (recount_mailbox). So the contract's meaning is unchanged, the common
-- path is O(1), and confirmations, the purge, device removal and account deletion keep their
-- statements and their locks (device removal and account deletion take the counters with
-- the device rows, by cascade). The cost moved to the recount, O(pending) once per
-- (limit - pending) sends at most: a mailbox far from its limit is recounted rarely; one at it
-- on every send, as before.
--
-- Safe to apply while the previous functions serve, and O(1) whatever `messages` holds: no
-- backfill (a NULL counter is counted on the mailbox's next send, under its lock), new nullable
-- columns (a catalogue change, no rewrite), checks NOT VALID (validated by the next migration
-- without blocking), and a new empty table whose foreign keys hold SHARE ROW EXCLUSIVE on
-- users and devices until this commits. The functions are replaced in place, same signatures:
-- the previous release's calls run the new bodies from the commit on.

ALTER TABLE devices
    ADD COLUMN pending_messages integer,
    ADD COLUMN pending_bytes    bigint,
    ADD CONSTRAINT devices_pending_messages_check CHECK (pending_messages >= 0) NOT VALID,
    ADD CONSTRAINT devices_pending_bytes_check CHECK (pending_bytes >= 0) NOT VALID,
    ADD CONSTRAINT devices_pending_known_check
        CHECK ((pending_messages IS NULL) = (pending_bytes IS NULL)) NOT VALID;

-- Each sender's share of a mailbox, for MAX_PENDING_FROM_ONE_SENDER. Rows go with the device
-- (removal, account deletion) and with the sender's account; a recount drops those of senders
-- with nothing pending, so a mailbox holds at most a row per sender it has pending mail from
-- plus one per send since its last recount.
CREATE TABLE mailbox_senders (
    recipient_id        uuid    NOT NULL,
    recipient_device_id integer NOT NULL,
    sender_id           uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    pending             integer NOT NULL CHECK (pending >= 0),
    PRIMARY KEY (recipient_id, recipient_device_id, sender_id),
    FOREIGN KEY (recipient_id, recipient_device_id)
        REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
-- The sender's foreign key: deleting an account must not scan the table.
CREATE INDEX mailbox_senders_sender_id ON mailbox_senders (sender_id);

-- A fixed-window counter of rate_limits (the window starts at the first count): adds p_count
-- to (p_bucket, p_key), or starts a new window with it when the last one ended; answers the
-- count and the seconds until the window ends. plpgsql, so its plan is cached per session
-- (PostgreSQL plans a SQL function's INSERT again on every call).
CREATE FUNCTION count_in_window(
    p_bucket text,
    p_key text,
    p_count integer,
    p_window_seconds double precision
) RETURNS TABLE (attempts integer, retry_after bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
    VALUES (p_bucket, p_key, now(), p_count)
    ON CONFLICT (bucket, key) DO UPDATE SET
        window_start = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                            THEN now() ELSE r.window_start END,
        attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => p_window_seconds)
                            THEN EXCLUDED.attempts ELSE r.attempts + EXCLUDED.attempts END
    RETURNING r.attempts,
              greatest(1, ceil(extract(epoch FROM r.window_start
                  + make_interval(secs => p_window_seconds) - now())))::bigint;
END
$$;

-- One mailbox counted exactly, as send_envelopes() did on every send: its undelivered,
-- unexpired mail (messages_pending_by_device, from the index alone), in a snapshot taken after
-- the caller locked the device row. Sets the counters from it: the device's to the exact
-- figures; p_sender's share to its exact figure; the shares of senders with nothing pending
-- dropped; another sender's share raised to its exact figure when below it (only when the
-- counters were unknown: NULL) and otherwise left as it is (never below the exact figure, and
-- rewriting every share on each recount would write once per sender instead of once per send).
-- Only for send_envelopes(), with the device row locked FOR NO KEY UPDATE.
CREATE FUNCTION recount_mailbox(p_recipient uuid, p_device integer, p_sender uuid)
RETURNS TABLE (pending bigint, bytes bigint, from_sender bigint, oldest timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH live AS (
        SELECT m.sender_id, m.size, m.expires_at
        FROM messages m
        WHERE m.recipient_id = p_recipient AND m.recipient_device_id = p_device
          AND NOT m.is_delivered AND m.expires_at > now()
    ), share AS (
        SELECT l.sender_id, count(*)::integer AS pending FROM live l GROUP BY l.sender_id
    ), total AS (
        SELECT count(*) AS pending, coalesce(sum(l.size), 0)::bigint AS bytes,
               count(*) FILTER (WHERE l.sender_id = p_sender) AS from_sender,
               min(l.expires_at) AS oldest
        FROM live l
    ), device_counted AS (
        UPDATE devices d SET pending_messages = t.pending, pending_bytes = t.bytes
        FROM total t WHERE d.user_id = p_recipient AND d.device_id = p_device
    ), shares_dropped AS (
        DELETE FROM mailbox_senders s
        WHERE s.recipient_id = p_recipient AND s.recipient_device_id = p_device
          AND s.sender_id NOT IN (SELECT sh.sender_id FROM share sh)
    ), shares_counted AS (
        INSERT INTO mailbox_senders AS s (recipient_id, recipient_device_id, sender_id, pending)
        SELECT p_recipient, p_device, sh.sender_id, sh.pending FROM share sh
        ON CONFLICT (recipient_id, recipient_device_id, sender_id) DO UPDATE
        SET pending = EXCLUDED.pending
        WHERE s.sender_id = p_sender OR s.pending < EXCLUDED.pending
    )
    SELECT t.pending, t.bytes, t.from_sender, t.oldest FROM total t;
END
$$;

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
--   6. each mailbox's quotas, from its counters, kept on the device row this send has locked
--      (and the sender's share in mailbox_senders, written only under that lock): O(1); the
--      mail is counted only when a counter is unknown or says full (recount_mailbox);
--   7. the ids (above each mailbox's cursor), the insert of every envelope, the counters.
-- Lock order, everywhere: a users row before device rows, device rows in device_id order.
-- outcome: stored | replayed | key_reused | rate_limited | mailbox_full | no_recipient |
--          unauthorized | devices_changed (one row per current device, with the differences).
CREATE OR REPLACE FUNCTION send_envelopes(
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
    v_recount integer[];
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

    SELECT c.attempts, c.retry_after INTO v_attempts, v_retry_after
    FROM count_in_window('send_sender', p_sender::text, 1, p_send_window_seconds) AS c;
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

    -- Each mailbox's quotas from its counters (the device rows locked above, and the sender's
    -- share), O(1) whatever the mailbox holds. A counter only ever over-counts (see
    -- recount_mailbox), so one under its limit is a send the exact count allows; a mailbox
    -- whose counters are unknown or say full is counted exactly, and its counters set.
    SELECT array_agg(e.device_id ORDER BY e.device_id) INTO v_recount
    FROM unnest(p_device_ids, p_data) AS e(device_id, data)
    JOIN devices d ON d.user_id = p_recipient AND d.device_id = e.device_id
    LEFT JOIN mailbox_senders s ON s.recipient_id = p_recipient
        AND s.recipient_device_id = e.device_id AND s.sender_id = p_sender
    WHERE d.pending_messages IS NULL
       OR d.pending_messages >= p_max_pending
       OR d.pending_bytes > p_max_pending_bytes - octet_length(e.data)
       OR coalesce(s.pending, 0) >= p_max_from_one_sender;
    IF v_recount IS NOT NULL THEN
        -- Room is made when the recipient confirms, or at the latest when the oldest message
        -- expires.
        SELECT greatest(1, least(60, ceil(extract(epoch FROM
                   coalesce(min(q.oldest), now()) - now()))))::bigint
        INTO v_full_retry
        FROM (SELECT x.device_id, x.data FROM unnest(p_device_ids, p_data) AS x(device_id, data)
              WHERE x.device_id = ANY (v_recount)) AS e
        CROSS JOIN LATERAL recount_mailbox(p_recipient, e.device_id, p_sender) AS q
        WHERE q.pending + 1 > p_max_pending
           OR q.bytes + octet_length(e.data) > p_max_pending_bytes
           OR q.from_sender + 1 > p_max_from_one_sender
        HAVING count(*) > 0;
        IF v_full_retry IS NOT NULL THEN
            RETURN QUERY SELECT 'mailbox_full', NULL::integer, NULL::uuid, NULL::integer,
                NULL::timestamptz, NULL::timestamptz, v_full_retry, NULL::text, NULL::text,
                NULL::timestamptz, NULL::integer[], NULL::integer[], NULL::integer[];
            RETURN;
        END IF;
    END IF;

    -- Each id above its mailbox's cursor; the cursor and the counters move with the insert.
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
        UPDATE devices d SET last_message_id = e.new_id,
            pending_messages = d.pending_messages + 1,
            pending_bytes = d.pending_bytes + octet_length(e.data)
        FROM envelope e WHERE d.user_id = p_recipient AND d.device_id = e.device_id
    ), share_counted AS (
        INSERT INTO mailbox_senders AS s (recipient_id, recipient_device_id, sender_id, pending)
        SELECT p_recipient, e.device_id, p_sender, 1 FROM envelope e
        ON CONFLICT (recipient_id, recipient_device_id, sender_id)
        DO UPDATE SET pending = s.pending + 1
    )
    SELECT 'stored', s.recipient_device_id, s.id, p_sender_device, s."timestamp", s.expires_at, 0::bigint,
           NULL::text, NULL::text, NULL::timestamptz,
           NULL::integer[], NULL::integer[], NULL::integer[]
    FROM stored s ORDER BY s.recipient_device_id;
END
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
CREATE OR REPLACE FUNCTION link_device(
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

    SELECT c.attempts INTO v_attempts
    FROM count_in_window('link_failure_account', p_user::text, 1, p_window_seconds) AS c;
    IF v_attempts >= p_max_failures THEN
        DELETE FROM link_codes c WHERE c.user_id = p_user;
    END IF;
    RETURN QUERY SELECT 'invalid', NULL::integer, NULL::timestamptz, 0::bigint;
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
CREATE OR REPLACE FUNCTION claim_prekeys(
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

    SELECT c.attempts, c.retry_after INTO v_attempts, v_retry_after
    FROM count_in_window(p_requester_bucket, p_requester::text, cardinality(v_devices),
                         p_window_seconds) AS c;
    IF v_attempts > p_requester_max THEN
        UPDATE rate_limits r SET attempts = r.attempts - cardinality(v_devices)
        WHERE r.bucket = p_requester_bucket AND r.key = p_requester::text;
        RETURN QUERY SELECT 'rate_limited'::text, NULL::integer, NULL::bigint, NULL::bytea,
            NULL::bytea, v_retry_after;
        RETURN;
    END IF;

    FOREACH v_device IN ARRAY v_devices LOOP
        -- Counts nothing (0): opens a new window when the last one ended.
        SELECT c.attempts INTO v_handed
        FROM count_in_window(p_target_bucket, p_target::text || '/' || v_device, 0,
                             p_window_seconds) AS c;

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
