-- 0008_queue_stats: per-queue statistics, exact at every commit.
--
-- Statement-level triggers append each statement's per-queue deltas as new
-- rows; readers sum them, and the maintenance pass folds them into one row per
-- queue. Appending never waits on another transaction, so a caller's open
-- transaction that enqueued a job blocks no worker here (an UPDATE of a shared
-- counter row would).

CREATE TABLE conveyor.queue_stats (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    waiting bigint NOT NULL DEFAULT 0,
    running bigint NOT NULL DEFAULT 0,
    total_enqueued bigint NOT NULL DEFAULT 0,
    total_succeeded bigint NOT NULL DEFAULT 0,
    total_failed bigint NOT NULL DEFAULT 0,
    total_cancelled bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT statement_timestamp()
);

CREATE INDEX queue_stats_queue_idx ON conveyor.queue_stats (queue);

-- Jobs that exist before this migration.
INSERT INTO conveyor.queue_stats (queue, waiting, running, total_enqueued,
                                  total_succeeded, total_failed, total_cancelled)
SELECT queue,
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
    INSERT INTO conveyor.queue_stats (queue, waiting, running, total_enqueued,
                                      total_succeeded, total_failed, total_cancelled)
    SELECT d.queue, d.waiting, d.running, d.enqueued, d.succeeded, d.failed, d.cancelled
    FROM jsonb_to_recordset(deltas) AS d(queue text, waiting integer, running integer,
                                         enqueued integer, succeeded integer,
                                         failed integer, cancelled integer);
$$;

-- Fold the committed deltas into one row per queue (run by the maintenance
-- pass). Deltas not yet committed are not visible, so they are left for later.
CREATE FUNCTION conveyor.compact_queue_stats() RETURNS bigint
LANGUAGE sql AS $$
    WITH folded AS (
        DELETE FROM conveyor.queue_stats RETURNING *
    ),
    summed AS (
        INSERT INTO conveyor.queue_stats (queue, waiting, running, total_enqueued,
                                          total_succeeded, total_failed, total_cancelled,
                                          updated_at)
        SELECT queue, sum(waiting), sum(running), sum(total_enqueued), sum(total_succeeded),
               sum(total_failed), sum(total_cancelled), max(updated_at)
        FROM folded
        GROUP BY queue
        RETURNING 1
    )
    SELECT count(*) FROM folded;
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
