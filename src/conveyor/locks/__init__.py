"""Distributed locks: PostgreSQL advisory locks and Redis locks behind one protocol.

```python
from conveyor.locks import AdvisoryLock, RedisLock, redis_client

async with app.lock("backfill:2026-03", timeout=5):      # PostgreSQL, session-level
    ...
async with RedisLock(redis_client(url), "nightly", ttl=30):
    ...
```

Both implement `Lock`: `acquire(timeout) -> bool` (False after the timeout,
never an exception for contention), `release()`, `extend(ttl)`, `owner`,
`fencing_token`, and `async with` that releases on error and raises
`LockLost` if the lock went away while the block ran. See docs/locks.md for
each backend's guarantees and failure modes.
"""

from conveyor.locks.advisory import AdvisoryLock, LockInfo, is_locked, list_locks, xact_lock
from conveyor.locks.base import Lock
from conveyor.locks.keys import LockKey, advisory_id
from conveyor.locks.redis_lock import RedisLock, redis_client

__all__ = [
    "AdvisoryLock",
    "Lock",
    "LockInfo",
    "LockKey",
    "RedisLock",
    "advisory_id",
    "is_locked",
    "list_locks",
    "redis_client",
    "xact_lock",
]
