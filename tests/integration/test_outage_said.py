"""An outage of PostgreSQL under an app, in its log: the first 503 of each route in full, and
one line when the database answers again, counting the units of work refused meanwhile.
Before, nothing said the outage had ended: the last line of the log was its last 503."""

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.servers import Postgres

pytestmark = [pytest.mark.anyio, pytest.mark.servers]

AGAIN = re.compile(
    r"^tether: '(\w+)' opens again: (\d+) units? of work refused for it over the last \d+ s$"
)


def make(kind: str, pg: Postgres) -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle(sweep_interval=0.05)
    app = FastAPI(lifespan=lc.lifespan)
    if kind == "asyncpg":
        from tether.integrations import asyncpg as tpg

        pool = tpg.pool(lc, pg.dsn, name="db", min_size=1, max_size=2, acquire_timeout=2.0)
        conn: Any = tpg.connection(lc, pool)

        @app.get("/q")
        async def q(c: Annotated[Any, Depends(conn)]) -> int:
            return int(await c.fetchval("SELECT 1"))

    elif kind == "psycopg":
        from tether.integrations import psycopg as tpsy

        pool = tpsy.pool(lc, pg.dsn, name="db", min_size=1, max_size=2, timeout=2.0)
        conn = tpsy.connection(lc, pool)

        @app.get("/q")
        async def q(c: Annotated[Any, Depends(conn)]) -> int:
            return int((await (await c.execute("SELECT 1")).fetchone())[0])

    else:
        from sqlalchemy import text

        from tether.integrations import sqlalchemy as tsa

        engine = tsa.engine(
            lc, pg.url("postgresql+asyncpg"), name="db", pool_size=2, pool_timeout=2.0
        )
        session = tsa.session(lc, engine)

        @app.get("/q")
        async def q(s: Annotated[Any, Depends(session)]) -> int:
            return int((await s.execute(text("SELECT 1"))).scalar_one())

    return app, lc


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
    ):
        yield client


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "sqlalchemy"])
async def test_the_database_answering_again_is_said_with_the_units_refused_meanwhile(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tether")
    with Postgres() as pg:
        app, lc = make(kind, pg)
        async with served(app) as client:
            assert (await client.get("/q")).status_code == 200
            await anyio.to_thread.run_sync(pg.kill)
            statuses = [(await client.get("/q")).status_code for _ in range(4)]
            refused = statuses.count(503)
            assert refused >= 3, statuses  # (the first may be a 500: a query cut off)
            await anyio.sleep(0.3)
            assert not [r for r in caplog.records if "opens again" in r.getMessage()]
            await anyio.to_thread.run_sync(pg.start)
            with anyio.fail_after(20):
                while (await client.get("/q")).status_code != 200:
                    refused += 1
                    await anyio.sleep(0.1)
                while not (
                    again := [
                        r.getMessage() for r in caplog.records if "opens again" in r.getMessage()
                    ]
                ):
                    await anyio.sleep(0.05)
    found = AGAIN.match(again[0])
    assert found is not None, again
    assert found.group(1) == "db"
    assert int(found.group(2)) == refused
    assert len(again) == 1
    said = [r.getMessage() for r in caplog.records if "GET /q answered 503" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    assert said[0].startswith("tether: GET /q answered 503: "), said
