-- Queries on conveyor.workers: registry, heartbeat, remote stop.

-- name: worker_register
-- Record a new worker process incarnation.
INSERT INTO conveyor.workers (id, host, pid, version, schema_version, queues, concurrency,
                              state, started_at, heartbeat_at, stats)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(schema_version)s, %(queues)s::text[],
        %(concurrency)s, %(state)s::conveyor.worker_state, (SELECT conveyor.now()), (SELECT conveyor.now()),
        %(stats)s::jsonb)
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: worker_heartbeat
-- One round trip per beat: renew the leases this worker holds, refresh its row,
-- and read back remote signals (stop requested, jobs whose cancel was requested).
WITH held AS (
    SELECT * FROM unnest(%(job_id)s::bigint[], %(token)s::bigint[]) AS l(id, token)
),
lockable AS (
    -- Only rows whose token still matches: a lease lost to the rescuer stays lost.
    -- Rows another transaction holds right now (this worker's own outcome write
    -- waiting on a key row, a cancel) are skipped, never waited for: a heartbeat
    -- that blocks would let every other lease of this worker run out.
    SELECT j.id
    FROM conveyor.jobs AS j
    JOIN held ON j.id = held.id
    WHERE j.lease_token = held.token
      AND j.state = 'running'
    FOR UPDATE OF j SKIP LOCKED
),
renewed AS (
    UPDATE conveyor.jobs AS j
    SET lease_expires_at = (SELECT conveyor.now()) + make_interval(secs => %(lease_s)s)
    FROM lockable
    WHERE j.id = lockable.id
    -- A pipeline step whose run halted is as good as cancelled (the halt could
    -- not lock this row to flag it; see run_halt).
    RETURNING j.id,
              j.cancel_requested_at IS NOT NULL
              OR (j.run_id IS NOT NULL AND EXISTS (
                  SELECT 1 FROM conveyor.runs AS r
                  WHERE r.id = j.run_id AND r.state <> 'running'
                    AND j.id IS DISTINCT FROM r.cleanup_job_id)) AS cancel_requested
),
busy AS (
    -- Still ours as of this statement, only locked by someone else: not lost.
    SELECT held.id
    FROM held
    JOIN conveyor.jobs AS j ON j.id = held.id
    WHERE j.lease_token = held.token
      AND j.state = 'running'
      AND held.id NOT IN (SELECT id FROM lockable)
),
me AS (
    -- A worker wrongly marked dead (a long pause) comes back in the state it
    -- knows it is in (running, or stopping once its shutdown began).
    UPDATE conveyor.workers
    SET heartbeat_at = (SELECT conveyor.now()),
        state = CASE WHEN state = 'dead' THEN %(own_state)s::conveyor.worker_state
                     ELSE state END,
        running_jobs = %(running_jobs)s,
        leaked_slots = %(leaked_slots)s,
        stats = %(stats)s::jsonb
    WHERE id = %(worker_id)s
    RETURNING stop_requested_at IS NOT NULL AS stop_requested
)
SELECT coalesce((SELECT stop_requested FROM me), false) AS stop_requested,
       (SELECT count(*) FROM me) = 1 AS registered,
       coalesce((SELECT array_agg(id) FROM renewed), '{}') AS renewed,
       coalesce((SELECT array_agg(id) FROM busy), '{}') AS busy,
       coalesce((SELECT array_agg(id) FROM renewed WHERE cancel_requested), '{}') AS cancel;

-- name: worker_set_state
-- Mark this worker stopping or stopped.
UPDATE conveyor.workers
SET state = %(state)s::conveyor.worker_state,
    stopped_at = CASE WHEN %(state)s::conveyor.worker_state = 'stopped' THEN (SELECT conveyor.now()) END,
    heartbeat_at = (SELECT conveyor.now()),
    running_jobs = %(running_jobs)s,
    leaked_slots = %(leaked_slots)s,
    stats = %(stats)s::jsonb
WHERE id = %(worker_id)s;

-- name: worker_mark_dead
-- Workers silent for longer than `dead_after_s` are dead (their leases expire on their own).
UPDATE conveyor.workers
SET state = 'dead'
WHERE state IN ('running', 'stopping')
  AND heartbeat_at < (SELECT conveyor.now()) - make_interval(secs => %(dead_after_s)s)
RETURNING id;

-- name: worker_request_stop
-- Ask one worker (or every live one, when id is NULL) to drain and exit.
WITH asked AS (
    UPDATE conveyor.workers
    SET stop_requested_at = coalesce(stop_requested_at, (SELECT conveyor.now()))
    WHERE (%(worker_id)s::text IS NULL OR id = %(worker_id)s::text)
      AND state IN ('running', 'stopping')
    RETURNING id
),
told AS (
    -- The heartbeat reads the flag too; NOTIFY just makes it immediate.
    SELECT count(pg_notify(%(channel)s, json_build_object('kind', 'stop', 'worker_id', id)::text))
    FROM asked
)
SELECT asked.id FROM asked, told ORDER BY asked.id;

-- name: worker_list
-- Every worker, newest first, with its heartbeat age on the database clock.
SELECT *, extract(epoch FROM (SELECT conveyor.now()) - heartbeat_at)::float8 AS heartbeat_age_s
FROM conveyor.workers
WHERE (%(live_only)s::boolean IS FALSE OR state IN ('running', 'stopping'))
ORDER BY started_at DESC, id;
