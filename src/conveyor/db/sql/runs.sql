-- Queries on pipeline runs, their steps, run state and checkpoints. The run's
-- life (what starts next, halting, cleanup, key lines) is decided in the
-- functions of migration 0009; these statements call them or read.

-- name: run_start
-- Create one run; it starts at once unless its key is busy.
SELECT * FROM conveyor.run_start(
    %(pipeline)s, %(key)s, %(input)s::jsonb, %(metadata)s::jsonb, %(steps)s::jsonb,
    %(cleanup)s::jsonb, %(channel)s);

-- name: run_get
-- One run by id.
SELECT * FROM conveyor.runs WHERE id = %(id)s;

-- name: run_get_many
-- Several runs by id.
SELECT * FROM conveyor.runs WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id;

-- name: run_steps_get
-- The steps of some runs, each with its current job's live state and timings.
SELECT s.*, j.state::text AS job_state, j.started_at, j.attempt AS job_attempt
FROM conveyor.run_steps AS s
LEFT JOIN conveyor.jobs AS j ON j.id = s.job_id
WHERE s.run_id = ANY(%(ids)s::bigint[])
ORDER BY s.run_id, s.position;

-- name: run_list
-- Recent runs, newest first, optionally of one pipeline and/or state.
SELECT * FROM conveyor.runs
WHERE (%(pipeline)s::text IS NULL OR pipeline = %(pipeline)s::text)
  AND (%(state)s::text IS NULL OR state::text = %(state)s::text)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: run_count_by_state
-- Runs per pipeline and state.
SELECT pipeline, state::text AS state, count(*) AS count
FROM conveyor.runs
GROUP BY pipeline, state
ORDER BY pipeline, state;

-- name: run_cancel
-- Cancel a run: its steps stop, nothing new starts, its cleanup is enqueued.
SELECT * FROM conveyor.run_cancel(%(id)s, %(reason)s, %(channel)s);

-- name: run_retry
-- Retry a failed or cancelled run from the steps that did not succeed.
SELECT * FROM conveyor.run_retry(%(id)s, %(channel)s);

-- name: run_job_context
-- What a step or cleanup job needs (see the function); NULL for other jobs.
SELECT conveyor.run_job_context(%(job_id)s) AS context;

-- name: run_data_get
-- The run's state document.
SELECT data FROM conveyor.runs WHERE id = %(run_id)s;

-- name: run_data_merge
-- Merge names into the run's state, if the writer still holds its job's lease
-- (fencing: a stale attempt's write is refused); `remove` deletes names. The
-- job row is share-locked so the lease cannot change hands before this commits
-- (job row, then run row: the order every other statement takes them in).
WITH fence AS (
    SELECT id FROM conveyor.jobs
    WHERE id = %(job_id)s AND run_id = %(run_id)s
      AND lease_token = %(token)s AND state = 'running'
    FOR SHARE
)
UPDATE conveyor.runs AS r
SET data = (r.data || %(patch)s::jsonb) - %(remove)s::text[]
WHERE r.id = %(run_id)s AND EXISTS (SELECT 1 FROM fence)
RETURNING r.id;

-- name: run_counter_get
-- One run counter (0 when never incremented), without reading the run's state.
SELECT coalesce((counters ->> %(name)s::text)::bigint, 0) AS value
FROM conveyor.runs
WHERE id = %(run_id)s;

-- name: run_counter_incr
-- Add to a run counter, fenced like run_data_merge; returns the new value.
WITH fence AS (
    SELECT id FROM conveyor.jobs
    WHERE id = %(job_id)s AND run_id = %(run_id)s
      AND lease_token = %(token)s AND state = 'running'
    FOR SHARE
)
UPDATE conveyor.runs AS r
SET counters = jsonb_set(
        r.counters, ARRAY[%(name)s::text],
        to_jsonb(coalesce((r.counters ->> %(name)s::text)::bigint, 0) + %(by)s::bigint))
WHERE r.id = %(run_id)s AND EXISTS (SELECT 1 FROM fence)
RETURNING (r.counters ->> %(name)s::text)::bigint AS value;

-- name: checkpoint_list
-- The recorded sub-step results of one job.
SELECT name, value FROM conveyor.checkpoints WHERE job_id = %(job_id)s;

-- name: checkpoint_insert
-- Record a sub-step result, if the writer still holds its job's lease.
INSERT INTO conveyor.checkpoints (job_id, name, value, created_at)
SELECT %(job_id)s, %(name)s, %(value)s::jsonb, (SELECT conveyor.now())
FROM (
    -- Share-locked: in an atomic sub-step the lease cannot change hands
    -- between this check and the commit of the caller's writes.
    SELECT id FROM conveyor.jobs
    WHERE id = %(job_id)s AND lease_token = %(token)s AND state = 'running'
    FOR SHARE
) AS fence
-- Recording the same name again (a statement retried after a lost connection)
-- keeps the first value and still answers, so the retry is harmless.
ON CONFLICT (job_id, name) DO UPDATE SET value = conveyor.checkpoints.value
RETURNING name;

-- name: run_promote_stranded
-- Safety net for the maintenance pass: a key whose line has waiting runs but
-- no running one starts its oldest (run_start closes this race itself; this
-- covers anything that slips past it).
SELECT conveyor.run_promote_next(w.pipeline, w.key, %(channel)s)
FROM (
    SELECT DISTINCT pipeline, key FROM conveyor.runs AS w
    WHERE state = 'waiting'
      AND NOT EXISTS (SELECT 1 FROM conveyor.runs AS r
                      WHERE r.pipeline = w.pipeline AND r.key = w.key
                        AND r.state = 'running')
) AS w;
