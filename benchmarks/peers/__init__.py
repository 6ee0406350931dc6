"""Peer job queues measured with the same scenarios as conveyor's own benchmarks.

Each `<name>_peer` module exposes NAME, VERSION and the async scenarios
`setup`, `enqueue`, `throughput` and `latency` (see README.md), and may name
scenarios it does not run, with the reason, in SKIP. The Python peers come
from the optional `peers` extra (`pip install -e '.[peers]'`), the Node.js
ones from `npm ci` in `node/` (see node_peer.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

PEERS = ("procrastinate", "pgqueuer", "graphile", "pgboss")


def load(name: str) -> ModuleType:
    """The adapter module of peer `name` (imports the peer package itself)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    return importlib.import_module(f"benchmarks.peers.{name}_peer")
