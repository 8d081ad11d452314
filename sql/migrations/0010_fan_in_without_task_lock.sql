-- A step's completion no longer serializes its siblings on the task row (issue 12; decision
-- 0013). complete_step_v2 took `FOR UPDATE` on the task and computed the whole task's execution
-- context on every completion, so the 1,000 siblings of a 1 -> 1,000 -> 1 fan-out waited for one
-- another's commits in turn, each reading all 1,002 steps under the lock.
--
-- complete_step_v3 splits by what the step leads to:
-- * a step with children, in a task that runs (`steps_in_process`): the task row is locked
--   `FOR KEY SHARE`, which siblings share but which waits for (and holds off) the writers of the
--   task's state (cancel, failure processing, evaluation: all `FOR UPDATE`). Only the step's own
--   children are examined: a pending child whose every parent is complete or resolved is
--   enqueued. When a child is left behind, the caller rechecks after its commit
--   (`tasker.enqueue_ready_children_v1` again, a statement of its own): of two siblings that
--   commit at the same time each may miss the other inside its transaction, but the recheck of
--   whichever committed second sees both. The enqueue is guarded by `state = 'pending'` under
--   the child's row lock, so the child is enqueued once. A recheck that finds nothing of the
--   task in flight (a failure, a retry or a pending branch holds the child) evaluates the task:
--   the general path, under the task's lock. A step in flight settles later and sees this one.
-- * a sink (no children), or a task in another state: complete_step_v2's path, under the task's
--   `FOR UPDATE` (finalization needs it; a sink is one step per branch).
-- A process that dies between the commit and its follow-up leaves a task with nothing running:
-- the coordinator's recovery sweep moves it on (tasker/engine/recovery.py).

-- What became of p_step's children: the ready ones are enqueued (state 'enqueued', with their
-- audit rows) and returned. follow_up says what the caller does next when a child was left
-- behind. Inside the completion's transaction (p_after_commit false) that is always 'recheck':
-- a sibling committing at the same time may have missed this step. After the commit (true) it
-- is 'evaluate' when nothing of the task is in flight any more (a failure, a retry or a pending
-- branch holds the child, and no running step will come back to it), else NULL: every step in
-- flight settles later and then sees this one.
CREATE FUNCTION tasker.enqueue_ready_children_v1(p_task uuid, p_step uuid, p_after_commit boolean)
RETURNS TABLE (enqueued uuid[], enqueued_names text[], follow_up text)
LANGUAGE plpgsql AS $$
DECLARE
    v_steps uuid[];
    v_names text[];
BEGIN
    WITH ready AS (
        SELECT c.workflow_step_uuid
        FROM tasker.workflow_step_edges e
        JOIN tasker.workflow_steps c ON c.workflow_step_uuid = e.to_step_uuid
        WHERE e.from_step_uuid = p_step AND c.task_uuid = p_task AND c.state = 'pending'
          AND (c.attempts = 0 OR (c.retryable AND c.attempts < c.max_attempts))
          AND (c.next_retry_at IS NULL OR c.next_retry_at <= clock_timestamp())
          AND NOT EXISTS (
              SELECT 1 FROM tasker.workflow_step_edges pe
              JOIN tasker.workflow_steps p ON p.workflow_step_uuid = pe.from_step_uuid
              WHERE pe.to_step_uuid = c.workflow_step_uuid AND p.task_uuid = p_task
                AND p.state NOT IN ('complete', 'resolved_manually'))
    ), moved AS (
        UPDATE tasker.workflow_steps ws SET state = 'enqueued', next_retry_at = NULL
        FROM ready
        WHERE ws.workflow_step_uuid = ready.workflow_step_uuid AND ws.state = 'pending'
        RETURNING ws.workflow_step_uuid, ws.name::text AS name
    )
    SELECT array_agg(moved.workflow_step_uuid ORDER BY moved.workflow_step_uuid),
           array_agg(moved.name ORDER BY moved.workflow_step_uuid)
    INTO v_steps, v_names FROM moved;
    IF v_steps IS NOT NULL THEN
        PERFORM tasker.record_step_transitions_v1(
            v_steps, array_fill('pending'::text, ARRAY[cardinality(v_steps)]), 'enqueued',
            '{}'::jsonb);
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM tasker.workflow_step_edges e
        WHERE e.from_step_uuid = p_step
          AND NOT e.to_step_uuid = ANY(coalesce(v_steps, '{}'::uuid[])))
    THEN
        RETURN QUERY SELECT v_steps, v_names, NULL::text;  -- every child is on its way
    ELSIF NOT p_after_commit THEN
        RETURN QUERY SELECT v_steps, v_names, 'recheck'::text;
    ELSIF EXISTS (
        SELECT 1 FROM tasker.workflow_steps ws
        WHERE ws.task_uuid = p_task
          AND ws.state IN ('enqueued', 'in_progress', 'enqueued_for_orchestration',
                           'enqueued_as_error_for_orchestration'))
    THEN
        RETURN QUERY SELECT v_steps, v_names, NULL::text;
    ELSE
        RETURN QUERY SELECT v_steps, v_names, 'evaluate'::text;
    END IF;
END
$$;

-- outcome as in complete_step_v2 ('lost', 'late', 'processing', 'enqueued', 'finalize',
-- 'evaluate'; the last two with the task row locked FOR UPDATE), plus follow_up: what the
-- caller does after its commit, for the 'processing' and 'enqueued' outcomes of a step with
-- children ('recheck': call tasker.enqueue_ready_children_v1 again; 'evaluate': the general
-- path under the task's lock).
CREATE FUNCTION tasker.complete_step_v3(p_step uuid, p_attempt integer, p_results jsonb)
RETURNS TABLE (
    outcome text, task_uuid uuid, namespace text, workflow text, version text, enqueued uuid[],
    enqueued_names text[], follow_up text
) LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_state text;
    v_namespace text;
    v_workflow text;
    v_version text;
    v_status text;
    c record;
BEGIN
    UPDATE tasker.workflow_steps ws
    SET state = 'complete', results = p_results, finished_at = clock_timestamp(),
        processed_at = clock_timestamp()
    WHERE ws.workflow_step_uuid = p_step AND ws.state = 'in_progress' AND ws.attempts = p_attempt
    RETURNING ws.task_uuid INTO v_task;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost', NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::uuid[],
            NULL::text[], NULL::text;
        RETURN;
    END IF;
    PERFORM tasker.record_step_transitions_v1(
        ARRAY[p_step], ARRAY['in_progress'], 'complete',
        jsonb_build_object('attempt', p_attempt, 'via', '["enqueued_for_orchestration"]'::jsonb));
    IF EXISTS (SELECT 1 FROM tasker.workflow_step_edges e WHERE e.from_step_uuid = p_step) THEN
        SELECT t.state, ns.name, nt.name, nt.version
        INTO v_state, v_namespace, v_workflow, v_version
        FROM tasker.tasks t
        JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
        JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
        WHERE t.task_uuid = v_task
        FOR KEY SHARE OF t;
        IF v_state IN ('complete', 'error', 'cancelled', 'resolved_manually',
                       'blocked_by_failures') THEN
            RETURN QUERY SELECT 'late', v_task, v_namespace, v_workflow, v_version,
                NULL::uuid[], NULL::text[], NULL::text;
            RETURN;
        END IF;
        IF v_state = 'steps_in_process' THEN
            SELECT * INTO c FROM tasker.enqueue_ready_children_v1(v_task, p_step, false);
            RETURN QUERY SELECT
                CASE WHEN c.enqueued IS NULL THEN 'processing' ELSE 'enqueued' END,
                v_task, v_namespace, v_workflow, v_version, c.enqueued, c.enqueued_names,
                c.follow_up;
            RETURN;
        END IF;
        -- any other state: evaluated after the commit, under the task's lock
        RETURN QUERY SELECT 'processing', v_task, v_namespace, v_workflow, v_version,
            NULL::uuid[], NULL::text[], 'evaluate'::text;
        RETURN;
    END IF;
    -- a sink: complete_step_v2's path (the step itself is already recorded; v2's UPDATE would
    -- find it complete, so the rest of v2 is repeated here)
    SELECT t.state, ns.name, nt.name, nt.version INTO v_state, v_namespace, v_workflow, v_version
    FROM tasker.tasks t
    JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
    JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
    WHERE t.task_uuid = v_task
    FOR UPDATE OF t;
    IF v_state IN ('complete', 'error', 'cancelled', 'resolved_manually', 'blocked_by_failures')
    THEN
        RETURN QUERY SELECT 'late', v_task, v_namespace, v_workflow, v_version, NULL::uuid[],
            NULL::text[], NULL::text;
        RETURN;
    END IF;
    IF v_state = 'steps_in_process' THEN
        SELECT ctx.execution_status INTO v_status FROM tasker.task_execution_context_v2(v_task) ctx;
    END IF;
    IF v_status = 'processing' THEN
        RETURN QUERY SELECT 'processing', v_task, v_namespace, v_workflow, v_version,
            NULL::uuid[], NULL::text[], NULL::text;
        RETURN;
    END IF;
    IF v_status = 'all_complete' THEN
        UPDATE tasker.tasks SET state = 'evaluating_results' WHERE tasks.task_uuid = v_task;
        PERFORM tasker.record_task_transition_v1(v_task, 'steps_in_process',
            'evaluating_results', '{"reason": "all steps complete"}'::jsonb);
        RETURN QUERY SELECT 'finalize', v_task, v_namespace, v_workflow, v_version,
            NULL::uuid[], NULL::text[], NULL::text;
        RETURN;
    END IF;
    -- ready steps elsewhere in the task (a sink's completion rarely makes any), failures,
    -- retries, or a task in another state: the general path, under the lock held
    RETURN QUERY SELECT 'evaluate', v_task, v_namespace, v_workflow, v_version, NULL::uuid[],
        NULL::text[], NULL::text;
END
$$;
