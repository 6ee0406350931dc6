"""`conveyor bench SCENARIO`: measure one scenario (or all) on fresh databases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from conveyor.cli.common import console, fail


def bench(
    scenario: Annotated[
        str,
        typer.Argument(
            help="enqueue, throughput, latency, keys, pipelines, backlog, connections, or all."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON report.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw the results as a PNG here.")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Smaller parameter sets (for a smoke run).")] = False,
) -> None:
    """Benchmark conveyor on this machine's PostgreSQL (CONVEYOR_DATABASE_URL, else the
    embedded server); each measurement gets a fresh database."""
    from conveyor.bench.runner import plot as draw
    from conveyor.bench.runner import run_with_progress, scenario_names

    names = scenario_names() if scenario == "all" else [scenario]
    unknown = [n for n in names if n not in scenario_names()]
    if unknown:
        raise fail(ValueError(f"unknown scenario {unknown[0]!r}; one of {scenario_names()}"))
    for name in names:
        report = run_with_progress(name, quick=quick, show=not as_json)
        print(json.dumps(report))
        if not as_json:
            _table(report)
        if plot is not None:
            target = plot if len(names) == 1 else plot.with_stem(f"{plot.stem}-{name}")
            draw(report, target)
            if not as_json:
                console.print(f"plot written to {target}")


def _table(report: dict[str, object]) -> None:
    table = Table(title=f"conveyor bench {report['scenario']}")
    table.add_column("parameters")
    table.add_column("results")
    runs = report["runs"]
    assert isinstance(runs, list)
    for run in runs:
        params = ", ".join(f"{k}={v}" for k, v in run["params"].items())
        results = ", ".join(f"{k}={v}" for k, v in run["results"].items())
        table.add_row(params, results)
    console.print(table)
