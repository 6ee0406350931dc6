-- Retention (conveyor.maintenance.pruner): delete finished history in batches,
-- so no statement holds many locks or writes a huge transaction.

-- name: job_prune_batch
-- Delete up to `batch` jobs in `states` that finished before `cutoff`, with their
-- checkpoints. Rows another transaction holds are skipped (a later pass takes them).
WITH doomed AS (
    SELECT id FROM conveyor.jobs
    WHERE state = ANY(%(states)s::conveyor.job_state[])
      AND finished_at < %(cutoff)s
    ORDER BY id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM conveyor.jobs AS j USING doomed WHERE j.id = doomed.id RETURNING j.id
),
forgotten AS (
    DELETE FROM conveyor.checkpoints WHERE job_id IN (SELECT id FROM gone)
)
SELECT count(*) AS n FROM gone;

-- name: run_prune_batch
-- Delete up to `batch` pipeline runs in `states` that ended before `cutoff` and
-- have no live job left (their steps go with them). Their step and cleanup jobs
-- are pruned by job_prune_batch.
WITH doomed AS (
    SELECT id FROM conveyor.runs
    WHERE state = ANY(%(states)s::conveyor.run_state[])
      AND finished_at < %(cutoff)s
      -- A run whose cleanup (or a cancelled step) has not ended yet is still in use.
      AND NOT EXISTS (SELECT 1 FROM conveyor.jobs AS j
                      WHERE j.run_id = runs.id
                        AND j.state IN ('scheduled', 'available', 'running'))
    ORDER BY id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM conveyor.runs AS r USING doomed WHERE r.id = doomed.id RETURNING r.id
)
SELECT count(*) AS n FROM gone;

-- name: clock_now_value
-- The database clock, for computing retention cutoffs.
SELECT (SELECT conveyor.now()) AS now;
