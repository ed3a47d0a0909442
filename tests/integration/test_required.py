"""An app that starts while its database is down (`required=False`; pain.md T7.1, "degraded").

A real PostgreSQL is stopped before the app starts and started again while it runs. Meanwhile
the app is live, not ready, answers 503 with Retry-After where it needs the database and 200
where it does not; once the database accepts connections, the pool opens in the background and
the app is ready without a restart.
"""

import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.servers import Postgres
from tether.fastapi import health_router
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    """A server of this module only: the tests stop it and start it again."""
    with Postgres() as server:
        yield server


async def _asyncpg_value(c: Any) -> int:
    return int(await c.fetchval("SELECT 41 + 1"))


async def _psycopg_value(c: Any) -> int:
    return int((await (await c.execute("SELECT 41 + 1")).fetchone())[0])


async def _sqlalchemy_value(s: Any) -> int:
    from sqlalchemy import text

    return int((await s.execute(text("SELECT 41 + 1"))).scalar_one())


def asyncpg_app(pg: Postgres) -> tuple[tether.Lifecycle, tether.Resource[Any], Callable[..., Any]]:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=2, connect_timeout=1, required=False,
                    backoff=0.2)  # fmt: skip
    return lc, tpg.connection(lc, pool), _asyncpg_value


def psycopg_app(pg: Postgres) -> tuple[tether.Lifecycle, tether.Resource[Any], Callable[..., Any]]:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, pg.dsn, min_size=1, max_size=2, open_timeout=1, connect_timeout=1,
                     required=False, backoff=0.2)  # fmt: skip
    return lc, tpsy.connection(lc, pool), _psycopg_value


def sqlalchemy_app(
    pg: Postgres,
) -> tuple[tether.Lifecycle, tether.Resource[Any], Callable[..., Any]]:
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=2, connect_timeout=1,
                        required=False, backoff=0.2)  # fmt: skip
    return lc, tsa.session(lc, engine), _sqlalchemy_value


@pytest.mark.parametrize("make", [asyncpg_app, psycopg_app, sqlalchemy_app],
                         ids=["asyncpg", "psycopg", "sqlalchemy"])  # fmt: skip
def test_the_app_starts_without_its_database_and_heals(
    pg: Postgres,
    make: Callable[[Postgres], tuple[tether.Lifecycle, tether.Resource[Any], Callable[..., Any]]],
) -> None:
    lc, conn, value = make(pg)
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc))

    @app.get("/value")
    async def read(c: Annotated[Any, Depends(conn)]) -> int:
        return int(await value(c))

    @app.get("/static")
    async def static() -> str:
        return "no database needed"

    pg.kill()
    try:
        with TestClient(app) as client:
            assert client.get("/health/live").status_code == 200
            assert client.get("/static").json() == "no database needed"
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            pool = "engine" if "engine" in lc.resources else "pool"
            assert ready.json()["checks"][pool]["status"] == "failing"
            down = client.get("/value")
            assert down.status_code == 503
            assert down.headers["retry-after"] == "1"
            assert "is down: it failed to open" in down.json()["detail"]

            pg.start()
            deadline = time.monotonic() + 15
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, client.get("/health/ready").json()
                time.sleep(0.1)
            assert client.get("/value").json() == 42
    finally:
        pg.start()


def test_a_migration_on_a_pool_that_was_down_runs_when_it_opens(pg: Postgres) -> None:
    """`once(...)` on a `required=False` pool: the app starts with the database down, and
    is ready only once the pool has opened and the migration has run."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=2, connect_timeout=1, required=False,
                    backoff=0.2)  # fmt: skip
    conn = tpg.connection(lc, pool)

    async def migrate(c: Any) -> None:
        await c.execute("CREATE TABLE late_notes (text text)")
        await c.execute("INSERT INTO late_notes VALUES ('migrated late')")

    tpg.once(lc, pool, migrate, key="late-notes:1")
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc))

    @app.get("/notes")
    async def notes(c: Annotated[Any, Depends(conn)]) -> list[str]:
        return [r["text"] for r in await c.fetch("SELECT text FROM late_notes")]

    pg.kill()
    try:
        with TestClient(app) as client:
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert set(ready.json()["checks"]) >= {"pool", "migrate"}
            pg.start()
            deadline = time.monotonic() + 15
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, client.get("/health/ready").json()
                time.sleep(0.1)
            assert client.get("/notes").json() == ["migrated late"]
    finally:
        pg.start()
