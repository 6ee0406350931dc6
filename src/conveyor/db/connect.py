"""How conveyor opens PostgreSQL connections: one place for URL resolution and socket options."""

from __future__ import annotations

import json
import os
from typing import Any

from psycopg.abc import AdaptContext
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg.types.json import (
    JsonbBinaryLoader,
    JsonBinaryLoader,
    JsonbLoader,
    JsonLoader,
    set_json_loads,
)

from conveyor.config import ENV_DATABASE_URL, Config

# A peer that vanished without a FIN (a cut cable, a frozen VM) is noticed in
# about KEEPALIVE_IDLE + INTERVAL * COUNT seconds instead of the kernel's two
# hours, and a write into a dead socket fails after TCP_USER_TIMEOUT_MS.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 15_000


def resolve_database_url(config: Config) -> str:
    """The URL to use: the config's, else `CONVEYOR_DATABASE_URL`, else the embedded server."""
    if config.database_url:
        return config.database_url
    if url := os.environ.get(ENV_DATABASE_URL):
        return url
    from conveyor.embedded import embedded_database_url

    return embedded_database_url()


SESSION_SETTINGS = "-c jit=off"
"""Server settings for conveyor's sessions. JIT compiles a statement whose
estimated cost passes jit_above_cost, and the claim's generic plan, estimated
blind to its LIMIT, passes it once the table holds about a million waiting
jobs: 45 ms of compiling for a 1 ms claim, every claim. Nothing conveyor
runs is long enough to gain from JIT."""


def _json_loads(data: bytes | str) -> Any:
    # Most jobs' `meta` and `errors` (and many jobs' `args`) are empty: a claim
    # parsed two or three of them per job, 1.5 us each, for the same constant.
    # A new object each time: the caller may change what it gets.
    if data == b"{}":
        return {}
    if data == b"[]":
        return []
    return json.loads(data)


def use_fast_json(context: AdaptContext) -> None:
    """Parse JSON on `context` (a connection of conveyor's pools) through a shortcut
    for empty objects and arrays, unless the application chose its own parsing.

    Registered on each connection as the pool opens it, so the connection
    starts from psycopg's global adapters as they are at that moment. If its
    JSON loaders are no longer psycopg's own with `json.loads` (the application
    called `set_json_loads`, say for orjson or Decimal floats, or registered
    loaders of its own), they are left alone: jobs' `args` and results then
    parse the application's way, without the shortcut.
    """
    adapters = context.adapters
    for name in ("json", "jsonb"):
        info = adapters.types.get(name)
        if info is None:
            return
        for fmt, default in _DEFAULT_JSON_LOADERS[name]:
            loader = adapters.get_loader(info.oid, fmt)
            if loader is not default or getattr(loader, "_loads", None) is not json.loads:
                return
    set_json_loads(_json_loads, context)


_DEFAULT_JSON_LOADERS = {
    "json": ((Format.TEXT, JsonLoader), (Format.BINARY, JsonBinaryLoader)),
    "jsonb": ((Format.TEXT, JsonbLoader), (Format.BINARY, JsonbBinaryLoader)),
}


def connection_kwargs(
    config: Config, *, conninfo: str = "", application_name: str = "conveyor"
) -> dict[str, Any]:
    """Keyword arguments for every connection conveyor opens (libpq options and psycopg's).

    `conninfo` is the URL the connection uses: its own `options`, if any, are kept
    ahead of conveyor's session settings.
    """
    own_options = conninfo_to_dict(conninfo).get("options", "") if conninfo else ""
    return {
        "application_name": application_name,
        "options": f"{own_options} {SESSION_SETTINGS}".strip(),
        "connect_timeout": max(int(config.connect_timeout.total_seconds()), 1),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        "prepare_threshold": config.prepare_threshold,
    }
