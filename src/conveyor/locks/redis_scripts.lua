-- Redis lock scripts (conveyor.locks.redis_lock). Each runs atomically on the
-- server, so the ownership check and the change cannot be split by another client.
-- A lock's value is "<owner>|<nonce>": the owner is the holder's identity (a
-- worker id: another lock object acting for that owner may extend or release);
-- the object that acquired matches the whole value, so once its hold expired it
-- can never touch a newer hold of the same owner. The nonce names one acquire call, so a replayed acquire (a client retrying after a lost
-- reply) recognises its own success instead of seeing contention; a release
-- leaves a short-lived marker naming its call, for the same reason.

-- name: acquire
-- KEYS[1] the lock, KEYS[2] its fencing counter; ARGV[1] value, ARGV[2] TTL in ms.
-- Returns the fencing token of this acquire (also when replayed), or nil when
-- someone else holds the lock.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return tonumber(redis.call('GET', KEYS[2]))
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return redis.call('INCR', KEYS[2])
end
return false

-- name: release
-- KEYS[1] the lock, KEYS[2] its release marker; ARGV[1] owner, ARGV[2] this
-- release call's nonce, ARGV[3] the marker's TTL in ms, ARGV[4] the value this
-- lock object acquired ('' for an object acting only as the owner). 1 if
-- released (also when this very call is replayed: the marker remembers it), 0
-- if the lock is gone or held by someone else.
local value = redis.call('GET', KEYS[1])
if not value then
    if redis.call('GET', KEYS[2]) == ARGV[2] then
        return 1
    end
    return 0
end
if (ARGV[4] ~= '' and value == ARGV[4])
        or (ARGV[4] == '' and string.match(value, '^(.*)|[^|]*$') == ARGV[1]) then
    redis.call('DEL', KEYS[1])
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
    return 1
end
return 0

-- name: extend
-- KEYS[1] the lock; ARGV[1] owner, ARGV[2] new TTL in ms, ARGV[3] the value this
-- lock object acquired ('' for an owner-only object). 1 if extended, 0 if not held.
local value = redis.call('GET', KEYS[1])
if value and ((ARGV[3] ~= '' and value == ARGV[3])
        or (ARGV[3] == '' and string.match(value, '^(.*)|[^|]*$') == ARGV[1])) then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0

-- name: abandon
-- KEYS[1] the lock; ARGV[1] value. Delete the key only if this very acquire
-- call set it (used when an acquire gives up without knowing whether it applied).
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
