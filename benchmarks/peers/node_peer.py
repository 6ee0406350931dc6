"""Node.js peers (pg-boss, graphile-worker) behind the peer contract.

The workloads live in `node/bench.mjs`, run by the machine's `node` against the
database the harness made: one process per scenario, printing its numbers as
JSON. `make bench` installs the pinned packages (`npm ci` in `node/`) when
node and npm are present; without them, or without `node/node_modules`,
importing a Node peer raises ImportError and the harness leaves it out.

Versions: the newest releases that run on Node 20 (pg-boss 11 and
graphile-worker 0.17 need Node 22, which this machine cannot install).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from psycopg.conninfo import conninfo_to_dict

NODE_DIR = Path(__file__).with_name("node")
SCRIPT = NODE_DIR / "bench.mjs"
SCENARIO_TIMEOUT_S = 900


def require(package: str) -> tuple[str, str]:
    """(node executable, installed version of `package`), or ImportError."""
    node = shutil.which("node")
    manifest = NODE_DIR / "node_modules" / package / "package.json"
    if node is None:
        raise ImportError("node is not installed")
    if not manifest.exists():
        raise ImportError(f"{package} is not installed: run `npm ci` in {NODE_DIR}")
    return node, str(json.loads(manifest.read_text())["version"])


def as_url(conninfo: str) -> str:
    """A postgresql:// URL for node's pg, from a libpq URL or key=value conninfo."""
    params = conninfo_to_dict(conninfo)
    user = quote(str(params.pop("user", "")), safe="")
    password = quote(str(params.pop("password", "")), safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    # A Unix socket directory goes in percent-encoded (node's pg decodes it).
    host = quote(str(params.pop("host", "localhost")), safe="")
    port = params.pop("port", "5432")
    database = quote(str(params.pop("dbname", "")), safe="")
    query = urlencode({k: v for k, v in params.items() if k == "application_name"})
    return f"postgresql://{auth}{host}:{port}/{database}" + (f"?{query}" if query else "")


async def run(node: str, peer: str, scenario: str, url: str, **params: Any) -> dict[str, Any]:
    """One scenario of `peer` in a node process; its JSON result."""
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), peer, scenario, as_url(url), json.dumps(params),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), SCENARIO_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} {scenario} failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


Scenario = Callable[..., Awaitable[dict[str, Any]]]


def scenarios(package: str, peer: str) -> tuple[str, Scenario, Scenario, Scenario, Scenario]:
    """The peer contract for one Node peer: (VERSION, setup, enqueue, throughput,
    latency), each scenario a node process; ImportError when it cannot run here."""
    node, version = require(package)

    async def setup(database_url: str) -> None:
        await run(node, peer, "setup", database_url)

    async def enqueue(database_url: str, *, single: int, bulk: int) -> dict[str, Any]:
        return await run(node, peer, "enqueue", database_url, single=single, bulk=bulk)

    async def throughput(database_url: str, *, jobs: int, concurrency: int) -> dict[str, Any]:
        return await run(node, peer, "throughput", database_url, jobs=jobs, concurrency=concurrency)

    async def latency(database_url: str, *, jobs: int, rate_per_s: float) -> dict[str, Any]:
        return await run(node, peer, "latency", database_url, jobs=jobs, rate_per_s=rate_per_s)

    return version, setup, enqueue, throughput, latency
