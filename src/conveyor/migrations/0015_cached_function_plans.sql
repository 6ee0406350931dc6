-- 0015_cached_function_plans: the SQL functions that hot statements call are
-- rewritten in PL/pgSQL, whose plans live as long as the session instead of
-- one call site of one statement. Same bodies, same results.
--
-- PostgreSQL plans the body of an SQL function that it cannot inline again
-- at each call site of each statement. Measured: 16 us a call for
-- conveyor.now(), 3 us in PL/pgSQL.
-- - conveyor.now() reads the clock table, so it cannot be inlined, and the
--   hot statements mention it several times each (a claim eight times, as
--   `(SELECT conveyor.now())`, once per mention and statement): about 0.1 ms
--   of every claim. STABLE as before: it reads the clock table as of the
--   calling statement.
-- - add_queue_deltas is an INSERT, which is never inlined; every count
--   trigger calls it (every enqueue, claim, outcome and delete).
-- - run_job_context runs for each claimed pipeline job.
CREATE OR REPLACE FUNCTION conveyor.now() RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN coalesce(
        nullif(current_setting('conveyor_clock.fake_now', true), '')::timestamptz,
        (SELECT fake_now FROM conveyor.clock),
        statement_timestamp()
    );
END
$$;

CREATE OR REPLACE FUNCTION conveyor.add_queue_deltas(deltas jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conveyor.queue_stats (queue, waiting, running, total_enqueued,
                                      total_succeeded, total_failed, total_cancelled)
    SELECT d.queue, d.waiting, d.running, d.enqueued, d.succeeded, d.failed, d.cancelled
    FROM jsonb_to_recordset(deltas) AS d(queue text, waiting integer, running integer,
                                         enqueued integer, succeeded integer,
                                         failed integer, cancelled integer);
END
$$;

CREATE OR REPLACE FUNCTION conveyor.run_job_context(p_job_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT jsonb_build_object(
            'run_id', r.id, 'pipeline', r.pipeline, 'run_state', r.state, 'input', r.input,
            'metadata', r.metadata, 'failed_step', r.failed_step, 'run_error', r.error,
            'cleanup_job_id', r.cleanup_job_id, 'step', s.name,
            'prev_results', (
                SELECT coalesce(jsonb_object_agg(a.name, a.result), '{}')
                FROM conveyor.run_steps AS a
                WHERE a.run_id = r.id
                  AND a.state = 'succeeded'
                  AND (s.name IS NULL OR a.name = ANY(s.ancestors))))
        FROM conveyor.jobs AS j
        JOIN conveyor.runs AS r ON r.id = j.run_id
        LEFT JOIN conveyor.run_steps AS s ON s.job_id = j.id
        WHERE j.id = p_job_id
    );
END
$$;
