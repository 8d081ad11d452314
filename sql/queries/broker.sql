-- Named statements of the PGMQ broker. `{queue}` is the PGMQ table of a queue (pgmq.q_<name>),
-- `{dead}` the table of its dead-letter queue (pgmq.q_<name>__xq); both are composed with
-- psycopg.sql.Identifier, values are always bound. Times come from the database clock.
-- Messages are rows of PGMQ's own layout, so PGMQ's functions and tools keep working on them.

-- name: send
INSERT INTO {queue} (vt, message, headers)
VALUES (clock_timestamp() + %(delay_ms)s::bigint * interval '1 millisecond',
        %(message)s::jsonb, %(headers)s::jsonb)
RETURNING msg_id

-- name: send_and_notify
WITH sent AS (
    INSERT INTO {queue} (vt, message, headers)
    VALUES (clock_timestamp(), %(message)s::jsonb, %(headers)s::jsonb)
    RETURNING msg_id
)
SELECT msg_id, pg_notify(%(channel)s, '') FROM sent

-- name: send_batch
INSERT INTO {queue} (vt, message, headers)
SELECT clock_timestamp() + %(delay_ms)s::bigint * interval '1 millisecond', m, h
FROM unnest(%(messages)s::jsonb[], %(headers)s::jsonb[]) AS batch(m, h)
RETURNING msg_id

-- name: notify
SELECT pg_notify(%(channel)s, '')

-- A retry of a delivered message (Dramatiq's Retries middleware re-enqueues the message it is
-- processing): the delivery is removed and its replacement inserted in one statement, or neither
-- happens and the delivery comes back when its lease runs out. Fenced by read_ct.
-- name: replace
WITH gone AS (
    DELETE FROM {queue} WHERE msg_id = %(msg_id)s AND read_ct = %(read_ct)s RETURNING msg_id
)
INSERT INTO {queue} (vt, message, headers)
SELECT clock_timestamp() + %(delay_ms)s::bigint * interval '1 millisecond',
       %(message)s::jsonb, %(headers)s::jsonb
FROM gone
RETURNING msg_id

-- Put a delivery back for later without counting it as a handler start (see record_start): its
-- handler did not crash, it chose to wait (a step claimed by another live worker). "returned"
-- counts the deliveries given back on purpose, which poison detection does not hold against it.
-- name: defer
UPDATE {queue}
SET vt = clock_timestamp() + %(delay_ms)s::bigint * interval '1 millisecond',
    headers = coalesce(headers, jsonb_build_object())
        || jsonb_build_object('returned', coalesce((headers->>'returned')::int, 0) + 1,
                              'parked_until_ms', (extract(epoch FROM clock_timestamp()) * 1000
                                                  + %(delay_ms)s::bigint)::bigint)
        || CASE WHEN %(read_ct)s::int > 1 AND headers ? 'starts'
                THEN jsonb_build_object('starts', greatest((headers->>'starts')::int - 1, 0))
                ELSE jsonb_build_object() END
WHERE msg_id = %(msg_id)s AND read_ct = %(read_ct)s
RETURNING msg_id

-- A message for an actor this worker does not have (a rolling deploy): back to the queue for a
-- worker that has it, later.
-- name: bounce
UPDATE {queue}
SET vt = clock_timestamp() + %(delay_ms)s::bigint * interval '1 millisecond',
    headers = coalesce(headers, jsonb_build_object())
        || jsonb_build_object('bounces', coalesce((headers->>'bounces')::int, 0) + 1,
                              'returned', coalesce((headers->>'returned')::int, 0) + 1,
                              'parked_until_ms', (extract(epoch FROM clock_timestamp()) * 1000
                                                  + %(delay_ms)s::bigint)::bigint)
WHERE msg_id = %(msg_id)s AND read_ct = %(read_ct)s

-- Claim up to `limit` visible messages. `vt <= now()` with ORDER BY vt lets the vt index serve
-- the scan, so delayed and leased rows ahead of the visible ones cost nothing (pgmq.read's
-- clock_timestamp() predicate walks all of them).
-- name: claim
WITH ready AS (
    SELECT msg_id FROM {queue}
    WHERE vt <= now()
    ORDER BY vt, msg_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {queue} AS m
SET vt = clock_timestamp() + %(lease_ms)s::bigint * interval '1 millisecond',
    read_ct = m.read_ct + 1,
    last_read_at = clock_timestamp()
FROM ready
WHERE m.msg_id = ready.msg_id
RETURNING m.msg_id, m.read_ct, m.message::text, m.headers::text

-- Milliseconds until the next message becomes visible (NULL when none is waiting).
-- name: next_visible_in
SELECT (extract(epoch FROM min(vt) - clock_timestamp()) * 1000)::bigint
FROM {queue} WHERE vt > now()

-- Acks and lease operations are fenced by read_ct: a worker whose lease expired cannot delete or
-- extend the copy that was delivered again to someone else.
-- name: ack_many
DELETE FROM {queue} AS m
USING unnest(%(msg_ids)s::bigint[], %(read_cts)s::int[]) AS acked(msg_id, read_ct)
WHERE m.msg_id = acked.msg_id AND m.read_ct = acked.read_ct
RETURNING m.msg_id

-- name: dead_letter
WITH gone AS (
    DELETE FROM {queue} WHERE msg_id = %(msg_id)s AND read_ct = %(read_ct)s RETURNING msg_id
)
INSERT INTO {dead} (vt, message, headers)
SELECT clock_timestamp(), %(message)s::jsonb, %(headers)s::jsonb FROM gone
RETURNING msg_id

-- name: dead_letter_raw
WITH gone AS (
    DELETE FROM {queue} WHERE msg_id = %(msg_id)s AND read_ct = %(read_ct)s
    RETURNING message, headers
)
INSERT INTO {dead} (vt, message, headers)
SELECT clock_timestamp(), message, coalesce(headers, jsonb_build_object()) || %(extra)s::jsonb
FROM gone
RETURNING msg_id

-- A redelivered message records that its handler started, so a message whose handlers keep
-- dying is told apart from messages that were only prefetched beside it.
-- name: record_start
UPDATE {queue}
SET headers = coalesce(headers, jsonb_build_object())
    || jsonb_build_object('starts', coalesce((headers->>'starts')::int, 0) + 1)
WHERE msg_id = %(msg_id)s AND read_ct = %(read_ct)s

-- name: extend_leases
UPDATE {queue} AS m
SET vt = clock_timestamp() + %(lease_ms)s::bigint * interval '1 millisecond'
FROM unnest(%(msg_ids)s::bigint[], %(read_cts)s::int[]) AS held(msg_id, read_ct)
WHERE m.msg_id = held.msg_id AND m.read_ct = held.read_ct
RETURNING m.msg_id

-- name: release
UPDATE {queue} AS m
SET vt = clock_timestamp()
FROM unnest(%(msg_ids)s::bigint[], %(read_cts)s::int[]) AS held(msg_id, read_ct)
WHERE m.msg_id = held.msg_id AND m.read_ct = held.read_ct

-- name: count
SELECT count(*) FROM {queue}

-- name: count_dead
SELECT count(*) FROM {dead}

-- name: last_dead_letter_id
SELECT coalesce(max(msg_id), 0) FROM {dead}

-- name: flush
DELETE FROM {queue}

-- name: flush_dead
DELETE FROM {dead}

-- The dead letters counted before a confirmation, not those that arrived while it was asked.
-- name: flush_dead_through
DELETE FROM {dead} WHERE msg_id <= %(through)s

-- name: dead_letter_summary
SELECT count(*), coalesce(max(msg_id), 0) FROM {dead}

-- The dead-letter queues of one broker namespace, declared by this process or not.
-- name: dead_letter_queues
SELECT queue_name FROM pgmq.meta
WHERE starts_with(queue_name, %(prefix)s) AND right(queue_name, %(suffix_len)s) = %(suffix)s
ORDER BY queue_name

-- name: expire_dead_letters
DELETE FROM {dead}
WHERE msg_id IN (
    SELECT msg_id FROM {dead}
    WHERE enqueued_at < now() - %(ttl_s)s::bigint * interval '1 second'
    ORDER BY msg_id
    LIMIT 1000
)

-- name: list_dead_letters
SELECT msg_id, enqueued_at, message::text, headers::text
FROM {dead} ORDER BY msg_id LIMIT %(limit)s

-- name: replay_dead_letters
WITH moved AS (
    DELETE FROM {dead}
    WHERE msg_id = ANY(%(msg_ids)s::bigint[]) OR %(all)s::boolean
    RETURNING message, headers - 'error' - 'traceback' - 'dead_lettered_from' AS headers
)
INSERT INTO {queue} (vt, message, headers)
SELECT clock_timestamp(), message, headers FROM moved
RETURNING msg_id

-- name: queue_exists
SELECT 1 FROM pgmq.meta WHERE queue_name = %(name)s

-- name: create_queue
SELECT pgmq.create(%(name)s::text)

-- name: tune_queue
ALTER TABLE {queue} SET (autovacuum_vacuum_scale_factor = 0.01,
                         autovacuum_vacuum_threshold = 50,
                         autovacuum_analyze_scale_factor = 0.05)

-- name: queue_stats
SELECT count(*) FILTER (WHERE vt <= now()) AS visible,
       count(*) FILTER (WHERE vt > now() AND read_ct = 0) AS delayed,
       count(*) FILTER (WHERE vt > now() AND read_ct > 0) AS leased,
       coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE vt <= now())), 0)
           AS oldest_visible_s
FROM {queue}

-- A cancelled task's messages (args: task_uuid first, then step_uuid for a step message), except
-- those of the steps in `keep` (still running: their worker settles them).
-- name: delete_task_messages
DELETE FROM {queue}
WHERE message->'args'->>0 = %(task)s
  AND NOT coalesce(message->'args'->>1 = ANY (%(keep)s::text[]), false)

-- The database breaker's probe (tasker/breakers/database.py): does PostgreSQL answer?
-- name: probe
SELECT 1
