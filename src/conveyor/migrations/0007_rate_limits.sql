-- 0007_rate_limits: at most N starts per period per concurrency key, across all workers.
--
-- A fixed window per key: the first start after the window ran out opens a new
-- one at that instant; starts are counted by the same trigger that counts
-- running jobs, so the count is exact at every commit.

ALTER TABLE conveyor.concurrency_keys
    ADD COLUMN rate_limit integer CHECK (rate_limit > 0),
    ADD COLUMN rate_period_s double precision CHECK (rate_period_s > 0),
    ADD COLUMN rate_window_start timestamptz,
    ADD COLUMN rate_window_count integer NOT NULL DEFAULT 0 CHECK (rate_window_count >= 0),
    ADD CONSTRAINT concurrency_keys_rate_complete CHECK (
        (rate_limit IS NULL) = (rate_period_s IS NULL)
    );

-- Starts a key may still make in its current window (a large number without a rate).
CREATE FUNCTION conveyor.rate_room(
    rate_limit integer, rate_period_s double precision,
    window_start timestamptz, window_count integer
) RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN rate_limit IS NULL THEN 2147483647
        WHEN window_start IS NULL
          OR conveyor.now() >= window_start + make_interval(secs => rate_period_s)
            THEN rate_limit
        ELSE greatest(rate_limit - window_count, 0)
    END
$$;

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
        updated_at = statement_timestamp()
    FROM jsonb_to_recordset(deltas) AS d(queue text, key text, waiting integer,
                                         running integer, enqueued integer,
                                         succeeded integer, failed integer,
                                         cancelled integer, started integer)
    WHERE k.queue = d.queue AND k.key = d.key;
END
$$;

CREATE OR REPLACE FUNCTION conveyor.count_keys_updated() RETURNS trigger
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
               sum((n.state = 'cancelled')::int - (o.state = 'cancelled')::int) AS cancelled,
               sum((n.state = 'running' AND o.state <> 'running')::int) AS started
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

DROP FUNCTION conveyor.prepare_keys(text[], text[], integer[], integer[], integer[]);

CREATE FUNCTION conveyor.prepare_keys(
    queues text[], keys text[], limits integer[], caps integer[], incoming integer[],
    rates integer[], periods double precision[]
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    row record;
BEGIN
    IF keys IS NULL THEN
        RETURN true;
    END IF;
    -- A key's limit, cap and rate are set by its first enqueue; later changes go
    -- through key_set_limit, which an enqueue never overrides. A key created by
    -- key_set_limit before any enqueue still gets its cap and rate from the first.
    INSERT INTO conveyor.concurrency_keys AS ck
        (queue, key, concurrency_limit, max_queue_length, rate_limit, rate_period_s)
    SELECT t.q, t.key_name, t.lim, t.cap, t.rate, t.period
    FROM unnest(queues, keys, limits, caps, rates, periods)
        AS t(q, key_name, lim, cap, rate, period)
    ORDER BY t.q, t.key_name
    ON CONFLICT (queue, key) DO UPDATE
    SET max_queue_length = coalesce(ck.max_queue_length, excluded.max_queue_length),
        rate_limit = CASE WHEN ck.rate_limit IS NULL THEN excluded.rate_limit
                          ELSE ck.rate_limit END,
        rate_period_s = CASE WHEN ck.rate_limit IS NULL THEN excluded.rate_period_s
                             ELSE ck.rate_period_s END
    WHERE (ck.max_queue_length IS NULL AND excluded.max_queue_length IS NOT NULL)
       OR (ck.rate_limit IS NULL AND excluded.rate_limit IS NOT NULL);

    FOR row IN
        SELECT ck.queue, ck.key, ck.waiting, ck.max_queue_length, t.n
        FROM conveyor.concurrency_keys AS ck
        JOIN unnest(queues, keys, incoming) AS t(q, key_name, n)
          ON ck.queue = t.q AND ck.key = t.key_name
        ORDER BY ck.queue, ck.key
        FOR UPDATE OF ck
    LOOP
        IF row.max_queue_length IS NOT NULL AND row.waiting + row.n > row.max_queue_length THEN
            RAISE EXCEPTION 'queue full: key % in queue % has % waiting job(s), cap %',
                row.key, row.queue, row.waiting, row.max_queue_length
                USING ERRCODE = 'CVQ01',
                      DETAIL = json_build_object(
                          'queue', row.queue, 'key', row.key, 'waiting', row.waiting,
                          'incoming', row.n, 'cap', row.max_queue_length)::text;
        END IF;
    END LOOP;
    RETURN true;
END
$$;
