-- 0002_workers_and_cancellation: the worker registry, remote stop, and
-- cancellation of running jobs.

CREATE TYPE conveyor.worker_state AS ENUM ('running', 'stopping', 'stopped', 'dead');

-- One row per worker process incarnation. `heartbeat_at` is database time;
-- the rescuer marks a worker dead when it has been silent for too long.
CREATE TABLE conveyor.workers (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    schema_version integer NOT NULL,
    queues text[] NOT NULL,
    concurrency integer NOT NULL CHECK (concurrency > 0),
    state conveyor.worker_state NOT NULL DEFAULT 'running',
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at timestamptz,
    -- Set by `conveyor workers stop`; the worker drains and exits when it sees it.
    stop_requested_at timestamptz,
    running_jobs integer NOT NULL DEFAULT 0,
    -- Attempts that ignored cancellation past the hard limit and still run.
    leaked_slots integer NOT NULL DEFAULT 0,
    stats jsonb NOT NULL DEFAULT '{}'
);

-- The rescuer's scan for silent workers touches live ones only.
CREATE INDEX workers_live_idx ON conveyor.workers (heartbeat_at)
    WHERE state IN ('running', 'stopping');

-- A cancel request for a running job: its worker stops the attempt and records
-- `cancelled`; if the worker is gone, the rescuer does.
ALTER TABLE conveyor.jobs ADD COLUMN cancel_requested_at timestamptz;
