"""An app for the CLI tests; its database comes from CONVEYOR_DATABASE_URL at import."""

from __future__ import annotations

from conveyor import App, JobContext

app = App()


@app.task(name="multiply")
async def multiply(ctx: JobContext, a: int, b: int) -> int:
    return a * b


not_an_app = 42
