-- Queries the benchmarks read their numbers with (conveyor.bench.scenarios).

-- name: bench_span
-- Finished jobs, and the seconds from the first start to the last finish; with
-- `since`, only jobs started since then (not a backlog's pre-made history).
SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(started_at)) AS s
FROM conveyor.jobs
WHERE state = 'succeeded'
  AND (%(since)s::timestamptz IS NULL OR started_at >= %(since)s::timestamptz);

-- name: bench_now
SELECT clock_timestamp() AS now;

-- name: bench_start_delays
-- Enqueue -> start of every job, in milliseconds, on the database clock.
SELECT extract(epoch FROM started_at - created_at) * 1000 AS ms FROM conveyor.jobs;

-- name: bench_fifo_violations
-- Keyed jobs that started strictly before a job of their key enqueued ahead of them.
SELECT count(*) AS n
FROM (
    SELECT started_at < max(started_at) OVER (
               PARTITION BY concurrency_key ORDER BY id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS early
    FROM conveyor.jobs
    WHERE concurrency_key IS NOT NULL
) AS t
WHERE early;

-- name: bench_fill
-- Insert `n` no-op jobs straight into the table: waiting, or finished long ago.
INSERT INTO conveyor.jobs (queue, task, state, max_attempts, run_at, created_at, started_at,
                           finished_at, attempt)
SELECT 'default', %(task)s, %(state)s::conveyor.job_state, 5, now(), now(),
       CASE WHEN %(done)s THEN now() - interval '1 day' END,
       CASE WHEN %(done)s THEN now() - interval '1 day' END,
       CASE WHEN %(done)s THEN 1 ELSE 0 END
FROM generate_series(1, %(n)s);

-- name: bench_analyze
VACUUM ANALYZE conveyor.jobs;

-- name: bench_connections
-- Connections conveyor holds to this database now.
SELECT count(*) AS n
FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'conveyor%%';
