-- 0009_pipelines: pipeline runs, their steps, run state and task checkpoints.
--
-- A run's steps execute as ordinary jobs (jobs.run_id points back). Every
-- decision about what runs next is taken by the database in the transaction
-- that records a step's end: the trigger on conveyor.jobs below marks the step,
-- then starts the steps it unblocked, ends the run, or halts it and enqueues
-- its cleanup. A crash can therefore never separate "step done" from "next step
-- enqueued", and no worker-side bookkeeping can be lost.

CREATE TYPE conveyor.run_state AS ENUM ('waiting', 'running', 'succeeded', 'failed', 'cancelled');

CREATE TYPE conveyor.step_state AS ENUM (
    'pending',    -- waiting for the steps it depends on
    'enqueued',   -- its job exists (the job's own state says available/running)
    'succeeded', 'failed', 'cancelled',
    'skipped'     -- the run halted before it could start
);

CREATE TABLE conveyor.runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline text NOT NULL CHECK (pipeline <> ''),
    state conveyor.run_state NOT NULL,
    -- Runs sharing a key run one at a time, in start order.
    key text CHECK (key <> ''),
    input jsonb NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    -- Run-scoped state: one codec-encoded value per name.
    data jsonb NOT NULL DEFAULT '{}',
    counters jsonb NOT NULL DEFAULT '{}',
    -- The cleanup job to enqueue when the run fails or is cancelled:
    -- {task, queue, priority, max_attempts, timeout_ms}, or NULL for none.
    cleanup jsonb,
    cleanup_job_id bigint,
    failed_step text,
    error jsonb,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    CONSTRAINT runs_finished_iff_terminal CHECK (
        (state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)
    )
);

-- At most one running run per (pipeline, key): the arbiter of run_start.
CREATE UNIQUE INDEX runs_one_running_per_key ON conveyor.runs (pipeline, key)
    WHERE key IS NOT NULL AND state = 'running';
-- The FIFO line of runs waiting for their key.
CREATE INDEX runs_waiting_idx ON conveyor.runs (pipeline, key, id) WHERE state = 'waiting';
CREATE INDEX runs_state_idx ON conveyor.runs (state, pipeline);

CREATE TABLE conveyor.run_steps (
    run_id bigint NOT NULL REFERENCES conveyor.runs (id) ON DELETE CASCADE,
    name text NOT NULL,
    position integer NOT NULL,
    depends_on text[] NOT NULL,
    -- Every step it depends on, directly or not: whose results it receives.
    ancestors text[] NOT NULL,
    state conveyor.step_state NOT NULL,
    -- The step's current job; NULL while pending.
    job_id bigint UNIQUE,
    task text NOT NULL,
    queue text NOT NULL,
    priority smallint NOT NULL,
    max_attempts integer NOT NULL,
    timeout_ms integer,
    result jsonb,
    error jsonb,
    attempts integer NOT NULL DEFAULT 0,
    finished_at timestamptz,
    PRIMARY KEY (run_id, name)
);

ALTER TABLE conveyor.jobs ADD COLUMN run_id bigint;
CREATE INDEX jobs_run_idx ON conveyor.jobs (run_id) WHERE run_id IS NOT NULL;

-- `ctx.step(name, fn)` results, per job: a retried attempt returns them instead
-- of doing the work again.
CREATE TABLE conveyor.checkpoints (
    job_id bigint NOT NULL,
    name text NOT NULL,
    value jsonb,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (job_id, name)
);

-- What a step or cleanup job needs to run: its run, its step, and the results
-- of every step it depends on (for a cleanup: of every step that succeeded).
-- The claim returns it with each claimed step job, saving a round trip per step.
CREATE FUNCTION conveyor.run_job_context(p_job_id bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
$$;

-- Enqueue the jobs of every pending step of a running run whose dependencies
-- have all succeeded; end the run when every step has. The caller holds the
-- run's row lock.
CREATE FUNCTION conveyor.run_advance(p_run_id bigint, p_channel text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    run conveyor.runs;
BEGIN
    WITH ready AS (
        SELECT s.*
        FROM conveyor.run_steps AS s
        WHERE s.run_id = p_run_id
          AND s.state = 'pending'
          AND NOT EXISTS (
              SELECT 1 FROM conveyor.run_steps AS d
              WHERE d.run_id = s.run_id AND d.name = ANY(s.depends_on)
                AND d.state <> 'succeeded')
        ORDER BY s.position
    ),
    inserted AS (
        INSERT INTO conveyor.jobs (queue, task, args, state, priority, max_attempts, run_at,
                                   created_at, timeout_ms, run_id)
        SELECT queue, task, '{}', 'available', priority, max_attempts, conveyor.now(),
               conveyor.now(), timeout_ms, p_run_id
        FROM ready
        ORDER BY position
        RETURNING id, task
    )
    UPDATE conveyor.run_steps AS s
    SET state = 'enqueued', job_id = inserted.id, error = NULL, result = NULL,
        finished_at = NULL
    FROM inserted
    WHERE s.run_id = p_run_id AND s.task = inserted.task;

    IF NOT EXISTS (SELECT 1 FROM conveyor.run_steps
                   WHERE run_id = p_run_id AND state <> 'succeeded') THEN
        UPDATE conveyor.runs SET state = 'succeeded', finished_at = conveyor.now()
        WHERE id = p_run_id
        RETURNING * INTO run;
        PERFORM conveyor.run_promote_next(run.pipeline, run.key, p_channel);
    END IF;
END
$$;

-- Start the oldest run waiting for (pipeline, key) if none of the key runs.
-- Serialise every decision about one key's line (start, promote, retry) with a
-- transaction-level advisory lock on the key: whoever holds it sees the line as
-- the previous holder left it. Pipeline names hold no ':', so the lock name is
-- unambiguous. Lock order: a run row of the key's running (or retried) run,
-- then this lock, then the waiting run a promotion starts; a waiting run's
-- cancel never takes this lock (run_halt).
CREATE FUNCTION conveyor.lock_run_key(p_pipeline text, p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('conveyor.run-key:' || p_pipeline || ':' || p_key, 0))
$$;

CREATE FUNCTION conveyor.run_promote_next(p_pipeline text, p_key text, p_channel text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    next_id bigint;
BEGIN
    IF p_key IS NULL THEN
        RETURN;
    END IF;
    PERFORM conveyor.lock_run_key(p_pipeline, p_key);
    IF EXISTS (SELECT 1 FROM conveyor.runs
               WHERE pipeline = p_pipeline AND key = p_key AND state = 'running') THEN
        RETURN;
    END IF;
    SELECT id INTO next_id FROM conveyor.runs
    WHERE pipeline = p_pipeline AND key = p_key AND state = 'waiting'
    ORDER BY id
    LIMIT 1
    FOR UPDATE;
    IF next_id IS NULL THEN
        RETURN;
    END IF;
    UPDATE conveyor.runs SET state = 'running', started_at = conveyor.now() WHERE id = next_id;
    PERFORM conveyor.run_advance(next_id, p_channel);
END
$$;

-- Halt a run: it ends `p_state` (failed or cancelled); steps that never started
-- are skipped; its waiting step jobs are cancelled and running ones asked to
-- stop; the cleanup job is enqueued, once, in this same transaction; the next
-- run of its key may start. The caller holds the run's row lock.
CREATE FUNCTION conveyor.run_halt(
    p_run_id bigint, p_state conveyor.run_state, p_failed_step text, p_error jsonb,
    p_channel text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    run conveyor.runs;
    was_running boolean;
    cleanup_id bigint;
    told bigint;
BEGIN
    SELECT state = 'running' INTO was_running FROM conveyor.runs WHERE id = p_run_id;
    UPDATE conveyor.runs
    SET state = p_state, failed_step = p_failed_step, error = p_error,
        finished_at = conveyor.now()
    WHERE id = p_run_id
    RETURNING * INTO run;

    UPDATE conveyor.run_steps SET state = 'skipped'
    WHERE run_id = p_run_id AND state = 'pending';

    -- Stop the run's other jobs. SKIP LOCKED: a sibling's row is locked only by a
    -- transaction that is ending it (it will find the run halted and start
    -- nothing), claiming it, or writing its run state; waiting for those rows
    -- while holding the run row could deadlock with them. Every running sibling
    -- is told by NOTIFY, and a worker's heartbeat reports any job whose run
    -- halted as cancelled, so a sibling skipped here stops within a heartbeat.
    -- Each job cancelled here fires this trigger again, which records its step.
    WITH siblings AS (
        SELECT id, state FROM conveyor.jobs
        WHERE run_id = p_run_id AND state IN ('scheduled', 'available', 'running')
          AND id <> coalesce(run.cleanup_job_id, 0)
        ORDER BY id
        FOR UPDATE SKIP LOCKED
    ),
    waiting AS (
        UPDATE conveyor.jobs AS j
        SET state = 'cancelled',
            finished_at = conveyor.now(),
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'at', conveyor.now(), 'attempt', j.attempt,
                'type', 'conveyor.Cancelled', 'message', 'the run ended ' || p_state::text))
        FROM siblings
        WHERE j.id = siblings.id AND siblings.state IN ('scheduled', 'available')
    )
    UPDATE conveyor.jobs AS j
    SET cancel_requested_at = conveyor.now()
    FROM siblings
    WHERE j.id = siblings.id AND siblings.state = 'running' AND j.cancel_requested_at IS NULL;

    SELECT count(pg_notify(p_channel, json_build_object(
        'kind', 'cancel', 'job_id', j.id, 'worker_id', j.worker_id)::text))
    INTO told
    FROM conveyor.jobs AS j
    WHERE j.run_id = p_run_id AND j.state = 'running'
      AND j.id <> coalesce(run.cleanup_job_id, 0);

    IF run.cleanup IS NOT NULL THEN
        INSERT INTO conveyor.jobs (queue, task, args, state, priority, max_attempts, run_at,
                                   created_at, timeout_ms, run_id)
        VALUES (run.cleanup->>'queue', run.cleanup->>'task', '{}', 'available',
                (run.cleanup->>'priority')::smallint, (run.cleanup->>'max_attempts')::integer,
                conveyor.now(), conveyor.now(), (run.cleanup->>'timeout_ms')::integer, p_run_id)
        RETURNING id INTO cleanup_id;
        UPDATE conveyor.runs SET cleanup_job_id = cleanup_id WHERE id = p_run_id;
    END IF;

    -- Only a running run frees its key. (A waiting run's cancel must not take
    -- the key lock: it holds that run's row, which a promotion may be after.)
    IF was_running THEN
        PERFORM conveyor.run_promote_next(run.pipeline, run.key, p_channel);
    END IF;
END
$$;

-- A step job ended (succeeded, failed or cancelled): record it, then move the
-- run on. A job that is not its step's current one (a superseded attempt of a
-- retried run, or the cleanup job) changes nothing.
CREATE FUNCTION conveyor.run_step_ended(
    p_run_id bigint, p_job_id bigint, p_state conveyor.job_state, p_result jsonb,
    p_error jsonb, p_attempt integer, p_channel text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    run conveyor.runs;
    step_name text;
BEGIN
    SELECT * INTO run FROM conveyor.runs WHERE id = p_run_id FOR UPDATE;
    UPDATE conveyor.run_steps
    SET state = p_state::text::conveyor.step_state,
        result = CASE WHEN p_state = 'succeeded' THEN p_result END,
        error = CASE WHEN p_state <> 'succeeded' THEN p_error END,
        attempts = p_attempt,
        finished_at = conveyor.now()
    WHERE run_id = p_run_id AND job_id = p_job_id AND state = 'enqueued'
    RETURNING name INTO step_name;
    IF step_name IS NULL OR run.state <> 'running' THEN
        RETURN;
    END IF;
    IF p_state = 'succeeded' THEN
        PERFORM conveyor.run_advance(p_run_id, p_channel);
    ELSE
        PERFORM conveyor.run_halt(
            p_run_id,
            (CASE WHEN p_state = 'failed' THEN 'failed' ELSE 'cancelled' END)::conveyor.run_state,
            step_name, p_error, p_channel);
    END IF;
END
$$;

-- Runs are moved on in run id order, so two transactions ending steps of the
-- same runs lock those runs in the same order.
CREATE FUNCTION conveyor.advance_runs_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ended record;
BEGIN
    -- Most statements (claims, heartbeats, plain jobs) touch no step job.
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE run_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    FOR ended IN
        SELECT n.id, n.run_id, n.state, n.result, n.errors -> -1 AS error, n.attempt
        FROM new_rows AS n
        JOIN old_rows AS o USING (id)
        WHERE n.run_id IS NOT NULL
          AND n.state IN ('succeeded', 'failed', 'cancelled')
          AND o.state NOT IN ('succeeded', 'failed', 'cancelled')
        ORDER BY n.run_id, n.id
    LOOP
        PERFORM conveyor.run_step_ended(ended.run_id, ended.id, ended.state, ended.result,
                                        ended.error, ended.attempt,
                                        TG_TABLE_SCHEMA || '.control');
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_advance_runs
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.advance_runs_updated();

-- Create a run (inside the caller's transaction when it gives one). Without a
-- key it starts at once. With a key it starts only if no run of that key is
-- running and none is waiting before it; otherwise it waits its turn. A keyed
-- start in the caller's transaction holds the key lock until it commits.
CREATE FUNCTION conveyor.run_start(
    p_pipeline text, p_key text, p_input jsonb, p_metadata jsonb, p_steps jsonb,
    p_cleanup jsonb, p_channel text
) RETURNS conveyor.runs
LANGUAGE plpgsql AS $$
DECLARE
    run conveyor.runs;
BEGIN
    IF p_key IS NULL THEN
        INSERT INTO conveyor.runs (pipeline, state, input, metadata, cleanup, created_at,
                                   started_at)
        VALUES (p_pipeline, 'running', p_input, p_metadata, p_cleanup, conveyor.now(),
                conveyor.now())
        RETURNING * INTO run;
    ELSE
        -- Under the key lock the line cannot change. A run of the key that is
        -- ending right now (its transaction not yet committed) still looks
        -- running: this run then waits, and that run's end, which takes the key
        -- lock after this transaction commits, starts it.
        PERFORM conveyor.lock_run_key(p_pipeline, p_key);
        INSERT INTO conveyor.runs (pipeline, state, key, input, metadata, cleanup, created_at,
                                   started_at)
        SELECT p_pipeline, busy.state, p_key, p_input, p_metadata, p_cleanup, conveyor.now(),
               CASE WHEN busy.state = 'running' THEN conveyor.now() END
        FROM (SELECT (CASE WHEN EXISTS (
                          SELECT 1 FROM conveyor.runs
                          WHERE pipeline = p_pipeline AND key = p_key
                            AND state IN ('running', 'waiting'))
                      THEN 'waiting' ELSE 'running' END)::conveyor.run_state AS state) AS busy
        RETURNING * INTO run;
    END IF;

    INSERT INTO conveyor.run_steps (run_id, name, position, depends_on, ancestors, state,
                                    task, queue, priority, max_attempts, timeout_ms)
    SELECT run.id, s.name, s.position, s.depends_on, s.ancestors, 'pending', s.task, s.queue,
           s.priority, s.max_attempts, s.timeout_ms
    FROM jsonb_to_recordset(p_steps) AS s(name text, position integer, depends_on text[],
                                          ancestors text[], task text, queue text,
                                          priority smallint, max_attempts integer,
                                          timeout_ms integer);

    IF run.state = 'running' THEN
        PERFORM conveyor.run_advance(run.id, p_channel);
    END IF;
    SELECT * INTO run FROM conveyor.runs WHERE id = run.id;
    RETURN run;
END
$$;

-- Cancel a run: steps stop, nothing new starts, the cleanup runs. Returns the
-- run; a run that already ended is returned unchanged.
CREATE FUNCTION conveyor.run_cancel(p_run_id bigint, p_reason text, p_channel text)
RETURNS conveyor.runs
LANGUAGE plpgsql AS $$
DECLARE
    run conveyor.runs;
BEGIN
    -- Job rows first, then the run: the order a step's end takes them in.
    PERFORM 1 FROM conveyor.jobs
    WHERE run_id = p_run_id AND state IN ('scheduled', 'available', 'running')
    ORDER BY id
    FOR UPDATE;
    SELECT * INTO run FROM conveyor.runs WHERE id = p_run_id FOR UPDATE;
    IF run.id IS NULL OR run.state NOT IN ('waiting', 'running') THEN
        RETURN run;
    END IF;
    PERFORM conveyor.run_halt(p_run_id, 'cancelled', NULL,
                              jsonb_build_object('type', 'conveyor.RunCancelled',
                                                 'message', p_reason),
                              p_channel);
    SELECT * INTO run FROM conveyor.runs WHERE id = p_run_id;
    RETURN run;
END
$$;

-- Retry a failed or cancelled run from where it stopped: succeeded steps keep
-- their results and never run again; the others run anew. Raises CVR01 for a
-- run that is not failed or cancelled, or whose cancelled step or cleanup job
-- has not ended yet (each failure's cleanup runs before the retry).
CREATE FUNCTION conveyor.run_retry(p_run_id bigint, p_channel text)
RETURNS conveyor.runs
LANGUAGE plpgsql AS $$
DECLARE
    run conveyor.runs;
BEGIN
    SELECT * INTO run FROM conveyor.runs WHERE id = p_run_id FOR UPDATE;
    IF run.id IS NULL THEN
        RETURN run;
    END IF;
    IF run.state NOT IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: only failed or cancelled runs can be retried',
            p_run_id, run.state USING ERRCODE = 'CVR01';
    END IF;
    IF EXISTS (SELECT 1 FROM conveyor.jobs
               WHERE run_id = p_run_id AND state IN ('scheduled', 'available', 'running')) THEN
        RAISE EXCEPTION 'run % has a step or its cleanup still to finish: retry once they ended',
            p_run_id USING ERRCODE = 'CVR01';
    END IF;
    IF run.key IS NOT NULL THEN
        PERFORM conveyor.lock_run_key(run.pipeline, run.key);
    END IF;
    UPDATE conveyor.run_steps
    SET state = 'pending', job_id = NULL, error = NULL, finished_at = NULL
    WHERE run_id = p_run_id AND state IN ('failed', 'cancelled', 'skipped', 'enqueued');
    UPDATE conveyor.runs
    SET state = (CASE WHEN key IS NOT NULL AND EXISTS (
                     SELECT 1 FROM conveyor.runs AS other
                     WHERE other.pipeline = runs.pipeline AND other.key = runs.key
                       AND other.state IN ('running', 'waiting'))
                 THEN 'waiting' ELSE 'running' END)::conveyor.run_state,
        failed_step = NULL, error = NULL, finished_at = NULL, cleanup_job_id = NULL,
        started_at = NULL
    WHERE id = p_run_id
    RETURNING * INTO run;
    IF run.state = 'running' THEN
        UPDATE conveyor.runs SET started_at = conveyor.now() WHERE id = p_run_id;
        PERFORM conveyor.run_advance(p_run_id, p_channel);
    ELSE
        PERFORM conveyor.run_promote_next(run.pipeline, run.key, p_channel);
    END IF;
    SELECT * INTO run FROM conveyor.runs WHERE id = p_run_id;
    RETURN run;
END
$$;
