-- Queries on conveyor.jobs. Parameters are named; every array parameter of a
-- batch statement has one element per job.
--
-- The database clock is read as `(SELECT conveyor.now())`, in this file and the
-- others: a scalar sub-select runs once per statement, while a bare call of
-- conveyor.now() (an SQL function reading the fake-clock table, which PostgreSQL
-- cannot inline) ran once per row and per mention, half of a bulk insert's time.

-- name: job_insert_many
-- Insert a batch of jobs in one statement; run times come from the database clock.
WITH input AS (
    -- One row per job, in the caller's order (ord), so ids follow that order.
    -- Binary arrays (%()b): psycopg dumps them in about a third of the text time.
    -- An array may be NULL when no job sets that column: unnest pads it with NULLs.
    SELECT *
    FROM unnest(
        %(queue)b::text[], %(task)b::text[], %(args)b::text[], %(priority)b::smallint[],
        %(max_attempts)b::integer[], %(run_at)b::timestamptz[], %(delay_s)b::float8[],
        %(timeout_ms)b::integer[], %(meta)b::text[], %(concurrency_key)b::text[],
        %(concurrency_limit)b::integer[], %(max_queue_length)b::integer[],
        %(window_start)b::time[], %(window_end)b::time[], %(window_tz)b::text[],
        %(dedup_key)b::text[], %(rate_limit)b::integer[], %(rate_period_s)b::float8[]
    ) WITH ORDINALITY AS i(queue, task, args, priority, max_attempts, run_at, delay_s,
                           timeout_ms, meta, concurrency_key, concurrency_limit,
                           max_queue_length, window_start, window_end, window_tz,
                           dedup_key, rate_limit, rate_period_s, ord)
),
keys_ready AS (
    -- Create the batch's keys, lock them, and refuse the whole batch (SQLSTATE
    -- CVQ01) if one would pass its cap: all or nothing.
    SELECT conveyor.prepare_keys(
        array_agg(queue), array_agg(key), array_agg(lim), array_agg(cap), array_agg(n),
        array_agg(rate), array_agg(period)
    ) AS ready
    FROM (
        SELECT queue, concurrency_key AS key, min(concurrency_limit) AS lim,
               min(max_queue_length) AS cap, count(*)::integer AS n,
               min(rate_limit) AS rate, min(rate_period_s) AS period
        FROM input
        WHERE concurrency_key IS NOT NULL
        GROUP BY queue, concurrency_key
    ) AS per_key
),
timed AS (
    -- An explicit run_at wins; otherwise now + delay on the database clock; then
    -- the next opening of the job's execution window, if it has one.
    SELECT input.*,
           CASE WHEN window_tz IS NULL
                THEN coalesce(run_at, (SELECT conveyor.now()) + make_interval(secs => delay_s))
                -- A windowed job due in the past is due now: its window must be open now.
                ELSE conveyor.window_next_open(
                    greatest(coalesce(run_at, (SELECT conveyor.now()) + make_interval(secs => delay_s)),
                             (SELECT conveyor.now())),
                    window_start, window_end, window_tz)
           END AS due
    FROM input
)
INSERT INTO conveyor.jobs (queue, task, args, state, priority, max_attempts, run_at,
                           created_at, timeout_ms, meta, concurrency_key,
                           window_start, window_end, window_tz, dedup_key)
SELECT queue, task, args::jsonb,
       (CASE WHEN due > (SELECT conveyor.now()) THEN 'scheduled' ELSE 'available' END)::conveyor.job_state,
       priority, max_attempts, due, (SELECT conveyor.now()), timeout_ms, meta::jsonb, concurrency_key,
       window_start, window_end, window_tz, dedup_key
FROM timed, keys_ready
WHERE keys_ready.ready
ORDER BY ord
-- A live job of the same task and dedup key wins: this row is dropped and the
-- caller reads the existing job (job_get_by_dedup_keys). When superseding, a
-- waiting one instead takes this enqueue's arguments and options, keeping its
-- id, history, queue and concurrency key; a running one is left alone (see
-- job_supersede_running). A batch never holds one key twice (enqueue_plan).
ON CONFLICT (task, dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('scheduled', 'available', 'running')
    DO UPDATE SET args = excluded.args,
                  priority = excluded.priority,
                  max_attempts = excluded.max_attempts,
                  run_at = excluded.run_at,
                  state = excluded.state,
                  timeout_ms = excluded.timeout_ms,
                  meta = excluded.meta,
                  window_start = excluded.window_start,
                  window_end = excluded.window_end,
                  window_tz = excluded.window_tz
    WHERE %(supersede)s::boolean AND conveyor.jobs.state IN ('scheduled', 'available')
-- What the database decided; the rest of a new job's row is what the caller
-- sent (enqueue_plan.assemble), which saves parsing whole rows in bulk. A row
-- with a dedup key may be an older job's: the caller reads those whole.
RETURNING id, task, dedup_key, state, run_at, created_at;

-- name: job_claim_many
-- Claim up to `limit` due jobs for one worker. Unkeyed jobs: highest priority,
-- then oldest run time, then id. Keyed jobs: strict id (enqueue) order within
-- their key, and never more running than the key's limit across all workers.
WITH unkeyed AS (
    -- Per queue, an ordered walk of jobs_claim_idx that stops after `limit` rows
    -- (queue = ANY(...) would force a sort of every due job); SKIP LOCKED lets
    -- concurrent claimers take disjoint rows without waiting.
    SELECT picked.*
    FROM unnest((SELECT %(queues)s::text[])) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at
        FROM conveyor.jobs
        WHERE state IN ('scheduled', 'available')
          AND concurrency_key IS NULL
          AND queue = q.name
          AND run_at <= (SELECT conveyor.now())
          AND conveyor.in_window((SELECT conveyor.now()), window_start, window_end, window_tz)
        ORDER BY priority DESC, run_at, id
        LIMIT (SELECT %(limit)s::integer)
        FOR UPDATE SKIP LOCKED
    ) AS picked
),
free_keys AS (
    -- Keys with room and waiting work, least recently served first. Locking the
    -- key row makes this claimer the only one starting jobs of that key, so the
    -- running count read here cannot go stale before this statement commits.
    -- A key's room is the lesser of its concurrency and its rate budget.
    -- Per queue, an ordered walk of concurrency_keys_waiting_idx that stops
    -- after `limit` keys, as for unkeyed jobs: not every key with work is
    -- probed for a due job and sorted at every claim.
    SELECT picked.*
    FROM unnest((SELECT %(queues)s::text[])) AS q(name)
    CROSS JOIN LATERAL (
        SELECT queue, key,
               least(concurrency_limit - running,
                     conveyor.rate_room(rate_limit, rate_period_s, rate_window_start,
                                        rate_window_count)) AS free
        FROM conveyor.concurrency_keys
        WHERE queue = q.name
          AND waiting > 0
          AND running < concurrency_limit
          AND conveyor.rate_room(rate_limit, rate_period_s, rate_window_start,
                                 rate_window_count) > 0
          -- Only keys with a due job: keys whose jobs all wait for a delay or a
          -- window must not use up the LIMIT and starve keys with work to do.
          -- OFFSET 0 keeps this a per-key probe that stops at the first due job;
          -- as a semi-join the planner bitmap-scanned every due job of the key
          -- (200,000 waiting on one key: 3.4 ms per claim, growing with the
          -- backlog). ORDER BY run_at keeps it a probe on the partitioned table:
          -- there the planner weighs an unordered scan of the partitions by its
          -- total cost (a bitmap scan again), an ordered one by its first row's.
          AND EXISTS (
              SELECT 1 FROM conveyor.jobs AS j
              WHERE j.queue = concurrency_keys.queue
                AND j.concurrency_key = concurrency_keys.key
                AND j.state IN ('scheduled', 'available')
                AND j.run_at <= (SELECT conveyor.now())
                AND conveyor.in_window((SELECT conveyor.now()), j.window_start, j.window_end,
                                       j.window_tz)
              ORDER BY j.run_at OFFSET 0
          )
        ORDER BY served_at
        LIMIT (SELECT %(limit)s::integer)
        FOR UPDATE SKIP LOCKED
    ) AS picked
),
keyed AS (
    -- The first `free` due jobs of each key, by id. Under the key lock no other
    -- claimer touches them; the only other statement that locks waiting jobs is a
    -- cancel, which ends them: skipping its rows keeps FIFO, and waiting for them
    -- would deadlock (the cancel's trigger then waits for this key row).
    SELECT picked.*, fk.key
    FROM free_keys AS fk
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at
        FROM conveyor.jobs
        WHERE state IN ('scheduled', 'available')
          AND queue = fk.queue
          AND concurrency_key = fk.key
          AND run_at <= (SELECT conveyor.now())
          AND conveyor.in_window((SELECT conveyor.now()), window_start, window_end, window_tz)
        ORDER BY id
        LIMIT fk.free
        FOR UPDATE SKIP LOCKED
    ) AS picked
),
candidates AS (
    -- Keyed jobs sort as a block behind their key's head, so the final LIMIT
    -- can only cut a key's tail, never take a later job before an earlier one.
    SELECT id, priority AS sort_priority, run_at AS sort_run_at, id AS sort_id, 0 AS rank
    FROM unkeyed
    UNION ALL
    SELECT id,
           first_value(priority) OVER w,
           first_value(run_at) OVER w,
           first_value(id) OVER w,
           row_number() OVER w
    FROM keyed
    WINDOW w AS (PARTITION BY key ORDER BY id)
),
chosen AS (
    SELECT id FROM candidates
    ORDER BY sort_priority DESC, sort_run_at, sort_id, rank
    LIMIT (SELECT %(limit)s::integer)
)
UPDATE conveyor.jobs AS j
SET state = 'running',
    attempt = j.attempt + 1,
    started_at = (SELECT conveyor.now()),
    lease_token = nextval('conveyor.lease_token_seq'),
    lease_expires_at = (SELECT conveyor.now()) + make_interval(secs => %(lease_s)s),
    worker_id = %(worker_id)s
-- An id array, not a join: the plan stays a primary-key lookup even when it is
-- generic (planned once, not at every claim), where a join would hash the table.
WHERE j.id = ANY(ARRAY(SELECT id FROM chosen))
  AND j.state IN ('scheduled', 'available')
-- A pipeline step's run context comes with it (one round trip per claim, not per step).
-- `more`: whether a claim right after this one could find work. False when every
-- walk ended before its limit and every candidate was taken: the queues are
-- drained and the keys seen are at their limits, for now. A claim that takes
-- exactly a key's room is then known to be all there is, without a second,
-- empty claim to find out.
RETURNING j.*, CASE WHEN j.run_id IS NOT NULL THEN conveyor.run_job_context(j.id) END
                   AS run_context,
          ((SELECT count(*) FROM unkeyed) >= (SELECT %(limit)s::integer)
           OR (SELECT count(*) FROM free_keys) >= (SELECT %(limit)s::integer)
           OR (SELECT count(*) FROM candidates) > (SELECT %(limit)s::integer)) AS more;

-- name: job_finish_many
-- Record a batch of attempt outcomes; a row whose lease token is stale is left alone (fencing).
WITH outcome AS (
    SELECT *
    -- Binary arrays (%()b), as in job_insert_many: a third of the dumping time.
    FROM unnest(
        %(id)b::bigint[], %(token)b::bigint[], %(state)b::text[], %(result)b::text[],
        %(error)b::text[], %(retry_in_s)b::float8[], %(refund)b::boolean[]
    ) AS o(id, token, state, result, error, retry_in_s, refund)
),
resolved AS (
    -- 'retry' becomes scheduled or available depending on the delay.
    SELECT outcome.*,
           (CASE WHEN state <> 'retry' THEN state
                 WHEN retry_in_s > 0 THEN 'scheduled'
                 ELSE 'available' END)::conveyor.job_state AS next_state
    FROM outcome
),
updated AS (
    -- A pending cancel request wins over any retry (failure, snooze, shutdown
    -- return): read from the locked row itself, so a cancel that commits while
    -- this statement waits for the row is still seen.
    UPDATE conveyor.jobs AS j
    SET state = (CASE WHEN r.state = 'retry' AND j.cancel_requested_at IS NOT NULL
                      THEN 'cancelled'
                      -- A retry may land outside the job's window: it waits for the opening.
                      WHEN r.state = 'retry' AND conveyor.window_next_open(
                               (SELECT conveyor.now()) + make_interval(secs => r.retry_in_s),
                               j.window_start, j.window_end, j.window_tz) > (SELECT conveyor.now())
                      THEN 'scheduled'
                      ELSE r.next_state::text END)::conveyor.job_state,
        result = coalesce(r.result::jsonb, j.result),
        errors = CASE WHEN r.error IS NULL THEN j.errors
                      ELSE j.errors || jsonb_build_array(
                          jsonb_build_object('at', (SELECT conveyor.now())) || r.error::jsonb)
                 END,
        attempt = CASE WHEN r.refund THEN j.attempt - 1 ELSE j.attempt END,
        run_at = CASE WHEN r.state = 'retry' AND j.cancel_requested_at IS NULL
                      THEN conveyor.window_next_open(
                          (SELECT conveyor.now()) + make_interval(secs => r.retry_in_s),
                          j.window_start, j.window_end, j.window_tz)
                      ELSE j.run_at END,
        finished_at = CASE WHEN r.next_state IN ('succeeded', 'failed', 'cancelled')
                             OR j.cancel_requested_at IS NOT NULL
                           THEN (SELECT conveyor.now()) END,
        lease_token = NULL,
        lease_expires_at = NULL
    FROM resolved AS r
    -- A primary-key probe per outcome, whatever the statistics say: the state
    -- test is on text so that no partial index of running jobs (which the
    -- planner may believe tiny, and would then scan whole) can serve it.
    WHERE j.id = r.id
      AND j.lease_token = r.token
      AND j.state::text = 'running'
    RETURNING j.id, j.queue, j.state, j.concurrency_key
),
woken AS (
    -- Jobs handed straight back (retry without delay, shutdown return), and
    -- keyed jobs whose end frees room in their key, wake listeners at once
    -- instead of leaving the next job to their poll.
    SELECT queue, pg_notify(%(channel)s, queue) AS sent
    FROM (
        SELECT DISTINCT queue FROM updated
        WHERE state = 'available' OR concurrency_key IS NOT NULL
    ) AS queues
)
-- The queues notified, so the writer knows which notifications it will hear
-- back from itself (conveyor.worker.echoes).
SELECT updated.id, ARRAY(SELECT queue FROM woken) AS woken
FROM updated;

-- name: lease_extend_many
-- Heartbeat: push the lease expiry of this worker's running jobs whose token still matches.
UPDATE conveyor.jobs AS j
SET lease_expires_at = (SELECT conveyor.now()) + make_interval(secs => %(lease_s)s)
FROM unnest(%(id)b::bigint[], %(token)b::bigint[]) AS l(id, token)
WHERE j.id = l.id
  AND j.lease_token = l.token
  AND j.state = 'running'
RETURNING j.id;

-- name: job_get
-- One job by id.
SELECT * FROM conveyor.jobs WHERE id = %(id)s;

-- name: job_get_many
-- Several jobs by id.
SELECT * FROM conveyor.jobs WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id;

-- name: job_count_by_queue_state
-- Counts per queue and state, for `conveyor status`.
SELECT queue, state::text AS state, count(*) AS count
FROM conveyor.jobs
GROUP BY queue, state
ORDER BY queue, state;

-- name: job_list
-- Recent jobs, newest first, optionally of one state.
SELECT * FROM conveyor.jobs
WHERE (%(state)s::text IS NULL OR state::text = %(state)s::text)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: job_count_due
-- Jobs a claim could take now (due, window open, key with room), or running, in
-- some queues: "is there anything left to do right now" for test drains.
SELECT count(*) AS count
FROM conveyor.jobs AS j
LEFT JOIN conveyor.concurrency_keys AS k
  ON k.queue = j.queue AND k.key = j.concurrency_key
WHERE j.queue = ANY(%(queues)s::text[])
  AND (
      j.state = 'running'
      OR (j.state IN ('scheduled', 'available')
          AND j.run_at <= (SELECT conveyor.now())
          AND conveyor.in_window((SELECT conveyor.now()), j.window_start, j.window_end, j.window_tz)
          AND (j.concurrency_key IS NULL
               OR (k.running < k.concurrency_limit
                   AND conveyor.rate_room(k.rate_limit, k.rate_period_s,
                                          k.rate_window_start, k.rate_window_count) > 0)))
  );

-- name: job_cancel_many
-- Cancel jobs by id and/or filter. Waiting jobs end `cancelled` at once; running
-- ones get a cancel request their worker acts on (NOTIFY now, heartbeat as fallback).
WITH target AS (
    SELECT id, state
    FROM conveyor.jobs
    WHERE (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(task)s::text IS NULL OR task = %(task)s::text)
      AND state IN ('scheduled', 'available', 'running')
    ORDER BY id
    FOR UPDATE
),
waiting AS (
    UPDATE conveyor.jobs AS j
    SET state = 'cancelled',
        finished_at = (SELECT conveyor.now()),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'at', (SELECT conveyor.now()), 'attempt', j.attempt,
            'type', 'conveyor.Cancelled', 'message', %(reason)s::text))
    FROM target
    WHERE j.id = target.id AND target.state IN ('scheduled', 'available')
    RETURNING j.id, 'cancelled' AS outcome
),
running AS (
    UPDATE conveyor.jobs AS j
    SET cancel_requested_at = coalesce(j.cancel_requested_at, (SELECT conveyor.now()))
    FROM target
    WHERE j.id = target.id AND target.state = 'running'
    RETURNING j.id, j.worker_id, 'cancel_requested' AS outcome
),
told AS (
    SELECT count(pg_notify(%(channel)s, json_build_object(
        'kind', 'cancel', 'job_id', id, 'worker_id', worker_id)::text)) AS sent
    FROM running
)
SELECT id, outcome FROM waiting
UNION ALL
SELECT id, outcome FROM running, told
ORDER BY id;

-- name: job_release_unheld
-- After a claim whose outcome is unknown (connection lost mid-statement): give
-- back every job this worker incarnation has running in the database but never
-- started (`held` lists every job it holds or started). The attempt is refunded;
-- a pending cancel request wins.
WITH released AS (
    UPDATE conveyor.jobs
    SET state = (CASE WHEN cancel_requested_at IS NULL THEN 'available'
                      ELSE 'cancelled' END)::conveyor.job_state,
        finished_at = CASE WHEN cancel_requested_at IS NULL THEN NULL
                           ELSE (SELECT conveyor.now()) END,
        attempt = attempt - 1,
        lease_token = NULL,
        lease_expires_at = NULL
    WHERE worker_id = %(worker_id)s
      AND state = 'running'
      AND id <> ALL(%(held)s::bigint[])
    RETURNING id, queue
),
woken AS (
    SELECT count(pg_notify(%(channel)s, queue)) AS sent
    FROM (SELECT DISTINCT queue FROM released) AS queues
)
SELECT released.id FROM released, woken;

-- name: key_list
-- Per-key counts and limits, for `conveyor stats` and the API.
SELECT * FROM conveyor.concurrency_keys
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
ORDER BY queue, key;

-- name: key_set_limit
-- Change a key's limit at runtime; the next claim uses it.
INSERT INTO conveyor.concurrency_keys (queue, key, concurrency_limit)
VALUES (%(queue)s, %(key)s, %(limit)s)
ON CONFLICT (queue, key) DO UPDATE
SET concurrency_limit = excluded.concurrency_limit, updated_at = statement_timestamp()
RETURNING *;

-- name: job_reschedule_closed_windows
-- Due jobs whose window closed before a claim took them: move them to the next
-- opening, so claims do not step over them until then.
UPDATE conveyor.jobs
SET state = 'scheduled',
    run_at = conveyor.window_next_open((SELECT conveyor.now()), window_start, window_end, window_tz)
WHERE window_tz IS NOT NULL
  AND state IN ('scheduled', 'available')
  AND run_at <= (SELECT conveyor.now())
  AND NOT conveyor.in_window((SELECT conveyor.now()), window_start, window_end, window_tz)
RETURNING id;

-- name: job_get_by_dedup_keys
-- The newest job per (task, dedup key): the live one that deduplicated an enqueue.
SELECT DISTINCT ON (task, dedup_key) *
FROM conveyor.jobs
WHERE (task, dedup_key) IN (SELECT * FROM unnest(%(task)s::text[], %(dedup_key)s::text[]))
ORDER BY task, dedup_key, id DESC;

-- name: job_supersede_running
-- Before a superseding enqueue: running jobs with these keys give up their dedup
-- key (so the new job can be inserted) and get a cancel request.
WITH superseded AS (
    UPDATE conveyor.jobs AS j
    SET dedup_key = NULL,
        cancel_requested_at = coalesce(j.cancel_requested_at, (SELECT conveyor.now()))
    FROM unnest(%(task)s::text[], %(dedup_key)s::text[]) AS k(task, dedup_key)
    WHERE j.task = k.task AND j.dedup_key = k.dedup_key AND j.state = 'running'
    RETURNING j.id, j.worker_id
),
told AS (
    SELECT count(pg_notify(%(channel)s, json_build_object(
        'kind', 'cancel', 'job_id', id, 'worker_id', worker_id)::text)) AS sent
    FROM superseded
)
SELECT superseded.id FROM superseded, told;

-- name: queue_stats
-- Per-queue counts and totals (the sum of the queue's shards), exact as of the last commit.
SELECT queue,
       sum(waiting)::bigint AS waiting,
       sum(running)::bigint AS running,
       sum(total_enqueued)::bigint AS total_enqueued,
       sum(total_succeeded)::bigint AS total_succeeded,
       sum(total_failed)::bigint AS total_failed,
       sum(total_cancelled)::bigint AS total_cancelled,
       max(updated_at) AS updated_at
FROM conveyor.queue_stats
GROUP BY queue
ORDER BY queue;

-- name: queue_stats_compact
-- Fold per-statement queue deltas into one row per queue.
SELECT conveyor.compact_queue_stats() AS folded;
