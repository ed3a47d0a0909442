"""A connection the server ends between a unit of work's last query and its commit.

The server says so first (``FATAL: terminating connection due to administrator command``:
a restart, ``pg_terminate_backend``, a failover) and closes the socket after. A client that
commits in between has read the error but not the close. Found by the soak (`tests/soak.py`)
during a PostgreSQL restart: SQLAlchemy over asyncpg answered 500, asyncpg refusing to send
``COMMIT`` with ``InternalClientError: cannot switch to state 15; another operation (2) is in
progress``. Nothing was committed (the ``COMMIT`` never left, the server ended the
transaction with the session), so it is a 503 a client may retry, and the connection never
goes back to the pool.

A fault proxy (`tests/faultproxy.py`, ``linger``) holds the close for a second, so the
commit always lands in that window.
"""

from collections.abc import Iterator
from typing import Annotated, Any

import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
import tether.fastapi
from tests.faultproxy import FaultProxy
from tests.integration.drivers import scalar
from tests.servers import Postgres, _pg_url
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

TABLE = "killed_before_commit"


@pytest.fixture
def proxy(postgres: Postgres) -> Iterator[FaultProxy]:
    postgres.sql(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    with FaultProxy(postgres.port) as p:
        p.linger(1.0)
        yield p


def asyncpg_tx(lc: tether.Lifecycle, url: str) -> Any:
    pool = tpg.pool(lc, url, min_size=1, max_size=2, acquire_timeout=3)
    return tpg.connection(lc, pool, transaction=True)


def psycopg_conn(lc: tether.Lifecycle, url: str) -> Any:
    pool = tpsy.pool(lc, url, min_size=1, max_size=2, timeout=3)
    return tpsy.connection(lc, pool, transaction=True)


def sqlalchemy_session(lc: tether.Lifecycle, url: str) -> Any:
    scheme = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = tsa.engine(lc, scheme, pool_size=2, pool_timeout=3)
    return tsa.session(lc, engine)


async def end_own_backend(postgres: Postgres, c: Any) -> None:
    """End the backend of *c* on the server; its error arrives, its close is held back."""
    pid = await scalar(c, "SELECT pg_backend_pid()")
    await anyio.to_thread.run_sync(postgres.sql, "SELECT pg_terminate_backend(%s, 5000)", (pid,))
    await anyio.sleep(0.2)


def write_route(app: FastAPI, conn: Any, postgres: Postgres, *, end_first: bool) -> Any:
    """``POST /write/{key}``: insert *key*; with ``kill``, end its backend before the insert
    (*end_first*) or after it, before the commit."""

    @app.post("/write/{key}")
    async def write(key: str, c: Annotated[Any, Depends(conn)], kill: bool = False) -> str:
        if kill and end_first:
            await end_own_backend(postgres, c)
        await scalar(c, f"INSERT INTO {TABLE} VALUES ('{key}') RETURNING k")
        if kill and not end_first:
            await end_own_backend(postgres, c)
        return key

    return write


@pytest.mark.parametrize(
    ("make", "status"),
    [(asyncpg_tx, 503), (psycopg_conn, 500), (sqlalchemy_session, 503)],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)
async def test_a_session_ended_before_the_commit_is_a_503_and_nothing_is_committed(
    postgres: Postgres, proxy: FaultProxy, make: Any, status: int
) -> None:
    """asyncpg (alone or under SQLAlchemy) has read the server's error and refuses to send
    ``COMMIT``: a 503. psycopg reads no reply before it sends, so it sends ``COMMIT`` and
    reads the error in reply: whether the server committed first cannot be known from the
    client, so it stays a 500 (asyncpg's answer too, where the error came in reply)."""
    lc = tether.Lifecycle()
    conn = make(lc, _pg_url("postgresql", proxy.port, None))
    app = FastAPI(lifespan=lc.lifespan)
    write = write_route(app, conn, postgres, end_first=False)
    runs: list[str] = []

    @app.post("/write-again/{key}")
    @tether.fastapi.idempotent
    async def write_again(key: str, c: Annotated[Any, Depends(conn)]) -> str:
        runs.append(key)
        return await write(key, c, kill=len(runs) == 1)

    name = make.__name__
    transport = httpx.ASGITransport(app=app)
    async with lc.lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        killed = await c.post(f"/write/{name}-killed", params={"kill": True})
        assert killed.status_code == status, killed.text
        if status == 503:
            assert "Retry-After" in killed.headers
            assert (
                "was lost before COMMIT, which was not sent, so nothing was committed"
                in (killed.json()["detail"])
            )
        # The pool serves again, on a connection that works.
        for i in range(3):
            assert (await c.post(f"/write/{name}-{i}")).status_code == 200
        # A route marked idempotent runs again on a fresh connection when nothing was
        # committed; the client sees one 200.
        again = await c.post(f"/write-again/{name}-again")
        assert again.status_code == (200 if status == 503 else 500), again.text
        assert len(runs) == (2 if status == 503 else 1)
    rows = postgres.sql(f"SELECT k FROM {TABLE} WHERE k LIKE %s ORDER BY k", (f"{name}-%",))
    written = [f"{name}-0", f"{name}-1", f"{name}-2"]
    assert [k for (k,) in rows] == written + ([f"{name}-again"] if status == 503 else [])


@pytest.mark.parametrize(
    "make", [asyncpg_tx, psycopg_conn, sqlalchemy_session], ids=["asyncpg", "psycopg", "sqlalchemy"]
)
async def test_a_session_ended_before_a_query_is_a_503_and_nothing_is_committed(
    postgres: Postgres, proxy: FaultProxy, make: Any
) -> None:
    """The same error read before a statement of the endpoint (the soak found it on asyncpg
    when a backend was ended just after its BEGIN): asyncpg refuses to send the statement,
    which was a 500 from asyncpg's `InternalClientError`. In a transaction nothing was
    committed: a 503 marked lost, on every driver."""
    lc = tether.Lifecycle()
    conn = make(lc, _pg_url("postgresql", proxy.port, None))
    app = FastAPI(lifespan=lc.lifespan)
    write_route(app, conn, postgres, end_first=True)
    name = f"{make.__name__}-q"
    transport = httpx.ASGITransport(app=app)
    async with lc.lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        killed = await c.post(f"/write/{name}-killed", params={"kill": True})
        assert killed.status_code == 503, killed.text
        assert "Retry-After" in killed.headers
        assert "the connection was lost mid-transaction" in killed.json()["detail"]
        assert (await c.post(f"/write/{name}-0")).status_code == 200
    rows = postgres.sql(f"SELECT k FROM {TABLE} WHERE k LIKE %s ORDER BY k", (f"{name}-%",))
    assert [k for (k,) in rows] == [f"{name}-0"]
