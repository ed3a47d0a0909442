"""`lc.stats().pools`: the drivers' own pool figures, against a real PostgreSQL.

Ground truth: the backends of each pool's application_name in pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


def asyncpg_pool(lc: tether.Lifecycle, pg: Postgres, name: str) -> tether.Resource[Any]:
    pool = tpg.pool(
        lc, pg.dsn, name="pg", min_size=1, max_size=3, server_settings={"application_name": name}
    )
    return tpg.connection(lc, pool)


def psycopg_pool(lc: tether.Lifecycle, pg: Postgres, name: str) -> tether.Resource[Any]:
    pool = tpsy.pool(lc, pg.dsn, name="pg", min_size=1, max_size=3, timeout=10,
                     kwargs={"application_name": name})  # fmt: skip
    return tpsy.connection(lc, pool)


def sqlalchemy_engine(lc: tether.Lifecycle, pg: Postgres, name: str) -> tether.Resource[Any]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), name="pg", pool_size=2,
                        max_overflow=1, pool_timeout=10, application_name=name)  # fmt: skip
    return tsa.session(lc, engine)


async def use(conn: Any) -> None:
    """Make the driver check a connection out (a session connects on first use)."""
    if hasattr(conn, "execute") and hasattr(conn, "get_bind"):  # an AsyncSession
        from sqlalchemy import text

        await conn.execute(text("SELECT 1"))
    elif hasattr(conn, "fetchval"):
        await conn.fetchval("SELECT 1")
    else:
        await conn.execute("SELECT 1")


@pytest.mark.parametrize(
    ("make", "waits"),
    [(asyncpg_pool, True), (psycopg_pool, True), (sqlalchemy_engine, False)],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)
async def test_pool_figures_follow_the_connections_in_use(
    postgres: Postgres, make: Callable[..., tether.Resource[Any]], waits: bool
) -> None:
    """Two units hold connections, a fourth waits on a full pool of 3: the figures say so,
    and match the server's backends; when all are back, none is in use."""
    name = f"tt-pools-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    conn = make(lc, postgres, name)
    release = asyncio.Event()
    holding = 0

    async def hold() -> None:
        nonlocal holding
        async with lc.scope("holder") as s:
            await use(await s.get(conn))
            holding += 1
            await release.wait()

    async def until(check: Callable[[], bool]) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never true: {lc.stats().pools}")

    async with lc.run():
        idle = lc.stats().pools["pg"]
        assert (idle.name, idle.max, idle.in_use) == ("pg", 3, 0)
        assert idle.waiting == (0 if waits else None)
        tasks = [asyncio.create_task(hold()) for _ in range(3)]
        await until(lambda: holding == 3)
        full = lc.stats().pools["pg"]
        assert (full.max, full.open, full.in_use, full.idle) == (3, 3, 3, 0)
        assert len(postgres.activity(name)) == full.open
        if waits:
            fourth = asyncio.create_task(hold())
            await until(lambda: lc.stats().pools["pg"].waiting == 1)
            tasks.append(fourth)
        release.set()
        await asyncio.gather(*tasks)
        done = lc.stats().pools["pg"]
        assert (done.in_use, done.waiting) == (0, 0 if waits else None)
        assert done.idle == done.open
        assert len(postgres.activity(name)) == done.open
    assert lc.stats().pools == {}  # closed: no figures
