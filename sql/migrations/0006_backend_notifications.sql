-- Wake blocked Dramatiq backend waits with NOTIFY instead of making them poll.
--
-- Storing a result (insert or replacement) notifies 'tasker_result_' || md5(message_key);
-- publishing a rate-limiter event notifies 'tasker_event_' || md5(key), which is the write that
-- releases a Barrier (its last party's wait_notify on '<barrier key>@events'). The notification
-- is sent by the writing transaction, at its commit, with an empty payload.
--
-- Channels: one per key, so a store wakes only the waits on that key, never every waiting
-- thread. A key can be any length (readable result keys, user barrier keys) while a channel name
-- is an identifier of at most 63 bytes, so the key is hashed: the MD5 of its UTF-8 bytes, which
-- tasker/backends/_common.py computes the same way whatever the database encoding. A collision
-- only costs a waiter one extra check: waiters always re-read the row before returning.
--
-- Triggers rather than pg_notify in the statements of sql/queries/backends.sql:
-- * rolling deploys: a Tasker that has this migration's code but runs on a database without it
--   still stores results (its waits fall back to a slow poll), and a Tasker of the previous
--   release storing into a migrated database wakes the new release's waiters;
-- * every writer wakes waiters, whatever statement it uses, now and later.
-- The cost is one PL/pgSQL call per stored row, next to the NOTIFY itself, whose commit-time
-- lock the broker's sends already take.

CREATE FUNCTION tasker.dramatiq_results_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_result_' || md5(convert_to(NEW.message_key, 'UTF8')), '');
    RETURN NULL;
END $$;

CREATE TRIGGER dramatiq_results_notify
AFTER INSERT OR UPDATE ON tasker.dramatiq_results
FOR EACH ROW EXECUTE FUNCTION tasker.dramatiq_results_notify();

CREATE FUNCTION tasker.dramatiq_rate_limit_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_event_' || md5(convert_to(NEW.key, 'UTF8')), '');
    RETURN NULL;
END $$;

CREATE TRIGGER dramatiq_rate_limit_events_notify
AFTER INSERT ON tasker.dramatiq_rate_limit_events
FOR EACH ROW EXECUTE FUNCTION tasker.dramatiq_rate_limit_events_notify();
