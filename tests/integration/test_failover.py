"""A failover that leaves the writer's address on a read-only server (pain.md T8.4).

The server is made read-only for every session, pooled ones included (`ALTER SYSTEM SET
default_transaction_read_only = on` and a reload), as a replica is; then writable again, as
the address reaching the new primary is. A write meanwhile is a 503 with Retry-After, never a
500; and no request afterwards reaches a connection opened before: the pool replaced them all.
Ground truth: pg_stat_activity by application_name, and the rows in the table.
"""

import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.integration.drivers import set_read_only
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    """A server of this module only: the tests switch it to read-only and back."""
    with Postgres() as server:
        server.sql("CREATE TABLE failover_t (k int)")
        server.sql("GRANT ALL ON failover_t TO tether")
        yield server


def asyncpg_app(pg: Postgres, name: str) -> FastAPI:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, pg.dsn, name="pg", min_size=3, max_size=3,
                    server_settings={"application_name": name})  # fmt: skip
    conn = tpg.connection(lc, pool, transaction=True)
    C = Annotated[Any, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pid")
    async def pid(c: C) -> int:
        return int(await c.fetchval("SELECT pg_backend_pid()"))

    @app.post("/write")
    async def write(c: C) -> str:
        await c.execute("INSERT INTO failover_t VALUES (1)")
        return "written"

    return app


def psycopg_app(pg: Postgres, name: str) -> FastAPI:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, pg.dsn, name="pg", min_size=3, max_size=3,
                     kwargs={"application_name": name})  # fmt: skip
    conn = tpsy.connection(lc, pool, transaction=True)
    C = Annotated[Any, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pid")
    async def pid(c: C) -> int:
        row = await (await c.execute("SELECT pg_backend_pid()")).fetchone()
        return int(row[0])

    @app.post("/write")
    async def write(c: C) -> str:
        await c.execute("INSERT INTO failover_t VALUES (1)")
        return "written"

    return app


def sqlalchemy_app(pg: Postgres, name: str) -> FastAPI:
    from sqlalchemy import text

    lc = tether.Lifecycle()
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), name="pg", pool_size=3,
                        application_name=name)  # fmt: skip
    session = tsa.session(lc, engine)
    S = Annotated[Any, Depends(session)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pid")
    async def pid(s: S) -> int:
        return int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    @app.post("/write")
    async def write(s: S) -> str:
        await s.execute(text("INSERT INTO failover_t VALUES (1)"))
        return "written"

    return app


@pytest.mark.parametrize(
    "make", [asyncpg_app, psycopg_app, sqlalchemy_app], ids=["asyncpg", "psycopg", "sqlalchemy"]
)
def test_a_write_on_a_read_only_server_is_a_503_and_the_pool_is_replaced(
    pg: Postgres, make: Callable[[Postgres, str], FastAPI]
) -> None:
    name = f"tt-failover-{uuid.uuid4().hex[:8]}"
    pg.sql("TRUNCATE failover_t")
    app = make(pg, name)
    with TestClient(app) as client:
        assert client.post("/write").json() == "written"
        old = {row["pid"] for row in pg.activity(name)}
        assert old
        set_read_only(pg, True)
        try:
            refused = client.post("/write")
        finally:
            set_read_only(pg, False)  # the writer's address reaches a primary again
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == (
            "Pool 'pg': the database refused a write as read-only (SQLSTATE 25006), as a "
            "replica does; after a failover the address may reach one. Nothing was written, "
            "and the pool's connections are being replaced. Retry shortly; if it persists, "
            "check which server the address reaches."
        )
        served = {client.get("/pid").json() for _ in range(10)}
        assert not served & old, "a request reached a connection from before the failover"
        assert client.post("/write").json() == "written"
    assert pg.sql("SELECT count(*) FROM failover_t") == [(2,)]
