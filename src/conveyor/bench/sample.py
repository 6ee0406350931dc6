"""The app benchmarks run: no-op tasks and a no-op pipeline.

Worker processes started by `conveyor bench` import it as
`conveyor.bench.sample:app` (the database comes from `CONVEYOR_DATABASE_URL`).
"""

from __future__ import annotations

from conveyor.app import App
from conveyor.config import Config
from conveyor.context import JobContext

NOOP = "bench.noop"
PIPELINE = "bench_pipeline"
PIPELINE_STEPS = 5


def build_app(database_url: str | None = None, *, config: Config | None = None) -> App:
    """An App with the benchmark tasks and pipeline registered (on `config`, if given)."""
    app = App(database_url, config=config)

    @app.task(name=NOOP)
    async def noop(ctx: JobContext) -> None:
        return None

    pipe = app.pipeline(PIPELINE)

    async def step(ctx: JobContext) -> None:
        return None

    for index in range(PIPELINE_STEPS):
        pipe.step(name=f"s{index}")(step)
    return app


app = build_app()
