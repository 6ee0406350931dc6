"""A history checker for per-key FIFO, installed in a test database.

An AFTER STATEMENT trigger looks at every job a statement moved to `running`
and records a violation when an earlier, due job of the same (queue, key) is
still waiting at that moment. This is the FIFO guarantee itself, checked at
each claim's commit point, independent of clocks and process scheduling.
"""

from __future__ import annotations

from typing import Any

from conveyor import App

INSTALL = """
CREATE TABLE public.fifo_violations (
    job_id bigint NOT NULL,
    earlier_id bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION public.check_fifo() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.fifo_violations (job_id, earlier_id)
    SELECT n.id, w.id
    FROM new_rows AS n
    JOIN old_rows AS o USING (id)
    JOIN conveyor.jobs AS w
      ON w.queue = n.queue
     AND w.concurrency_key = n.concurrency_key
     AND w.id < n.id
     AND w.state IN ('scheduled', 'available')
     AND w.run_at <= conveyor.now()
    WHERE n.state = 'running' AND o.state <> 'running' AND n.concurrency_key IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER zz_check_fifo
    AFTER UPDATE ON conveyor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.check_fifo();
"""


async def install_fifo_checker(app: App) -> None:
    """Create the violations table and the checking trigger."""
    async with app.db.connection() as conn:
        await conn.execute(INSTALL)


async def fifo_violations(app: App) -> list[dict[str, Any]]:
    """Every (job, earlier waiting job) pair recorded so far."""
    async with app.db.connection() as conn:
        cur = await conn.execute("SELECT job_id, earlier_id FROM public.fifo_violations")
        return list(await cur.fetchall())
