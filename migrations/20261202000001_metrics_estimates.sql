-- /metrics at a cost that does not grow with the data (issue 10, item 4). The scrape used to
-- count four predicates over the whole of `messages` (three sequential scans: 3 ms at a few
-- thousand rows, seconds at millions).

-- The oldest undelivered message, found at the front of an index instead of by a scan: with one
-- TTL, the earliest expiry among pending rows is the oldest pending message. A send adds one
-- small entry here; a confirmation adds none (the new row version is delivered).
CREATE INDEX messages_pending_by_expiry ON messages (expires_at) WHERE NOT is_delivered;

-- The planner's row estimate for a query (from pg_class.reltuples scaled to the table's current
-- size, and the column statistics ANALYZE keeps): planning only, no rows read (volatile only
-- because PostgreSQL allows EXPLAIN in no other kind of function). metrics_counts()
-- passes it fixed queries (anyone who can call it can run SQL of their own anyway).
CREATE FUNCTION estimated_rows(p_query text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_plan json;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || p_query INTO v_plan;
    RETURN greatest(0, round((v_plan -> 0 -> 'Plan' ->> 'Plan Rows')::float8))::bigint;
END
$$;

-- The counts of /metrics. Exact while a table holds at most p_exact_up_to rows (found by
-- reading at most that many, so small deployments and tests see exact figures); above that,
-- the planner's estimates, whose cost does not depend on the number of rows. `estimated` says
-- which. The oldest pending message is always exact (one index probe).
CREATE FUNCTION metrics_counts(p_exact_up_to integer)
RETURNS TABLE (
    users bigint,
    messages_pending bigint,
    messages_delivered_awaiting_expiry bigint,
    messages_expired_awaiting_purge bigint,
    oldest_pending_age_seconds float8,
    estimated boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    v_messages bigint;
BEGIN
    estimated := false;

    SELECT count(*) INTO users FROM (SELECT 1 FROM users LIMIT p_exact_up_to + 1) AS capped;
    IF users > p_exact_up_to THEN
        users := greatest(p_exact_up_to + 1, estimated_rows('SELECT 1 FROM users'));
        estimated := true;
    END IF;

    SELECT count(*) INTO v_messages FROM (SELECT 1 FROM messages LIMIT p_exact_up_to + 1) AS capped;
    IF v_messages <= p_exact_up_to THEN
        SELECT count(*) FILTER (WHERE NOT m.is_delivered AND m.expires_at > now()),
               count(*) FILTER (WHERE m.is_delivered),
               count(*) FILTER (WHERE m.expires_at <= now())
        INTO messages_pending, messages_delivered_awaiting_expiry, messages_expired_awaiting_purge
        FROM messages m;
    ELSE
        messages_pending := estimated_rows(
            'SELECT 1 FROM messages WHERE NOT is_delivered AND expires_at > now()');
        messages_delivered_awaiting_expiry := estimated_rows(
            'SELECT 1 FROM messages WHERE is_delivered');
        messages_expired_awaiting_purge := estimated_rows(
            'SELECT 1 FROM messages WHERE expires_at <= now()');
        estimated := true;
    END IF;

    SELECT coalesce(extract(epoch FROM now() - m."timestamp")::float8, 0)
    INTO oldest_pending_age_seconds
    FROM messages m
    WHERE NOT m.is_delivered AND m.expires_at > now()
    ORDER BY m.expires_at
    LIMIT 1;
    oldest_pending_age_seconds := coalesce(oldest_pending_age_seconds, 0);
    RETURN NEXT;
END
$$;
