-- 0008_queue_stats: per-queue statistics, exact at every commit.
--
-- Statement-level triggers add each statement's deltas to one of SHARDS rows
-- per queue (chosen by backend), so concurrent workers do not queue up on a
-- single counter row; readers sum the shards.

CREATE TABLE conveyor.queue_stats (
    queue text NOT NULL,
    shard smallint NOT NULL,
    waiting bigint NOT NULL DEFAULT 0,
    running bigint NOT NULL DEFAULT 0,
    total_enqueued bigint NOT NULL DEFAULT 0,
    total_succeeded bigint NOT NULL DEFAULT 0,
    total_failed bigint NOT NULL DEFAULT 0,
    total_cancelled bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (queue, shard)
);

-- Jobs that exist before this migration count in shard 0.
INSERT INTO conveyor.queue_stats (queue, shard, waiting, running, total_enqueued,
                                  total_succeeded, total_failed, total_cancelled)
SELECT queue, 0,
       count(*) FILTER (WHERE state IN ('scheduled', 'available')),
       count(*) FILTER (WHERE state = 'running'),
       count(*),
       count(*) FILTER (WHERE state = 'succeeded'),
       count(*) FILTER (WHERE state = 'failed'),
       count(*) FILTER (WHERE state = 'cancelled')
FROM conveyor.jobs
GROUP BY queue;

CREATE FUNCTION conveyor.add_queue_deltas(deltas jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO conveyor.queue_stats AS s (queue, shard, waiting, running, total_enqueued,
                                          total_succeeded, total_failed, total_cancelled)
    SELECT d.queue, pg_backend_pid() % 16, d.waiting, d.running, d.enqueued,
           d.succeeded, d.failed, d.cancelled
    FROM jsonb_to_recordset(deltas) AS d(queue text, waiting integer, running integer,
                                         enqueued integer, succeeded integer,
                                         failed integer, cancelled integer)
    ORDER BY d.queue
    ON CONFLICT (queue, shard) DO UPDATE
    SET waiting = s.waiting + excluded.waiting,
        running = s.running + excluded.running,
        total_enqueued = s.total_enqueued + excluded.total_enqueued,
        total_succeeded = s.total_succeeded + excluded.total_succeeded,
        total_failed = s.total_failed + excluded.total_failed,
        total_cancelled = s.total_cancelled + excluded.total_cancelled,
        updated_at = statement_timestamp();
$$;

CREATE FUNCTION conveyor.count_queues_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    SELECT jsonb_agg(d) INTO deltas FROM (
        SELECT queue,
               count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) AS enqueued,
               count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               count(*) FILTER (WHERE state = 'cancelled') AS cancelled
        FROM inserted
        GROUP BY queue
    ) AS d;
    IF deltas IS NOT NULL THEN
        PERFORM conveyor.add_queue_deltas(deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION conveyor.count_queues_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    SELECT jsonb_agg(d) INTO deltas FROM (
        SELECT n.queue,
               sum((n.state IN ('scheduled', 'available'))::int
                   - (o.state IN ('scheduled', 'available'))::int) AS waiting,
               sum((n.state = 'running')::int - (o.state = 'running')::int) AS running,
               0 AS enqueued,
               sum((n.state = 'succeeded')::int - (o.state = 'succeeded')::int) AS succeeded,
               sum((n.state = 'failed')::int - (o.state = 'failed')::int) AS failed,
               sum((n.state = 'cancelled')::int - (o.state = 'cancelled')::int) AS cancelled
        FROM old_rows AS o
        JOIN new_rows AS n USING (id)
        WHERE o.state <> n.state
        GROUP BY n.queue
    ) AS d;
    IF deltas IS NOT NULL THEN
        PERFORM conveyor.add_queue_deltas(deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION conveyor.count_queues_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    -- Retention keeps the totals; deleting live jobs takes them out of the counts.
    SELECT jsonb_agg(d) INTO deltas FROM (
        SELECT queue,
               -count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,
               -count(*) FILTER (WHERE state = 'running') AS running,
               0 AS enqueued, 0 AS succeeded, 0 AS failed, 0 AS cancelled
        FROM deleted
        WHERE state IN ('scheduled', 'available', 'running')
        GROUP BY queue
    ) AS d;
    IF deltas IS NOT NULL THEN
        PERFORM conveyor.add_queue_deltas(deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_queues_inserted
    AFTER INSERT ON conveyor.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_queues_inserted();

CREATE TRIGGER jobs_count_queues_updated
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_queues_updated();

CREATE TRIGGER jobs_count_queues_deleted
    AFTER DELETE ON conveyor.jobs
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_queues_deleted();
