-- Redis lock scripts (conveyor.locks.redis_lock). Each runs atomically on the
-- server, so the ownership check and the change cannot be split by another client.

-- name: acquire
-- KEYS[1] the lock, KEYS[2] its fencing counter; ARGV[1] owner, ARGV[2] TTL in ms.
-- Returns the new fencing token, or nil when someone holds the lock.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return redis.call('INCR', KEYS[2])
end
return false

-- name: release
-- KEYS[1] the lock; ARGV[1] owner. 1 if released, 0 if the owner did not hold it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0

-- name: extend
-- KEYS[1] the lock; ARGV[1] owner, ARGV[2] new TTL in ms. 1 if extended, 0 if not held.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0

-- name: recover
-- After a lost reply to acquire: KEYS[1] the lock, KEYS[2] its counter; ARGV[1]
-- owner. The current token if the owner holds the lock (nobody else can have
-- drawn one since), else nil.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return tonumber(redis.call('GET', KEYS[2]))
end
return false
