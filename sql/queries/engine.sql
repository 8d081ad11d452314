-- Named statements of the workflow engine (schema tasker). Values are always bound.

-- name: upsert_namespace
INSERT INTO tasker.task_namespaces (name) VALUES (%(namespace)s)
ON CONFLICT (name) DO UPDATE SET name = excluded.name
RETURNING task_namespace_uuid

-- name: insert_named_task
INSERT INTO tasker.named_tasks
    (task_namespace_uuid, name, version, configuration, identity_strategy)
VALUES (%(namespace_uuid)s, %(name)s, %(version)s, %(configuration)s::jsonb, %(identity)s)
ON CONFLICT (task_namespace_uuid, name, version) DO NOTHING
RETURNING named_task_uuid

-- name: lock_named_task
SELECT named_task_uuid, configuration
FROM tasker.named_tasks
WHERE task_namespace_uuid = %(namespace_uuid)s AND name = %(name)s AND version = %(version)s
FOR UPDATE

-- name: replace_named_task
UPDATE tasker.named_tasks
SET configuration = %(configuration)s::jsonb, identity_strategy = %(identity)s, updated_at = now()
WHERE named_task_uuid = %(named_task)s

-- Every registered version of a template (the latest is chosen by semver precedence in Python).
-- name: template_versions
SELECT nt.named_task_uuid, ns.name AS namespace, nt.name, nt.version, nt.configuration,
       nt.identity_strategy
FROM tasker.named_tasks nt
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE ns.name = %(namespace)s AND nt.name = %(name)s
  AND (%(version)s::text IS NULL OR nt.version = %(version)s::text)

-- name: create_task
SELECT task_uuid, version, created, conflict, enqueued, enqueued_names
FROM tasker.create_task_v2(
    %(named_task_uuid)s, %(context)s::jsonb, %(identity_hash)s, %(priority)s,
    %(correlation_id)s, %(parent_correlation_id)s, %(initiator)s, %(source_system)s,
    %(reason)s, %(tags)s::jsonb, %(steps)s::text[], %(retryable)s::boolean[],
    %(max_attempts)s::int[], %(inputs)s::jsonb[], %(edge_parents)s::text[],
    %(edge_children)s::text[])

-- name: record_task_transition
SELECT tasker.record_task_transition_v1(%(task)s, %(from)s, %(to)s, %(metadata)s::jsonb)

-- name: record_step_transitions
SELECT tasker.record_step_transitions_v1(%(steps)s::uuid[], %(from)s::text[], %(to)s,
                                         %(metadata)s::jsonb)

-- name: lock_task
SELECT t.task_uuid, t.state, ns.name AS namespace, nt.name AS workflow, nt.version,
       nt.named_task_uuid
FROM tasker.tasks t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE t.task_uuid = %(task)s
FOR UPDATE OF t

-- name: template_configuration
SELECT configuration FROM tasker.named_tasks WHERE named_task_uuid = %(named_task)s

-- name: set_task_state
UPDATE tasker.tasks
SET state = %(to)s,
    complete = (%(to)s = 'complete'),
    completed_at = CASE WHEN %(to)s IN ('complete', 'error', 'cancelled', 'resolved_manually')
                        THEN clock_timestamp() END
WHERE task_uuid = %(task)s

-- name: ready_steps
SELECT workflow_step_uuid, name FROM tasker.step_readiness_v1(%(task)s)
WHERE ready_for_execution

-- name: enqueue_steps
UPDATE tasker.workflow_steps AS s
SET state = 'enqueued', next_retry_at = NULL
FROM (
    SELECT workflow_step_uuid, state FROM tasker.workflow_steps
    WHERE workflow_step_uuid = ANY (%(steps)s::uuid[])
      AND state IN ('pending', 'waiting_for_retry')
    FOR UPDATE
) AS old
WHERE s.workflow_step_uuid = old.workflow_step_uuid
RETURNING s.workflow_step_uuid, s.name, old.state AS from_state

-- name: execution_context
SELECT execution_status, next_retry_at, total, completed, failed
FROM tasker.task_execution_context_v2(%(task)s)

-- name: claim_step
SELECT outcome, state, attempt, max_attempts, name, inputs, task_context, correlation_id,
       parent_results, extract(epoch FROM claimed_until - clock_timestamp())::float8 AS lease_left_s
FROM tasker.claim_step_v2(%(step)s, %(token)s, %(lease_ms)s)

-- The heartbeat of running steps: fenced by the attempt, so a claim that was lost stays lost.
-- name: extend_step_claims
UPDATE tasker.workflow_steps AS ws
SET claimed_until = clock_timestamp() + %(lease_ms)s::bigint * interval '1 millisecond'
FROM unnest(%(steps)s::uuid[], %(attempts)s::int[]) AS held(step, attempt)
WHERE ws.workflow_step_uuid = held.step AND ws.state = 'in_progress'
  AND ws.attempts = held.attempt

-- A forced exit: the steps this process runs may be re-claimed at once, and get their attempt
-- back (the worker gave them up; they did not fail).
-- name: release_step_claims
UPDATE tasker.workflow_steps AS ws
SET claimed_until = clock_timestamp(), attempts = ws.attempts - 1
FROM unnest(%(steps)s::uuid[], %(attempts)s::int[]) AS held(step, attempt)
WHERE ws.workflow_step_uuid = held.step AND ws.state = 'in_progress'
  AND ws.attempts = held.attempt

-- name: complete_step_fast
SELECT outcome, task_uuid, namespace, workflow, version, enqueued, enqueued_names, follow_up
FROM tasker.complete_step_v3(%(step)s, %(attempt)s, %(results)s::jsonb)

-- After a completion's commit, when one of its children still waited for a sibling that ran:
-- enqueue the children that are ready now (decision 0013). Read-only unless it enqueues.
-- name: recheck_children
SELECT r.enqueued, r.enqueued_names, r.follow_up
FROM tasker.tasks t, tasker.enqueue_ready_children_v1(t.task_uuid, %(step)s, true) r
WHERE t.task_uuid = %(task)s AND t.state = 'steps_in_process'

-- Fenced by state and attempt: a worker that lost the step to a re-claim records nothing.
-- name: finish_step
UPDATE tasker.workflow_steps
SET state = %(to)s, results = %(results)s::jsonb, finished_at = clock_timestamp()
WHERE workflow_step_uuid = %(step)s AND state = 'in_progress' AND attempts = %(attempt)s
RETURNING task_uuid

-- The last resort when an outcome cannot be recorded: the step fails for good without result
-- processing, and the task is re-evaluated by the step-enqueue stage.
-- name: fail_step_minimal
UPDATE tasker.workflow_steps
SET state = 'error', results = %(results)s::jsonb, finished_at = clock_timestamp(),
    processed_at = clock_timestamp()
WHERE workflow_step_uuid = %(step)s AND state = 'in_progress' AND attempts = %(attempt)s
RETURNING task_uuid

-- name: lock_step_result
SELECT state, attempts, max_attempts, retryable, name, results
FROM tasker.workflow_steps WHERE workflow_step_uuid = %(step)s
FOR UPDATE

-- name: complete_step
UPDATE tasker.workflow_steps
SET state = 'complete', processed_at = clock_timestamp()
WHERE workflow_step_uuid = %(step)s

-- name: error_step
UPDATE tasker.workflow_steps
SET state = 'error', processed_at = clock_timestamp()
WHERE workflow_step_uuid = %(step)s

-- name: wait_step_for_retry
UPDATE tasker.workflow_steps
SET state = 'waiting_for_retry', backoff_request_seconds = %(delay_s)s,
    next_retry_at = clock_timestamp() + %(delay_s)s * interval '1 second'
WHERE workflow_step_uuid = %(step)s
RETURNING next_retry_at

-- Whether a finalizer holds the task's claim now (an unexpired lease).
-- name: finalization_held
SELECT 1 FROM tasker.finalization_claims
WHERE task_uuid = %(task)s AND expires_at > clock_timestamp()

-- name: claim_finalization
SELECT claimed, held_by, message FROM tasker.claim_finalization_v1(%(task)s, %(holder)s, %(lease_s)s)

-- name: release_finalization
SELECT tasker.release_finalization_v1(%(task)s, %(holder)s)

-- name: extend_finalization
SELECT tasker.extend_finalization_v1(%(task)s, %(holder)s, %(lease_s)s)

-- name: task_version
SELECT ns.name AS namespace, nt.name AS workflow, nt.version
FROM tasker.tasks t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE t.task_uuid = %(task)s

-- A step whose message waits for a worker that has its handler (only while nothing runs it).
-- name: mark_step_waiting
UPDATE tasker.workflow_steps
SET waiting_for = %(why)s, waiting_since = coalesce(waiting_since, clock_timestamp())
WHERE workflow_step_uuid = %(step)s AND state = 'enqueued'
  AND waiting_for IS DISTINCT FROM %(why)s

-- name: task_status
SELECT t.task_uuid, t.state, ns.name AS namespace, nt.name AS workflow, nt.version, t.context,
       t.requested_at, t.completed_at, t.correlation_id, t.priority, t.initiator,
       t.source_system, t.reason, t.tags
FROM tasker.tasks t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE t.task_uuid = %(task)s

-- The task's steps in dependency order: by depth (the longest chain of parents above a step),
-- then name; with the names of the steps each depends on.
-- name: step_statuses
WITH RECURSIVE edges AS (
    SELECT e.from_step_uuid, e.to_step_uuid
    FROM tasker.workflow_step_edges e
    JOIN tasker.workflow_steps ws ON ws.workflow_step_uuid = e.to_step_uuid
    WHERE ws.task_uuid = %(task)s
), depth AS (
    SELECT ws.workflow_step_uuid, 0 AS depth
    FROM tasker.workflow_steps ws WHERE ws.task_uuid = %(task)s
    UNION ALL
    SELECT e.to_step_uuid, d.depth + 1
    FROM depth d JOIN edges e ON e.from_step_uuid = d.workflow_step_uuid
)
SELECT ws.workflow_step_uuid, ws.name, ws.state, ws.attempts, ws.max_attempts, ws.results,
       ws.started_at, ws.finished_at, ws.next_retry_at, ws.waiting_for, ws.waiting_since,
       coalesce((SELECT array_agg(p.name::text ORDER BY p.name)
                 FROM edges e JOIN tasker.workflow_steps p
                      ON p.workflow_step_uuid = e.from_step_uuid
                 WHERE e.to_step_uuid = ws.workflow_step_uuid), '{}') AS depends_on
FROM tasker.workflow_steps ws
JOIN (SELECT workflow_step_uuid, max(depth) AS depth FROM depth GROUP BY 1) d
    USING (workflow_step_uuid)
WHERE ws.task_uuid = %(task)s
ORDER BY d.depth, ws.name

-- name: cancel_task
SELECT outcome, state, namespace, cancelled_steps, running_steps
FROM tasker.cancel_task_v1(%(task)s, %(by)s, %(reason)s)

-- name: manual_step_action
SELECT outcome, task_state, step_state, reopened
FROM tasker.manual_step_action_v1(%(task)s, %(step)s, %(action)s, %(results)s::jsonb, %(by)s,
                                  %(reason)s)

-- A step's history, newest first: every transition with its metadata (attempt, operator's
-- action, who and why).
-- name: step_audit
SELECT tr.workflow_step_transition_uuid AS transition_uuid, tr.from_state, tr.to_state,
       tr.metadata, tr.created_at
FROM tasker.workflow_step_transitions tr
WHERE tr.workflow_step_uuid = %(step)s
ORDER BY tr.sort_key DESC

-- name: task_audit
SELECT tr.task_transition_uuid AS transition_uuid, tr.from_state, tr.to_state, tr.metadata,
       tr.created_at
FROM tasker.task_transitions tr
WHERE tr.task_uuid = %(task)s
ORDER BY tr.sort_key DESC

-- Registered templates, with how many tasks each has now and in all.
-- name: list_templates
SELECT ns.name AS namespace, nt.name, nt.version, nt.identity_strategy,
       jsonb_array_length(coalesce(nt.configuration->'steps', '[]')) AS steps,
       nt.configuration->>'description' AS description, nt.created_at, nt.updated_at
FROM tasker.named_tasks nt
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE %(namespace)s::text IS NULL OR ns.name = %(namespace)s::text
ORDER BY ns.name, nt.name, nt.created_at

-- A task's steps by name (every task has at least one: none means no such task).
-- name: task_step_names
SELECT workflow_step_uuid::text, name FROM tasker.workflow_steps
WHERE task_uuid = %(task)s
ORDER BY name
