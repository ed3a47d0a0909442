"""Connections the server closes while they sit idle in the pool (pain.md T8.2).

A PostgreSQL with `idle_session_timeout = 3s` ends every backend left idle that long, as a
server or a proxy with an idle timeout does. After a longer pause, the next requests succeed,
each on a backend started after the pause: the pools notice (asyncpg reads its idle sockets) or
check (psycopg's and SQLAlchemy's pre-ping) before handing a connection out.

psycopg's pool makes the first request after such a pause wait about a second: it discards the
dead connections it finds, then opens new ones from its worker with a delay of its own. With an
idle timeout as short as one second the new connections die waiting too, and requests time out
(503): keep a pool's connections busier than the idle timeout, or the timeout longer.
"""

import time
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with Postgres(settings={"idle_session_timeout": "3s"}) as server:
        yield server


async def _asyncpg_pid(c: Any) -> int:
    return int(await c.fetchval("SELECT pg_backend_pid()"))


async def _psycopg_pid(c: Any) -> int:
    return int((await (await c.execute("SELECT pg_backend_pid()")).fetchone())[0])


async def _sqlalchemy_pid(s: Any) -> int:
    from sqlalchemy import text

    return int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def asyncpg_conn(lc: tether.Lifecycle, pg: Postgres) -> tuple[tether.Resource[Any], Any]:
    return tpg.connection(lc, tpg.pool(lc, pg.dsn, min_size=2, max_size=2)), _asyncpg_pid


def psycopg_conn(lc: tether.Lifecycle, pg: Postgres) -> tuple[tether.Resource[Any], Any]:
    return tpsy.connection(lc, tpsy.pool(lc, pg.dsn, min_size=2, max_size=2)), _psycopg_pid


def sqlalchemy_session(lc: tether.Lifecycle, pg: Postgres) -> tuple[tether.Resource[Any], Any]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=2)
    return tsa.session(lc, engine), _sqlalchemy_pid


@pytest.mark.parametrize("make", [asyncpg_conn, psycopg_conn, sqlalchemy_session],
                         ids=["asyncpg", "psycopg", "sqlalchemy"])  # fmt: skip
def test_connections_closed_while_idle_are_replaced_not_handed_out(pg: Postgres, make: Any) -> None:
    lc = tether.Lifecycle()
    conn, pid_of = make(lc, pg)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pid")
    async def pid(c: Annotated[Any, Depends(conn)]) -> int:
        return int(await pid_of(c))

    with TestClient(app) as client:
        before = {client.get("/pid").json() for _ in range(4)}
        time.sleep(4)  # every idle backend ends after 3 s
        assert not {row["pid"] for row in pg.activity()} & before
        answers = [client.get("/pid") for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert not {a.json() for a in answers} & before
