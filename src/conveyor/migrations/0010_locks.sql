-- 0010_locks: advisory lock helpers, the registry behind `conveyor locks`, and
-- the fencing token sequence.

-- Grows with every acquisition of an advisory lock through conveyor.locks: a
-- protected write can carry it so a stale holder's write is refused.
CREATE SEQUENCE conveyor.lock_fence_seq AS bigint;

-- Who took which session lock through conveyor, under which key, since when.
-- PostgreSQL knows only the numeric id and the pid; this adds the key as given.
-- Rows whose lock is no longer held (the session ended) are ignored when
-- listing and purged by `lock_registry_purge`. Unlogged: it only describes
-- live sessions, which a crash ends anyway.
CREATE UNLOGGED TABLE conveyor.advisory_locks (
    pid integer NOT NULL,
    classid bigint NOT NULL,
    objid bigint NOT NULL,
    objsubid smallint NOT NULL,
    key text NOT NULL,
    owner text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (pid, classid, objid, objsubid)
);

-- Take an advisory lock by one bigint (`single`) or two ints (`a`, `b`):
-- waiting or not, session- or transaction-level. True once held.
CREATE FUNCTION conveyor.advisory_lock(
    single bigint, a integer, b integer, wait boolean, xact boolean
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF single IS NOT NULL THEN
        IF xact AND wait THEN PERFORM pg_advisory_xact_lock(single); RETURN true; END IF;
        IF xact THEN RETURN pg_try_advisory_xact_lock(single); END IF;
        IF wait THEN PERFORM pg_advisory_lock(single); RETURN true; END IF;
        RETURN pg_try_advisory_lock(single);
    END IF;
    IF xact AND wait THEN PERFORM pg_advisory_xact_lock(a, b); RETURN true; END IF;
    IF xact THEN RETURN pg_try_advisory_xact_lock(a, b); END IF;
    IF wait THEN PERFORM pg_advisory_lock(a, b); RETURN true; END IF;
    RETURN pg_try_advisory_lock(a, b);
END
$$;

-- Release a session lock held by this session; false if it held none.
CREATE FUNCTION conveyor.advisory_unlock(single bigint, a integer, b integer) RETURNS boolean
LANGUAGE sql AS $$
    SELECT CASE WHEN single IS NOT NULL THEN pg_advisory_unlock(single)
                ELSE pg_advisory_unlock(a, b) END
$$;
