"""`max_waiting`: with every connection in use and that many units of work waiting, the next
one is refused at once (503) instead of queueing (reliability.md, test 3: load shedding).

A pool of one connection, held; `max_waiting=2`; six more units of work ask for a connection
at once against a real PostgreSQL. Two wait (and get the connection in turn once it is
released); four are refused in well under the acquire timeout, with a message that says why.
"""

import time
from typing import Any

import anyio
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


def asyncpg_conn(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=1, acquire_timeout=5, max_waiting=2)
    return tpg.connection(lc, pool)


def sqlalchemy_session(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=1, pool_timeout=5,
                        max_waiting=2)  # fmt: skip
    return tsa.session(lc, engine)


@pytest.mark.parametrize("make", [asyncpg_conn, sqlalchemy_session], ids=["asyncpg", "sqlalchemy"])
async def test_past_max_waiting_a_unit_is_refused_at_once(postgres: Postgres, make: Any) -> None:
    lc = tether.Lifecycle()
    conn = make(lc, postgres)
    served: list[float] = []
    refused: list[tuple[float, str]] = []

    async def ask(started: float) -> None:
        try:
            async with lc.scope() as s:
                await s.get(conn)
                served.append(time.monotonic() - started)
                await anyio.sleep(0.05)
        except tether.ResourceUnavailable as exc:
            refused.append((time.monotonic() - started, str(exc)))

    async with lc.run():
        release = anyio.Event()

        async def hold() -> None:
            async with lc.scope() as holder:
                await holder.get(conn)
                held.set()
                await release.wait()

        held = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await held.wait()
            started = time.monotonic()
            for _ in range(6):
                tg.start_soon(ask, started)
            await anyio.sleep(0.5)
            assert len(refused) == 4
            assert served == []
            release.set()  # the two waiting get the connection in turn
    assert len(served) == 2
    assert all(took < 1.0 for took, _ in refused), refused
    assert (
        "no connection is free (each is in use or still being made) and 2 units of work already "
        "wait for one (max_waiting=2); refused at once rather than queued"
    ) in refused[0][1]


def psycopg_conn(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    pool = tpsy.pool(lc, pg.dsn, min_size=1, max_size=3, timeout=5, max_waiting=2)
    return tpsy.connection(lc, pool)


def asyncpg_cold(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=3, acquire_timeout=5, max_waiting=2)
    return tpg.connection(lc, pool)


def sqlalchemy_cold(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=3, pool_timeout=5,
                        max_waiting=2)  # fmt: skip
    return tsa.session(lc, engine)


@pytest.mark.parametrize(
    "make", [asyncpg_cold, psycopg_conn, sqlalchemy_cold], ids=["asyncpg", "psycopg", "sqlalchemy"]
)
async def test_a_pool_still_filling_admits_its_size_and_max_waiting(
    postgres: Postgres, make: Any
) -> None:
    """A burst on a pool with fewer connections than its size (cold, or after a restart: the
    moments a stampede comes): at most size + max_waiting units are admitted, the rest
    refused at once. asyncpg's pool queued every one while it was still filling (its size
    counts the connections made), and each waited the whole acquire timeout for its 503.
    (psycopg's and SQLAlchemy's count a unit waiting for a connection being made as
    waiting, so on a cold pool they admit fewer: refused early, never late.)"""
    lc = tether.Lifecycle()
    conn = make(lc, postgres)
    served: list[float] = []
    refused: list[float] = []
    release = anyio.Event()

    async def ask(started: float) -> None:
        try:
            async with lc.scope() as s:
                await s.get(conn)
                served.append(time.monotonic() - started)
                await release.wait()
        except tether.ResourceUnavailable:
            refused.append(time.monotonic() - started)

    async with lc.run():
        async with anyio.create_task_group() as tg:
            started = time.monotonic()
            for _ in range(12):
                tg.start_soon(ask, started)
            with anyio.fail_after(4):  # well within the 5 s acquire timeout
                while len(refused) < 7:
                    await anyio.sleep(0.01)
                # Every connection made and handed out (a fixed 0.3 s may end before the
                # pool has made them on a loaded machine).
                while len(served) < 3:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)
            assert len(served) == 3
            admitted = 12 - len(refused)
            if make is asyncpg_cold:
                assert admitted == 5, (served, refused)  # 3 + max_waiting=2
            assert 3 <= admitted <= 5, (served, refused)
            release.set()
    assert len(served) == 12 - len(refused)
    assert all(took < 2.0 for took in refused), refused
