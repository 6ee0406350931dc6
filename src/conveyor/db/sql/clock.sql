-- The database clock (see migrations/0001_initial.sql).

-- name: clock_now
-- The time every scheduling decision uses.
SELECT conveyor.now() AS now;

-- name: clock_set
-- Freeze the clock at a time (NULL unfreezes it: real time again).
UPDATE conveyor.clock SET fake_now = %(at)s::timestamptz;

-- name: clock_advance
-- Move the clock forward from its current reading and freeze it there.
UPDATE conveyor.clock SET fake_now = conveyor.now() + make_interval(secs => %(seconds)s)
RETURNING fake_now;
