"""Batch parameters: one array per column, for the `unnest(...)` batch statements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def columns(items: Sequence[object], *fields: str, **renamed: str) -> dict[str, list[Any]]:
    """`{param: [getattr(item, attribute) for item in items]}`.

    `fields` are attributes passed under their own name; `renamed` maps a
    parameter name to the attribute that fills it (`id="job_id"`).
    """
    names = {name: name for name in fields} | renamed
    return {param: [getattr(item, attr) for item in items] for param, attr in names.items()}
