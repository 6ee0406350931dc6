"""`make bench`: every conveyor scenario, then conveyor and its peers side by side.

    python -m benchmarks.run [--quick] [--repeats 3] [--out benchmarks/results]

Writes to `--out`:
- `latest.json`: every report (machine, PostgreSQL settings, parameters, results);
- `summary.md`: the tables `docs/performance.md` quotes, with the targets;
- one PNG per scenario, and `peers.png` for the side-by-side comparison.

Peers (`benchmarks/peers/`, installed by `pip install -e '.[peers]'`) run the
same workloads on a fresh database each; every side-by-side number is the
median of `--repeats` runs. A peer that is not installed is left out, and the
summary says so.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.peers import PEERS
from rich.console import Console
from rich.progress import Progress

from conveyor.bench import scenarios
from conveyor.bench.environment import fresh_database, machine, server_url
from conveyor.bench.runner import plot, run_scenario, scenario_names
from conveyor.cli.progress import progress_bar
from conveyor.event_loop import run as run_loop

COMPARED: list[tuple[str, dict[str, Any]]] = [
    ("throughput", {"jobs": 10_000, "concurrency": 10}),
    ("throughput", {"jobs": 10_000, "concurrency": 50}),
    ("enqueue", {"single": 1_000, "bulk": 100_000}),
    ("latency", {"jobs": 200, "rate_per_s": 50.0}),
]
QUICK_COMPARED: list[tuple[str, dict[str, Any]]] = [
    ("throughput", {"jobs": 2_000, "concurrency": 10}),
    ("enqueue", {"single": 200, "bulk": 10_000}),
]
HEADLINE = {
    # First start to last finish on the database clock, for conveyor and peers alike.
    "throughput": "span_jobs_per_s",
    "enqueue": "bulk_jobs_per_s",
    "latency": "p50_ms",
}
console = Console()


def _peer(name: str) -> Any | None:
    try:
        return importlib.import_module(f"benchmarks.peers.{name}_peer")
    except ImportError as exc:
        console.print(f"[yellow]peer {name} not available ({exc}); left out[/]")
        return None


async def _median_of(
    repeats: int, measure: Callable[[], Awaitable[dict[str, float]]]
) -> dict[str, float]:
    runs = [await measure() for _ in range(repeats)]
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: statistics.median(float(run[k]) for run in runs) for k in keys}


async def _compare(quick: bool, repeats: int, progress: Progress) -> dict[str, Any]:
    server = server_url()
    peers = {name: module for name in PEERS if (module := _peer(name)) is not None}
    table: list[dict[str, Any]] = []
    for scenario, params in QUICK_COMPARED if quick else COMPARED:
        bar = progress.add_task(f"side by side: {scenario} {params}", total=None)

        def tick(done: int, total: int, bar: Any = bar) -> None:
            progress.update(bar, completed=done, total=total)

        bench = scenarios.Bench(fresh=lambda: fresh_database(server), tick=tick)
        conveyor_fn = scenarios.SCENARIOS[scenario]
        row: dict[str, Any] = {"scenario": scenario, "params": params}
        row["conveyor"] = await _median_of(
            repeats, lambda fn=conveyor_fn, b=bench, p=params: fn(b, **p)
        )
        for name, module in peers.items():
            row[f"{name}_version"] = module.VERSION
            if (reason := getattr(module, "SKIP", {}).get(scenario)) is not None:
                row[name] = {}
                row[f"{name}_skipped"] = reason
                continue
            measure = functools.partial(_measure_peer, module, server, scenario, params)
            row[name] = await _median_of(repeats, measure)
        table.append(row)
    return {"repeats": repeats, "peers": list(peers), "rows": table}


async def _measure_peer(
    module: Any, server: str, scenario: str, params: dict[str, Any]
) -> dict[str, float]:
    """One run of a peer on a fresh database of its own."""
    with fresh_database(server, label="peer") as url:
        await module.setup(url)
        result: dict[str, float] = await getattr(module, scenario)(url, **params)
        return result


def _summary(reports: list[dict[str, Any]], comparison: dict[str, Any]) -> str:
    lines = ["# conveyor benchmarks", ""]
    info = reports[0]["machine"] if reports else machine(server_url())
    pg = info["postgres"]
    lines += [
        f"Machine: {info['cpus']} CPUs, Python {info['python']} on "
        f"{info.get('event_loop', 'asyncio')}, PostgreSQL "
        f"{pg['server_version']} on the same machine (shared_buffers {pg['shared_buffers']}, "
        f"synchronous_commit {pg['synchronous_commit']}, fsync {pg['fsync']}).",
        "",
        "## conveyor scenarios",
        "",
        "| scenario | parameters | results |",
        "|---|---|---|",
    ]
    for report in reports:
        for run in report["runs"]:
            params = ", ".join(f"{k}={v}" for k, v in run["params"].items())
            results = ", ".join(f"{k}={v}" for k, v in run["results"].items())
            lines.append(f"| {report['scenario']} | {params} | {results} |")
    peers = comparison["peers"]
    lines += [
        "",
        f"## Side by side (median of {comparison['repeats']}, fresh database each)",
        "",
        "| workload | measure | conveyor | " + " | ".join(peers) + " | conveyor vs best peer |",
        "|---|---|---|" + "---|" * len(peers) + "---|",
    ]
    for row in comparison["rows"]:
        measure = HEADLINE[row["scenario"]]
        ours = row["conveyor"].get(measure)
        theirs = [row[p].get(measure) for p in peers if row[p].get(measure)]
        lower_is_better = measure.endswith("_ms")
        best = (min(theirs) if lower_is_better else max(theirs)) if theirs else None
        ratio = ""
        if best and ours:
            ratio = f"{(best / ours if lower_is_better else ours / best):.2f}x"
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        cells = [f"{row[p][measure]:,.1f}" if measure in row[p] else "-" for p in peers]
        lines.append(
            f"| {row['scenario']} ({params}) | {measure} | {ours:,.1f} | "
            + " | ".join(cells)
            + f" | {ratio} |"
        )
    notes = {
        f"- {p} does not run {row['scenario']}: {row[f'{p}_skipped']}."
        for row in comparison["rows"]
        for p in peers
        if f"{p}_skipped" in row
    }
    versions = {p: row[f"{p}_version"] for row in comparison["rows"] for p in peers}
    lines += [
        "",
        "Peers: " + ", ".join(f"{p} {v}" for p, v in versions.items()) + ".",
        *sorted(notes),
    ]
    lines += ["", *_targets(reports, comparison)]
    return "\n".join(lines) + "\n"


def _targets(reports: list[dict[str, Any]], comparison: dict[str, Any]) -> list[str]:
    by_name = {r["scenario"]: r for r in reports}
    lines = ["## Targets (issue 7)", ""]

    def first(name: str) -> dict[str, Any]:
        return by_name[name]["runs"][0]["results"] if name in by_name else {}

    keys, latency, backlog, conns = (
        first("keys"),
        first("latency"),
        first("backlog"),
        first("connections"),
    )
    checks = [
        ("keys: one key at limit 10 >= 80% of plain", keys.get("one_key_vs_plain"), 0.8, ">="),
        ("keys: 100 keys at limit 2 >= 80% of plain", keys.get("hundred_keys_vs_plain"), 0.8, ">="),
        ("latency p50 <= 3 ms", latency.get("p50_ms"), 3, "<="),
        ("latency p99 <= 10 ms", latency.get("p99_ms"), 10, "<="),
        ("backlog: largest >= 90% of smallest", backlog.get("largest_vs_smallest"), 0.9, ">="),
        ("connections <= 4 at concurrency 200", conns.get("peak_connections"), 4, "<="),
    ]
    for row in comparison["rows"]:
        if row["scenario"] != "throughput":
            continue
        ours = row["conveyor"]["span_jobs_per_s"]
        best = max(
            (row[p]["span_jobs_per_s"] for p in comparison["peers"] if row[p]),
            default=None,
        )
        if best:
            label = f"throughput >= 2x fastest peer ({row['params']})"
            checks.append((label, round(ours / best, 2), 2, ">="))
    for label, value, goal, op in checks:
        if value is None:
            lines.append(f"- {label}: not measured")
            continue
        met = value >= goal if op == ">=" else value <= goal
        lines.append(f"- {label}: {value} {'met' if met else '**not met**'}")
    return lines


async def _measure(quick: bool, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with progress_bar(console) as progress:
        reports = [
            await run_scenario(name, quick=quick, progress=progress) for name in scenario_names()
        ]
        comparison = await _compare(quick, repeats, progress)
    return reports, comparison


def main(quick: bool, repeats: int, out: Path) -> None:
    """Measure everything, then write the results directory."""
    reports, comparison = run_loop(_measure(quick, repeats))
    out.mkdir(parents=True, exist_ok=True)
    for report in reports:
        plot(report, out / f"{report['scenario']}.png")
    _plot_peers(comparison, out / "peers.png")
    (out / "latest.json").write_text(
        json.dumps({"reports": reports, "comparison": comparison}, indent=2)
    )
    summary = _summary(reports, comparison)
    (out / "summary.md").write_text(summary)
    console.print(summary)
    console.print(f"written to {out}/ (latest.json, summary.md, *.png)")


def _plot_peers(comparison: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    systems = ["conveyor", *comparison["peers"]]
    figure, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.6), squeeze=False)
    for axis, row in zip(axes[0], rows, strict=True):
        measure = HEADLINE[row["scenario"]]
        values = [row[s].get(measure, 0) for s in systems]
        axis.bar(systems, values, color=["#3b6ea5", "#b0b0b0", "#d0d0d0"][: len(systems)])
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        axis.set_title(f"{row['scenario']}\n{params}", fontsize=9)
        axis.set_ylabel(measure)
        for index, value in enumerate(values):
            axis.text(index, value, f"{value:,.0f}" if value >= 10 else f"{value:.2f}",
                      ha="center", va="bottom", fontsize=8)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Small parameter sets.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side-by-side number.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    main(args.quick, args.repeats, args.out)
