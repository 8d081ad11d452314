-- Workflow state: templates, tasks, steps, edges, transition history, finalization claims, DLQ.
-- The current state lives on the task and step rows (one index lookup, no history scan); the
-- transition tables are the append-only audit, with a partial unique index on the current row.

CREATE FUNCTION tasker.uuid_generate_v7() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    unix_ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
    bytes bytea := uuid_send(gen_random_uuid());
BEGIN
    bytes := overlay(bytes PLACING substring(int8send(unix_ms) FROM 3) FROM 1 FOR 6);
    bytes := set_byte(bytes, 6, (get_byte(bytes, 6) & 15) | 112);  -- version 7
    RETURN encode(bytes, 'hex')::uuid;
END
$$;

CREATE TABLE tasker.task_namespaces (
    task_namespace_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    name varchar(64) NOT NULL UNIQUE,
    description text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasker.named_tasks (
    named_task_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_namespace_uuid uuid NOT NULL REFERENCES tasker.task_namespaces,
    name varchar(64) NOT NULL,
    version varchar(16) NOT NULL DEFAULT '0.1.0',
    configuration jsonb NOT NULL,
    identity_strategy text NOT NULL DEFAULT 'strict'
        CHECK (identity_strategy IN ('strict', 'caller_provided', 'always_unique')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_namespace_uuid, name, version)
);

CREATE TABLE tasker.named_steps (
    named_step_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    name varchar(128) NOT NULL UNIQUE
);

CREATE TABLE tasker.tasks (
    task_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    named_task_uuid uuid NOT NULL REFERENCES tasker.named_tasks,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN (
        'pending', 'initializing', 'enqueuing_steps', 'steps_in_process', 'evaluating_results',
        'waiting_for_dependencies', 'waiting_for_retry', 'blocked_by_failures', 'complete',
        'error', 'cancelled', 'resolved_manually')),
    complete boolean NOT NULL DEFAULT false,
    context jsonb NOT NULL DEFAULT '{}',
    identity_hash varchar(128) NOT NULL,
    priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    correlation_id uuid NOT NULL,
    parent_correlation_id uuid,
    initiator varchar(128),
    source_system varchar(128),
    reason varchar(128),
    tags jsonb NOT NULL DEFAULT '{}',
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at timestamptz
);
CREATE UNIQUE INDEX tasks_identity_hash_idx ON tasker.tasks (identity_hash);
CREATE INDEX tasks_active_idx ON tasker.tasks (state, requested_at)
    WHERE state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually');

CREATE TABLE tasker.workflow_steps (
    workflow_step_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid uuid NOT NULL REFERENCES tasker.tasks ON DELETE CASCADE,
    named_step_uuid uuid NOT NULL REFERENCES tasker.named_steps,
    name varchar(128) NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN (
        'pending', 'enqueued', 'in_progress', 'enqueued_for_orchestration',
        'enqueued_as_error_for_orchestration', 'waiting_for_retry', 'complete', 'error',
        'cancelled', 'resolved_manually')),
    retryable boolean NOT NULL DEFAULT true,
    max_attempts integer NOT NULL DEFAULT 3,
    attempts integer NOT NULL DEFAULT 0,
    last_attempted_at timestamptz,
    backoff_request_seconds double precision,
    next_retry_at timestamptz,
    inputs jsonb NOT NULL DEFAULT '{}',
    results jsonb,
    started_at timestamptz,
    finished_at timestamptz,
    processed_at timestamptz,
    UNIQUE (task_uuid, named_step_uuid)
);
CREATE INDEX workflow_steps_task_idx ON tasker.workflow_steps (task_uuid);

CREATE TABLE tasker.workflow_step_edges (
    from_step_uuid uuid NOT NULL REFERENCES tasker.workflow_steps ON DELETE CASCADE,
    to_step_uuid uuid NOT NULL REFERENCES tasker.workflow_steps ON DELETE CASCADE,
    name varchar(64) NOT NULL DEFAULT 'provides',
    PRIMARY KEY (to_step_uuid, from_step_uuid),
    CHECK (from_step_uuid <> to_step_uuid)
);
CREATE INDEX workflow_step_edges_from_idx ON tasker.workflow_step_edges (from_step_uuid);

CREATE TABLE tasker.task_transitions (
    task_transition_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid uuid NOT NULL REFERENCES tasker.tasks ON DELETE CASCADE,
    from_state text,
    to_state text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    sort_key integer NOT NULL,
    most_recent boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX task_transitions_current_idx
    ON tasker.task_transitions (task_uuid) WHERE most_recent;
CREATE UNIQUE INDEX task_transitions_order_idx ON tasker.task_transitions (task_uuid, sort_key);

CREATE TABLE tasker.workflow_step_transitions (
    workflow_step_transition_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    workflow_step_uuid uuid NOT NULL REFERENCES tasker.workflow_steps ON DELETE CASCADE,
    from_state text,
    to_state text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    sort_key integer NOT NULL,
    most_recent boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX workflow_step_transitions_current_idx
    ON tasker.workflow_step_transitions (workflow_step_uuid) WHERE most_recent;
CREATE UNIQUE INDEX workflow_step_transitions_order_idx
    ON tasker.workflow_step_transitions (workflow_step_uuid, sort_key);

-- Finalization claims: one holder at a time per task, with a lease; every attempt is audited.
CREATE TABLE tasker.finalization_claims (
    task_uuid uuid PRIMARY KEY REFERENCES tasker.tasks ON DELETE CASCADE,
    holder text NOT NULL,
    claimed_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE TABLE tasker.finalization_attempts (
    finalization_attempt_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid uuid NOT NULL,
    holder text NOT NULL,
    action text NOT NULL CHECK (action IN ('claim', 'extend', 'release')),
    succeeded boolean NOT NULL,
    held_by text,
    message text NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX finalization_attempts_task_idx ON tasker.finalization_attempts (task_uuid);

CREATE TABLE tasker.tasks_dlq (
    dlq_entry_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    task_uuid uuid NOT NULL REFERENCES tasker.tasks ON DELETE CASCADE,
    original_state text NOT NULL,
    dlq_reason text NOT NULL CHECK (dlq_reason IN ('staleness_timeout', 'max_retries_exceeded',
        'dependency_cycle_detected', 'worker_unavailable', 'manual_dlq')),
    dlq_timestamp timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolution_status text NOT NULL DEFAULT 'pending' CHECK (resolution_status IN (
        'pending', 'manually_resolved', 'permanently_failed', 'cancelled')),
    resolution_timestamp timestamptz,
    resolution_notes text,
    resolved_by text,
    task_snapshot jsonb NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX tasks_dlq_pending_idx ON tasker.tasks_dlq (task_uuid)
    WHERE resolution_status = 'pending';

-- The functions below are PL/pgSQL, not SQL: PL/pgSQL caches its statements' plans per session,
-- while a non-inlined SQL function is planned again on every call, which cost more than running
-- it.

-- Append transitions and move the current-row markers (callers hold the rows' locks).
CREATE FUNCTION tasker.record_task_transition_v1(
    p_task uuid, p_from text, p_to text, p_metadata jsonb
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    previous integer;
BEGIN
    UPDATE tasker.task_transitions SET most_recent = false
    WHERE task_uuid = p_task AND most_recent
    RETURNING sort_key INTO previous;
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, metadata, sort_key)
    VALUES (p_task, p_from, p_to, p_metadata, coalesce(previous, 0) + 1);
END
$$;

CREATE FUNCTION tasker.record_step_transitions_v1(
    p_steps uuid[], p_from text[], p_to text, p_metadata jsonb
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH old AS (
        UPDATE tasker.workflow_step_transitions SET most_recent = false
        WHERE workflow_step_uuid = ANY (p_steps) AND most_recent
        RETURNING workflow_step_uuid, sort_key
    )
    INSERT INTO tasker.workflow_step_transitions
        (workflow_step_uuid, from_state, to_state, metadata, sort_key)
    SELECT moved.step, moved.from_state, p_to, p_metadata, coalesce(old.sort_key, 0) + 1
    FROM unnest(p_steps, p_from) AS moved(step, from_state)
    LEFT JOIN old ON old.workflow_step_uuid = moved.step;
END
$$;

-- Step readiness (seed-spec 3.1), from the state kept on the step rows.
CREATE FUNCTION tasker.step_readiness_v1(p_task uuid)
RETURNS TABLE (
    workflow_step_uuid uuid, name text, current_state text, dependencies_satisfied boolean,
    retry_eligible boolean, ready_for_execution boolean, next_retry_at timestamptz,
    total_parents integer, completed_parents integer, attempts integer, max_attempts integer
) LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT s.workflow_step_uuid, s.name::text, s.state,
           coalesce(p.total, 0) = coalesce(p.completed, 0),
           s.attempts = 0 OR (s.retryable AND s.attempts < s.max_attempts),
           s.state IN ('pending', 'waiting_for_retry')
               AND coalesce(p.total, 0) = coalesce(p.completed, 0)
               AND (s.attempts = 0 OR (s.retryable AND s.attempts < s.max_attempts))
               AND (s.next_retry_at IS NULL OR s.next_retry_at <= clock_timestamp()),
           s.next_retry_at, coalesce(p.total, 0)::integer, coalesce(p.completed, 0)::integer,
           s.attempts, s.max_attempts
    FROM tasker.workflow_steps s
    LEFT JOIN LATERAL (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE parent.state IN ('complete', 'resolved_manually'))
                   AS completed
        FROM tasker.workflow_step_edges e
        JOIN tasker.workflow_steps parent ON parent.workflow_step_uuid = e.from_step_uuid
        WHERE e.to_step_uuid = s.workflow_step_uuid
    ) p ON true
    WHERE s.task_uuid = p_task;
END
$$;

-- Task execution context with the later (TAS-222) rules of seed-spec 4.1.
CREATE FUNCTION tasker.task_execution_context_v1(p_task uuid)
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
    )
    SELECT c.total, c.pending, c.enqueued, c.in_progress, c.efo, c.eaefo, c.wfr, c.completed,
           c.failed, c.ready,
           CASE
               WHEN c.failed > 0 THEN 'blocked_by_failures'
               WHEN c.ready > 0 THEN 'has_ready_steps'
               WHEN c.in_progress + c.enqueued + c.efo + c.eaefo > 0 THEN 'processing'
               WHEN c.completed = c.total AND c.total > 0 THEN 'all_complete'
               ELSE 'waiting_for_dependencies'
           END,
           CASE
               WHEN c.failed > 0 THEN 'handle_failures'
               WHEN c.ready > 0 THEN 'execute_ready_steps'
               WHEN c.in_progress + c.enqueued + c.efo + c.eaefo > 0 THEN 'wait_for_completion'
               WHEN c.completed = c.total AND c.total > 0 THEN 'finalize_task'
               ELSE 'wait_for_dependencies'
           END,
           c.next_retry_at
    FROM c;
END
$$;

-- Create a task in one round trip: the task row (idempotent on its identity hash), its steps,
-- edges and first transitions; the root steps move to enqueued and are returned, so the caller
-- sends their messages in the same transaction. Steps are given in dependency order.
CREATE FUNCTION tasker.create_task_v1(
    p_named_task uuid, p_context jsonb, p_identity text, p_priority integer, p_correlation uuid,
    p_parent_correlation uuid, p_initiator text, p_source_system text, p_reason text,
    p_tags jsonb, p_steps text[], p_retryable boolean[], p_max_attempts integer[],
    p_inputs jsonb[], p_edge_parents text[], p_edge_children text[]
) RETURNS TABLE (task_uuid uuid, created boolean, enqueued uuid[], enqueued_names text[])
LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_steps uuid[];
    v_names text[];
BEGIN
    INSERT INTO tasker.tasks AS t (named_task_uuid, context, identity_hash, priority,
        correlation_id, parent_correlation_id, initiator, source_system, reason, tags, state)
    VALUES (p_named_task, p_context, p_identity, p_priority, p_correlation,
        p_parent_correlation, p_initiator, p_source_system, p_reason, p_tags, 'steps_in_process')
    ON CONFLICT (identity_hash) DO NOTHING
    RETURNING t.task_uuid INTO v_task;
    IF v_task IS NULL THEN
        RETURN QUERY SELECT t.task_uuid, false, NULL::uuid[], NULL::text[]
            FROM tasker.tasks t WHERE t.identity_hash = p_identity;
        RETURN;
    END IF;
    INSERT INTO tasker.named_steps (name) SELECT unnest(p_steps) ON CONFLICT (name) DO NOTHING;
    INSERT INTO tasker.workflow_steps
        (task_uuid, named_step_uuid, name, retryable, max_attempts, inputs)
    SELECT v_task, ns.named_step_uuid, s.name, s.retryable, s.max_attempts, s.inputs
    FROM unnest(p_steps, p_retryable, p_max_attempts, p_inputs)
        AS s(name, retryable, max_attempts, inputs)
    JOIN tasker.named_steps ns ON ns.name = s.name;
    INSERT INTO tasker.workflow_step_edges (from_step_uuid, to_step_uuid)
    SELECT parent.workflow_step_uuid, child.workflow_step_uuid
    FROM unnest(p_edge_parents, p_edge_children) AS e(parent, child)
    JOIN tasker.workflow_steps parent ON parent.task_uuid = v_task AND parent.name = e.parent
    JOIN tasker.workflow_steps child ON child.task_uuid = v_task AND child.name = e.child;
    INSERT INTO tasker.workflow_step_transitions (workflow_step_uuid, from_state, to_state,
        sort_key)
    SELECT ws.workflow_step_uuid, NULL, 'pending', 1
    FROM tasker.workflow_steps ws WHERE ws.task_uuid = v_task;
    WITH roots AS (
        UPDATE tasker.workflow_steps ws SET state = 'enqueued'
        WHERE ws.task_uuid = v_task AND ws.name <> ALL (coalesce(p_edge_children, '{}'))
        RETURNING ws.workflow_step_uuid, ws.name::text AS name
    )
    SELECT array_agg(roots.workflow_step_uuid), array_agg(roots.name)
    INTO v_steps, v_names FROM roots;
    PERFORM tasker.record_step_transitions_v1(
        v_steps, array_fill('pending'::text, ARRAY[cardinality(v_steps)]), 'enqueued',
        '{}'::jsonb);
    PERFORM tasker.record_task_transition_v1(v_task, NULL, 'pending', '{}'::jsonb);
    PERFORM tasker.record_task_transition_v1(v_task, 'pending', 'steps_in_process',
        jsonb_build_object(
            'via', '["initializing", "enqueuing_steps", "steps_in_process"]'::jsonb,
            'reason', format('created; %s step(s) enqueued', cardinality(v_steps))));
    RETURN QUERY SELECT v_task, true, v_steps, v_names;
END
$$;

-- A worker's claim in one round trip: lock the step, compare-and-swap enqueued -> in_progress
-- (or re-claim a redelivered step whose worker died) with attempts + 1, record the transition,
-- and return the task context and the results of every completed ancestor, by step name.
CREATE FUNCTION tasker.claim_step_v1(p_step uuid, p_redelivered boolean)
RETURNS TABLE (
    outcome text, state text, attempt integer, max_attempts integer, name text, inputs jsonb,
    task_context jsonb, correlation_id uuid, parent_results jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    SELECT ws.state, ws.attempts, ws.max_attempts, ws.name, ws.inputs, t.context,
           t.correlation_id AS correlation, ws.task_uuid
    INTO s
    FROM tasker.workflow_steps ws JOIN tasker.tasks t ON t.task_uuid = ws.task_uuid
    WHERE ws.workflow_step_uuid = p_step
    FOR UPDATE OF ws;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing', NULL::text, NULL::integer, NULL::integer, NULL::text,
            NULL::jsonb, NULL::jsonb, NULL::uuid, NULL::jsonb;
        RETURN;
    END IF;
    IF s.state = 'in_progress' AND p_redelivered AND s.attempts >= s.max_attempts THEN
        RETURN QUERY SELECT 'exhausted', s.state, s.attempts, s.max_attempts, s.name::text,
            s.inputs, s.context, s.correlation, NULL::jsonb;
        RETURN;
    END IF;
    IF NOT (s.state = 'enqueued' OR (s.state = 'in_progress' AND p_redelivered)) THEN
        RETURN QUERY SELECT 'skipped', s.state, s.attempts, s.max_attempts, s.name::text,
            s.inputs, s.context, s.correlation, NULL::jsonb;
        RETURN;
    END IF;
    UPDATE tasker.workflow_steps
    SET state = 'in_progress', attempts = attempts + 1, last_attempted_at = clock_timestamp(),
        started_at = clock_timestamp(), finished_at = NULL
    WHERE workflow_step_uuid = p_step;
    PERFORM tasker.record_step_transitions_v1(
        ARRAY[p_step], ARRAY[s.state], 'in_progress',
        jsonb_build_object('attempt', s.attempts + 1, 'reclaimed', s.state = 'in_progress'));
    RETURN QUERY
    WITH RECURSIVE ancestors AS (
        SELECT e.from_step_uuid FROM tasker.workflow_step_edges e WHERE e.to_step_uuid = p_step
        UNION
        SELECT e.from_step_uuid FROM tasker.workflow_step_edges e
        JOIN ancestors a ON e.to_step_uuid = a.from_step_uuid
    )
    SELECT 'claimed', s.state, s.attempts + 1, s.max_attempts, s.name::text, s.inputs,
           s.context, s.correlation,
           coalesce((SELECT jsonb_object_agg(p.name, p.results->'result')
                     FROM ancestors a
                     JOIN tasker.workflow_steps p ON p.workflow_step_uuid = a.from_step_uuid
                     WHERE p.task_uuid = s.task_uuid  -- lets the planner use the task index
                       AND p.state IN ('complete', 'resolved_manually')), '{}'::jsonb);
END
$$;

-- The inline fast path of a successful step, in one round trip: record the result (fenced by the
-- attempt), complete the step, and under the task row lock move the task forward: enqueue the
-- steps that became ready (returned, so the caller sends their messages in this transaction), or
-- mark the task ready for finalization. Anything else (a sibling failed, retries pending) is
-- left to the caller ('evaluate'), which runs the general path with the task already locked.
CREATE FUNCTION tasker.complete_step_v1(p_step uuid, p_attempt integer, p_results jsonb)
RETURNS TABLE (
    outcome text, task_uuid uuid, namespace text, workflow text, enqueued uuid[],
    enqueued_names text[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_task uuid;
    v_state text;
    v_namespace text;
    v_workflow text;
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
        RETURN QUERY SELECT 'lost', NULL::uuid, NULL::text, NULL::text, NULL::uuid[],
            NULL::text[];
        RETURN;
    END IF;
    PERFORM tasker.record_step_transitions_v1(
        ARRAY[p_step], ARRAY['in_progress'], 'complete',
        jsonb_build_object('attempt', p_attempt, 'via', '["enqueued_for_orchestration"]'::jsonb));
    SELECT t.state, ns.name, nt.name INTO v_state, v_namespace, v_workflow
    FROM tasker.tasks t
    JOIN tasker.named_tasks nt ON nt.named_task_uuid = t.named_task_uuid
    JOIN tasker.task_namespaces ns ON ns.task_namespace_uuid = nt.task_namespace_uuid
    WHERE t.task_uuid = v_task
    FOR UPDATE OF t;
    IF v_state IN ('complete', 'error', 'cancelled', 'resolved_manually', 'blocked_by_failures')
    THEN
        RETURN QUERY SELECT 'late', v_task, v_namespace, v_workflow, NULL::uuid[], NULL::text[];
        RETURN;
    END IF;
    SELECT c.execution_status INTO v_status FROM tasker.task_execution_context_v1(v_task) c;
    IF v_status = 'processing' AND v_state = 'steps_in_process' THEN
        RETURN QUERY SELECT 'processing', v_task, v_namespace, v_workflow, NULL::uuid[],
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
            WHERE ws.state IN ('pending', 'waiting_for_retry')
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
            RETURN QUERY SELECT 'enqueued', v_task, v_namespace, v_workflow, v_steps, v_names;
            RETURN;
        END IF;
    END IF;
    IF v_status = 'all_complete' AND v_state = 'steps_in_process' THEN
        UPDATE tasker.tasks SET state = 'evaluating_results' WHERE tasks.task_uuid = v_task;
        PERFORM tasker.record_task_transition_v1(v_task, v_state, 'evaluating_results',
            '{"reason": "all steps complete"}'::jsonb);
        RETURN QUERY SELECT 'finalize', v_task, v_namespace, v_workflow, NULL::uuid[],
            NULL::text[];
        RETURN;
    END IF;
    RETURN QUERY SELECT 'evaluate', v_task, v_namespace, v_workflow, NULL::uuid[], NULL::text[];
END
$$;

-- Atomic finalization claim: one holder per task while its lease lasts; every attempt audited.
CREATE FUNCTION tasker.claim_finalization_v1(p_task uuid, p_holder text, p_lease_seconds integer)
RETURNS TABLE (claimed boolean, held_by text, message text) LANGUAGE plpgsql AS $$
DECLARE
    current_holder text;
BEGIN
    INSERT INTO tasker.finalization_claims AS fc (task_uuid, holder, claimed_at, expires_at)
    VALUES (p_task, p_holder, clock_timestamp(),
            clock_timestamp() + p_lease_seconds * interval '1 second')
    ON CONFLICT (task_uuid) DO UPDATE
        SET holder = excluded.holder, claimed_at = excluded.claimed_at,
            expires_at = excluded.expires_at
        WHERE fc.expires_at < clock_timestamp() OR fc.holder = excluded.holder
    RETURNING fc.holder INTO current_holder;
    IF current_holder IS NOT NULL THEN
        claimed := true; held_by := p_holder; message := 'claimed';
    ELSE
        SELECT fc.holder INTO held_by FROM tasker.finalization_claims fc WHERE task_uuid = p_task;
        claimed := false; message := 'already claimed';
    END IF;
    INSERT INTO tasker.finalization_attempts (task_uuid, holder, action, succeeded, held_by, message)
    VALUES (p_task, p_holder, 'claim', claimed, held_by, message);
    RETURN NEXT;
END
$$;

CREATE FUNCTION tasker.extend_finalization_v1(p_task uuid, p_holder text, p_lease_seconds integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    extended boolean;
BEGIN
    UPDATE tasker.finalization_claims
    SET expires_at = clock_timestamp() + p_lease_seconds * interval '1 second'
    WHERE task_uuid = p_task AND holder = p_holder;
    extended := FOUND;
    INSERT INTO tasker.finalization_attempts (task_uuid, holder, action, succeeded, message)
    VALUES (p_task, p_holder, 'extend', extended,
            CASE WHEN extended THEN 'extended' ELSE 'not the holder' END);
    RETURN extended;
END
$$;

CREATE FUNCTION tasker.release_finalization_v1(p_task uuid, p_holder text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    released boolean;
BEGIN
    DELETE FROM tasker.finalization_claims WHERE task_uuid = p_task AND holder = p_holder;
    released := FOUND;
    INSERT INTO tasker.finalization_attempts (task_uuid, holder, action, succeeded, message)
    VALUES (p_task, p_holder, 'release', released,
            CASE WHEN released THEN 'released' ELSE 'not the holder' END);
    RETURN released;
END
$$;
