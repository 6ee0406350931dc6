-- 0006_dedup: invoke-time deduplication and superseding.
--
-- While a job with a dedup key is waiting or running, no other job of the same
-- task with that key can exist: the unique index makes concurrent enqueues
-- race-safe (one inserts, the others find it), not a check-then-insert.

ALTER TABLE conveyor.jobs ADD COLUMN dedup_key text CHECK (dedup_key <> '');

CREATE UNIQUE INDEX jobs_dedup_idx ON conveyor.jobs (task, dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('scheduled', 'available', 'running');
