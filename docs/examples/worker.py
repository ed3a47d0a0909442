"""A job worker with tether, outside any server, that stops cleanly on SIGTERM.

See "A worker process that stops on SIGTERM" in docs/recipes.md. Jobs are rows of a
PostgreSQL table; each is taken and done in one unit of work, so it is committed with its row
marked done, or rolled back and left to do (by the next worker, or this one after a restart)::

    CREATE TABLE jobs (id serial PRIMARY KEY, seconds float NOT NULL, done_at timestamptz);

    DATABASE_URL=postgresql://app:secret@127.0.0.1/app python -m docs.examples.worker

On SIGTERM (or Ctrl-C) it takes no new job; the job in hand has ``WORKER_GRACE`` seconds
(10 by default) to finish, then is cancelled, and rolls back. The app scope then closes the
pool, and the process exits 0. A second signal ends it at once.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio

import tether
from tether.integrations import asyncpg as tpg

log = logging.getLogger("worker")

POLL = 1.0  # seconds between looks at an empty queue


def database_url() -> str:
    """Read when the worker starts (never at import): secrets stay out of module state."""
    return os.environ["DATABASE_URL"]


lc = tether.Lifecycle()
pool = tpg.pool(lc, database_url, min_size=1, max_size=2)
tx = tpg.connection(lc, pool, transaction=True)  # one transaction per unit of work


async def run_one() -> bool:
    """Take the next job and do it, in one unit of work; False if there is none."""
    async with lc.scope("job") as unit:
        conn = await unit.get(tx)
        job = await conn.fetchrow(
            "SELECT id, seconds FROM jobs WHERE done_at IS NULL ORDER BY id "
            "LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
        if job is None:
            return False
        log.info("job %s: started", job["id"])
        await conn.execute("SELECT pg_sleep($1)", job["seconds"])  # the work
        await conn.execute("UPDATE jobs SET done_at = now() WHERE id = $1", job["id"])
    log.info("job %s: done", job["id"])  # committed when the block ended
    return True


async def main() -> None:
    grace = float(os.environ.get("WORKER_GRACE", "10"))
    stopping = anyio.Event()
    async with lc.run(), anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: no new job; the job in hand has %g s", signum.name, grace)
                    break
            stopping.set()
            await anyio.sleep(grace)
            log.warning("the job in hand ran past %g s: cancelled, rolled back", grace)
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        while not stopping.is_set():
            if not await run_one():
                with anyio.move_on_after(POLL):  # an empty queue: look again, or stop
                    await stopping.wait()
        tg.cancel_scope.cancel()  # stopped between jobs: no grace to wait out
    log.info("worker stopped")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    anyio.run(main)
