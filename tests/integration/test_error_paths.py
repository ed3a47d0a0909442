"""Failures after a write, on the request path, against a real PostgreSQL (pain.md T3.3, T3.5).

- A response that fails its `response_model` validation after the endpoint wrote: the write
  is rolled back and the client gets a 500 (the commit happens after serialisation).
- An `HTTPException(404)` raised after a write, with the rollback itself failing (the
  backend was terminated): the client still gets its 404, not a 500 with a driver trace, and
  the broken connection is discarded.
"""

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


class Out(BaseModel):
    id: int


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    name = f"errs_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (k int)")
    yield name
    postgres.sql(f"DROP TABLE {name}")


class Driver:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def make(self, lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
        if self.kind == "asyncpg":
            return tpg.connection(lc, tpg.pool(lc, pg.dsn, max_size=2), transaction=True)
        return tsa.session(lc, tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=2))

    async def execute(self, c: Any, sql: str) -> None:
        if self.kind == "asyncpg":
            await c.execute(sql)
        else:
            from sqlalchemy import text

            await c.execute(text(sql))

    async def pid(self, c: Any) -> int:
        if self.kind == "asyncpg":
            return int(c.get_server_pid())
        raw = await (await c.connection()).get_raw_connection()
        return int(raw.driver_connection.get_server_pid())


DRIVERS = pytest.mark.parametrize(
    "driver", [Driver("asyncpg"), Driver("sqlalchemy")], ids=["asyncpg", "sqlalchemy"]
)


def make_app(pg: Postgres, driver: Driver, table: str) -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle()
    conn = driver.make(lc, pg)
    C = Annotated[Any, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)
    router = APIRouter()

    async def write_then_invalid(c: Any) -> Any:
        await driver.execute(c, f"INSERT INTO {table} VALUES (1)")
        return {"id": "not a number"}

    @app.post("/invalid", response_model=Out)
    async def invalid(c: C) -> Any:
        return await write_then_invalid(c)

    @router.post("/invalid", response_model=Out)
    async def invalid_included(c: C) -> Any:
        return await write_then_invalid(c)

    @app.post("/valid", response_model=Out)
    async def valid(c: C) -> Any:
        await driver.execute(c, f"INSERT INTO {table} VALUES (2)")
        return {"id": 2}

    @app.post("/missing")
    async def missing(c: C) -> Any:
        await driver.execute(c, f"INSERT INTO {table} VALUES (3)")
        pid = await driver.pid(c)
        pg.sql("SELECT pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + 5
        while pg.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raise HTTPException(404, "no such note")

    app.include_router(router, prefix="/r")
    return app, lc


@DRIVERS
def test_a_response_that_fails_validation_rolls_the_write_back(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    app, _ = make_app(postgres, driver, table)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/invalid").status_code == 500
        assert client.post("/r/invalid").status_code == 500
        assert postgres.sql(f"SELECT count(*) FROM {table}") == [(0,)]
        assert client.post("/valid").json() == {"id": 2}
    assert postgres.sql(f"SELECT k FROM {table}") == [(2,)]


@DRIVERS
def test_an_http_exception_keeps_its_status_when_the_rollback_fails(
    postgres: Postgres, table: str, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(postgres, driver, table)
    with TestClient(app) as client, caplog.at_level(logging.WARNING):
        answer = client.post("/missing")
        assert (answer.status_code, answer.json()) == (404, {"detail": "no such note"})
        for _ in range(5):  # the broken connection was discarded: the pool works on
            assert client.post("/valid").status_code == 200
    assert postgres.sql(f"SELECT k FROM {table} ORDER BY k") == [(2,)] * 5
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for noise in ("didn't stop after athrow", "response already started", "Traceback"):
        assert noise not in logged
