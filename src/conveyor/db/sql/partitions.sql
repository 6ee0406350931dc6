-- Queries on the per-task partitions of `jobs`. Creating and removing one is
-- done by the functions of migration 0013, which move the task's rows.

-- name: partition_list
-- Every task with a partition of its own, with its table's size.
SELECT p.task, p.table_name, p.created_at,
       greatest(c.reltuples, 0)::bigint AS estimated_rows,
       pg_total_relation_size(c.oid) AS size_bytes
FROM conveyor.task_partitions AS p
JOIN pg_class AS c
  ON c.relname = p.table_name
 AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'conveyor.jobs'::regclass)
ORDER BY p.task;

-- name: partition_create
-- Give a task its own partition (idempotent); returns its table's name.
SELECT conveyor.task_partition_create(%(task)s) AS table_name;

-- name: partition_remove
-- Fold a task's partition back into the default one; false if it had none.
SELECT conveyor.task_partition_remove(%(task)s) AS removed;

-- name: partition_roots
-- For tables and indexes of conveyor's schema that are partitions: the
-- partitioned table or index each belongs to (for reading plans).
SELECT c.relname AS name, r.relname AS root
FROM pg_class AS c
JOIN pg_class AS r ON r.oid = pg_partition_root(c.oid)
WHERE c.relname = ANY(%(names)s::text[])
  AND c.relispartition
  AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'conveyor.jobs'::regclass);
