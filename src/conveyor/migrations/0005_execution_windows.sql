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

-- `at` if the window is open then, else the next time it opens.
CREATE FUNCTION conveyor.window_next_open(at timestamptz, start_t time, end_t time, tz text)
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN conveyor.in_window(at, start_t, end_t, tz) THEN at
        WHEN ((at AT TIME ZONE tz)::date + start_t) > (at AT TIME ZONE tz)
            THEN ((at AT TIME ZONE tz)::date + start_t) AT TIME ZONE tz
        ELSE ((at AT TIME ZONE tz)::date + 1 + start_t) AT TIME ZONE tz
    END
$$;

-- Due jobs whose window closed before they were claimed: the rescuer moves them
-- to the next opening so claims do not keep stepping over them.
CREATE INDEX jobs_window_due_idx ON conveyor.jobs (run_at)
    WHERE window_tz IS NOT NULL AND state IN ('scheduled', 'available');
