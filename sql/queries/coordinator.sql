-- Named statements of the coordinator's sweeps, staleness detection, retention, worker registry
-- and scaling hints (schema tasker). Values are always bound; `{queue}` is a PGMQ table composed
-- with psycopg.sql.Identifier.

-- Every action, in the transaction that takes it.
-- name: record_action
INSERT INTO tasker.coordinator_actions (action, task_uuid, step_uuid, detail, coordinator)
VALUES (%(action)s, %(task)s, %(step)s, %(detail)s::jsonb, %(coordinator)s)

-- Steps of active tasks that may have lost their message: enqueued (or waiting for
-- orchestration) for longer than the grace, or running on a claim whose lease ran out longer
-- than the grace ago. The active-task index bounds the scan to work in progress.
-- name: recovery_candidates
SELECT ws.workflow_step_uuid AS step_uuid, ws.task_uuid, ws.name, ws.state, ws.attempts,
       ns.name AS namespace, nt.name AS workflow, nt.version
FROM tasker.tasks t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
JOIN tasker.workflow_steps ws ON ws.task_uuid = t.task_uuid
CROSS JOIN LATERAL (
    SELECT st.created_at FROM tasker.workflow_step_transitions st
    WHERE st.workflow_step_uuid = ws.workflow_step_uuid ORDER BY st.sort_key DESC LIMIT 1
) tr
WHERE t.state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
  AND (
    (ws.state IN ('enqueued', 'enqueued_for_orchestration',
                  'enqueued_as_error_for_orchestration')
     AND tr.created_at < clock_timestamp() - %(grace_s)s * interval '1 second')
    OR (ws.state = 'in_progress'
        AND coalesce(ws.claimed_until, ws.last_attempted_at)
            < clock_timestamp() - %(grace_s)s * interval '1 second'))
ORDER BY tr.created_at
LIMIT %(limit)s

-- The candidate steps whose message is in the queue (visible, delayed or leased).
-- name: live_step_messages
SELECT message->'args'->>1 AS step_uuid FROM {queue}
WHERE message->'args'->>1 = ANY(%(steps)s::text[])

-- The messages of a step that failed as handler_not_found: no worker would ever take them, and
-- they would go on returning to their queue.
-- name: delete_step_messages
DELETE FROM {queue} WHERE message->'args'->>1 = %(step)s

-- Re-read a candidate under its row lock: a second coordinator waits here, then sees the first
-- one's recovery.
-- name: lock_step_for_recovery
SELECT state, attempts, claimed_until < clock_timestamp() AS lease_over
FROM tasker.workflow_steps WHERE workflow_step_uuid = %(step)s
FOR UPDATE

-- A claim whose worker vanished with its message: the attempt failed (retryable).
-- name: fail_lost_attempt
UPDATE tasker.workflow_steps
SET state = 'enqueued_as_error_for_orchestration', results = %(results)s::jsonb,
    finished_at = clock_timestamp()
WHERE workflow_step_uuid = %(step)s AND state = 'in_progress' AND attempts = %(attempt)s
RETURNING task_uuid

-- Active tasks with nothing running or scheduled for longer than the grace (a lost finalization
-- or retry message): their next move is computed again.
-- A task waiting in blocked_by_failures is settled (it waits for a person, or for its staleness
-- limit), not stuck.
-- name: stuck_tasks
SELECT t.task_uuid, t.state
FROM tasker.tasks t
CROSS JOIN LATERAL (
    SELECT tt.created_at FROM tasker.task_transitions tt
    WHERE tt.task_uuid = t.task_uuid ORDER BY tt.sort_key DESC LIMIT 1
) tr
WHERE t.state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually',
                      'blocked_by_failures')
  AND tr.created_at < clock_timestamp() - %(grace_s)s * interval '1 second'
  AND NOT EXISTS (
    SELECT 1 FROM tasker.workflow_steps ws
    WHERE ws.task_uuid = t.task_uuid
      AND (ws.state IN ('enqueued', 'in_progress', 'enqueued_for_orchestration',
                        'enqueued_as_error_for_orchestration')
           OR (ws.state = 'waiting_for_retry'
               AND ws.next_retry_at > clock_timestamp() - %(grace_s)s * interval '1 second')
           OR greatest(ws.finished_at, ws.processed_at, ws.last_attempted_at)
              > clock_timestamp() - %(grace_s)s * interval '1 second'))
ORDER BY tr.created_at
LIMIT %(limit)s

-- Tasks past their staleness threshold: time since their last activity (a task transition, a
-- step starting or finishing, or a step running on a live lease) in their state, or their age, over the limit of their template's
-- lifecycle, else the settings' defaults (minutes).
-- name: stale_tasks
WITH active AS (
    SELECT t.task_uuid, t.state, t.requested_at, nt.configuration->'lifecycle' AS lifecycle,
           -- a step running on a live lease (renewed while its handler runs) is activity now
           greatest(tr.created_at, (SELECT max(greatest(
                                        ws.last_attempted_at, ws.finished_at, ws.processed_at,
                                        CASE WHEN ws.state = 'in_progress'
                                              AND ws.claimed_until > clock_timestamp()
                                             THEN clock_timestamp() END))
                                    FROM tasker.workflow_steps ws
                                    WHERE ws.task_uuid = t.task_uuid)) AS last_activity
    FROM tasker.tasks t
    JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
    CROSS JOIN LATERAL (
        SELECT tt.created_at FROM tasker.task_transitions tt
        WHERE tt.task_uuid = t.task_uuid ORDER BY tt.sort_key DESC LIMIT 1
    ) tr
    WHERE t.state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
      AND NOT EXISTS (SELECT 1 FROM tasker.tasks_dlq d
                      WHERE d.task_uuid = t.task_uuid AND d.resolution_status = 'pending')
), limits AS (
    SELECT a.*,
           CASE a.state
               WHEN 'steps_in_process' THEN coalesce(
                   (a.lifecycle->>'max_steps_in_process_minutes')::int, %(steps_in_process)s)
               WHEN 'waiting_for_retry' THEN coalesce(
                   (a.lifecycle->>'max_waiting_for_retry_minutes')::int, %(waiting_for_retry)s)
               WHEN 'waiting_for_dependencies' THEN coalesce(
                   (a.lifecycle->>'max_waiting_for_dependencies_minutes')::int,
                   %(waiting_for_dependencies)s)
               WHEN 'blocked_by_failures' THEN coalesce(
                   (a.lifecycle->>'max_blocked_by_failures_minutes')::int,
                   %(blocked_by_failures)s)
           END AS state_limit,
           coalesce((a.lifecycle->>'max_duration_minutes')::int, %(lifetime)s) AS lifetime_limit,
           extract(epoch FROM clock_timestamp() - a.last_activity)::float8 / 60 AS idle_minutes,
           extract(epoch FROM clock_timestamp() - a.requested_at)::float8 / 60 AS age_minutes
    FROM active a
)
SELECT task_uuid, state, idle_minutes, age_minutes, state_limit, lifetime_limit,
       CASE WHEN age_minutes >= lifetime_limit THEN 'max_lifetime'
            ELSE 'time_in_state' END AS why
FROM limits
WHERE idle_minutes >= state_limit OR age_minutes >= lifetime_limit
ORDER BY last_activity
LIMIT %(limit)s

-- name: dlq_snapshot
SELECT jsonb_build_object(
    'task_uuid', t.task_uuid, 'namespace', ns.name, 'task_name', nt.name,
    'version', nt.version, 'current_state', t.state,
    'snapshot_timestamp', clock_timestamp(),
    'task_details', jsonb_build_object(
        'correlation_id', t.correlation_id, 'priority', t.priority,
        'requested_at', t.requested_at, 'initiator', t.initiator, 'context', t.context),
    'steps', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                  'name', ws.name, 'state', ws.state, 'attempts', ws.attempts,
                  'max_attempts', ws.max_attempts, 'error', ws.results->'error')
                  ORDER BY ws.name), '[]'::jsonb)
              FROM tasker.workflow_steps ws WHERE ws.task_uuid = t.task_uuid)) AS snapshot
FROM tasker.tasks t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE t.task_uuid = %(task)s

-- name: insert_dlq_entry
INSERT INTO tasker.tasks_dlq (task_uuid, original_state, dlq_reason, task_snapshot, metadata)
VALUES (%(task)s, %(state)s, %(reason)s, %(snapshot)s::jsonb, %(metadata)s::jsonb)
ON CONFLICT (task_uuid) WHERE resolution_status = 'pending' DO NOTHING
RETURNING dlq_entry_uuid

-- name: list_dlq_entries
SELECT d.dlq_entry_uuid, d.task_uuid, d.original_state, d.dlq_reason, d.dlq_timestamp,
       d.resolution_status, d.resolution_timestamp, d.resolution_notes, d.resolved_by,
       d.task_snapshot->>'namespace' AS namespace, d.task_snapshot->>'task_name' AS task_name
FROM tasker.tasks_dlq d
WHERE (%(status)s::text IS NULL OR d.resolution_status = %(status)s::text)
  AND (%(task)s::uuid IS NULL OR d.task_uuid = %(task)s::uuid)
  AND (%(namespaces)s::text[] IS NULL
       OR d.task_snapshot->>'namespace' = ANY (%(namespaces)s::text[]))
ORDER BY d.dlq_timestamp DESC
LIMIT %(limit)s

-- Entries per reason and resolution status (of the namespaces given; NULL: all).
-- name: dlq_stats
SELECT d.dlq_reason, d.resolution_status, count(*) AS entries,
       min(d.dlq_timestamp) AS oldest, max(d.dlq_timestamp) AS newest
FROM tasker.tasks_dlq d
WHERE %(namespaces)s::text[] IS NULL
   OR d.task_snapshot->>'namespace' = ANY (%(namespaces)s::text[])
GROUP BY d.dlq_reason, d.resolution_status
ORDER BY d.dlq_reason, d.resolution_status

-- name: get_dlq_entry
SELECT d.dlq_entry_uuid, d.task_uuid, d.original_state, d.dlq_reason, d.dlq_timestamp,
       d.resolution_status, d.resolution_timestamp, d.resolution_notes, d.resolved_by,
       d.task_snapshot->>'namespace' AS namespace, d.task_snapshot->>'task_name' AS task_name,
       d.task_snapshot, d.metadata
FROM tasker.tasks_dlq d WHERE d.dlq_entry_uuid = %(entry)s

-- name: resolve_dlq_entry
UPDATE tasker.tasks_dlq
SET resolution_status = %(status)s, resolution_timestamp = clock_timestamp(),
    resolution_notes = %(notes)s, resolved_by = %(by)s
WHERE dlq_entry_uuid = %(entry)s AND resolution_status = 'pending'
RETURNING dlq_entry_uuid

-- Retention: one batch of finished tasks, oldest first; steps, edges, transitions, claims and
-- resolved DLQ entries go with them (ON DELETE CASCADE). A task with a pending DLQ entry waits
-- for an operator, however old. SKIP LOCKED: a task an operator is looking at is taken next time.
-- name: delete_finished_tasks
WITH doomed AS (
    SELECT task_uuid FROM tasker.tasks
    WHERE completed_at IS NOT NULL AND completed_at < clock_timestamp() - %(days)s * interval '1 day'
      AND state IN ('complete', 'error', 'cancelled', 'resolved_manually')
      AND NOT EXISTS (SELECT 1 FROM tasker.tasks_dlq d
                      WHERE d.task_uuid = tasks.task_uuid AND d.resolution_status = 'pending')
    ORDER BY completed_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), attempts AS (
    DELETE FROM tasker.finalization_attempts a USING doomed
    WHERE a.task_uuid = doomed.task_uuid
)
DELETE FROM tasker.tasks t USING doomed WHERE t.task_uuid = doomed.task_uuid
RETURNING t.task_uuid

-- name: clear_expired_claims
DELETE FROM tasker.finalization_claims WHERE expires_at < clock_timestamp()
RETURNING task_uuid

-- name: trim_actions
DELETE FROM tasker.coordinator_actions
WHERE action_uuid IN (
    SELECT action_uuid FROM tasker.coordinator_actions
    WHERE taken_at < clock_timestamp() - %(days)s * interval '1 day'
    ORDER BY taken_at LIMIT %(batch)s)

-- name: forget_dead_workers
DELETE FROM tasker.workers
WHERE last_seen < clock_timestamp() - %(seconds)s * interval '1 second'
RETURNING worker_uuid

-- Worker registry ----------------------------------------------------------------------------

-- name: register_worker
INSERT INTO tasker.workers (worker_uuid, hostname, pid, queues, actors, threads, tasker_version)
VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s, %(actors)s, %(threads)s, %(version)s)
ON CONFLICT (worker_uuid) DO UPDATE
    SET last_seen = clock_timestamp(), queues = excluded.queues, actors = excluded.actors

-- name: heartbeat_worker
UPDATE tasker.workers
SET last_seen = clock_timestamp(), in_flight = %(in_flight)s, processed = %(processed)s,
    failed = %(failed)s
WHERE worker_uuid = %(worker)s
RETURNING worker_uuid

-- name: deregister_worker
DELETE FROM tasker.workers WHERE worker_uuid = %(worker)s

-- name: list_workers
SELECT worker_uuid, hostname, pid, queues, threads, tasker_version, started_at, last_seen,
       in_flight, processed, failed,
       last_seen > clock_timestamp() - %(live_s)s * interval '1 second' AS live
FROM tasker.workers
ORDER BY hostname, pid

-- name: live_actor
SELECT EXISTS (
    SELECT 1 FROM tasker.workers
    WHERE %(actor)s = ANY(actors)
      AND last_seen > clock_timestamp() - %(live_s)s * interval '1 second')

-- Scaling hints --------------------------------------------------------------------------------

-- One statement per cycle: the queues' depth and counters (tasker.queue_metrics_v1), the live
-- workers consuming each (registry), the previous hints (rates are differences), the rule
-- (tasker.desired_replicas_v1), upserted.
-- name: update_scaling_hints
WITH queues AS (
    SELECT * FROM unnest(%(dramatiq)s::text[], %(pgmq)s::text[]) AS q(queue, pgmq_name)
), per_queue AS (
    SELECT q.queue, m.* FROM queues q
    JOIN tasker.queue_metrics_v1(%(pgmq)s::text[]) m ON m.pgmq_name = q.pgmq_name
), metrics AS (  -- each queue, and the pool of queues one Deployment consumes together
    SELECT * FROM per_queue
    UNION ALL
    SELECT %(pool)s, %(pool)s, sum(depth)::bigint, max(oldest_age_s), sum(in_flight)::bigint,
           sum(last_msg_id)::bigint, sum(dead)::bigint
    FROM per_queue WHERE queue = ANY(%(pool_queues)s::text[])
    HAVING count(*) > 0
), live_workers AS (
    SELECT * FROM tasker.workers w
    WHERE w.last_seen > clock_timestamp() - %(live_s)s * interval '1 second'
), live AS (
    SELECT queue, count(DISTINCT w.hostname)::integer AS replicas,
           sum(w.processed)::bigint AS processed, sum(w.failed)::bigint AS failed
    FROM live_workers w, unnest(w.queues) AS queue
    GROUP BY queue
    UNION ALL
    SELECT %(pool)s, count(DISTINCT w.hostname)::integer, sum(w.processed)::bigint,
           sum(w.failed)::bigint
    FROM live_workers w WHERE w.queues && %(pool_queues)s::text[]
), inputs AS (
    SELECT m.queue, m.depth, m.oldest_age_s, m.in_flight, m.last_msg_id,
           coalesce(l.replicas, 0) AS live_replicas,
           coalesce(l.processed, 0) AS processed, coalesce(l.failed, 0) AS failed,
           h.desired_replicas AS current, h.changed_at,
           CASE WHEN h.queue IS NULL OR h.updated_at >= clock_timestamp() THEN 0
                ELSE greatest((m.last_msg_id - h.last_msg_id) - (m.depth - h.depth), 0)
                     / extract(epoch FROM clock_timestamp() - h.updated_at)
           END AS completions_per_s,
           CASE WHEN h.queue IS NULL OR coalesce(l.processed, 0) <= h.processed THEN 0
                ELSE least(greatest(coalesce(l.failed, 0) - h.failed, 0)::double precision
                           / (coalesce(l.processed, 0) - h.processed), 1)
           END AS error_rate
    FROM metrics m
    LEFT JOIN live l ON l.queue = m.queue
    LEFT JOIN tasker.scaling_hints h ON h.queue = m.queue
), decided AS (
    SELECT i.*, r.desired, r.changed
    FROM inputs i,
    LATERAL tasker.desired_replicas_v1(
        i.current, i.in_flight, i.depth, i.error_rate, %(capacity)s, %(target)s,
        %(backlog)s, %(min)s, %(max)s, %(error_threshold)s,
        coalesce(extract(epoch FROM clock_timestamp() - i.changed_at), 1e9), %(cooldown_s)s) r
)
INSERT INTO tasker.scaling_hints AS h (
    queue, depth, oldest_age_s, in_flight, completions_per_s, live_replicas, utilization,
    error_rate, desired_replicas, updated_at, changed_at, last_msg_id, processed, failed)
SELECT d.queue, d.depth, d.oldest_age_s, d.in_flight, d.completions_per_s, d.live_replicas,
       CASE WHEN d.live_replicas > 0
            THEN d.in_flight::double precision / (d.live_replicas * %(capacity)s) END,
       d.error_rate, d.desired, clock_timestamp(),
       CASE WHEN d.changed THEN clock_timestamp() ELSE coalesce(d.changed_at, clock_timestamp()) END,
       d.last_msg_id, d.processed, d.failed
FROM decided d
ON CONFLICT (queue) DO UPDATE SET
    depth = excluded.depth, oldest_age_s = excluded.oldest_age_s, in_flight = excluded.in_flight,
    completions_per_s = excluded.completions_per_s, live_replicas = excluded.live_replicas,
    utilization = excluded.utilization, error_rate = excluded.error_rate,
    desired_replicas = excluded.desired_replicas, updated_at = excluded.updated_at,
    changed_at = excluded.changed_at, last_msg_id = excluded.last_msg_id,
    processed = excluded.processed, failed = excluded.failed
RETURNING h.queue, h.depth, h.oldest_age_s, h.in_flight, h.completions_per_s, h.live_replicas,
          h.utilization, h.error_rate, h.desired_replicas, h.updated_at, h.changed_at

-- name: scaling_hints
SELECT queue, depth, oldest_age_s, in_flight, completions_per_s, live_replicas, utilization,
       error_rate, desired_replicas, updated_at, changed_at
FROM tasker.scaling_hints ORDER BY queue

-- name: task_state
SELECT state FROM tasker.tasks WHERE task_uuid = %(task)s

-- name: known_step_queues
SELECT name FROM tasker.task_namespaces ORDER BY name

-- Steps of active tasks waiting longer than a window for a worker that has their handler.
-- name: long_waiting_steps
SELECT ws.workflow_step_uuid AS step_uuid, ws.task_uuid, ws.name, ws.state, ws.attempts,
       ns.name AS namespace, nt.name AS workflow, nt.version
FROM tasker.tasks t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
JOIN tasker.workflow_steps ws ON ws.task_uuid = t.task_uuid
WHERE t.state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
  AND ws.state = 'enqueued'
  AND ws.waiting_since < clock_timestamp() - %(after_s)s * interval '1 second'
LIMIT %(limit)s

-- name: fail_unhandled_step
UPDATE tasker.workflow_steps
SET state = 'error', results = %(results)s::jsonb, finished_at = clock_timestamp(),
    processed_at = clock_timestamp()
WHERE workflow_step_uuid = %(step)s AND state = 'enqueued'
  AND waiting_since < clock_timestamp() - %(after_s)s * interval '1 second'
RETURNING task_uuid
