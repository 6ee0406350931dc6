-- The rescuer: jobs whose lease expired go back to the queue (or end), fenced.

-- name: job_rescue_candidates
-- Running jobs whose lease expired on the database clock, oldest expiry first.
SELECT id, lease_token, queue, attempt, max_attempts, worker_id
FROM conveyor.jobs
WHERE state = 'running'
  AND lease_expires_at < (SELECT conveyor.now())
ORDER BY lease_expires_at
LIMIT %(limit)s;

-- name: job_rescue_many
-- Rescue the candidates read before, re-checking state, token and expiry: a job
-- completed (or renewed) in between is left alone. A rescue counts as an attempt:
-- a job that kills its worker every time ends `failed`, not in a loop.
WITH target AS (
    SELECT * FROM unnest(%(id)s::bigint[], %(token)s::bigint[]) AS t(id, token)
),
rescued AS (
    UPDATE conveyor.jobs AS j
    SET state = (CASE
            WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
            WHEN j.attempt >= j.max_attempts THEN 'failed'
            WHEN %(backoff_base_s)s > 0 THEN 'scheduled'
            ELSE 'available' END)::conveyor.job_state,
        run_at = conveyor.window_next_open(
            (SELECT conveyor.now()) + make_interval(secs => least(
                -- The exponent is clamped: 2^1024 overflows float8 long after the cap applies.
                %(backoff_base_s)s * power(2::float8, least(greatest(j.attempt - 1, 0), 60)),
                %(backoff_max_s)s)),
            j.window_start, j.window_end, j.window_tz),
        finished_at = CASE
            WHEN j.cancel_requested_at IS NOT NULL OR j.attempt >= j.max_attempts
            THEN (SELECT conveyor.now()) END,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'at', (SELECT conveyor.now()),
            'attempt', j.attempt,
            'type', 'conveyor.LeaseExpired',
            'message', format('lease expired at %%s: worker %%s stopped heartbeating',
                              j.lease_expires_at, j.worker_id))),
        lease_token = NULL,
        lease_expires_at = NULL
    FROM target
    WHERE j.id = target.id
      AND j.lease_token = target.token
      AND j.state = 'running'
      AND j.lease_expires_at < (SELECT conveyor.now())
    RETURNING j.id, j.queue, j.state::text AS state
),
woken AS (
    SELECT count(pg_notify(%(channel)s, queue)) AS sent
    FROM (SELECT DISTINCT queue FROM rescued WHERE state = 'available') AS queues
)
SELECT rescued.id, rescued.state FROM rescued, woken;
