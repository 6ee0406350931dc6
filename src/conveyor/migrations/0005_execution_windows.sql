-- 0005_execution_windows: daily windows of local time in which a job may start.

ALTER TABLE conveyor.jobs
    ADD COLUMN window_start time,
    ADD COLUMN window_end time,
    ADD COLUMN window_tz text,
    ADD CONSTRAINT jobs_window_complete CHECK (
        (window_start IS NULL) = (window_end IS NULL)
        AND (window_start IS NULL) = (window_tz IS NULL)
    ),
    ADD CONSTRAINT jobs_window_not_empty CHECK (window_start <> window_end);

-- Whether a job with this window may start at `at`. A NULL zone means no window.
-- start > end spans midnight. Local time follows the zone's rules (DST included).
CREATE FUNCTION conveyor.in_window(at timestamptz, start_t time, end_t time, tz text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN tz IS NULL THEN true
        WHEN start_t < end_t
            THEN (at AT TIME ZONE tz)::time >= start_t AND (at AT TIME ZONE tz)::time < end_t
        ELSE (at AT TIME ZONE tz)::time >= start_t OR (at AT TIME ZONE tz)::time < end_t
    END
$$;

-- `at` if the window is open then, else the first instant after it when it is.
-- Candidates: the instants whose local time is `start` on the surrounding days,
-- each also one hour earlier and later (a start time that occurs twice on the
-- night clocks fall back, or not at all when they spring forward), and every
-- quarter hour (UTC) ahead for 50 hours (a clock change, at a quarter hour in
-- every zone in use, can itself open a window). The earliest
-- candidate after `at` that is inside the window is the opening.
CREATE FUNCTION conveyor.window_next_open(at timestamptz, start_t time, end_t time, tz text)
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN conveyor.in_window(at, start_t, end_t, tz) THEN at
        ELSE (
            SELECT min(c)
            FROM (
                SELECT (((at AT TIME ZONE tz)::date + d + start_t) AT TIME ZONE tz)
                       + make_interval(hours => h) AS c
                FROM generate_series(-1, 2) AS d, generate_series(-1, 1) AS h
                UNION ALL
                SELECT date_trunc('hour', at, 'UTC') + make_interval(mins => 15 * q)
                FROM generate_series(1, 200) AS q
            ) AS candidates
            WHERE c > at AND conveyor.in_window(c, start_t, end_t, tz)
        )
    END
$$;

-- Due jobs whose window closed before they were claimed: the rescuer moves them
-- to the next opening so claims do not keep stepping over them.
CREATE INDEX jobs_window_due_idx ON conveyor.jobs (run_at)
    WHERE window_tz IS NOT NULL AND state IN ('scheduled', 'available');

-- "Does this key have a due job?" for the claim's key scan: the lowest run_at of
-- a key's waiting jobs, without stepping over the rest.
CREATE INDEX jobs_keyed_due_idx ON conveyor.jobs (queue, concurrency_key, run_at)
    WHERE state IN ('scheduled', 'available') AND concurrency_key IS NOT NULL;
