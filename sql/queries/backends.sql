-- Named statements of the Postgres Results and rate-limiter backends (schema tasker).
-- `{table}` in delete_expired is composed with psycopg.sql.Identifier; values are bound.

-- name: add
INSERT INTO tasker.dramatiq_rate_limits AS r (key, value, expires_at)
VALUES (%(key)s, %(value)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')
ON CONFLICT (key) DO UPDATE
SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
WHERE r.expires_at <= clock_timestamp()
RETURNING true

-- name: upsert_delta
INSERT INTO tasker.dramatiq_rate_limits AS r (key, value, expires_at)
VALUES (%(key)s, %(delta)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')
ON CONFLICT (key) DO UPDATE
SET value = CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value,
    expires_at = EXCLUDED.expires_at
WHERE CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value
      BETWEEN %(lower)s AND %(upper)s
RETURNING true

-- name: update_live_delta
UPDATE tasker.dramatiq_rate_limits
SET value = value + %(delta)s,
    expires_at = clock_timestamp() + %(ttl)s * interval '1 millisecond'
WHERE key = %(key)s AND expires_at > clock_timestamp()
  AND value + %(delta)s BETWEEN %(lower)s AND %(upper)s
RETURNING true

-- name: lock_keys
SELECT pg_advisory_xact_lock(%(lock_class)s, hashed.h)
FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(%(keys)s::text[]) AS k) AS hashed
ORDER BY hashed.h

-- name: incr_and_sum
WITH live AS (
    SELECT key, value FROM tasker.dramatiq_rate_limits
    WHERE key = ANY (%(locked)s::text[]) AND expires_at > clock_timestamp()
)
INSERT INTO tasker.dramatiq_rate_limits AS r (key, value, expires_at)
SELECT %(key)s, %(amount)s, clock_timestamp() + %(ttl)s * interval '1 millisecond'
WHERE (SELECT COALESCE(sum(value), 0) FROM live WHERE key = %(key)s) + %(amount)s
      <= %(maximum)s
  AND (SELECT COALESCE(sum(value), 0) FROM live WHERE key = ANY (%(keys)s::text[]))
      + %(amount)s <= %(maximum)s
ON CONFLICT (key) DO UPDATE
SET value = CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value,
    expires_at = EXCLUDED.expires_at
WHERE CASE WHEN r.expires_at > clock_timestamp() THEN r.value ELSE 0 END + EXCLUDED.value
      <= %(maximum)s
RETURNING true

-- name: notify
INSERT INTO tasker.dramatiq_rate_limit_events (key, expires_at)
VALUES (%(key)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')

-- name: has_event
SELECT EXISTS (
    SELECT 1 FROM tasker.dramatiq_rate_limit_events
    WHERE key = %(key)s AND expires_at > clock_timestamp()
)

-- name: store_result
INSERT INTO tasker.dramatiq_results (message_key, result, expires_at)
VALUES (%(key)s, %(result)s, clock_timestamp() + %(ttl)s * interval '1 millisecond')
ON CONFLICT (message_key) DO UPDATE
SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at

-- name: get_result
SELECT result FROM tasker.dramatiq_results
WHERE message_key = %(key)s AND expires_at > clock_timestamp()

-- Delete a batch of expired rows without waiting for rows others are deleting.
-- name: delete_expired
DELETE FROM {table}
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM {table}
    WHERE expires_at <= clock_timestamp()
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
