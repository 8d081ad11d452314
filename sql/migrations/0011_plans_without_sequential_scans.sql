-- The hot path's functions plan with sequential scans disabled (decision 0015). Every statement
-- in them is keyed by a task, step or owner id with an index to match, but plans are made from
-- the statistics of the moment: tables ANALYZEd while small (a new install, a quiet hour,
-- autovacuum off) get sequential scans, cached in the session, that then read every step ever
-- recorded on every call (a run of 3,000 W1 workflows read 354 M rows of workflow_steps that
-- way). The setting only steers the choice between plans; a statement with no usable index
-- still scans. Tasker's own sessions plan so too (tasker.db.connection.connection_kwargs).
ALTER FUNCTION tasker.claim_step_v2(uuid, text, integer) SET enable_seqscan = off;
ALTER FUNCTION tasker.complete_step_v2(uuid, integer, jsonb) SET enable_seqscan = off;
ALTER FUNCTION tasker.complete_step_v3(uuid, integer, jsonb) SET enable_seqscan = off;
ALTER FUNCTION tasker.enqueue_ready_children_v1(uuid, uuid, boolean) SET enable_seqscan = off;
ALTER FUNCTION tasker.create_task_v1(uuid, jsonb, text, integer, uuid, uuid, text, text, text,
    jsonb, text[], boolean[], integer[], jsonb[], text[], text[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.create_task_v2(uuid, jsonb, text, integer, uuid, uuid, text, text, text,
    jsonb, text[], boolean[], integer[], jsonb[], text[], text[]) SET enable_seqscan = off;
ALTER FUNCTION tasker.step_readiness_v1(uuid) SET enable_seqscan = off;
ALTER FUNCTION tasker.task_execution_context_v2(uuid) SET enable_seqscan = off;
ALTER FUNCTION tasker.record_step_transitions_v1(uuid[], text[], text, jsonb)
    SET enable_seqscan = off;
ALTER FUNCTION tasker.record_task_transition_v1(uuid, text, text, jsonb) SET enable_seqscan = off;
ALTER FUNCTION tasker.manual_step_action_v1(uuid, uuid, text, jsonb, text, text)
    SET enable_seqscan = off;
ALTER FUNCTION tasker.cancel_task_v1(uuid, text, text) SET enable_seqscan = off;
