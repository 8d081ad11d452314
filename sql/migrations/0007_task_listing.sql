-- Task listing and search (tasker/engine/listing.py, sql/queries/listing.sql).
--
-- list_tasks pages newest first by keyset on task_uuid, a UUID v7 whose order is the order of
-- creation: ORDER BY task_uuid DESC LIMIT n, the next page after task_uuid < the last one. A
-- filter is cheap when an index returns its tasks in that order, so each index below ends in
-- task_uuid: PostgreSQL walks the tasks of one value newest first and stops after a page, where
-- walking the primary key would read past every task of other values, and a bitmap scan would
-- read and sort every matching task. Chosen from EXPLAIN (ANALYZE, BUFFERS) of list_tasks over a
-- million tasks (tests/test_task_listing.py, the slow plan test):
--
-- * (named_task_uuid, task_uuid): the tasks of one template version. A namespace or workflow
--   filter names several versions: list_tasks walks each (a UNION ALL, merged in order), as
--   named_task_uuid = ANY (...) cannot keep the order. Also serves the foreign key to named_tasks.
-- * (state, task_uuid): the tasks in one state; several states are merged the same way.
-- * (initiator, task_uuid) and (source_system, task_uuid), only where set (submit leaves both
--   NULL unless given).
-- * GIN (tags jsonb_path_ops): tags @> '{...}' for a rare tag, where walking the primary key would
--   read much of the table. A common tag is found sooner by walking the primary key, and the
--   planner chooses between the two from the statistics. jsonb_path_ops indexes @> only, and is
--   smaller than the default jsonb_ops.
--
-- With no filter, and for since/until (which list_tasks turns into task_uuid bounds as well), the
-- primary key is the index. A rarely used value of a filter without an index here (reason,
-- priority) means reading past the tasks of other values.
--
-- Cost: a task's state changes are not HOT updates (tasks_active_idx covers state), so each one
-- also inserts into these indexes. Built without CONCURRENTLY (migrations run in a transaction):
-- on a large tasks table they block writes to it while they are built.

CREATE INDEX tasks_named_task_idx ON tasker.tasks (named_task_uuid, task_uuid);
CREATE INDEX tasks_state_idx ON tasker.tasks (state, task_uuid);
CREATE INDEX tasks_initiator_idx ON tasker.tasks (initiator, task_uuid)
    WHERE initiator IS NOT NULL;
CREATE INDEX tasks_source_system_idx ON tasker.tasks (source_system, task_uuid)
    WHERE source_system IS NOT NULL;
CREATE INDEX tasks_tags_idx ON tasker.tasks USING gin (tags jsonb_path_ops);
