-- What an operator does to a workflow, and the push that tells waiters a task is settled.
--
-- * cancel_task_v1: the task becomes `cancelled` at once; its steps that do not run move to
--   `cancelled` in the same transaction (a step running at that moment may finish and is
--   recorded, but a final task never advances). claim_step_v2 already refuses to start a step of
--   a final task, so no step starts after the cancel commits. The caller removes the task's
--   queued messages in the same transaction (the queue names are the broker's to compute).
-- * manual_step_action_v1: `retry` (error -> pending, attempts back to 0, as the seed's
--   ResetForRetry), `resolve` (-> resolved_manually, dependents proceed) and `complete` (-> complete
--   with a result supplied by the operator). A task waiting in `blocked_by_failures` or given up
--   in `error` is reopened to `evaluating_results`; the caller then moves it forward in the same
--   transaction (the engine's advance_task, which sends the messages).
-- * Who, when and why of every action is in the transition rows it writes (metadata `action`,
--   `by`, `reason`); a pending task DLQ entry is closed with the same who and why.
-- * A task entering a final state or `blocked_by_failures` sends NOTIFY tasker_task_settled with
--   `<task_uuid> <state>`: tasker.Client.wait wakes on it instead of polling. It is a trigger, so
--   every path that settles a task (finalization, the coordinator, an operator) notifies, and the
--   notification is delivered only if that transaction commits.

CREATE FUNCTION tasker.notify_task_settled_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_task_settled', NEW.task_uuid::text || ' ' || NEW.state);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_settled_notify
    AFTER UPDATE OF state ON tasker.tasks
    FOR EACH ROW
    WHEN (NEW.state IS DISTINCT FROM OLD.state AND NEW.state IN (
        'complete', 'error', 'cancelled', 'resolved_manually', 'blocked_by_failures'))
    EXECUTE FUNCTION tasker.notify_task_settled_v1();

-- outcome: 'cancelled', 'final' (the task was final already: state says which), 'missing'.
CREATE FUNCTION tasker.cancel_task_v1(p_task uuid, p_by text, p_reason text)
RETURNS TABLE (
    outcome text, state text, namespace text, cancelled_steps uuid[], running_steps uuid[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_namespace text;
    v_steps uuid[];
    v_from text[];
    v_running uuid[];
    v_audit jsonb := jsonb_build_object('action', 'cancel', 'by', p_by, 'reason', p_reason);
BEGIN
    SELECT t.state, ns.name INTO v_state, v_namespace
    FROM tasker.tasks t
    JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
    JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
    WHERE t.task_uuid = p_task
    FOR UPDATE OF t;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing', NULL::text, NULL::text, NULL::uuid[], NULL::uuid[];
        RETURN;
    END IF;
    IF v_state IN ('complete', 'error', 'cancelled', 'resolved_manually') THEN
        RETURN QUERY SELECT 'final', v_state, v_namespace, NULL::uuid[], NULL::uuid[];
        RETURN;
    END IF;
    -- the step rows are locked here, so a claim either ran before (the step is in_progress and
    -- may finish) or waits for this commit and then finds the step cancelled
    WITH old AS (
        SELECT ws.workflow_step_uuid, ws.state FROM tasker.workflow_steps ws
        WHERE ws.task_uuid = p_task
          AND ws.state NOT IN ('in_progress', 'complete', 'cancelled', 'resolved_manually')
        FOR UPDATE OF ws
    ), moved AS (
        UPDATE tasker.workflow_steps ws
        SET state = 'cancelled', processed_at = clock_timestamp(), next_retry_at = NULL,
            waiting_for = NULL, waiting_since = NULL
        FROM old WHERE ws.workflow_step_uuid = old.workflow_step_uuid
        RETURNING ws.workflow_step_uuid, old.state AS from_state
    )
    SELECT array_agg(moved.workflow_step_uuid), array_agg(moved.from_state)
    INTO v_steps, v_from FROM moved;
    IF v_steps IS NOT NULL THEN
        PERFORM tasker.record_step_transitions_v1(v_steps, v_from, 'cancelled', v_audit);
    END IF;
    SELECT array_agg(ws.workflow_step_uuid) INTO v_running
    FROM tasker.workflow_steps ws WHERE ws.task_uuid = p_task AND ws.state = 'in_progress';
    UPDATE tasker.tasks t
    SET state = 'cancelled', complete = false, completed_at = clock_timestamp()
    WHERE t.task_uuid = p_task;
    PERFORM tasker.record_task_transition_v1(p_task, v_state, 'cancelled', v_audit);
    UPDATE tasker.tasks_dlq d
    SET resolution_status = 'cancelled', resolution_timestamp = clock_timestamp(),
        resolution_notes = p_reason, resolved_by = p_by
    WHERE d.task_uuid = p_task AND d.resolution_status = 'pending';
    RETURN QUERY SELECT 'cancelled', 'cancelled'::text, v_namespace,
        coalesce(v_steps, '{}'::uuid[]), coalesce(v_running, '{}'::uuid[]);
END
$$;

-- p_action: 'retry', 'resolve' or 'complete' (p_results: the stored document of the supplied
-- result). outcome: 'done', 'missing' (no such task, or the step is not one of its steps),
-- 'task_final' (the task is complete, cancelled or resolved: nothing to act on),
-- 'step_running' (a worker runs the step now), 'not_allowed' (the step's state does not allow
-- the action: step_state says which).
CREATE FUNCTION tasker.manual_step_action_v1(
    p_task uuid, p_step uuid, p_action text, p_results jsonb, p_by text, p_reason text
) RETURNS TABLE (outcome text, task_state text, step_state text, reopened boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_task_state text;
    v_step_state text;
    v_to text;
    v_audit jsonb := jsonb_build_object('action', p_action, 'by', p_by, 'reason', p_reason);
BEGIN
    IF p_action NOT IN ('retry', 'resolve', 'complete') THEN
        RAISE EXCEPTION 'unknown manual step action %', p_action USING ERRCODE = '22023';
    END IF;
    SELECT t.state INTO v_task_state FROM tasker.tasks t WHERE t.task_uuid = p_task FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing', NULL::text, NULL::text, false;
        RETURN;
    END IF;
    SELECT ws.state INTO v_step_state FROM tasker.workflow_steps ws
    WHERE ws.workflow_step_uuid = p_step AND ws.task_uuid = p_task
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing', v_task_state, NULL::text, false;
        RETURN;
    END IF;
    IF v_task_state IN ('complete', 'cancelled', 'resolved_manually') THEN
        RETURN QUERY SELECT 'task_final', v_task_state, v_step_state, false;
        RETURN;
    END IF;
    IF v_step_state = 'in_progress' THEN
        RETURN QUERY SELECT 'step_running', v_task_state, v_step_state, false;
        RETURN;
    END IF;
    IF (p_action = 'retry' AND v_step_state <> 'error')
       OR v_step_state IN ('complete', 'resolved_manually', 'cancelled') THEN
        RETURN QUERY SELECT 'not_allowed', v_task_state, v_step_state, false;
        RETURN;
    END IF;
    IF p_action = 'retry' THEN
        v_to := 'pending';
        UPDATE tasker.workflow_steps ws
        SET state = 'pending', attempts = 0, next_retry_at = NULL, backoff_request_seconds = NULL,
            processed_at = NULL, finished_at = NULL
        WHERE ws.workflow_step_uuid = p_step;
    ELSIF p_action = 'resolve' THEN
        v_to := 'resolved_manually';
        UPDATE tasker.workflow_steps ws
        SET state = 'resolved_manually', processed_at = clock_timestamp(),
            finished_at = coalesce(ws.finished_at, clock_timestamp()), next_retry_at = NULL,
            waiting_for = NULL, waiting_since = NULL
        WHERE ws.workflow_step_uuid = p_step;
    ELSE
        v_to := 'complete';
        UPDATE tasker.workflow_steps ws
        SET state = 'complete', results = p_results, processed_at = clock_timestamp(),
            finished_at = clock_timestamp(), next_retry_at = NULL, waiting_for = NULL,
            waiting_since = NULL
        WHERE ws.workflow_step_uuid = p_step;
    END IF;
    PERFORM tasker.record_step_transitions_v1(ARRAY[p_step], ARRAY[v_step_state], v_to, v_audit);
    IF v_task_state IN ('error', 'blocked_by_failures') THEN
        UPDATE tasker.tasks t
        SET state = 'evaluating_results', complete = false, completed_at = NULL
        WHERE t.task_uuid = p_task;
        PERFORM tasker.record_task_transition_v1(p_task, v_task_state, 'evaluating_results',
            v_audit || jsonb_build_object('step', p_step));
        UPDATE tasker.tasks_dlq d
        SET resolution_status = 'manually_resolved', resolution_timestamp = clock_timestamp(),
            resolution_notes = p_reason, resolved_by = p_by
        WHERE d.task_uuid = p_task AND d.resolution_status = 'pending';
    END IF;
    RETURN QUERY SELECT 'done', CASE WHEN v_task_state IN ('error', 'blocked_by_failures')
                                     THEN 'evaluating_results' ELSE v_task_state END,
        v_to, v_task_state IN ('error', 'blocked_by_failures');
END
$$;
