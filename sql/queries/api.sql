-- Named statements of the HTTP API (tasker/api). Values are always bound.

-- The deepest queue of a deployment (its PGMQ queues start with `<broker.namespace>_`; their
-- dead-letter queues are left out): visible and in-flight messages, what workers have to do now
-- (tasker.queue_metrics_v1, migration 0004). No row when the deployment has no queue yet.
-- name: deepest_queue
SELECT m.pgmq_name, m.depth
FROM tasker.queue_metrics_v1(ARRAY(
    SELECT queue_name FROM pgmq.meta
    WHERE starts_with(queue_name, %(prefix)s) AND right(queue_name, 4) <> '__xq'
)) AS m
ORDER BY m.depth DESC
LIMIT 1

-- name: ping
SELECT 1
