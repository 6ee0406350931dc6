"""Run benchmark scenarios with their standard parameters, and report them.

A scenario's report is one JSON object: its parameters and results per
measurement, the machine, the PostgreSQL settings, conveyor's version and
when it was measured. `plot` draws its rates and latencies as a PNG (needs
matplotlib, the `bench` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.progress import Progress

from conveyor.bench.environment import fresh_database, machine, server_url
from conveyor.bench.scenarios import SCENARIOS, Bench, Result
from conveyor.cli.progress import progress_bar
from conveyor.event_loop import run as run_loop

Params = dict[str, Any]

PLANS: dict[str, tuple[list[Params], list[Params]]] = {
    # scenario: (full parameter sets, quick ones)
    "enqueue": ([{"single": 1_000, "bulk": 100_000}], [{"single": 200, "bulk": 10_000}]),
    "throughput": (
        [
            {"jobs": 10_000, "concurrency": 10},
            {"jobs": 10_000, "concurrency": 50},
            {"jobs": 100_000, "concurrency": 10},
            {"jobs": 100_000, "concurrency": 50},
            {"jobs": 10_000, "concurrency": 25, "processes": 2},
        ],
        [{"jobs": 10_000, "concurrency": 10}, {"jobs": 10_000, "concurrency": 50}],
    ),
    "latency": ([{"jobs": 200, "rate_per_s": 50.0}], [{"jobs": 100, "rate_per_s": 50.0}]),
    "keys": ([{"jobs": 10_000}], [{"jobs": 2_000}]),
    "pipelines": ([{"runs": 1_000}], [{"runs": 200}]),
    "backlog": (
        [{"waiting": (10_000, 100_000, 1_000_000)}],
        [{"waiting": (10_000, 100_000), "drained": 5_000}],
    ),
    "connections": ([{"jobs": 10_000, "concurrency": 200}], [{"jobs": 2_000, "concurrency": 200}]),
}


def scenario_names() -> list[str]:
    """Every scenario, in the order `all` runs them."""
    return list(SCENARIOS)


async def run_scenario(
    name: str,
    *,
    quick: bool = False,
    progress: Progress | None = None,
    server: str | None = None,
) -> Result:
    """Run every parameter set of scenario `name`; returns its report."""
    scenario = SCENARIOS[name]
    full, short = PLANS[name]
    server = server or server_url()
    runs: list[Result] = []
    for params in short if quick else full:
        label = f"{name} " + " ".join(f"{k}={_show(v)}" for k, v in params.items())
        bar = progress.add_task(label, total=None) if progress is not None else None

        def tick(done: int, total: int, bar: Any = bar) -> None:
            if progress is not None and bar is not None:
                progress.update(bar, completed=done, total=total)

        bench = Bench(fresh=lambda: fresh_database(server), tick=tick, quick=quick)
        results = await scenario(bench, **params)
        runs.append({"params": _jsonable(params), "results": results})
    from conveyor import __version__

    return {
        "scenario": name,
        "conveyor": __version__,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine(server),
        "runs": runs,
    }


def run_with_progress(name: str, *, quick: bool, show: bool) -> Result:
    """Run a scenario in a new event loop, with a progress bar when `show`."""
    if not show:
        return run_loop(run_scenario(name, quick=quick))
    with progress_bar() as progress:
        return run_loop(run_scenario(name, quick=quick, progress=progress))


def plot(report: Result, path: Path) -> None:
    """Draw a report's rates (per second) and latencies (ms) as bar charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates: dict[str, float] = {}
    millis: dict[str, float] = {}
    for run in report["runs"]:
        tag = ", ".join(f"{k}={_show(v)}" for k, v in run["params"].items())
        for key, value in run["results"].items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if key.endswith("_per_s"):
                rates[f"{key}\n({tag})"] = value
            elif key.endswith("_ms"):
                millis[f"{key}\n({tag})"] = value
    panels = [(title, data) for title, data in (("per second", rates), ("ms", millis)) if data]
    figure, axes = plt.subplots(len(panels) or 1, 1, figsize=(10, 3 + 0.45 * max(
        (len(d) for _, d in panels), default=1)), squeeze=False)  # fmt: skip
    for axis, (title, data) in zip(axes[:, 0], panels, strict=False):
        axis.barh(list(data), list(data.values()), color="#3b6ea5")
        axis.set_xlabel(title)
        axis.invert_yaxis()
        for index, value in enumerate(data.values()):
            axis.text(value, index, f" {value:,.0f}" if value >= 10 else f" {value:.2f}",
                      va="center", fontsize=8)  # fmt: skip
    figure.suptitle(f"conveyor bench {report['scenario']} ({report['measured_at']})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "/".join(_show(v) for v in value)
    if isinstance(value, int) and value >= 1000 and value % 1000 == 0:
        return f"{value // 1000}k"
    return str(value)


def _jsonable(params: Params) -> Params:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


Reporter = Callable[[Result], None]
