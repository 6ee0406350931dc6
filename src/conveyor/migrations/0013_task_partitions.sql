-- 0013_task_partitions: `jobs` becomes a table partitioned by task, so that a
-- hot task can have a partition of its own (hot-task isolation): its rows,
-- indexes, dead tuples and vacuum stay apart from every other task's.
--
-- Every existing job moves, untouched, into the DEFAULT partition
-- `jobs_default`: the old table is renamed and attached, not copied. Tasks
-- without a partition of their own keep landing there. Statements keep naming
-- `jobs`; PostgreSQL routes each row by its task.
--
-- What partitioning asks of the schema:
-- - a unique index of the partitioned table must contain the partition key,
--   so `jobs` has no primary key of its own: each partition has one, on id.
--   Ids come from one sequence and a move deletes a row where it inserts it,
--   so an id is in one partition only. A key on (id, task) would not do: the
--   planner knows an id matches one row only from a unique index on id alone,
--   and without it a worker's outcome write (planned once per session, often
--   before the table was analyzed) hashed its batch and read the whole table;
-- - PostgreSQL 15 has no identity columns on partitioned tables: the id comes
--   from a plain sequence default, continuing where the identity stopped;
-- - statement triggers live on the partitioned table, which hands them the
--   rows of every partition a statement touched. Statements run directly on a
--   partition (only partition moves below do that) fire none: a job moving
--   between partitions is not enqueued, finished or deleted.

-- The old table becomes the default partition, its indexes and triggers with it.
ALTER TABLE conveyor.jobs RENAME TO jobs_default;
ALTER INDEX conveyor.jobs_lease_idx RENAME TO jobs_default_lease_idx;
ALTER INDEX conveyor.jobs_claim_idx RENAME TO jobs_default_claim_idx;
ALTER INDEX conveyor.jobs_claim_keyed_idx RENAME TO jobs_default_claim_keyed_idx;
ALTER INDEX conveyor.jobs_window_due_idx RENAME TO jobs_default_window_due_idx;
ALTER INDEX conveyor.jobs_keyed_due_idx RENAME TO jobs_default_keyed_due_idx;
ALTER INDEX conveyor.jobs_dedup_idx RENAME TO jobs_default_dedup_idx;
ALTER INDEX conveyor.jobs_run_idx RENAME TO jobs_default_run_idx;
ALTER INDEX conveyor.jobs_finished_idx RENAME TO jobs_default_finished_idx;
ALTER TABLE conveyor.jobs_default RENAME CONSTRAINT jobs_pkey TO jobs_default_pkey;

DROP TRIGGER jobs_notify_inserted ON conveyor.jobs_default;
DROP TRIGGER jobs_count_keys_inserted ON conveyor.jobs_default;
DROP TRIGGER jobs_count_keys_deleted ON conveyor.jobs_default;
DROP TRIGGER jobs_count_queues_inserted ON conveyor.jobs_default;
DROP TRIGGER jobs_count_queues_deleted ON conveyor.jobs_default;
DROP TRIGGER jobs_advance_runs ON conveyor.jobs_default;
DROP TRIGGER jobs_count_updated ON conveyor.jobs_default;

-- The id sequence continues where the identity's stopped.
CREATE SEQUENCE conveyor.job_id_seq AS bigint;
SELECT setval('conveyor.job_id_seq', last_value, is_called) FROM conveyor.jobs_id_seq;
ALTER TABLE conveyor.jobs_default ALTER COLUMN id DROP IDENTITY;

CREATE TABLE conveyor.jobs (
    LIKE conveyor.jobs_default INCLUDING DEFAULTS INCLUDING CONSTRAINTS
) PARTITION BY LIST (task);
ALTER TABLE conveyor.jobs ALTER COLUMN id SET DEFAULT nextval('conveyor.job_id_seq');
ALTER SEQUENCE conveyor.job_id_seq OWNED BY conveyor.jobs.id;

ALTER TABLE conveyor.jobs ATTACH PARTITION conveyor.jobs_default DEFAULT;

-- Partitioned indexes: each adopts the default partition's identical index
-- instead of building a new one, and is created on every later partition.
CREATE INDEX jobs_claim_idx ON conveyor.jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available') AND concurrency_key IS NULL;
CREATE INDEX jobs_claim_keyed_idx ON conveyor.jobs (queue, concurrency_key, id)
    WHERE state IN ('scheduled', 'available') AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_keyed_due_idx ON conveyor.jobs (queue, concurrency_key, run_at)
    WHERE state IN ('scheduled', 'available') AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_window_due_idx ON conveyor.jobs (run_at)
    WHERE window_tz IS NOT NULL AND state IN ('scheduled', 'available');
CREATE INDEX jobs_lease_idx ON conveyor.jobs (lease_expires_at) WHERE state = 'running';
CREATE UNIQUE INDEX jobs_dedup_idx ON conveyor.jobs (task, dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('scheduled', 'available', 'running');
CREATE INDEX jobs_run_idx ON conveyor.jobs (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX jobs_finished_idx ON conveyor.jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON conveyor.jobs REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.notify_jobs_inserted();
CREATE TRIGGER jobs_count_keys_inserted
    AFTER INSERT ON conveyor.jobs REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_keys_inserted();
CREATE TRIGGER jobs_count_keys_deleted
    AFTER DELETE ON conveyor.jobs REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_keys_deleted();
CREATE TRIGGER jobs_count_queues_inserted
    AFTER INSERT ON conveyor.jobs REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_queues_inserted();
CREATE TRIGGER jobs_count_queues_deleted
    AFTER DELETE ON conveyor.jobs REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_queues_deleted();
CREATE TRIGGER jobs_advance_runs
    AFTER UPDATE ON conveyor.jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.advance_runs_updated();
CREATE TRIGGER jobs_count_updated
    AFTER UPDATE ON conveyor.jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor.count_jobs_updated();

-- The tasks that have a partition of their own, and its table's name.
CREATE TABLE conveyor.task_partitions (
    task text PRIMARY KEY CHECK (task <> ''),
    table_name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT conveyor.now()
);

-- Give `p_task` its own partition, moving its jobs out of the default one.
-- Idempotent: returns the existing partition's table if there is one.
--
-- The move holds `jobs` exclusively: claims, enqueues, outcomes and reads
-- wait for it (they resume when it commits, nothing fails). It is a
-- delete and an insert on the partitions themselves, so no count changes, no
-- run advances and nothing is notified; ids, leases and fencing tokens move
-- with the rows, so a worker running one of the jobs finishes it normally.
CREATE FUNCTION conveyor.task_partition_create(p_task text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    parent regclass := 'conveyor.jobs'::regclass;
    default_part regclass := 'conveyor.jobs_default'::regclass;
    registry regclass := 'conveyor.task_partitions'::regclass;
    schema_name text;
    part_name text;
BEGIN
    IF p_task IS NULL OR p_task = '' THEN
        RAISE EXCEPTION 'a partition needs a task name' USING ERRCODE = '22023';
    END IF;
    -- One partition change at a time; a second creator of the same partition
    -- finds it registered.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', registry);
    EXECUTE format('SELECT table_name FROM %s WHERE task = $1', registry)
        INTO part_name USING p_task;
    IF part_name IS NOT NULL THEN
        RETURN part_name;
    END IF;

    SELECT relnamespace::regnamespace::text INTO schema_name FROM pg_class WHERE oid = parent;
    -- Readable and unique within 63 bytes whatever the task's name.
    part_name := 'jobs_task_'
        || left(trim(both '_' from regexp_replace(lower(p_task), '[^a-z0-9]+', '_', 'g')), 36)
        || '_' || left(md5(p_task), 8);

    -- The parent, not only the default partition: ATTACH alone would let a
    -- statement that locked `jobs` before the move plan with the old list of
    -- partitions, then run after it and miss the moved rows (a worker's outcome
    -- write found nothing to update). And the parent first, as every statement
    -- on `jobs` locks it before its partitions.
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', parent);
    EXECUTE format('CREATE TABLE %s.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   schema_name, part_name, parent);
    EXECUTE format('INSERT INTO %s.%I SELECT * FROM %s WHERE task = $1',
                   schema_name, part_name, default_part) USING p_task;
    EXECUTE format('DELETE FROM %s WHERE task = $1', default_part) USING p_task;
    EXECUTE format('ALTER TABLE %s.%I ADD CONSTRAINT %I PRIMARY KEY (id)',
                   schema_name, part_name, part_name || '_pkey');
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %s.%I FOR VALUES IN (%L)',
                   parent, schema_name, part_name, p_task);
    EXECUTE format('INSERT INTO %s (task, table_name) VALUES ($1, $2)', registry)
        USING p_task, part_name;
    RETURN part_name;
END
$$;

-- Fold `p_task`'s partition back into the default one. Returns false if the
-- task had none. The same kind of move as above, the other way.
CREATE FUNCTION conveyor.task_partition_remove(p_task text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    parent regclass := 'conveyor.jobs'::regclass;
    default_part regclass := 'conveyor.jobs_default'::regclass;
    registry regclass := 'conveyor.task_partitions'::regclass;
    schema_name text;
    part_name text;
BEGIN
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', registry);
    EXECUTE format('DELETE FROM %s WHERE task = $1 RETURNING table_name', registry)
        INTO part_name USING p_task;
    IF part_name IS NULL THEN
        RETURN false;
    END IF;
    SELECT relnamespace::regnamespace::text INTO schema_name FROM pg_class WHERE oid = parent;
    -- The parent first, as every statement on `jobs` locks it first.
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', parent);
    EXECUTE format('ALTER TABLE %s DETACH PARTITION %s.%I', parent, schema_name, part_name);
    EXECUTE format('INSERT INTO %s SELECT * FROM %s.%I', default_part, schema_name, part_name);
    EXECUTE format('DROP TABLE %s.%I', schema_name, part_name);
    RETURN true;
END
$$;
