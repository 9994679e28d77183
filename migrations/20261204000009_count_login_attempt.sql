-- A login attempt counted, and refused when it must be, in one call: the three login counters
-- (name and address, name, address) each raised by one in a window of p_window_seconds; when
-- any is then past its limit (p_limits, in the same order), the attempt is refused and the
-- counters it did not overrun get their count back (the attempt guessed nothing), before this
-- transaction lets go of their rows. The give-back used to be a second statement: a refused
-- attempt took two round trips, and attempts racing it read the other counters one too high.
-- Answers the counters' buckets and keys (in that order: the success statement gives them back
-- by these) and, for a refused attempt, the longest wait among the counters past their limit
-- (NULL when the attempt may go on to the password). The name-and-address key is
-- 'name key@address'; names never contain '@'.
CREATE FUNCTION count_login_attempt(
    p_name_key text,
    p_address text,
    p_limits integer[],
    p_window_seconds double precision
) RETURNS TABLE (buckets text[], keys text[], retry_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_buckets text[] := ARRAY['login_name_address', 'login_name', 'login_address'];
    v_keys text[] := ARRAY[p_name_key || '@' || p_address, p_name_key, p_address];
    v_over text[] := '{}';
    v_wait bigint;
    v_count integer;
    v_until bigint;
BEGIN
    -- Always in this order, so two attempts lock the rows they share in the same order (and
    -- two attempts share the first row only when they share the other two).
    FOR i IN 1 .. 3 LOOP
        SELECT c.attempts, c.retry_after INTO v_count, v_until
        FROM count_in_window(v_buckets[i], v_keys[i], 1, p_window_seconds) AS c;
        IF v_count > p_limits[i] THEN
            v_over := v_over || v_buckets[i];
            v_wait := greatest(v_wait, v_until);
        END IF;
    END LOOP;
    IF v_wait IS NOT NULL THEN
        UPDATE rate_limits AS r SET attempts = greatest(r.attempts - 1, 0)
        FROM unnest(v_buckets, v_keys) AS k(bucket, key)
        WHERE r.bucket = k.bucket AND r.key = k.key AND k.bucket <> ALL (v_over);
    END IF;
    RETURN QUERY SELECT v_buckets, v_keys, v_wait;
END
$$;
