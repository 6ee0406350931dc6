"""What a pipeline step (or cleanup) sees of its run: `ctx.run`.

Reads come from the run's row as loaded before the attempt started (input,
metadata, prev_results) or from the database (state). Every write is fenced by
the attempt's lease token: an attempt that lost its job gets `LeaseLost` and
writes nothing, so a zombie worker can never overwrite what the new holder of
the step wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor import codec
from conveyor.errors import CounterLimitExceeded, InvalidArguments, LeaseLost
from conveyor.runs import RunFailure, RunState

if TYPE_CHECKING:
    from conveyor.context import JobContext
    from conveyor.db.database import Row


@dataclass(kw_only=True)
class RunContext:
    """The run a step belongs to, and its state and counters."""

    ctx: JobContext = field(repr=False)
    id: int
    pipeline: str
    step: str | None
    """This step's name; None in the cleanup."""
    input: Any
    metadata: dict[str, Any]
    prev_results: dict[str, Any]
    """Results of every step this one depends on, directly or through others, by
    name. In the cleanup: of every step that succeeded."""
    failure: RunFailure | None = None
    """Why the run halted; set in the cleanup only."""

    @classmethod
    def from_row(cls, ctx: JobContext, row: Row) -> RunContext:
        """Build from a `run_job_context` row."""
        results = codec.decode_values(row["prev_results"])
        metadata = codec.decode(row["metadata"])
        run_input = codec.decode(row["input"])
        failure = None
        if row["step"] is None:
            failure = RunFailure(
                run_id=row["run_id"],
                pipeline=row["pipeline"],
                state=RunState(row["run_state"]),
                failed_step=row["failed_step"],
                error=row["run_error"],
                results=results,
                input=run_input,
                metadata=metadata,
            )
        return cls(
            ctx=ctx,
            id=row["run_id"],
            pipeline=row["pipeline"],
            step=row["step"],
            input=run_input,
            metadata=metadata,
            prev_results=results,
            failure=failure,
        )

    # -- state -----------------------------------------------------------------

    async def state(self) -> dict[str, Any]:
        """The whole run state, as last committed."""
        rows = await self.ctx.app.db.fetch("read run state", "run_data_get", {"run_id": self.id})
        return codec.decode_values(rows[0]["data"]) if rows else {}

    async def get(self, name: str, default: Any = None) -> Any:
        """One value of the run state, or `default`."""
        return (await self.state()).get(name, default)

    async def set(self, name: str, value: Any) -> None:
        """Store `value` (any codec type) under `name` in the run state."""
        await self.update({name: value})

    async def update(self, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Store several names at once (one fenced write); other names are kept."""
        patch = {**(values or {}), **more}
        for name in patch:
            _check_name(name)
        await self._write_state(patch, [])

    async def delete(self, *names: str) -> None:
        """Remove names from the run state."""
        for name in names:
            _check_name(name)
        await self._write_state({}, list(names))

    async def _write_state(self, patch: dict[str, Any], remove: list[str]) -> None:
        encoded = codec.compact_json({k: codec.encode(v) for k, v in patch.items()})
        rows = await self.ctx.app.db.fetch(
            "write run state",
            "run_data_merge",
            {**self._fence(), "patch": encoded, "remove": remove},
        )
        if not rows:
            raise LeaseLost(
                f"job {self.ctx.job.id} no longer holds its lease: run state not written"
            )

    # -- counters --------------------------------------------------------------

    async def incr(self, name: str, by: int = 1, *, max: int | None = None) -> int:
        """Add `by` to the run counter `name` atomically and return its new value.

        Past `max`, raise `CounterLimitExceeded`: the step fails for good and the
        run halts. The count is persisted before that, so it survives crashes
        and a retried step cannot loop past the ceiling either.
        """
        _check_name(name)
        if not isinstance(by, int) or isinstance(by, bool):
            raise InvalidArguments(f"incr(by=...) must be an integer, got {by!r}")
        # Not idempotent: after a connection lost mid-statement the increment may
        # or may not have applied, so it is not resent (the step fails and retries).
        rows = await self.ctx.app.db.fetch(
            "increment run counter",
            "run_counter_incr",
            {**self._fence(), "name": name, "by": by},
            idempotent=False,
        )
        if not rows:
            raise LeaseLost(f"job {self.ctx.job.id} no longer holds its lease: counter not changed")
        value = int(rows[0]["value"])
        if max is not None and value > max:
            raise CounterLimitExceeded(name, value, max)
        return value

    async def counter(self, name: str) -> int:
        """The current value of a run counter (0 if never incremented)."""
        rows = await self.ctx.app.db.fetch(
            "read run counter", "run_counter_get", {"run_id": self.id, "name": name}
        )
        return int(rows[0]["value"]) if rows else 0

    def _fence(self) -> dict[str, Any]:
        job = self.ctx.job
        return {"run_id": self.id, "job_id": job.id, "token": job.lease_token}


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidArguments(f"run state and counter names are non-empty strings, got {name!r}")
