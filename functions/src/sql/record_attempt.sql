-- Counts one attempt in each (bucket, key) of the CTE `attempt_keys`, all with the window $3
-- seconds. Composed into the statements that check a limit, so counting is the same round trip.
INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
SELECT bucket, key, now(), 1 FROM attempt_keys
ON CONFLICT (bucket, key) DO UPDATE SET
    window_start = CASE WHEN r.window_start <= now() - make_interval(secs => $3)
                        THEN now() ELSE r.window_start END,
    attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => $3)
                        THEN 1 ELSE r.attempts + 1 END
RETURNING r.bucket,
          r.attempts,
          greatest(1, ceil(extract(epoch FROM r.window_start + make_interval(secs => $3) - now())))::bigint
              AS retry_after
