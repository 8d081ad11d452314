-- Named statements of task listing (tasker/engine/listing.py). Values are always bound; the
-- {placeholders} are filled by listing.py with psycopg.sql fragments of this file.
--
-- The statements are run unprepared, so PostgreSQL plans them with their values: a filter that
-- is not given is bound as NULL and its "%(x)s IS NULL OR ..." folds away, and every value is a
-- constant the planner weighs against the column statistics.

-- The template versions a namespace / workflow / version filter names (NULL: any), within the
-- namespaces a caller may see (NULL: all).
-- name: listing_templates
SELECT nt.named_task_uuid
FROM tasker.named_tasks nt
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
WHERE (%(namespace)s::text IS NULL OR ns.name = %(namespace)s::text)
  AND (%(namespaces)s::text[] IS NULL OR ns.name = ANY (%(namespaces)s::text[]))
  AND (%(workflow)s::text IS NULL OR nt.name = %(workflow)s::text)
  AND (%(version)s::text IS NULL OR nt.version = %(version)s::text)
ORDER BY nt.named_task_uuid

-- A page of tasks, newest first: {branches} is one list_tasks_branch or several joined by
-- UNION ALL, which PostgreSQL merges in task_uuid order (Merge Append), reading each branch only
-- as far as the page needs. The templates' names are joined to the page, not to the branches.
-- name: list_tasks
SELECT t.task_uuid::text, ns.name AS namespace, nt.name AS workflow, nt.version, t.state,
       t.priority, t.initiator, t.source_system, t.reason, t.tags,
       t.correlation_id::text, t.requested_at, t.completed_at
FROM (
    SELECT * FROM ({branches}) AS branch
    ORDER BY branch.task_uuid DESC
    LIMIT %(limit)s
) AS t
JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
ORDER BY t.task_uuid DESC

-- The newest tasks of one branch: {key} is "true" or list_tasks_key_* fragments joined by AND.
-- lower/upper bound task_uuid (the cursor, and since/until as UUID v7 bounds with 1 ms of
-- slack); since/until also bound requested_at exactly.
-- name: list_tasks_branch
(SELECT t.task_uuid, t.named_task_uuid, t.state, t.priority, t.initiator, t.source_system,
        t.reason, t.tags, t.correlation_id, t.requested_at, t.completed_at
 FROM tasker.tasks t
 WHERE {key}
   AND (%(lower)s::uuid IS NULL OR t.task_uuid >= %(lower)s::uuid)
   AND (%(upper)s::uuid IS NULL OR t.task_uuid < %(upper)s::uuid)
   AND (%(since)s::timestamptz IS NULL OR t.requested_at >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL OR t.requested_at < %(until)s::timestamptz)
   AND (%(initiator)s::text IS NULL OR t.initiator = %(initiator)s::text)
   AND (%(source_system)s::text IS NULL OR t.source_system = %(source_system)s::text)
   AND (%(tags)s::jsonb IS NULL OR t.tags @> %(tags)s::jsonb)
 ORDER BY t.task_uuid DESC
 LIMIT %(limit)s)

-- Keys of a branch: one template version, several (past listing.MAX_BRANCHES branches), a state.
-- name: list_tasks_key_template
t.named_task_uuid = {value}::uuid

-- name: list_tasks_key_templates
t.named_task_uuid = ANY ({value}::uuid[])

-- name: list_tasks_key_state
t.state = {value}::text
