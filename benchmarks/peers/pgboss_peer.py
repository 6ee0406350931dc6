"""pg-boss (Node.js) behind the peer contract; the workloads are in node/bench.mjs
(enqueue with `send` and `insert`, polling `work()` workers; see README.md)."""

from __future__ import annotations

from benchmarks.peers.node_peer import scenarios

NAME = "pgboss"
VERSION, setup, enqueue, throughput, latency = scenarios("pg-boss", "pgboss")

SKIP = {
    "throughput": (
        "pg-boss 10 workers poll: after each batch a worker waits out the rest of its "
        "polling interval (0.5 s at least), so at concurrency C it runs about 2C jobs/s "
        "whatever the database can do; 10,000 jobs would take minutes per run"
    ),
}
