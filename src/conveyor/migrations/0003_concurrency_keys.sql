-- 0003_concurrency_keys: per-key FIFO concurrency limits with persisted counts.
--
-- A job may carry a concurrency key. Per (queue, key) at most `concurrency_limit`
-- jobs run at once, across all workers, and they start in enqueue (id) order
-- among the jobs that are due. The counts live in `concurrency_keys` and are
-- maintained by statement-level triggers in the same transaction as every job
-- change, so they always equal a recount of the jobs table.

ALTER TABLE conveyor.jobs ADD COLUMN concurrency_key text CHECK (concurrency_key <> '');

CREATE TABLE conveyor.concurrency_keys (
    queue text NOT NULL,
    key text NOT NULL,
    concurrency_limit integer NOT NULL CHECK (concurrency_limit > 0),
    waiting integer NOT NULL DEFAULT 0 CHECK (waiting >= 0),
    running integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    total_enqueued bigint NOT NULL DEFAULT 0,
    total_succeeded bigint NOT NULL DEFAULT 0,
    total_failed bigint NOT NULL DEFAULT 0,
    total_cancelled bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (queue, key)
);

-- Keys with work waiting, least recently served first (the claim's key scan).
CREATE INDEX concurrency_keys_waiting_idx ON conveyor.concurrency_keys (queue, updated_at)
    WHERE waiting > 0;

-- The claim paths split: unkeyed jobs by priority, keyed jobs by key then id.
DROP INDEX conveyor.jobs_claim_idx;
CREATE INDEX jobs_claim_idx ON conveyor.jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available') AND concurrency_key IS NULL;
CREATE INDEX jobs_claim_keyed_idx ON conveyor.jobs (queue, concurrency_key, id)
    WHERE state IN ('scheduled', 'available') AND concurrency_key IS NOT NULL;

-- Apply per-key deltas, locking key rows in key order so concurrent statements
-- never deadlock on them.
CREATE FUNCTION conveyor.apply_key_deltas(deltas jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1
    FROM conveyor.concurrency_keys AS k
    JOIN jsonb_to_recordset(deltas) AS d(queue text, key text) USING (queue, key)
    ORDER BY k.queue, k.key
    FOR UPDATE OF k;

    UPDATE conveyor.concurrency_keys AS k
    SET waiting = k.waiting + d.waiting,
        running = k.running + d.running,
        total_enqueued = k.total_enqueued + d.enqueued,
        total_succeeded = k.total_succeeded + d.succeeded,
        total_failed = k.total_failed + d.failed,
        total_cancelled = k.total_cancelled + d.cancelled,
        updated_at = statement_timestamp()
    FROM jsonb_to_recordset(deltas) AS d(queue text, key text, waiting integer,
                                         running integer, enqueued integer,
                                         succeeded integer, failed integer,
                                         cancelled integer)
    WHERE k.queue = d.queue AND k.key = d.key;
END
$$;

CREATE FUNCTION conveyor.count_keys_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    SELECT jsonb_agg(d) INTO deltas FROM (
        SELECT queue, concurrency_key AS key,
               count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) AS enqueued,
               count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               count(*) FILTER (WHERE state = 'cancelled') AS cancelled
        FROM inserted
        WHERE concurrency_key IS NOT NULL
        GROUP BY queue, concurrency_key
    ) AS d;
    IF deltas IS NOT NULL THEN
        PERFORM conveyor.apply_key_deltas(deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION conveyor.count_keys_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    SELECT jsonb_agg(d) INTO deltas FROM (
        SELECT n.queue, n.concurrency_key AS key,
               sum((n.state IN ('scheduled', 'available'))::int
                   - (o.state IN ('scheduled', 'available'))::int) AS waiting,
               sum((n.state = 'running')::int - (o.state = 'running')::int) AS running,
               0 AS enqueued,
               sum((n.state = 'succeeded')::int - (o.state = 'succeeded')::int) AS succeeded,
               sum((n.state = 'failed')::int - (o.state = 'failed')::int) AS failed,
               sum((n.state = 'cancelled')::int - (o.state = 'cancelled')::int) AS cancelled
        FROM old_rows AS o
        JOIN new_rows AS n USING (id)
        WHERE n.concurrency_key IS NOT NULL AND o.state <> n.state
        GROUP BY n.queue, n.concurrency_key
    ) AS d;
    IF deltas IS NOT NULL THEN
        PERFORM conveyor.apply_key_deltas(deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION conveyor.count_keys_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    -- Deleting finished jobs (retention) keeps the totals; deleting waiting or
    -- running ones takes them out of the live counts.
    SELECT jsonb_agg(d) INTO deltas FROM (
        SELECT queue, concurrency_key AS key,
               -count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,
               -count(*) FILTER (WHERE state = 'running') AS running,
               0 AS enqueued, 0 AS succeeded, 0 AS failed, 0 AS cancelled
        FROM deleted
        WHERE concurrency_key IS NOT NULL
          AND state IN ('scheduled', 'available', 'running')
        GROUP BY queue, concurrency_key
    ) AS d;
    IF deltas IS NOT NULL THEN
        PERFORM conveyor.apply_key_deltas(deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_keys_inserted
    AFTER INSERT ON conveyor.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_keys_inserted();

CREATE TRIGGER jobs_count_keys_updated
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_keys_updated();

CREATE TRIGGER jobs_count_keys_deleted
    AFTER DELETE ON conveyor.jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_keys_deleted();
