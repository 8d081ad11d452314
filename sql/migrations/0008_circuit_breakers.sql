-- Shared circuit breakers of workflow steps (tasker/breakers/shared.py, sql/queries/breakers.sql;
-- decision 0010). One row per breaker name, written only on a failure of a step that declares
-- the breaker and on changes of state (a success while closed writes nothing); every worker
-- reads the rows through a cache of about a second. No row means closed. The rule itself is in
-- Python (tasker/breakers/policy.py): a change locks the row (SELECT ... FOR UPDATE), computes
-- the new state and writes it back in one transaction.
--
-- * failures: times of the recent failures while closed (at most failure_threshold of them);
-- * open_until: end of the open window; half-open after it (the first admission writes it);
-- * half_open_successes: successes counted since it went half-open;
-- * trials: the half-open trial slots taken, {"<token>": <held until, epoch seconds>};
-- * times_opened, opened_at, last_failure_at, last_error, changed_at: for operators.

CREATE TABLE tasker.circuit_breakers (
    name text PRIMARY KEY,
    state text NOT NULL DEFAULT 'closed'
        CONSTRAINT circuit_breakers_state_check CHECK (state IN ('closed', 'open', 'half_open')),
    failures timestamptz[] NOT NULL DEFAULT '{}',
    open_until timestamptz,
    half_open_successes integer NOT NULL DEFAULT 0,
    trials jsonb NOT NULL DEFAULT '{}',
    times_opened bigint NOT NULL DEFAULT 0,
    opened_at timestamptz,
    last_failure_at timestamptz,
    last_error text,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT circuit_breakers_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,63}$')
);
