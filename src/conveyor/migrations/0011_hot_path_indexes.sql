-- 0011_hot_path_indexes: fewer index writes per job, and plans that cannot
-- drift onto a scan of every running job.
--
-- jobs_state_idx (state, queue) covered every row, so each claim and each
-- outcome (neither can be a HOT update: `state` is in index predicates) wrote
-- an entry into it. No hot statement needs it: claims walk the partial claim
-- indexes, outcomes and heartbeats find rows by id, the rescuer walks
-- jobs_lease_idx. Worse, with statistics taken when few jobs ran, the planner
-- used it to hash every running job for each outcome batch.
-- Retention is the one reader that filters on finished states: it gets a
-- partial index of finished jobs by finish time, which claims never touch.
DROP INDEX conveyor.jobs_state_idx;

CREATE INDEX jobs_finished_idx ON conveyor.jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
