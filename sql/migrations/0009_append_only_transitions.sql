-- Append-only transitions (decision 0012, which replaces the current-row marker of decision
-- 0004). A transition is one INSERT: its sort_key is the previous one's plus one, read from the
-- (owner, sort_key) index, and the current transition of a task or step is its highest sort_key.
-- The `most_recent` flag cost an UPDATE of the previous row on every transition (a new version
-- of that row in each of its indexes, since the flag is a partial index's predicate); the state
-- a caller needs is on the task and step rows already. Callers hold the rows' locks, and the
-- unique (owner, sort_key) indexes refuse a second writer of the same position.

DROP INDEX tasker.task_transitions_current_idx;
DROP INDEX tasker.workflow_step_transitions_current_idx;
ALTER TABLE tasker.task_transitions DROP COLUMN most_recent;
ALTER TABLE tasker.workflow_step_transitions DROP COLUMN most_recent;

CREATE OR REPLACE FUNCTION tasker.record_task_transition_v1(
    p_task uuid, p_from text, p_to text, p_metadata jsonb
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, metadata, sort_key)
    VALUES (p_task, p_from, p_to, p_metadata, coalesce(
        (SELECT tt.sort_key FROM tasker.task_transitions tt WHERE tt.task_uuid = p_task
         ORDER BY tt.sort_key DESC LIMIT 1), 0) + 1);
END
$$;

CREATE OR REPLACE FUNCTION tasker.record_step_transitions_v1(
    p_steps uuid[], p_from text[], p_to text, p_metadata jsonb
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasker.workflow_step_transitions
        (workflow_step_uuid, from_state, to_state, metadata, sort_key)
    SELECT moved.step, moved.from_state, p_to, p_metadata, coalesce(
        (SELECT st.sort_key FROM tasker.workflow_step_transitions st
         WHERE st.workflow_step_uuid = moved.step ORDER BY st.sort_key DESC LIMIT 1), 0) + 1
    FROM unnest(p_steps, p_from) AS moved(step, from_state);
END
$$;
