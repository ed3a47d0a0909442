"""`lc.stats().pools`: the drivers' own pool figures, against a real PostgreSQL.

Ground truth: the backends of each pool's application_name in pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import re
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


async def test_psycopg_waiters_that_gave_up_are_not_counted_as_waiting(
    postgres: Postgres,
) -> None:
    """psycopg keeps a waiter that timed out in its queue (``requests_waiting``) until the
    pool next hands a connection out. Three units of work time out on a held pool of 1:
    tether's figures say none waits any more, and readiness says busy, not saturated."""
    name = f"tt-gaveup-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle(check_timeout=3.0)
    pool = tpsy.pool(lc, postgres.dsn, name="pg", min_size=1, max_size=1, timeout=0.3,
                     kwargs={"application_name": name})  # fmt: skip
    conn = tpsy.connection(lc, pool)

    async def wait_in_vain() -> str:
        with pytest.raises(tether.ResourceUnavailable) as caught:
            async with lc.scope("waiter") as s:
                await s.get(conn)
        return str(caught.value)

    async with lc.run():
        async with lc.scope("holder") as s:
            await use(await s.get(conn))
            refusals = await asyncio.gather(*(wait_in_vain() for _ in range(3)))
            assert all("no connection came free within timeout=0.3 s" in r for r in refusals)
            psycopg_says = lc.get(pool).get_stats()["requests_waiting"]
            assert psycopg_says == 3  # the driver's own figure: the three that gave up
            figures = lc.stats().pools["pg"]
            assert (figures.in_use, figures.waiting) == (1, 0)
            await asyncio.sleep(0.4)  # longer than the pool's timeout since the last hand-out
            report = await lc.health()
            assert report.ok, report.as_dict()
            detail = report["pg"].detail or ""
            assert re.fullmatch(
                r"busy: the one connection in use; one was handed out \d+\.\d s ago", detail
            ), detail
        assert lc.stats().pools["pg"].waiting == 0


async def test_psycopg_a_connection_the_pool_is_still_making_is_not_in_use(
    postgres: Postgres,
) -> None:
    """psycopg counts a connection it is making in ``pool_size``, so ``pool_size`` −
    ``pool_available`` is not what is in use. One unit of work holds a connection and a
    second waits while the pool makes another (slowly, in ``configure``): one in use, one
    waiting; then two in use, none waiting."""
    name = f"tt-making-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    making = asyncio.Event()
    made = 0

    async def configure(conn: Any) -> None:
        nonlocal made
        made += 1
        if made > 1:  # the second one: the pool grows while a unit waits
            making.set()
            await asyncio.sleep(1.0)

    pool = tpsy.pool(lc, postgres.dsn, name="pg", min_size=1, max_size=2, timeout=10,
                     configure=configure, kwargs={"application_name": name})  # fmt: skip
    conn = tpsy.connection(lc, pool)
    second_has_one = asyncio.Event()
    done = asyncio.Event()

    async def second() -> None:
        async with lc.scope("second") as s:
            await use(await s.get(conn))
            second_has_one.set()
            await done.wait()

    async with lc.run():
        async with lc.scope("first") as s:
            await use(await s.get(conn))
            task = asyncio.create_task(second())
            await asyncio.wait_for(making.wait(), 5)
            stats = lc.get(pool).get_stats()
            assert (stats["pool_size"], stats["pool_available"]) == (2, 0)  # psycopg's own
            figures = lc.stats().pools["pg"]
            assert (figures.open, figures.in_use, figures.idle) == (2, 1, 0), figures
            assert figures.waiting == 1, figures
            await asyncio.wait_for(second_has_one.wait(), 5)
            figures = lc.stats().pools["pg"]
            assert (figures.in_use, figures.idle, figures.waiting) == (2, 0, 0), figures
            done.set()
            await task
        figures = lc.stats().pools["pg"]
        assert figures.in_use == 0, figures
