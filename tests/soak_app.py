"""The app `tests/soak.py` serves under uvicorn: asyncpg and SQLAlchemy over a fault proxy.

Configured from the environment when its lifespan starts: ``SOAK_DSN`` (PostgreSQL through the
proxy) and ``SOAK_APP`` (the application_name of its connections, for the server-side count).
``/_soak`` reports what the harness compares over the run: the process's tasks, file
descriptors and resident memory, and tether's own figures.
"""

import asyncio
import gc
import logging
import os
from collections import Counter
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import tether
from tether.fastapi import health_router
from tether.integrations import asyncpg as tpg
from tether.integrations import sqlalchemy as tsa

MAX_PG, MAX_SA = 5, 3


class _NoTraceback(logging.Filter):
    """asyncpg logs, with a traceback, each failed attempt to reconnect its pool's
    min_size while PostgreSQL restarts: the soak's restart fault. The line stays, the
    traceback goes, so the soak's check of the log finds only what is not expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to restore the pool connection floor"):
            record.exc_info = None
        return True


logging.getLogger("asyncpg.pool").addFilter(_NoTraceback())

lc = tether.Lifecycle(drain_timeout=5.0, close_timeout=5.0)
pool = tpg.pool(
    lc,
    lambda: os.environ["SOAK_DSN"],
    name="pg",
    min_size=2,
    max_size=MAX_PG,
    acquire_timeout=1.0,
    command_timeout=3.0,
    server_settings={"application_name": os.environ.get("SOAK_APP", "tether-soak")},
)
tx = tpg.connection(lc, pool, name="tx", transaction=True)
engine = tsa.engine(
    lc,
    lambda: (
        os.environ["SOAK_DSN"]
        .replace("postgresql://", "postgresql+asyncpg://", 1)
        .replace("sslmode=", "ssl=")  # SQLAlchemy hands its URL's query to asyncpg.connect
    ),
    name="sa",
    pool_size=MAX_SA,
    pool_timeout=1.0,
    connect_timeout=2,
    application_name=os.environ.get("SOAK_APP", "tether-soak"),
)
session = tsa.session(lc, engine)

Tx = Annotated[asyncpg.Connection, Depends(tx)]
Session = Annotated[AsyncSession, Depends(session)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


@app.get("/pg/{x}")
async def pg_echo(x: int, c: Tx) -> dict[str, int]:
    # Two round trips in the unit's transaction: a reply meant for another unit of work (a
    # cancelled query's, read by the next user of its connection) would show here.
    await c.execute("SELECT pg_sleep(0.002)")
    return {"x": await c.fetchval("SELECT $1::int", x)}


@app.get("/sa/{x}")
async def sa_echo(x: int, s: Session) -> dict[str, int]:
    return {"x": (await s.execute(text("SELECT CAST(:x AS int)"), {"x": x})).scalar_one()}


@app.get("/slow")
async def slow(c: Tx, seconds: float = 1.0) -> dict[str, str]:
    await c.execute("SELECT pg_sleep($1)", seconds)
    return {"status": "slept"}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0  # pragma: no cover - Linux only


@app.get("/_soak")
async def probe(types: bool = False) -> dict[str, Any]:
    stats = lc.stats()
    counts: dict[str, int] = {}
    if types:  # what the garbage collector tracks, by type (to tell what grows)
        gc.collect()
        counts = dict(Counter(type(o).__qualname__ for o in gc.get_objects()))
    return {
        "types": counts,
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_kib": _rss_kib(),
        "in_use": {n: r.in_use for n, r in stats.resources.items() if r.scope == "request"},
        "leaks": sum(r.leaks for r in stats.resources.values()),
        "pools": {
            name: {"open": p.open, "in_use": p.in_use, "idle": p.idle}
            for name, p in stats.pools.items()
        },
        "units_in_flight": stats.units_in_flight,
    }
