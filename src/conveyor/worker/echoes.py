"""Telling the echoes of a worker's own NOTIFYs apart from other sessions' news.

Writing outcomes notifies the jobs channel when a key gets room or a job is
handed straight back, so that other workers claim at once. The writing worker
hears its own notification too, after it has already claimed again on its own
(it knows when its write committed). Acting on the echo costs a claim that
comes back empty: for a busy key, one in every cycle.

PostgreSQL names the backend that sent each notification. Before a write, the
worker notes the backend it writes on and the queues it may notify; the write
reports the queues it did notify. The next notification from that backend for
such a queue is the echo, and is not acted on. A notification from an earlier
transaction on the same connection, still on its way, may be taken for the
echo instead, and that is safe too: it committed before the write, and the
worker claims after its write anyway.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

ECHO_TTL_S = 2.0
"""An echo not heard within this long is forgotten (it can be lost, for one when
the listening connection reconnects), so it cannot swallow a later real one."""


class Echoes:
    """Notifications this worker is about to send, or sent and has not heard back."""

    def __init__(self, ttl_s: float = ECHO_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._expected: dict[tuple[int, str], deque[float]] = {}

    def expect(self, pid: int, payloads: Iterable[str], now: float) -> None:
        """Backend `pid` may send one notification per item of `payloads`.

        Called before the statement is sent: its notification can be heard
        before its own reply is read.
        """
        for payload in payloads:
            deadlines = self._expected.setdefault((pid, payload), deque())
            _drop_expired(deadlines, now)
            deadlines.append(now + self._ttl_s)

    def settle(self, pid: int, expected: Iterable[str], sent: Iterable[str]) -> None:
        """The statement from `pid` is done and sent `sent`: forget the rest of `expected`."""
        for payload in set(expected).difference(sent):
            deadlines = self._expected.get((pid, payload))
            if deadlines:
                deadlines.pop()
            if not deadlines:
                self._expected.pop((pid, payload), None)

    def heard(self, pid: int, payload: str, now: float) -> bool:
        """True, and forgotten, if this notification is the echo of one sent here.

        Notifications from one backend arrive in the order its transactions
        committed, so the oldest expectation is the one heard.
        """
        deadlines = self._expected.get((pid, payload))
        if deadlines is None:
            return False
        _drop_expired(deadlines, now)
        echo = bool(deadlines)
        if echo:
            deadlines.popleft()
        if not deadlines:
            del self._expected[(pid, payload)]
        return echo

    def forget(self) -> None:
        """Drop every expectation (the listening connection was replaced)."""
        self._expected.clear()

    def __len__(self) -> int:
        return sum(len(deadlines) for deadlines in self._expected.values())


def _drop_expired(deadlines: deque[float], now: float) -> None:
    while deadlines and deadlines[0] < now:
        deadlines.popleft()
