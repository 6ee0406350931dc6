"""What one attempt produced, as the completer writes it."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

OutcomeState = Literal["succeeded", "failed", "cancelled", "retry"]

# Tracebacks are kept for debugging, but a runaway recursion must not bloat the row.
MAX_TRACEBACK_CHARS = 8_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt of job `job_id`, fenced by `token`."""

    job_id: int
    token: int
    state: OutcomeState
    result: str | None = None
    error: str | None = None
    retry_in_s: float | None = None
    refund: bool = False
    """Give the attempt back (snooze, shutdown return): it does not count."""

    @classmethod
    def succeeded(cls, job_id: int, token: int, result_json: str) -> Outcome:
        """A successful attempt with its JSON-encoded result."""
        return cls(job_id, token, "succeeded", result=result_json)

    @classmethod
    def retry(
        cls, job_id: int, token: int, delay: timedelta, error: str | None, *, refund: bool = False
    ) -> Outcome:
        """Run again after `delay`."""
        return cls(
            job_id, token, "retry", error=error, retry_in_s=delay.total_seconds(), refund=refund
        )


def error_record(exc: BaseException, attempt: int, *, with_traceback: bool = True) -> str:
    """The JSON entry appended to a job's error history for `exc`."""
    kind = type(exc)
    record: dict[str, Any] = {
        "attempt": attempt,
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "message": str(exc),
    }
    if with_traceback:
        text = "".join(traceback.format_exception(exc))
        record["traceback"] = text[-MAX_TRACEBACK_CHARS:]
    return json.dumps(record)
