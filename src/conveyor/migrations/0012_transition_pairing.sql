-- 0012_transition_pairing: statement triggers pair each job's old and new row by
-- grouping on id, not by joining the two transition tables; one trigger counts
-- for both keys and queues.
--
-- The planner knows nothing of a transition table's size, and a trigger's query
-- plan is made once per session, at its first call: usually a claim of a few
-- rows, or an upsert that updated none. It then joined old and new rows in a
-- nested loop, for every later statement too: quadratic in the rows a
-- statement updates. An outcome batch of 200 jobs spent 9 ms of its 16 ms in
-- the two count triggers, and a 20,000-row admin update took over a minute.
-- Grouping has no quadratic plan: it hashes or sorts.
--
-- The counts are unchanged: a job's delta is its new state's counts minus its
-- old state's, for jobs whose state changed, under its new row's queue and key.
-- Keys are counted before queues, the order the two triggers ran in.

DROP TRIGGER jobs_count_keys_updated ON conveyor.jobs;
DROP TRIGGER jobs_count_queues_updated ON conveyor.jobs;
DROP FUNCTION conveyor.count_keys_updated();
DROP FUNCTION conveyor.count_queues_updated();

CREATE FUNCTION conveyor.count_jobs_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key_deltas jsonb;
    queue_deltas jsonb;
BEGIN
    WITH job AS (
        SELECT max(queue) FILTER (WHERE is_new) AS queue,
               max(key) FILTER (WHERE is_new) AS key,
               max(state) FILTER (WHERE is_new) AS n_state,
               max(state) FILTER (WHERE NOT is_new) AS o_state
        FROM (SELECT true AS is_new, id, queue, concurrency_key AS key, state FROM new_rows
              UNION ALL
              SELECT false, id, queue, concurrency_key, state FROM old_rows) AS sides
        GROUP BY id
    ),
    delta AS (
        -- Per queue and key (NULL for unkeyed jobs).
        SELECT queue, key,
               sum((n_state IN ('scheduled', 'available'))::int
                   - (o_state IN ('scheduled', 'available'))::int) AS waiting,
               sum((n_state = 'running')::int - (o_state = 'running')::int) AS running,
               0 AS enqueued,
               sum((n_state = 'succeeded')::int - (o_state = 'succeeded')::int) AS succeeded,
               sum((n_state = 'failed')::int - (o_state = 'failed')::int) AS failed,
               sum((n_state = 'cancelled')::int - (o_state = 'cancelled')::int) AS cancelled,
               sum((n_state = 'running' AND o_state <> 'running')::int) AS started
        FROM job
        WHERE o_state <> n_state
        GROUP BY queue, key
    )
    SELECT (SELECT jsonb_agg(d) FROM delta AS d WHERE key IS NOT NULL),
           (SELECT jsonb_agg(q)
            FROM (SELECT queue, sum(waiting) AS waiting, sum(running) AS running,
                         0 AS enqueued, sum(succeeded) AS succeeded, sum(failed) AS failed,
                         sum(cancelled) AS cancelled
                  FROM delta
                  GROUP BY queue) AS q)
    INTO key_deltas, queue_deltas;
    IF key_deltas IS NOT NULL THEN
        PERFORM conveyor.apply_key_deltas(key_deltas);
    END IF;
    IF queue_deltas IS NOT NULL THEN
        PERFORM conveyor.add_queue_deltas(queue_deltas);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_updated
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_jobs_updated();

CREATE OR REPLACE FUNCTION conveyor.advance_runs_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ended record;
BEGIN
    -- Most statements (claims, heartbeats, plain jobs) touch no step job.
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE run_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    FOR ended IN
        SELECT id, run_id, state, result, error, attempt
        FROM (
            SELECT id,
                   max(run_id) FILTER (WHERE is_new) AS run_id,
                   max(state) FILTER (WHERE is_new) AS state,
                   (array_agg(result) FILTER (WHERE is_new))[1] AS result,
                   (array_agg(error) FILTER (WHERE is_new))[1] AS error,
                   max(attempt) FILTER (WHERE is_new) AS attempt,
                   max(state) FILTER (WHERE NOT is_new) AS o_state
            FROM (SELECT true AS is_new, id, run_id, state, result, errors -> -1 AS error,
                         attempt
                  FROM new_rows
                  WHERE run_id IS NOT NULL
                  UNION ALL
                  SELECT false, id, run_id, state, NULL, NULL, attempt
                  FROM old_rows
                  WHERE run_id IS NOT NULL) AS sides
            GROUP BY id
        ) AS job
        WHERE run_id IS NOT NULL
          AND state IN ('succeeded', 'failed', 'cancelled')
          AND o_state NOT IN ('succeeded', 'failed', 'cancelled')
        ORDER BY run_id, id
    LOOP
        PERFORM conveyor.run_step_ended(ended.run_id, ended.id, ended.state, ended.result,
                                        ended.error, ended.attempt,
                                        TG_TABLE_SCHEMA || '.control');
    END LOOP;
    RETURN NULL;
END
$$;
