"""The embedded PostgreSQL used when no database URL is configured.

`pgserver` ships PostgreSQL binaries in a wheel. The server runs from a
per-user data directory and is left running when the process exits, so the
next process (another worker, the next `make demo`) reuses it in milliseconds.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import platformdirs

from conveyor.errors import ConfigError

log = logging.getLogger("conveyor")

ENV_EMBEDDED_DIR = "CONVEYOR_EMBEDDED_DIR"

_lock = threading.Lock()
_urls: dict[Path, str] = {}


def default_data_dir() -> Path:
    """`$CONVEYOR_EMBEDDED_DIR`, else a `pgdata` folder in the user's data directory."""
    if custom := os.environ.get(ENV_EMBEDDED_DIR):
        return Path(custom)
    return platformdirs.user_data_path("conveyor") / "pgdata"


def embedded_database_url(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL in `data_dir` and return its URL."""
    path = (data_dir or default_data_dir()).resolve()
    with _lock:
        if path in _urls:
            return _urls[path]
        try:
            with warnings.catch_warnings():
                # pgserver asks platformdirs for a runtime dir at import; the fallback is fine.
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError as exc:
            raise ConfigError(
                "no database URL configured (CONVEYOR_DATABASE_URL is unset) and the embedded "
                "PostgreSQL is not installed: pip install 'conveyor[embedded]'"
            ) from exc
        path.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(path, cleanup_mode=None)  # type: ignore[attr-defined]
        url = str(server.get_uri())
        _urls[path] = url
        log.info("conveyor: using embedded PostgreSQL in %s", path)
        return url
