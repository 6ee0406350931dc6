"""graphile-worker (Node.js) behind the peer contract; the workloads are in node/bench.mjs
(enqueue with `addJob` and `add_jobs`, a `run({concurrency})` worker; see README.md)."""

from __future__ import annotations

from benchmarks.peers.node_peer import scenarios

NAME = "graphile"
VERSION, setup, enqueue, throughput, latency = scenarios("graphile-worker", "graphile")
