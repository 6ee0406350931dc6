"""How conveyor opens PostgreSQL connections: one place for URL resolution and socket options."""

from __future__ import annotations

import os
from typing import Any

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


def connection_kwargs(config: Config, *, application_name: str = "conveyor") -> dict[str, Any]:
    """Keyword arguments for every connection conveyor opens (libpq options and psycopg's)."""
    return {
        "application_name": application_name,
        "connect_timeout": max(int(config.connect_timeout.total_seconds()), 1),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        "prepare_threshold": config.prepare_threshold,
    }
