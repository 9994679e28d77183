-- rekey_device() (PUT /update-key) takes the account's row before the device's, the lock order
-- of every other function (a users row before any device rows): it locked the device row, then,
-- for device 1, updated the account's row, while DELETE /me holds the account's row and its
-- cascade waits for the device rows, so the two could wait for each other. Now they meet at the
-- account's row. The body is otherwise the one of 20261204000001.
CREATE OR REPLACE FUNCTION rekey_device(
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
    -- The account's row first: device 1's key is the account's too, so it is updated below.
    IF p_device = 1 THEN
        PERFORM 1 FROM users u WHERE u.id = p_user FOR NO KEY UPDATE;
    ELSE
        PERFORM 1 FROM users u WHERE u.id = p_user FOR KEY SHARE;
    END IF;
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
