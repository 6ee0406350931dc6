"""Redis locks: `SET key owner NX PX ttl`, with ownership-checked release and extend.

```python
client = redis_client("redis://localhost:6379/0")
lock = RedisLock(client, "pipeline:nightly", ttl=timedelta(seconds=30))
async with lock:                 # auto-extended every ttl/3 while the block runs
    await write(fencing_token=lock.fencing_token)
```

One Redis instance, no Redlock: if that instance loses its data (a restart
without persistence, a failover to a replica that had not seen the SET), two
holders can overlap. The TTL is measured by Redis; the holder counts it on its
own monotonic clock from *before* it sent the command, so it gives the lock up
locally no later than Redis does, unless its process is paused (GC, SIGSTOP,
a frozen VM) for longer than the TTL. That pause is why protected writes
should carry `fencing_token`, which grows with every acquisition of the key.

Release and extend run Lua scripts that compare the stored owner first: a
wrong owner gets `LockNotOwned` and nothing changes. Connection errors are
retried (the client reconnects), and every script is safe to replay: the
stored value is `<owner>|<nonce>`, one nonce per acquire call, so a replayed
acquire recognises its own success; a release leaves a marker naming its call
for a minute, so a replayed release is still answered "released".
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from datetime import timedelta
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from conveyor.db.queries import parse_queries
from conveyor.errors import ConfigError, LockError, LockNotOwned
from conveyor.locks.base import GuardedLock, Seconds, as_seconds

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger("conveyor.locks")

DEFAULT_TTL = timedelta(seconds=30)
KEY_PREFIX = "conveyor:lock:"
POLL_MIN_S = 0.01
POLL_MAX_S = 0.1
RETRY_PAUSE_S = 0.01
"""Pause before the guard tries again after a failed extend."""
COMMAND_RETRIES = 3
"""Attempts of one script call across connection errors before giving up."""
RELEASE_MARKER_TTL_MS = 60_000
"""How long a release is remembered, so a replay of it (after a lost reply) is
still answered "released": far longer than any client retry takes."""


def redis_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """An asyncio Redis client that reconnects and retries on connection errors."""
    try:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ConfigError(
            "Redis locks need the redis extra: pip install 'conveyor[redis]'"
        ) from exc
    settings: dict[str, Any] = {
        # A quick first retry: a lock's TTL may be short, and a dropped connection
        # is usually back at once (the guard cuts each extend at the lock's deadline).
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.005), COMMAND_RETRIES),
        "retry_on_error": [ConnectionError, TimeoutError],
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 10,
        **options,
    }
    return redis.asyncio.Redis.from_url(url, **settings)


@cache
def _scripts() -> dict[str, str]:
    text = resources.files("conveyor.locks").joinpath("redis_scripts.lua").read_text("utf-8")
    return parse_queries(text)


class RedisLock(GuardedLock):
    """A lock held in one Redis key with a TTL."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        key: str,
        *,
        ttl: Seconds = DEFAULT_TTL,
        owner: str | None = None,
        timeout: Seconds = None,
        auto_extend: bool = True,
        prefix: str = KEY_PREFIX,
    ) -> None:
        super().__init__(owner=owner, timeout=timeout)
        if not isinstance(key, str) or not key:
            raise LockError(f"a Redis lock key is a non-empty string, got {key!r}")
        ttl_s = as_seconds(ttl)
        if ttl_s is None or ttl_s < 0.001:
            raise LockError(f"a Redis lock needs a TTL of at least 1 ms, got {ttl!r}")
        if "|" in self.owner:
            raise LockError(f"a Redis lock owner must not contain '|', got {self.owner!r}")
        self.key = key
        self.ttl = ttl_s
        self.auto_extend = auto_extend
        """Extend every ttl/3 while an `async with` block runs."""
        # The braces make the lock and its counter one hash slot (Redis Cluster).
        self.redis_key = f"{prefix}{{{key}}}"
        self.fence_key = f"{self.redis_key}:fence"
        self.release_marker_key = f"{self.redis_key}:released"
        self._client = client
        self._deadline = 0.0
        self._value = ""
        """What this object's last acquire stored ("" until one succeeds)."""
        scripts = _scripts()
        self._acquire_script = client.register_script(scripts["acquire"])
        self._release_script = client.register_script(scripts["release"])
        self._extend_script = client.register_script(scripts["extend"])
        self._abandon_script = client.register_script(scripts["abandon"])

    def __repr__(self) -> str:
        return f"<RedisLock {self.key} owner={self.owner} held={self.held}>"

    def describe(self) -> str:
        """The key as given."""
        return self.key

    @property
    def expires_in(self) -> float:
        """Seconds until the holder must assume the lock expired (0 if not held)."""
        return max(0.0, self._deadline - time.monotonic()) if self.held else 0.0

    @property
    def held(self) -> bool:
        """True while acquired, not lost, and the TTL has not run out on this clock."""
        return self._held and not self._lost and time.monotonic() < self._deadline

    def check(self) -> None:
        """Raise `LockLost` if the lock was lost or its TTL ran out (between awaits)."""
        if self._held and time.monotonic() >= self._deadline:
            self._lost = True
        super().check()

    async def _acquire(self, timeout_s: float | None) -> bool:
        # One nonce per acquire call: a replay of this call's script (by the client's
        # retry, or ours after an error) finds its own value and gets its token.
        value = f"{self.owner}|{uuid.uuid4().hex}"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = POLL_MIN_S
        while True:
            sent_at = time.monotonic()
            try:
                token = await self._acquire_script(
                    keys=[self.redis_key, self.fence_key], args=[value, self._ttl_ms()]
                )
            except _TRANSIENT_ERRORS as exc:
                log.warning("Redis lock %s: acquire failed (%s); retrying", self.key, exc)
                token = None
                if deadline is not None and time.monotonic() >= deadline:
                    # The last try may have applied: never return False with a key
                    # that this call set left behind.
                    token = await self._settle(value)
            if token is not None:
                self._token = int(token)
                self._value = value
                self._deadline = sent_at + self.ttl
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            pause = random.uniform(delay / 2, delay)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)
            delay = min(delay * 2, POLL_MAX_S)

    async def _settle(self, value: str) -> int | None:
        """After a failed last try: the token if it applied after all, else None,
        with any key this acquire call set deleted (best effort)."""
        try:
            token = await self._call(
                self._acquire_script, [self.redis_key, self.fence_key], [value, self._ttl_ms()]
            )
        except _TRANSIENT_ERRORS:
            token = None
        if token is None:
            try:
                await self._call(self._abandon_script, [self.redis_key], [value])
            except _TRANSIENT_ERRORS as exc:
                log.warning("Redis lock %s: could not clean up after acquire (%s)", self.key, exc)
        return None if token is None else int(token)

    async def release(self) -> None:
        """Release if this owner holds the lock; `LockNotOwned` (nothing changed) otherwise."""
        was_held = self._held
        self._held = False
        released = await self._call(
            self._release_script,
            [self.redis_key, self.release_marker_key],
            [self.owner, uuid.uuid4().hex, RELEASE_MARKER_TTL_MS, self._value],
        )
        if not released:
            detail = " (its TTL expired)" if was_held else ""
            raise LockNotOwned(f"lock {self.key} is not held by owner {self.owner}{detail}")

    async def extend(self, ttl: Seconds = None) -> None:
        """Reset the TTL to `ttl` (default: the lock's); `LockNotOwned` unless held here."""
        ttl_s = self.ttl if ttl is None else as_seconds(ttl)
        assert ttl_s is not None
        sent_at = time.monotonic()
        millis = max(1, round(ttl_s * 1000))
        extended = await self._call(
            self._extend_script, [self.redis_key], [self.owner, millis, self._value]
        )
        if not extended:
            if self._held:
                self._lost = True
            raise LockNotOwned(f"lock {self.key} is not held by owner {self.owner}")
        self._held = True
        self._deadline = sent_at + ttl_s

    async def _watch(self) -> None:
        pause = self.ttl / 3
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                log.error("Redis lock %s: its TTL ran out while its block ran", self.key)
                return
            if not self.auto_extend:
                await asyncio.sleep(remaining)
                continue
            await asyncio.sleep(min(pause, remaining))
            pause = self.ttl / 3
            remaining = self._deadline - time.monotonic()
            if self._stopping:
                return  # the block ended: _run_guard sees _stopping and does nothing
            if remaining <= 0:
                continue  # reported as lost at the top of the loop
            try:
                # Never past the deadline: a slow extend must not let the block run
                # on after Redis may already have freed the key.
                async with asyncio.timeout(remaining):
                    await self.extend()
            except LockNotOwned:
                log.error("Redis lock %s lost: no longer held by %s", self.key, self.owner)
                return
            except TimeoutError:
                log.warning("Redis lock %s: extend timed out; retrying", self.key)
                pause = RETRY_PAUSE_S
            except _TRANSIENT_ERRORS as exc:
                log.warning("Redis lock %s: extend failed (%s); retrying", self.key, exc)
                pause = RETRY_PAUSE_S

    async def _discard(self) -> None:
        """Nothing is held locally: Redis frees the key at its TTL. (The acquired
        value is kept, so this object can never touch a newer hold of its owner.)"""
        return None

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        for attempt in range(COMMAND_RETRIES):
            try:
                return await script(keys=keys, args=args)
            except _TRANSIENT_ERRORS:
                if attempt == COMMAND_RETRIES - 1:
                    raise
                await asyncio.sleep(POLL_MIN_S * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))


def _transient_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError, TimeoutError
    except ImportError:  # pragma: no cover - without the extra no client can exist
        return (OSError,)
    return (OSError, ConnectionError, TimeoutError)


_TRANSIENT_ERRORS = _transient_errors()
"""Failures after which the same command may succeed: the client reconnects."""
