-- The coordinator: a worker registry, scaling hints, a record of every action, and what its
-- sweeps and retention need (docs/operations.md).

-- Each worker process heartbeats its row; the coordinator tells a dead worker from a slow one.
CREATE TABLE tasker.workers (
    worker_uuid uuid PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    queues text[] NOT NULL,
    actors text[] NOT NULL,
    threads integer NOT NULL,
    tasker_version text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen timestamptz NOT NULL DEFAULT clock_timestamp(),
    in_flight integer NOT NULL DEFAULT 0,
    processed bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0
);

-- One row per Dramatiq queue, written by the leading coordinator every cycle; KEDA's PostgreSQL
-- scaler and `tasker scale` read it. last_msg_id/processed/failed are the previous cycle's
-- counters, from which the rates are computed.
CREATE TABLE tasker.scaling_hints (
    queue text PRIMARY KEY,
    depth bigint NOT NULL,
    oldest_age_s double precision NOT NULL,
    in_flight integer NOT NULL,
    completions_per_s double precision NOT NULL,
    live_replicas integer NOT NULL,
    utilization double precision,
    error_rate double precision NOT NULL,
    desired_replicas integer NOT NULL,
    updated_at timestamptz NOT NULL,
    changed_at timestamptz NOT NULL,
    last_msg_id bigint NOT NULL DEFAULT 0,
    processed bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0
);

-- Every action of the coordinator, in the transaction that took it.
CREATE TABLE tasker.coordinator_actions (
    action_uuid uuid PRIMARY KEY DEFAULT tasker.uuid_generate_v7(),
    action text NOT NULL,
    task_uuid uuid,
    step_uuid uuid,
    detail jsonb NOT NULL DEFAULT '{}',
    coordinator text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX coordinator_actions_taken_at_idx ON tasker.coordinator_actions (taken_at);
CREATE INDEX coordinator_actions_task_idx ON tasker.coordinator_actions (task_uuid);

-- Retention deletes finished tasks oldest first, in small batches.
CREATE INDEX tasks_finished_idx ON tasker.tasks (completed_at) WHERE completed_at IS NOT NULL;

-- The scaling rule (docs/operations.md, "Scaling"), one queue at a time; IMMUTABLE so the
-- property tests can drive it with any inputs.
--   capacity: processes x threads of one worker pod; current: the last desired count (NULL at
--   first); returns the new desired count and whether it changed.
CREATE FUNCTION tasker.desired_replicas_v1(
    p_current integer, p_in_flight bigint, p_depth bigint, p_error_rate double precision,
    p_capacity integer, p_target_utilization double precision, p_backlog_per_replica integer,
    p_min integer, p_max integer, p_error_threshold double precision,
    p_seconds_since_change double precision, p_cooldown_s double precision
) RETURNS TABLE (desired integer, changed boolean) LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_want integer;
    v_current integer := coalesce(p_current, p_min);
BEGIN
    v_want := greatest(
        ceil(greatest(p_in_flight, 0) / (p_capacity * p_target_utilization))::integer,
        ceil(greatest(p_depth, 0)::double precision / p_backlog_per_replica)::integer);
    IF p_error_rate > p_error_threshold THEN
        v_want := v_want + 1;
    END IF;
    v_want := least(greatest(v_want, p_min), p_max);
    IF v_want < v_current THEN  -- scale down by at most half the excess (rounded up)
        v_want := v_current - ceil((v_current - v_want) / 2.0)::integer;
    END IF;
    v_want := least(greatest(v_want, p_min), p_max);
    IF p_current IS NOT NULL AND v_want <> p_current
       AND p_seconds_since_change < p_cooldown_s THEN
        RETURN QUERY SELECT p_current, false;  -- inside the cooldown: no change
        RETURN;
    END IF;
    RETURN QUERY SELECT v_want, p_current IS NULL OR v_want <> p_current;
END
$$;

-- Depth, oldest visible age, messages in flight, the last msg_id handed out and dead letters, of
-- PGMQ queues given by name (tables pgmq.q_<name>, pgmq.q_<name>__xq); missing queues are skipped.
CREATE FUNCTION tasker.queue_metrics_v1(p_queues text[])
RETURNS TABLE (
    pgmq_name text, depth bigint, oldest_age_s double precision, in_flight bigint,
    last_msg_id bigint, dead bigint
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue text;
    v_dead text;
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        CONTINUE WHEN to_regclass(format('pgmq.%I', 'q_' || v_queue)) IS NULL;
        v_dead := CASE WHEN to_regclass(format('pgmq.%I', 'q_' || v_queue || '__xq')) IS NULL
                       THEN '0'
                       ELSE format('(SELECT count(*) FROM pgmq.%I)', 'q_' || v_queue || '__xq')
                  END;
        -- A message is waiting (delayed: a retry's backoff, a deferred or bounced delivery,
        -- marked parked_until_ms by the broker), visible, or in flight (held by a consumer).
        -- depth counts the visible and the in-flight ones: what workers have to do now.
        RETURN QUERY EXECUTE format(
            'WITH m AS (
                 SELECT enqueued_at, vt <= now() AS visible,
                        vt > now() AND read_ct > 0
                        AND NOT coalesce(extract(epoch FROM vt) * 1000
                                         <= (headers->>''parked_until_ms'')::float8 + 1, false)
                            AS held
                 FROM pgmq.%I)
             SELECT %L::text, count(*) FILTER (WHERE visible OR held),
                    coalesce(extract(epoch FROM now() - min(enqueued_at)
                             FILTER (WHERE visible)), 0)::double precision,
                    count(*) FILTER (WHERE held),
                    coalesce((SELECT last_value FROM pg_sequences
                              WHERE schemaname = ''pgmq'' AND sequencename = %L), 0)::bigint,
                    %s::bigint
             FROM m',
            'q_' || v_queue, v_queue, 'q_' || v_queue || '_msg_id_seq', v_dead);
    END LOOP;
END
$$;
