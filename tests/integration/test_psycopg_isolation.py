"""`tether.integrations.psycopg.connection(isolation=..., readonly=...)` against a real
PostgreSQL: the unit of work's transaction begins at that level and read-only, and the
connection goes back to the pool as it came. Before, the option did not exist: a
`SERIALIZABLE` route had to set the level as its first call, which `rolled_back` could not
run, and the options are refused as asyncpg's are."""

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI
from psycopg import IsolationLevel

import tether
from tests.servers import Postgres
from tether.integrations import psycopg as tpsy

Conn = psycopg.AsyncConnection[Any]
LEVEL = (
    "SELECT current_setting('transaction_isolation') || ' '"
    " || current_setting('transaction_read_only')"
)


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    name = f"iso_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (v int)")
    postgres.sql(f"GRANT ALL ON {name} TO {postgres.user}")
    yield name
    postgres.sql(f"DROP TABLE IF EXISTS {name}")


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        yield client


async def one(c: Conn, sql: str) -> Any:
    row = await (await c.execute(sql)).fetchone()
    return None if row is None else row[0]


@pytest.mark.servers
@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_each_unit_begins_at_its_level_and_the_connection_goes_back_as_it_came(
    postgres: Postgres, table: str
) -> None:
    """Three resources on one connection (a pool of one): each unit runs at its resource's
    level, also after one that ran serializable and read-only, and a write through the
    read-only one is a 500 (the driver's ReadOnlySqlTransaction) that keeps the pool's
    connection: the resource's own read-only transaction is not a failover to a replica."""
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1)
    ser = tpsy.connection(
        lc, pool, name="ser", transaction=True, isolation=IsolationLevel.SERIALIZABLE
    )
    ro = tpsy.connection(
        lc, pool, name="ro", transaction=True, isolation="repeatable_read", readonly=True
    )
    plain = tpsy.connection(lc, pool, name="plain", transaction=True)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/ser")
    async def at_ser(c: Annotated[Conn, Depends(ser)]) -> list[Any]:
        return [await one(c, LEVEL), c.pgconn.backend_pid]

    @app.get("/ro")
    async def at_ro(c: Annotated[Conn, Depends(ro)]) -> list[Any]:
        return [await one(c, LEVEL), c.pgconn.backend_pid]

    @app.post("/ro")
    async def write_ro(c: Annotated[Conn, Depends(ro)]) -> None:
        await c.execute(f"INSERT INTO {table} VALUES (1)")

    @app.get("/plain")
    async def at_plain(c: Annotated[Conn, Depends(plain)]) -> list[Any]:
        return [await one(c, LEVEL), c.pgconn.backend_pid]

    @app.post("/plain")
    async def write_plain(c: Annotated[Conn, Depends(plain)]) -> None:
        await c.execute(f"INSERT INTO {table} VALUES (2)")

    async with running(app) as client:
        level, pid = (await client.get("/ser")).json()
        assert level == "serializable off"
        assert (await client.get("/plain")).json() == ["read committed off", pid]
        assert (await client.get("/ro")).json() == ["repeatable read on", pid]
        assert (await client.get("/plain")).json() == ["read committed off", pid]
        refused = await client.post("/ro")
        assert refused.status_code == 500  # not a 503 "the server is read-only"
        assert (await client.get("/plain")).json() == ["read committed off", pid]
        assert (await client.post("/plain")).status_code == 200
    assert postgres.sql(f"SELECT v FROM {table}") == [(2,)]


@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    ("isolation", "fix"),
    [
        ("repeatable read", "isolation='repeatable_read'"),
        ("SERIALIZABLE", "isolation='serializable'"),
        ("snapshot", "one of them"),
    ],
)
def test_an_isolation_level_not_known_is_refused_at_registration(isolation: str, fix: str) -> None:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, "postgresql://localhost/x")
    with pytest.raises(ValueError) as caught:
        tpsy.connection(lc, pool, transaction=True, isolation=isolation)
    assert str(caught.value) == (
        f"Connection 'conn': isolation={isolation!r} is not an isolation level psycopg knows "
        f"('read_committed', 'read_uncommitted', 'repeatable_read', 'serializable'), so every "
        f"request would fail as it begins its transaction. Pass {fix}, or None for the "
        f"server's default."
    )


@pytest.mark.fastapi_free
def test_transaction_options_need_a_transaction_and_readonly_a_bool() -> None:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, "postgresql://localhost/x")
    with pytest.raises(ValueError) as caught:
        tpsy.connection(lc, pool, readonly=True)
    assert str(caught.value) == (
        "Connection 'conn': readonly=True needs transaction=True: it is of the unit of "
        "work's transaction, and transaction=False runs none (each statement commits on "
        "its own), so it would be ignored and writes committed. Pass transaction=True, or "
        "drop readonly=True."
    )
    with pytest.raises(ValueError, match=r"isolation='serializable' needs transaction=True"):
        tpsy.connection(lc, pool, isolation="serializable")
    with pytest.raises(TypeError, match=r"readonly"):
        tpsy.connection(lc, pool, transaction=True, readonly="yes")  # type: ignore[arg-type]
    for i, level in enumerate([None, "read_committed", *IsolationLevel]):
        tpsy.connection(lc, pool, name=f"ok{i}", transaction=True, isolation=level)
