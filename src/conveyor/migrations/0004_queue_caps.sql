-- 0004_queue_caps: a maximum queue length per concurrency key.
--
-- Enqueues create their keys and check the caps in one function, before the
-- jobs are inserted: it upserts each key, locks the key rows in key order (so
-- concurrent enqueues to one key queue up here, and never deadlock), and
-- refuses the whole statement when a key would go past its cap.

ALTER TABLE conveyor.concurrency_keys
    ADD COLUMN max_queue_length integer CHECK (max_queue_length > 0),
    ADD CONSTRAINT concurrency_keys_key_not_empty CHECK (key <> '');

CREATE FUNCTION conveyor.prepare_keys(
    queues text[], keys text[], limits integer[], caps integer[], incoming integer[]
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    row record;
BEGIN
    IF keys IS NULL THEN
        RETURN true;
    END IF;
    -- A key's limit and cap are set by its first enqueue; later changes go
    -- through key_set_limit, which an enqueue never overrides.
    INSERT INTO conveyor.concurrency_keys (queue, key, concurrency_limit, max_queue_length)
    SELECT t.q, t.key_name, t.lim, t.cap
    FROM unnest(queues, keys, limits, caps) AS t(q, key_name, lim, cap)
    ORDER BY t.q, t.key_name
    ON CONFLICT (queue, key) DO NOTHING;

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
