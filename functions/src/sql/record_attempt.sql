-- Counts one attempt in each ($1 bucket, $2 key) pair, all with the window $3 seconds.
INSERT INTO rate_limits AS r (bucket, key, window_start, attempts)
SELECT bucket, key, now(), 1 FROM UNNEST($1::text[], $2::text[]) AS t(bucket, key)
ON CONFLICT (bucket, key) DO UPDATE SET
    window_start = CASE WHEN r.window_start <= now() - make_interval(secs => $3)
                        THEN now() ELSE r.window_start END,
    attempts     = CASE WHEN r.window_start <= now() - make_interval(secs => $3)
                        THEN 1 ELSE r.attempts + 1 END
RETURNING r.bucket,
          r.attempts,
          greatest(1, ceil(extract(epoch FROM r.window_start + make_interval(secs => $3) - now())))::bigint
              AS retry_after
