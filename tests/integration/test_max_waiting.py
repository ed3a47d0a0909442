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
    assert "units of work already wait for one (max_waiting=2); refused at once" in refused[0][1]
