"""Named SQL queries loaded from the `.sql` files beside this module.

Each file groups the queries of one entity; a query starts with a
`-- name: entity_verb` header line. Files are written against the schema
`conveyor` so they run as-is in psql; `schema_qualify` swaps in the configured
schema, which `Config` has already validated as a plain identifier.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

_NAME_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_SCHEMA_PREFIX = re.compile(r"\bconveyor\.(?=[a-z_])")
_COMMENT_OR_QUOTED = re.compile(
    r"""(?P<quoted>'(?:[^']|'')*'|"(?:[^"]|"")*"|\$(?P<tag>\w*)\$.*?\$(?P=tag)\$)"""
    r"|(?P<comment>--[^\n]*)",
    re.DOTALL,
)


def strip_comments(text: str) -> str:
    """`text` without `--` comments (quoted strings and identifiers kept) or blank lines.

    The files explain themselves in comments; the server need not receive
    them. It also keeps hot statements under psycopg's 4 KB limit for caching
    its query conversion, which the claim's comments alone exceeded.
    """
    bare = _COMMENT_OR_QUOTED.sub(lambda m: m.group("quoted") or "", text)
    return "\n".join(line.rstrip() for line in bare.splitlines() if line.strip())


def schema_qualify(text: str, schema: str) -> str:
    """Replace the `conveyor.` schema prefix of `text` with the quoted `schema`."""
    quoted = sql.Identifier(schema).as_string()
    return _SCHEMA_PREFIX.sub(lambda _: f"{quoted}.", text)


def parse_queries(text: str) -> dict[str, str]:
    """Split a `.sql` file into `{name: statement}` by its `-- name:` headers."""
    parts = _NAME_HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        queries[name] = body.strip()
    return queries


@cache
def _raw_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for entry in sorted(resources.files("conveyor.db.sql").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            for name, body in parse_queries(entry.read_text(encoding="utf-8")).items():
                if name in queries:
                    raise ValueError(f"query {name!r} is defined twice")
                queries[name] = body
    return queries


class Queries:
    """The named queries of one schema, ready to execute."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        # Bytes, not sql.SQL: psycopg would render a Composable on every execution.
        self._compiled = {
            name: schema_qualify(strip_comments(body), schema).encode()
            for name, body in _raw_queries().items()
        }

    def __getitem__(self, name: str) -> bytes:
        return self._compiled[name]

    def names(self) -> list[str]:
        """All query names, sorted."""
        return sorted(self._compiled)
