-- set_signing_key() takes the account's row before the device's, the lock order of every other
-- function (a users row before any device rows). PUT /keys/signing-key's reset by password now
-- writes the login counters' give-back in the same statement (functions::credentials,
-- forgiven_cte!), after the function: without the account's row first, it held the device row
-- while it waited for the login counters, and DELETE /me holds those (its own give-back) while
-- its cascade waits for the device row, a deadlock. With it, the two meet at the account's row
-- and one waits for the other. The body is otherwise the one of 20261204000001.
CREATE OR REPLACE FUNCTION set_signing_key(
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
    -- The account's row first, as everywhere (KEY SHARE: sends and links, which take it FOR NO
    -- KEY UPDATE, go on; the account's deletion waits, or is waited for).
    PERFORM 1 FROM users u WHERE u.id = p_user FOR KEY SHARE;
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
