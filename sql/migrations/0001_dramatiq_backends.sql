-- Postgres-backed storage for Dramatiq's Results middleware and rate limiters, so a Tasker
-- deployment needs no Redis or Memcached for groups, pipelines with results, or barriers.

CREATE TABLE tasker.dramatiq_results (
    message_key text PRIMARY KEY,
    result bytea NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX dramatiq_results_expires_at_idx ON tasker.dramatiq_results (expires_at);

CREATE TABLE tasker.dramatiq_rate_limits (
    key text PRIMARY KEY,
    value bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX dramatiq_rate_limits_expires_at_idx ON tasker.dramatiq_rate_limits (expires_at);

-- Notifications for rate-limiter waits (barriers): one row per notify, popped by waiters.
CREATE TABLE tasker.dramatiq_rate_limit_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX dramatiq_rate_limit_events_key_idx ON tasker.dramatiq_rate_limit_events (key, id);
