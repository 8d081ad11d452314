-- Named statements of the shared step breakers (tasker/breakers/shared.py). Times travel as
-- epoch seconds of the database's clock, so hosts whose clocks disagree still agree on windows.

-- The breakers a worker knows, and the database's clock (one statement per cache refresh).
-- name: read_breakers
SELECT n.name, b.state,
       coalesce(ARRAY(SELECT extract(epoch FROM f)::float8 FROM unnest(b.failures) AS f
                      ORDER BY f), '{}') AS failures,
       extract(epoch FROM b.open_until)::float8 AS open_until,
       b.half_open_successes, b.trials, b.times_opened,
       extract(epoch FROM clock_timestamp())::float8 AS now
FROM unnest(%(names)s::text[]) AS n(name)
LEFT JOIN tasker.circuit_breakers b ON b.name = n.name

-- name: ensure_breaker
INSERT INTO tasker.circuit_breakers (name) VALUES (%(name)s) ON CONFLICT (name) DO NOTHING

-- name: lock_breaker
SELECT b.name, b.state,
       ARRAY(SELECT extract(epoch FROM f)::float8 FROM unnest(b.failures) AS f ORDER BY f)
           AS failures,
       extract(epoch FROM b.open_until)::float8 AS open_until,
       b.half_open_successes, b.trials, b.times_opened,
       extract(epoch FROM clock_timestamp())::float8 AS now
FROM tasker.circuit_breakers b
WHERE b.name = %(name)s
FOR UPDATE

-- name: write_breaker
UPDATE tasker.circuit_breakers
SET state = %(state)s,
    failures = ARRAY(SELECT to_timestamp(f) FROM unnest(%(failures)s::float8[]) AS f),
    open_until = to_timestamp(%(open_until)s::float8),
    half_open_successes = %(successes)s,
    trials = %(trials)s::jsonb,
    times_opened = %(times_opened)s,
    opened_at = CASE WHEN %(times_opened)s > times_opened THEN clock_timestamp()
                     ELSE opened_at END,
    last_failure_at = CASE WHEN %(error)s::text IS NULL THEN last_failure_at
                           ELSE clock_timestamp() END,
    last_error = coalesce(%(error)s::text, last_error),
    changed_at = CASE WHEN state <> %(state)s THEN clock_timestamp() ELSE changed_at END
WHERE name = %(name)s

-- For `tasker breakers`: every breaker with a row, as operators read it.
-- name: list_breakers
SELECT name,
       CASE WHEN state = 'open' AND open_until <= clock_timestamp() THEN 'half_open'
            ELSE state END AS state,
       cardinality(failures) AS failures,
       CASE WHEN state = 'open' AND open_until > clock_timestamp()
            THEN extract(epoch FROM open_until - clock_timestamp())::float8 END AS open_for_s,
       half_open_successes, times_opened, opened_at, last_failure_at, last_error, changed_at
FROM tasker.circuit_breakers
WHERE %(name)s::text IS NULL OR name = %(name)s::text
ORDER BY name

-- Close a breaker by hand (`tasker breakers reset NAME`); workers see it within their cache TTL.
-- name: reset_breaker
UPDATE tasker.circuit_breakers
SET state = 'closed', failures = '{}', open_until = NULL, half_open_successes = 0,
    trials = '{}', changed_at = clock_timestamp()
WHERE name = %(name)s
RETURNING name
