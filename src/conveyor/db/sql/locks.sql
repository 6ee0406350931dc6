-- Advisory locks (conveyor.locks.advisory). Ids come from conveyor.locks.keys:
-- `single` (one bigint) or `a` and `b` (two ints); classid/objid/objsubid are
-- the same id as pg_locks shows it.

-- name: lock_acquire
-- Take the lock at transaction level (conveyor.locks holds a "session" lock in a
-- transaction kept open on its own connection), waiting or not; reports the
-- backend that holds it and, once held, a fencing token (a sequence is not
-- transactional: the token is drawn even though the transaction stays open).
WITH taken AS MATERIALIZED (
    SELECT conveyor.advisory_lock(%(single)s, %(a)s, %(b)s, %(wait)s, %(xact)s) AS locked,
           pg_backend_pid() AS pid
)
SELECT locked, pid, CASE WHEN locked THEN nextval('conveyor.lock_fence_seq') END AS token
FROM taken;

-- name: lock_settings
-- First statement of the transaction a session lock lives in. Transaction-local
-- settings: a pooler hands this server session to others afterwards, and
-- nothing may leak. The lock's transaction is idle between statements by
-- design, so the server's idle-in-transaction timeout must not end it.
SELECT set_config('lock_timeout', %(timeout)s, true),
       set_config('idle_in_transaction_session_timeout', '0', true);

-- name: lock_register
-- Before a session acquire, on the lock's connection and outside the
-- transaction the lock will live in (rows written inside it stay invisible to
-- listings until it ends): note the key and owner of the lock this backend is
-- about to ask for. %(pid)s names another backend instead: the one a pooler
-- gave the lock's transaction (registered from the app's pool).
INSERT INTO conveyor.advisory_locks (pid, classid, objid, objsubid, key, owner)
VALUES (coalesce(%(pid)s, pg_backend_pid()), %(classid)s, %(objid)s, %(objsubid)s,
        %(key)s, %(owner)s)
ON CONFLICT (pid, classid, objid, objsubid)
    DO UPDATE SET key = excluded.key, owner = excluded.owner, acquired_at = clock_timestamp()
RETURNING pid;

-- name: lock_release
-- In the lock's transaction, just before it commits (which releases the lock):
-- forget the registry row; false when this session no longer held the lock.
WITH forgotten AS (
    DELETE FROM conveyor.advisory_locks
    WHERE pid = pg_backend_pid()
      AND classid = %(classid)s AND objid = %(objid)s AND objsubid = %(objsubid)s
)
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
      AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
      AND objsubid = %(objsubid)s
) AS released;

-- name: lock_held_here
-- Whether this session holds the lock.
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
      AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
      AND objsubid = %(objsubid)s
) AS held;

-- name: lock_is_locked
-- Whether any session of this database holds the lock.
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid::bigint = %(classid)s AND objid::bigint = %(objid)s
      AND objsubid = %(objsubid)s
) AS locked;

-- name: lock_list
-- Every advisory lock of this database, held or awaited: who, since when, and
-- the key as given when conveyor took it.
SELECT l.pid, a.application_name, l.granted, l.mode,
       l.classid::bigint AS classid, l.objid::bigint AS objid, l.objsubid::integer AS objsubid,
       r.key, r.owner,
       CASE WHEN l.granted THEN r.acquired_at ELSE l.waitstart END AS since
FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN conveyor.advisory_locks AS r
  ON r.pid = l.pid AND r.classid = l.classid::bigint AND r.objid = l.objid::bigint
 AND r.objsubid = l.objsubid AND l.granted
WHERE l.locktype = 'advisory'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY l.granted DESC, since NULLS LAST, l.pid;

-- name: lock_registry_purge
-- Forget registry rows whose session neither holds nor waits for their lock,
-- once that session has ended or the row is a minute old (a row is written
-- just before its lock is asked for: a young one may be about to be used).
DELETE FROM conveyor.advisory_locks AS r
WHERE NOT EXISTS (
    SELECT 1 FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.pid = r.pid
      AND l.classid::bigint = r.classid AND l.objid::bigint = r.objid
      AND l.objsubid = r.objsubid
)
AND (NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = r.pid)
     OR r.acquired_at < clock_timestamp() - interval '1 minute');

-- name: lock_alive
-- The watch's look at a held lock's connection: does the session still answer.
SELECT 1 AS alive;
