"""How a lock key becomes a PostgreSQL advisory lock id.

PostgreSQL advisory locks are identified by one 64-bit integer or by two
32-bit integers (two separate key spaces). conveyor maps:

- a string key to one signed 64-bit integer: the first 8 bytes of the
  SHA-256 digest of its UTF-8 encoding, read big-endian as a signed integer.
  Any language can compute the same id (`advisory_id("backfill:2026-03")`),
  and it never changes between versions or servers;
- a pair of integers `(a, b)`, each within the int4 range, to the two-integer
  form `pg_advisory_lock(a, b)` as is (e.g. `(year, month)`).

In `pg_locks` a 64-bit id shows as classid = its high 32 bits and objid = its
low 32 bits (both unsigned), objsubid = 1; a pair as classid = a, objid = b
(unsigned), objsubid = 2.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from conveyor.errors import LockError

INT4_MIN = -(2**31)
INT4_MAX = 2**31 - 1
KEY_MAX_LENGTH = 1_000

LockKey = str | tuple[int, int]
"""A lock key as given: a string, or two int4 integers."""


@dataclass(frozen=True)
class AdvisoryId:
    """A key's advisory lock id: `pair` for the two-integer form, else `single`."""

    single: int | None = None
    pair: tuple[int, int] | None = None

    @property
    def locks_row(self) -> tuple[int, int, int]:
        """(classid, objid, objsubid) as `pg_locks` shows this id."""
        if self.pair is not None:
            a, b = self.pair
            return a & 0xFFFFFFFF, b & 0xFFFFFFFF, 2
        assert self.single is not None
        unsigned = self.single & 0xFFFFFFFFFFFFFFFF
        return unsigned >> 32, unsigned & 0xFFFFFFFF, 1

    @property
    def params(self) -> dict[str, int | None]:
        """Parameters for the lock statements (`single`, or `a` and `b`)."""
        a, b = self.pair if self.pair is not None else (None, None)
        return {"single": self.single, "a": a, "b": b}


def advisory_id(key: LockKey) -> AdvisoryId:
    """The advisory lock id of `key`; raises `LockError` for a key that cannot be one."""
    if isinstance(key, str):
        if not key or len(key) > KEY_MAX_LENGTH:
            raise LockError(f"a lock key is a non-empty string of at most {KEY_MAX_LENGTH} chars")
        try:
            digest = hashlib.sha256(key.encode()).digest()
        except UnicodeEncodeError as exc:
            raise LockError(f"a lock key must be valid UTF-8 text, got {key!r}") from exc
        return AdvisoryId(single=int.from_bytes(digest[:8], "big", signed=True))
    if (
        isinstance(key, tuple)
        and len(key) == 2
        and all(isinstance(k, int) and not isinstance(k, bool) for k in key)
        and all(INT4_MIN <= k <= INT4_MAX for k in key)
    ):
        return AdvisoryId(pair=(key[0], key[1]))
    raise LockError(f"a lock key is a string or a pair of int4 integers, got {key!r}")


def describe(key: LockKey) -> str:
    """The key as text, for listings and the registry."""
    return key if isinstance(key, str) else f"({key[0]}, {key[1]})"
