-- 0014_key_service_order: keys are served in the order of their last start,
-- not of their last change, so that only a claim rewrites a key's index entries.
--
-- A claim takes keys with room least recently served first, walking
-- concurrency_keys_waiting_idx (queue, updated_at). Every count change set
-- `updated_at`, so every one (enqueue, start, outcome) was an update that moved
-- the key's index entries: never a HOT update, and dead entries for the next
-- claim's walk to step over (3,200 of them for 100 keys after 150 claims).
-- `served_at` changes only when jobs of the key start: an outcome that leaves
-- `waiting` alone (a success, a failure, a cancel of a running job) now touches
-- no indexed column, and the key's row can be updated in place (HOT). The
-- table keeps room on each page for that.
--
-- The order also means what it says now: an enqueue no longer sends a key to
-- the back of the line; only being served does.

ALTER TABLE conveyor.concurrency_keys
    ADD COLUMN served_at timestamptz NOT NULL DEFAULT statement_timestamp();
UPDATE conveyor.concurrency_keys SET served_at = updated_at;
ALTER TABLE conveyor.concurrency_keys SET (fillfactor = 50);

DROP INDEX conveyor.concurrency_keys_waiting_idx;
CREATE INDEX concurrency_keys_waiting_idx ON conveyor.concurrency_keys (queue, served_at)
    WHERE waiting > 0;

CREATE OR REPLACE FUNCTION conveyor.apply_key_deltas(deltas jsonb) RETURNS void
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
        -- Starts open a new rate window when the last one ran out.
        rate_window_start = CASE
            WHEN coalesce(d.started, 0) > 0 AND k.rate_limit IS NOT NULL
             AND (k.rate_window_start IS NULL
                  OR conveyor.now() >= k.rate_window_start
                                       + make_interval(secs => k.rate_period_s))
            THEN conveyor.now()
            ELSE k.rate_window_start END,
        rate_window_count = CASE
            WHEN coalesce(d.started, 0) > 0 AND k.rate_limit IS NOT NULL
             AND (k.rate_window_start IS NULL
                  OR conveyor.now() >= k.rate_window_start
                                       + make_interval(secs => k.rate_period_s))
            THEN d.started
            ELSE k.rate_window_count + coalesce(d.started, 0) END,
        served_at = CASE WHEN coalesce(d.started, 0) > 0 THEN statement_timestamp()
                         ELSE k.served_at END,
        updated_at = statement_timestamp()
    FROM jsonb_to_recordset(deltas) AS d(queue text, key text, waiting integer,
                                         running integer, enqueued integer,
                                         succeeded integer, failed integer,
                                         cancelled integer, started integer)
    WHERE k.queue = d.queue AND k.key = d.key;
END
$$;
