"""The pipelines the worker subprocesses of the pipeline concurrency tests run.

`build_app` (sample_app.py) registers them in every worker process and in the
test process alike, so both sides declare the same pipelines and steps.

Two side tables show what really happened, whatever the run records say:

- `public.step_log`: one row per execution of a step's body, written in
  autocommit when it enters (and `exited` stamped when it leaves), never
  fenced: a step executed twice shows up as two rows, with attempt and process.
- `public.ledger`: one row per step, written through `ctx.step("ledger", ...,
  atomic=True)`, in the transaction that records the job's checkpoint: a retried
  attempt finds the checkpoint and writes nothing, so any duplicate row is a bug.

Every result is a pure function of the run's input (see the `expected_*`
functions), so a run that got another run's data, or a step's result twice
applied, is caught by comparing results.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from conveyor import App, Fail, FixedDelay, JobContext, RunFailure

MEET = "meet"
CRASHY = "crashy"
HANDOFF = "handoff"
DAG = "dag6"
MIXED = "mixed"
SERIAL = "serial"
LIGHT = "light"
FANFAIL = "fanfail"
SLOW = "slow"
POISONED = "poisoned"

HANDOFF_QUEUE = "handoff"
"""The queue of HANDOFF's third step: a worker that does not claim from it stops
the run right after the second step's end is recorded."""

CRASHY_STEPS = ("s1", "s2", "s3", "s4")
HANDOFF_STEPS = ("a", "b", "c", "d")
DAG_STEPS = ("a", "b", "c", "d", "e", "f")
DAG_DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "a": (),
    "b": ("a",),
    "c": ("a",),
    "d": ("a",),
    "e": ("b", "c"),
    "f": ("d", "e"),
}
DAG_ANCESTORS: dict[str, frozenset[str]] = {
    "a": frozenset(),
    "b": frozenset("a"),
    "c": frozenset("a"),
    "d": frozenset("a"),
    "e": frozenset("abc"),
    "f": frozenset("abcde"),
}
MIXED_STEPS = ("s1", "s2", "s3", "s4", "s5")
MIXED_FAILING_STEP = "s3"
MIXED_FAIL_ATTEMPTS = 2
"""s3 of a failing input raises on each of its attempts, then the run halts."""
CLEANUP_STEP = "on_failure"
"""The name the cleanup writes its ledger row and step_log rows under."""
SERIAL_STEPS = ("k1", "k2", "k3")
LIGHT_STEPS = ("l1", "l2", "l3")
FANFAIL_STEPS = ("r", "p", "q", "w", "j")
FANFAIL_SIBLINGS = ("q", "w")
"""Steps that run beside `p` and keep writing run state and counters while it fails."""
SLOW_STEPS = ("t1", "t2", "t3", "t4")
POISONED_STEPS = ("ok", "boom", "never")
POISON_MAX_ATTEMPTS = 2
"""`boom` kills the worker running it on each of its attempts."""

STEP_LOG_DDL = """
CREATE TABLE public.step_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline text NOT NULL,
    run_id bigint NOT NULL,
    step text NOT NULL,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    entered timestamptz NOT NULL DEFAULT clock_timestamp(),
    exited timestamptz
)
"""
LEDGER_DDL = """
CREATE TABLE public.ledger (
    run_id bigint NOT NULL,
    step text NOT NULL,
    job_id bigint NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
"""No unique key on purpose: a second write for a (run, step) shows up as a row."""

TASK_POLL_S = 0.02
WAIT_LIMIT_S = 60.0
"""How long a step waits for a gate or a rendezvous before it fails loudly."""


# -- the pure functions the tests check results against ----------------------


def expected_meet(n: int) -> dict[str, Any]:
    """MEET's final result for input n."""
    return {"n": n, "value": 4 * n * n + n, "tag": f"run-{n}", "hops": 3}


def expected_crashy(n: int) -> dict[str, int]:
    """CRASHY's (and HANDOFF's) final result for input n."""
    return {"n": n, "value": (n + 1) * 3 - 2}


def expected_dag(n: int) -> dict[str, int]:
    """Every step's result of DAG for input n."""
    a = n
    b, c, d = a + 1, a * 2, a * a
    e = b * c
    return {"a": a, "b": b, "c": c, "d": d, "e": e, "f": d + e}


def mixed_fails(n: int) -> bool:
    """Whether MIXED's input n fails for good at its third step."""
    return n % 4 == 0


def expected_mixed(n: int) -> int:
    """MIXED's final result for an input that does not fail."""
    return n + 5


def expected_light(n: int) -> dict[str, int]:
    """LIGHT's final result for input n."""
    return {"n": n, "value": n * 10 + 7, "counter": 2}


# -- side-table helpers --------------------------------------------------------


async def _sql(ctx: JobContext, statement: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    async with ctx.app.db.connection() as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall() if cur.description else []


def _step_name(ctx: JobContext) -> str:
    return ctx.run.step or CLEANUP_STEP


async def _enter(ctx: JobContext) -> int:
    rows = await _sql(
        ctx,
        "INSERT INTO public.step_log (pipeline, run_id, step, job_id, attempt, pid)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (ctx.run.pipeline, ctx.run.id, _step_name(ctx), ctx.job.id, ctx.attempt, os.getpid()),
    )
    return int(rows[0]["id"])


async def _leave(ctx: JobContext, log_id: int) -> None:
    await _sql(
        ctx, "UPDATE public.step_log SET exited = clock_timestamp() WHERE id = %s", (log_id,)
    )


async def _insert_ledger(conn: Any, run_id: int, step: str, job_id: int) -> bool:
    await conn.execute(
        "INSERT INTO public.ledger (run_id, step, job_id, pid) VALUES (%s, %s, %s, %s)",
        (run_id, step, job_id, os.getpid()),
    )
    return True


async def _write_ledger(ctx: JobContext) -> None:
    await ctx.step("ledger", _insert_ledger, ctx.run.id, _step_name(ctx), ctx.job.id, atomic=True)


async def _poll(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_LIMIT_S
    while not await condition():
        if loop.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {WAIT_LIMIT_S}s")
        await asyncio.sleep(TASK_POLL_S)


async def _hold_if_asked(ctx: JobContext) -> None:
    """Block while the gate file of this attempt is missing, if the run's input names
    this step in `hold` (`{attempt}` in the gate path is the attempt's number)."""
    run_input = ctx.run.input
    if run_input.get("hold") != ctx.run.step:
        return
    gate = Path(run_input["gate"].format(attempt=ctx.attempt))

    async def opened() -> bool:
        return gate.exists()

    await _poll(opened, f"gate {gate}")


async def _work(ctx: JobContext) -> None:
    if work_s := ctx.run.input.get("work_s", 0):
        await asyncio.sleep(work_s)  # simulated work, not synchronisation


Body = Callable[[JobContext], Awaitable[Any]]


def _traced(body: Body, *, ledger: bool = True) -> Callable[[JobContext], Awaitable[Any]]:
    """A step that logs its execution, writes its ledger row once, then runs `body`."""

    async def step(ctx: JobContext) -> Any:
        log_id = await _enter(ctx)
        if ledger:
            await _write_ledger(ctx)
        await _hold_if_asked(ctx)
        await _work(ctx)
        result = await body(ctx)
        await _leave(ctx, log_id)
        return result

    return step


def _check_ancestors(ctx: JobContext, expected: frozenset[str]) -> None:
    got = set(ctx.run.prev_results)
    if got != expected:
        raise Fail(f"step {ctx.run.step} got prev_results {sorted(got)}, not {sorted(expected)}")


# -- the pipelines -------------------------------------------------------------


def register_pipelines(app: App) -> None:
    """Declare every pipeline of the pipeline concurrency tests on `app`."""
    _register_meet(app)
    _register_crashy(app)
    _register_handoff(app)
    _register_dag(app)
    _register_mixed(app)
    _register_serial(app)
    _register_light(app)
    _register_fanfail(app)
    _register_slow(app)
    _register_poisoned(app)


def _register_meet(app: App) -> None:
    """meet -> double -> square -> finish; `meet` waits until `parties` processes are
    inside a `meet` at once; the others use run state and counters."""
    pipe = app.pipeline(MEET)

    async def meet(ctx: JobContext) -> int:
        parties = int(ctx.run.input["parties"])

        async def enough() -> bool:
            rows = await _sql(
                ctx,
                "SELECT count(DISTINCT pid) AS n FROM public.step_log"
                " WHERE pipeline = %s AND step = 'meet'",
                (MEET,),
            )
            return int(rows[0]["n"]) >= parties

        await _poll(enough, f"{parties} processes in meet")
        return int(ctx.run.input["n"])

    async def double(ctx: JobContext) -> int:
        value = 2 * ctx.run.prev_results["meet"]
        await ctx.run.set("doubled", value)
        await ctx.run.incr("hops")
        return int(value)

    async def square(ctx: JobContext) -> int:
        stored = await ctx.run.get("doubled")
        if stored != ctx.run.prev_results["double"]:
            raise Fail(f"run state says {stored}, prev_results {ctx.run.prev_results}")
        await ctx.run.incr("hops")
        return int(stored * stored)

    async def finish(ctx: JobContext) -> dict[str, Any]:
        _check_ancestors(ctx, frozenset({"meet", "double", "square"}))
        prev = ctx.run.prev_results
        return {
            "n": ctx.run.input["n"],
            "value": prev["square"] + prev["meet"],
            "tag": ctx.run.metadata["tag"],
            "hops": await ctx.run.incr("hops"),
        }

    pipe.step(name="meet")(_traced(meet, ledger=False))
    pipe.step(name="double")(_traced(double, ledger=False))
    pipe.step(name="square")(_traced(square, ledger=False))
    pipe.step(name="finish")(_traced(finish, ledger=False))


def _register_chain(app: App, name: str, steps: Sequence[str], queues: dict[str, str]) -> None:
    """n -> n + 1 -> * 3 -> - 2 -> {n, value}, every step traced and ledgered."""
    pipe = app.pipeline(name)
    first, second, third, _ = steps

    async def one(ctx: JobContext) -> int:
        return int(ctx.run.input["n"]) + 1

    async def two(ctx: JobContext) -> int:
        return int(ctx.run.prev_results[first]) * 3

    async def three(ctx: JobContext) -> int:
        return int(ctx.run.prev_results[second]) - 2

    async def four(ctx: JobContext) -> dict[str, int]:
        _check_ancestors(ctx, frozenset({first, second, third}))
        return {"n": ctx.run.input["n"], "value": ctx.run.prev_results[third]}

    for step, body in zip(steps, (one, two, three, four), strict=True):
        options: dict[str, Any] = {}
        if step in queues:
            options["queue"] = queues[step]
        pipe.step(name=step, **options)(_traced(body))


def _register_crashy(app: App) -> None:
    _register_chain(app, CRASHY, CRASHY_STEPS, {})


def _register_handoff(app: App) -> None:
    _register_chain(app, HANDOFF, HANDOFF_STEPS, {"c": HANDOFF_QUEUE})


def _register_dag(app: App) -> None:
    """a -> (b, c, d); (b, c) -> e; (d, e) -> f. Each step checks it received exactly
    its ancestors' results."""
    pipe = app.pipeline(DAG)

    def compute(step: str) -> Body:
        async def body(ctx: JobContext) -> int:
            _check_ancestors(ctx, DAG_ANCESTORS[step])
            prev = ctx.run.prev_results
            if step == "a":
                return int(ctx.run.input["n"])
            if step == "b":
                return int(prev["a"]) + 1
            if step == "c":
                return int(prev["a"]) * 2
            if step == "d":
                return int(prev["a"]) ** 2
            if step == "e":
                return int(prev["b"]) * int(prev["c"])
            return int(prev["d"]) + int(prev["e"])

        return body

    for step in DAG_STEPS:
        pipe.step(name=step, depends_on=list(DAG_DEPENDS_ON[step]))(_traced(compute(step)))


async def _report_failure(ctx: JobContext, failure: RunFailure) -> dict[str, Any]:
    """A cleanup: logged, one ledger row, and what it was told, as its result."""
    log_id = await _enter(ctx)
    await _write_ledger(ctx)
    await _leave(ctx, log_id)
    return {
        "run_id": failure.run_id,
        "state": str(failure.state),
        "failed_step": failure.failed_step,
        "error": None if failure.error is None else failure.error.get("message"),
        "results": failure.results,
        "input": failure.input,
        "metadata": failure.metadata,
    }


def _register_mixed(app: App) -> None:
    """s1..s5, each adds 1; s3 raises on every attempt for inputs where `mixed_fails`;
    the cleanup writes its ledger row once and returns what it was told."""
    pipe = app.pipeline(MIXED)

    def add_one(step: str, previous: str | None) -> Body:
        async def body(ctx: JobContext) -> int:
            n = int(ctx.run.input["n"])
            if step == MIXED_FAILING_STEP and mixed_fails(n):
                raise RuntimeError(f"input {n} fails at {step}")
            base = n if previous is None else int(ctx.run.prev_results[previous])
            return base + 1

        return body

    previous: str | None = None
    for step in MIXED_STEPS:
        options: dict[str, Any] = {}
        if step == MIXED_FAILING_STEP:
            options = {"max_attempts": MIXED_FAIL_ATTEMPTS, "retry": FixedDelay(timedelta(0))}
        pipe.step(name=step, **options)(_traced(add_one(step, previous)))
        previous = step

    pipe.on_failure()(_report_failure)


def _register_serial(app: App) -> None:
    """k1 -> k2 -> k3, traced, each working `work_s`: runs sharing a key must not overlap."""
    pipe = app.pipeline(SERIAL)

    def passthrough(step: str) -> Body:
        async def body(ctx: JobContext) -> str:
            return f"{ctx.run.input['n']}:{step}"

        return body

    for step in SERIAL_STEPS:
        pipe.step(name=step)(_traced(passthrough(step), ledger=False))


def _register_light(app: App) -> None:
    """l1 -> l2 -> l3: light steps using run state, counters and the ledger (load tests)."""
    pipe = app.pipeline(LIGHT)

    async def l1(ctx: JobContext) -> int:
        await ctx.run.incr("steps")
        return int(ctx.run.input["n"])

    async def l2(ctx: JobContext) -> int:
        await ctx.run.set("tenfold", ctx.run.prev_results["l1"] * 10)
        await _write_ledger(ctx)
        await ctx.run.incr("steps")
        return int(ctx.run.prev_results["l1"]) + 7

    async def l3(ctx: JobContext) -> dict[str, int]:
        tenfold = await ctx.run.get("tenfold")
        await _write_ledger(ctx)
        return {
            "n": ctx.run.input["n"],
            "value": tenfold + 7,
            "counter": int(await ctx.run.counter("steps")),
        }

    pipe.step(name="l1")(l1)
    pipe.step(name="l2")(l2)
    pipe.step(name="l3")(l3)


def _register_fanfail(app: App) -> None:
    """r -> (p, q, w) -> j. `p` fails for good when the input says `fail`, while its
    siblings `q` and `w` (other processes, often) write run state and counters."""
    pipe = app.pipeline(FANFAIL)

    async def root(ctx: JobContext) -> int:
        return int(ctx.run.input["n"])

    async def failing(ctx: JobContext) -> int:
        await asyncio.sleep(ctx.run.input["p_work_s"])  # simulated work
        if ctx.run.input["fail"]:
            raise Fail(f"input {ctx.run.input['n']} fails at p")
        return 1

    def writer(step: str) -> Body:
        async def body(ctx: JobContext) -> int:
            for i in range(ctx.run.input["writes"]):
                await ctx.run.set(f"{step}{i}", i)
                await ctx.run.incr("writes")
                await asyncio.sleep(ctx.run.input["pause_s"])  # simulated work
            return int(ctx.run.input["n"])

        return body

    async def join(ctx: JobContext) -> int:
        _check_ancestors(ctx, frozenset({"r", "p", "q", "w"}))
        prev = ctx.run.prev_results
        return int(prev["r"] + prev["p"] + prev["q"] + prev["w"])

    pipe.step(name="r", depends_on=[])(_traced(root))
    pipe.step(name="p", depends_on=["r"])(_traced(failing))
    pipe.step(name="q", depends_on=["r"])(_traced(writer("q")))
    pipe.step(name="w", depends_on=["r"])(_traced(writer("w")))
    pipe.step(name="j", depends_on=["p", "q", "w"])(_traced(join))
    pipe.on_failure()(_report_failure)


def _register_slow(app: App) -> None:
    """t1 -> t2 -> t3 -> t4, each working `work_s`, with a cleanup: runs to cancel."""
    pipe = app.pipeline(SLOW)

    def count(step: str, previous: str | None) -> Body:
        async def body(ctx: JobContext) -> int:
            if previous is None:
                return int(ctx.run.input["n"])
            return int(ctx.run.prev_results[previous]) + 1

        return body

    previous: str | None = None
    for step in SLOW_STEPS:
        pipe.step(name=step)(_traced(count(step, previous)))
        previous = step
    pipe.on_failure()(_report_failure)


def _register_poisoned(app: App) -> None:
    """ok -> boom -> never: `boom` kills its worker (an OOM kill) on every attempt, so
    only the rescuer can end it, failed, after its attempts; the cleanup then runs."""
    pipe = app.pipeline(POISONED)

    async def ok(ctx: JobContext) -> int:
        return int(ctx.run.input["n"])

    async def boom(ctx: JobContext) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    async def never(ctx: JobContext) -> None:
        raise Fail("the step after a poisoned one must never run")

    pipe.step(name="ok")(_traced(ok))
    pipe.step(name="boom", max_attempts=POISON_MAX_ATTEMPTS)(_traced(boom))
    pipe.step(name="never")(_traced(never))
    pipe.on_failure()(_report_failure)
