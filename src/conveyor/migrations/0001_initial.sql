-- 0001_initial: the job table, the fake-able clock and the wake-up trigger.
-- Every name is qualified with the schema `conveyor`; the migrator swaps in the
-- configured schema, so this file also runs as-is in psql.

-- The database clock. Tests freeze or move it by writing `clock.fake_now`, or
-- per session with `SET conveyor_clock.fake_now = '...'`; nothing in conveyor reads a
-- worker's wall clock for a scheduling decision.
CREATE TABLE conveyor.clock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    fake_now timestamptz
);
INSERT INTO conveyor.clock (singleton, fake_now) VALUES (true, NULL);

CREATE FUNCTION conveyor.now() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(
        nullif(current_setting('conveyor_clock.fake_now', true), '')::timestamptz,
        (SELECT fake_now FROM conveyor.clock),
        statement_timestamp()
    )
$$;

CREATE TYPE conveyor.job_state AS ENUM (
    'scheduled', 'available', 'running', 'succeeded', 'failed', 'cancelled'
);

-- Grows with every claim; a write carrying an older token is a zombie's and is ignored.
CREATE SEQUENCE conveyor.lease_token_seq AS bigint;

CREATE TABLE conveyor.jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL CHECK (queue <> ''),
    task text NOT NULL CHECK (task <> ''),
    args jsonb NOT NULL DEFAULT '{}',
    state conveyor.job_state NOT NULL,
    priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    attempt integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts integer NOT NULL CHECK (max_attempts > 0),
    run_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    lease_token bigint,
    lease_expires_at timestamptz,
    worker_id text,
    timeout_ms integer CHECK (timeout_ms > 0),
    result jsonb,
    errors jsonb NOT NULL DEFAULT '[]',
    meta jsonb NOT NULL DEFAULT '{}',
    -- A running job always has a lease; a waiting or finished one never does.
    CONSTRAINT jobs_lease_iff_running CHECK (
        (state = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    CONSTRAINT jobs_finished_iff_terminal CHECK (
        (state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)
    )
);

-- The claim path: waiting jobs only, in claim order. Finished jobs never enter
-- this index, so its size follows the backlog, not the history.
CREATE INDEX jobs_claim_idx ON conveyor.jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available');

-- Lease expiry scans (rescue) touch running jobs only.
CREATE INDEX jobs_lease_idx ON conveyor.jobs (lease_expires_at) WHERE state = 'running';

-- Counts per state and queue (`conveyor status`), retention by state.
CREATE INDEX jobs_state_idx ON conveyor.jobs (state, queue);

-- Wake listening workers once per statement and queue, not once per row, so a
-- bulk insert of 100 000 jobs sends a handful of notifications. NOTIFY is
-- transactional: a job enqueued in a caller's transaction wakes workers only
-- when (and if) that transaction commits.
CREATE FUNCTION conveyor.notify_jobs_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.jobs', q.queue)
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS q;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON conveyor.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.notify_jobs_inserted();
