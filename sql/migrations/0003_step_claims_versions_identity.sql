-- Step claims with a lease, tasks that move on only when nothing of theirs still runs, versioned
-- templates and idempotency keys that hold across versions.
--
-- * A claim records the delivery that took it (claim_token) and lasts until claimed_until, which
--   the worker's heartbeat extends while the handler runs. Another delivery of the step's
--   message (a redelivery after a lost lease, a re-sent copy) may re-claim the step only once
--   that lease has run out, so no attempt runs twice at once and a crashed attempt is never
--   stranded; the same delivery repeating its claim after a lost connection gets the same
--   attempt back instead of using another one.
-- * The execution context gives running and scheduled work precedence over failures: a task
--   whose step failed keeps running its other branches and their retries, and is blocked only
--   when nothing of it runs or waits for a retry any more (docs/decisions/0005).
-- * Template versions are semantic-version strings of any length (they were varchar(16)).
-- * A step whose message waits for a worker that has its handler (a rolling deploy) says so in
--   waiting_for / waiting_since until it is claimed.
-- * create_task_v2 tells a repeated idempotency key with another context apart (docs/decisions/0006).

ALTER TABLE tasker.named_tasks ALTER COLUMN version TYPE text;

ALTER TABLE tasker.workflow_steps
    ADD COLUMN claimed_until timestamptz,
    ADD COLUMN claim_token text,
    ADD COLUMN waiting_for text,
    ADD COLUMN waiting_since timestamptz;

-- outcome: 'claimed' (from enqueued), 'reclaimed' (the previous claim's lease ran out),
-- 'repeated' (the same delivery asked again), 'busy' (a live claim holds the step until
-- claimed_until), 'exhausted' (the previous claim ran out on the last allowed attempt),
-- 'skipped' (nothing to run: the step is pending, done or waiting), 'missing'.
CREATE FUNCTION tasker.claim_step_v2(p_step uuid, p_token text, p_lease_ms integer)
RETURNS TABLE (
    outcome text, state text, attempt integer, max_attempts integer, name text, inputs jsonb,
    task_context jsonb, correlation_id uuid, parent_results jsonb, claimed_until timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    s record;
    v_outcome text;
    v_attempt integer;
    v_now timestamptz := clock_timestamp();
BEGIN
    SELECT ws.state, ws.attempts, ws.max_attempts, ws.name, ws.inputs, ws.claimed_until AS until,
           ws.claim_token AS token, t.context, t.correlation_id AS correlation, ws.task_uuid,
           t.state AS task_state
    INTO s
    FROM tasker.workflow_steps ws JOIN tasker.tasks t ON t.task_uuid = ws.task_uuid
    WHERE ws.workflow_step_uuid = p_step
    FOR UPDATE OF ws;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing', NULL::text, NULL::integer, NULL::integer, NULL::text,
            NULL::jsonb, NULL::jsonb, NULL::uuid, NULL::jsonb, NULL::timestamptz;
        RETURN;
    END IF;
    IF s.state = 'in_progress' AND s.token = p_token THEN
        v_outcome := 'repeated';
        v_attempt := s.attempts;
        UPDATE tasker.workflow_steps
        SET claimed_until = v_now + p_lease_ms * interval '1 millisecond'
        WHERE workflow_step_uuid = p_step;
    ELSIF s.state = 'in_progress' AND coalesce(s.until > v_now, false) THEN
        RETURN QUERY SELECT 'busy', s.state, s.attempts, s.max_attempts, s.name::text,
            NULL::jsonb, NULL::jsonb, NULL::uuid, NULL::jsonb, s.until;
        RETURN;
    ELSIF s.state = 'in_progress' AND s.attempts >= s.max_attempts THEN
        RETURN QUERY SELECT 'exhausted', s.state, s.attempts, s.max_attempts, s.name::text,
            NULL::jsonb, NULL::jsonb, NULL::uuid, NULL::jsonb, s.until;
        RETURN;
    ELSIF s.task_state IN ('complete', 'error', 'cancelled', 'resolved_manually') THEN
        -- the task was given up (staleness, an operator) or finished while this waited: no
        -- step of a final task starts
        RETURN QUERY SELECT 'task_finished', s.state, s.attempts, s.max_attempts, s.name::text,
            NULL::jsonb, NULL::jsonb, NULL::uuid, NULL::jsonb, s.until;
        RETURN;
    ELSIF s.state NOT IN ('enqueued', 'in_progress') THEN
        RETURN QUERY SELECT 'skipped', s.state, s.attempts, s.max_attempts, s.name::text,
            NULL::jsonb, NULL::jsonb, NULL::uuid, NULL::jsonb, s.until;
        RETURN;
    ELSE
        v_outcome := CASE WHEN s.state = 'in_progress' THEN 'reclaimed' ELSE 'claimed' END;
        v_attempt := s.attempts + 1;
        UPDATE tasker.workflow_steps
        SET state = 'in_progress', attempts = v_attempt, last_attempted_at = v_now,
            started_at = v_now, finished_at = NULL,
            claimed_until = v_now + p_lease_ms * interval '1 millisecond', claim_token = p_token,
            waiting_for = NULL, waiting_since = NULL
        WHERE workflow_step_uuid = p_step;
        PERFORM tasker.record_step_transitions_v1(
            ARRAY[p_step], ARRAY[s.state], 'in_progress',
            jsonb_build_object('attempt', v_attempt, 'reclaimed', s.state = 'in_progress'));
    END IF;
    RETURN QUERY
    WITH RECURSIVE ancestors AS (
        SELECT e.from_step_uuid FROM tasker.workflow_step_edges e WHERE e.to_step_uuid = p_step
        UNION
        SELECT e.from_step_uuid FROM tasker.workflow_step_edges e
        JOIN ancestors a ON e.to_step_uuid = a.from_step_uuid
    )
    SELECT v_outcome, s.state, v_attempt, s.max_attempts, s.name::text, s.inputs, s.context,
           s.correlation,
           coalesce((SELECT jsonb_object_agg(p.name, p.results->'result')
                     FROM ancestors a
                     JOIN tasker.workflow_steps p ON p.workflow_step_uuid = a.from_step_uuid
                     WHERE p.task_uuid = s.task_uuid  -- lets the planner use the task index
                       AND p.state IN ('complete', 'resolved_manually')), '{}'::jsonb),
           v_now + p_lease_ms * interval '1 millisecond';
END
$$;

-- The execution context, first matching status wins: has_ready_steps, processing (enqueued,
-- running or waiting for orchestration), waiting_for_retry, blocked_by_failures, all_complete,
-- waiting_for_dependencies. Unlike v1, a failed step blocks the task only once nothing else
-- runs, is ready or waits for a retry.
CREATE FUNCTION tasker.task_execution_context_v2(p_task uuid)
RETURNS TABLE (
    total integer, pending integer, enqueued integer, in_progress integer,
    enqueued_for_orchestration integer, enqueued_as_error integer, waiting_for_retry integer,
    completed integer, failed integer, ready integer, execution_status text,
    recommended_action text, next_retry_at timestamptz
) LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    WITH c AS (
        SELECT count(*)::integer AS total,
               count(*) FILTER (WHERE r.current_state = 'pending')::integer AS pending,
               count(*) FILTER (WHERE r.current_state = 'enqueued')::integer AS enqueued,
               count(*) FILTER (WHERE r.current_state = 'in_progress')::integer AS in_progress,
               count(*) FILTER (WHERE r.current_state = 'enqueued_for_orchestration')::integer
                   AS efo,
               count(*) FILTER (WHERE r.current_state = 'enqueued_as_error_for_orchestration')
                   ::integer AS eaefo,
               count(*) FILTER (WHERE r.current_state = 'waiting_for_retry')::integer AS wfr,
               count(*) FILTER (WHERE r.current_state IN ('complete', 'resolved_manually'))
                   ::integer AS completed,
               count(*) FILTER (WHERE r.current_state = 'error')::integer AS failed,
               count(*) FILTER (WHERE r.ready_for_execution)::integer AS ready,
               min(r.next_retry_at) FILTER (WHERE r.current_state = 'waiting_for_retry')
                   AS next_retry_at
        FROM tasker.step_readiness_v1(p_task) r
    ), s AS (
        SELECT c.*,
               CASE
                   WHEN c.ready > 0 THEN 'has_ready_steps'
                   WHEN c.in_progress + c.enqueued + c.efo + c.eaefo > 0 THEN 'processing'
                   WHEN c.wfr > 0 THEN 'waiting_for_retry'
                   WHEN c.failed > 0 THEN 'blocked_by_failures'
                   WHEN c.completed = c.total AND c.total > 0 THEN 'all_complete'
                   ELSE 'waiting_for_dependencies'
               END AS status
        FROM c
    )
    SELECT s.total, s.pending, s.enqueued, s.in_progress, s.efo, s.eaefo, s.wfr, s.completed,
           s.failed, s.ready, s.status,
           CASE s.status
               WHEN 'has_ready_steps' THEN 'execute_ready_steps'
               WHEN 'processing' THEN 'wait_for_completion'
               WHEN 'waiting_for_retry' THEN 'wait_for_retry'
               WHEN 'blocked_by_failures' THEN 'handle_failures'
               WHEN 'all_complete' THEN 'finalize_task'
               ELSE 'wait_for_dependencies'
           END,
           s.next_retry_at
    FROM s;
END
$$;

-- complete_step_v1 with the v2 execution context, and the join of newly ready steps scoped to
-- the task (v1 let the planner scan every step ever recorded).
CREATE FUNCTION tasker.complete_step_v2(p_step uuid, p_attempt integer, p_results jsonb)
RETURNS TABLE (
    outcome text, task_uuid uuid, namespace text, workflow text, version text, enqueued uuid[],
    enqueued_names text[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_state text;
    v_namespace text;
    v_workflow text;
    v_version text;
    v_status text;
    v_steps uuid[];
    v_names text[];
    v_from text[];
BEGIN
    UPDATE tasker.workflow_steps ws
    SET state = 'complete', results = p_results, finished_at = clock_timestamp(),
        processed_at = clock_timestamp()
    WHERE ws.workflow_step_uuid = p_step AND ws.state = 'in_progress' AND ws.attempts = p_attempt
    RETURNING ws.task_uuid INTO v_task;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost', NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::uuid[],
            NULL::text[];
        RETURN;
    END IF;
    PERFORM tasker.record_step_transitions_v1(
        ARRAY[p_step], ARRAY['in_progress'], 'complete',
        jsonb_build_object('attempt', p_attempt, 'via', '["enqueued_for_orchestration"]'::jsonb));
    SELECT t.state, ns.name, nt.name, nt.version INTO v_state, v_namespace, v_workflow, v_version
    FROM tasker.tasks t
    JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
    JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
    WHERE t.task_uuid = v_task
    FOR UPDATE OF t;
    IF v_state IN ('complete', 'error', 'cancelled', 'resolved_manually', 'blocked_by_failures')
    THEN
        RETURN QUERY SELECT 'late', v_task, v_namespace, v_workflow, v_version, NULL::uuid[], NULL::text[];
        RETURN;
    END IF;
    SELECT c.execution_status INTO v_status FROM tasker.task_execution_context_v2(v_task) c;
    IF v_status = 'processing' AND v_state = 'steps_in_process' THEN
        RETURN QUERY SELECT 'processing', v_task, v_namespace, v_workflow, v_version, NULL::uuid[],
            NULL::text[];
        RETURN;
    END IF;
    IF v_status = 'has_ready_steps' AND v_state = 'steps_in_process' THEN
        WITH ready AS (
            SELECT r.workflow_step_uuid FROM tasker.step_readiness_v1(v_task) r
            WHERE r.ready_for_execution
        ), old AS (
            SELECT ws.workflow_step_uuid, ws.state FROM tasker.workflow_steps ws
            JOIN ready USING (workflow_step_uuid)
            WHERE ws.task_uuid = v_task AND ws.state IN ('pending', 'waiting_for_retry')
            FOR UPDATE OF ws
        ), moved AS (
            UPDATE tasker.workflow_steps ws SET state = 'enqueued', next_retry_at = NULL
            FROM old WHERE ws.workflow_step_uuid = old.workflow_step_uuid
            RETURNING ws.workflow_step_uuid, ws.name::text AS name, old.state AS from_state
        )
        SELECT array_agg(moved.workflow_step_uuid), array_agg(moved.name),
               array_agg(moved.from_state)
        INTO v_steps, v_names, v_from FROM moved;
        IF v_steps IS NOT NULL THEN
            PERFORM tasker.record_step_transitions_v1(v_steps, v_from, 'enqueued', '{}'::jsonb);
            RETURN QUERY SELECT 'enqueued', v_task, v_namespace, v_workflow, v_version, v_steps, v_names;
            RETURN;
        END IF;
    END IF;
    IF v_status = 'all_complete' AND v_state = 'steps_in_process' THEN
        UPDATE tasker.tasks SET state = 'evaluating_results' WHERE tasks.task_uuid = v_task;
        PERFORM tasker.record_task_transition_v1(v_task, v_state, 'evaluating_results',
            '{"reason": "all steps complete"}'::jsonb);
        RETURN QUERY SELECT 'finalize', v_task, v_namespace, v_workflow, v_version, NULL::uuid[],
            NULL::text[];
        RETURN;
    END IF;
    RETURN QUERY SELECT 'evaluate', v_task, v_namespace, v_workflow, v_version, NULL::uuid[], NULL::text[];
END
$$;

-- create_task_v1, plus the version of the task's template and, for a task that exists already,
-- whether it was asked for with another context (a reused idempotency key): conflict.
CREATE FUNCTION tasker.create_task_v2(
    p_named_task uuid, p_context jsonb, p_identity text, p_priority integer, p_correlation uuid,
    p_parent_correlation uuid, p_initiator text, p_source_system text, p_reason text,
    p_tags jsonb, p_steps text[], p_retryable boolean[], p_max_attempts integer[],
    p_inputs jsonb[], p_edge_parents text[], p_edge_children text[]
) RETURNS TABLE (
    task_uuid uuid, version text, created boolean, conflict boolean, enqueued uuid[],
    enqueued_names text[]
) LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    SELECT * INTO c
    FROM tasker.create_task_v1(p_named_task, p_context, p_identity, p_priority, p_correlation,
        p_parent_correlation, p_initiator, p_source_system, p_reason, p_tags, p_steps,
        p_retryable, p_max_attempts, p_inputs, p_edge_parents, p_edge_children);
    -- a statement of its own: it sees the task the call above may have inserted
    RETURN QUERY
    SELECT c.task_uuid, nt.version, c.created,
           NOT c.created AND t.context IS DISTINCT FROM p_context, c.enqueued, c.enqueued_names
    FROM tasker.tasks t
    JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
    WHERE t.task_uuid = c.task_uuid;
END
$$;
