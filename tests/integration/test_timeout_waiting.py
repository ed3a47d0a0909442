"""The acquire-timeout message counts the others waiting, the same for every driver.

A pool of one connection, held; two units of work ask for one and time out. The first to
time out sees one other waiting, the second none: the unit timing out is no longer waiting,
so it does not count itself (asyncpg counted it, psycopg and SQLAlchemy did not; acceptance
audit N4, reliability.md #2).
"""

from typing import Any

import anyio
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


def asyncpg_conn(lc: tether.Lifecycle, pg: Postgres) -> Any:
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=1, acquire_timeout=0.3)
    return tpg.connection(lc, pool)


def psycopg_conn(lc: tether.Lifecycle, pg: Postgres) -> Any:
    pool = tpsy.pool(lc, pg.dsn, min_size=1, max_size=1, timeout=0.3)
    return tpsy.connection(lc, pool)


def sqlalchemy_session(lc: tether.Lifecycle, pg: Postgres) -> Any:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=1, pool_timeout=0.3)
    return tsa.session(lc, engine)


@pytest.mark.parametrize(
    "make", [asyncpg_conn, psycopg_conn, sqlalchemy_session], ids=["asyncpg", "psycopg", "sa"]
)
async def test_timeout_counts_the_others_waiting(postgres: Postgres, make: Any) -> None:
    lc = tether.Lifecycle()
    conn = make(lc, postgres)
    details: list[str] = []

    async def wait(delay: float) -> None:
        await anyio.sleep(delay)
        with pytest.raises(tether.ResourceUnavailable) as caught:
            async with lc.scope() as s:
                await s.get(conn)
        details.append(str(caught.value))

    async with lc.run():
        async with lc.scope() as holder:
            await holder.get(conn)
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, 0.0)
                tg.start_soon(wait, 0.1)
    assert len(details) == 2, details
    assert details[0].startswith("Pool "), details
    assert "(size 1, in use 1, waiting 1) could not give a connection: " in details[0], details
    assert "(size 1, in use 1, waiting 0) could not give a connection: " in details[1], details
