"""Routes declared `@idempotent` run again when their connection is lost (pain.md T8.5).

The endpoint's own backend is terminated on the server (`pg_terminate_backend`) after the
pool handed the connection out and before the endpoint's statement: the race between a
pool's check and the first query that a restart or failover opens. A route declared
idempotent is run again on a fresh connection and answers 200; a route that is not is
answered 503 with Retry-After, once, and what it wrote is rolled back.
"""

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Form
from fastapi.testclient import TestClient
from pydantic import BaseModel

import tether
from tests.servers import Postgres
from tether.fastapi import idempotent
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers

# The pool gave a connection: the message says it was lost, and does not blame the pool's size.
LOST_MID_TRANSACTION = (
    r"Pool '\w+': the connection was lost mid-transaction, so nothing was committed \(.+\)\. "
    r"Retry shortly; if it persists, check the database\."
)
COMMIT_NOT_SENT = (
    r"Pool '\w+': the connection was lost before COMMIT, which was not sent, so nothing was "
    r"committed \(.+; the server ended the session, or the driver closed it after a "
    r"cancelled query\)\. Retry shortly; if it "
    r"persists, check the database\."
)


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    name = f"retry_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (k int)")
    yield name
    postgres.sql(f"DROP TABLE {name}")


def kill(pg: Postgres, pid: int) -> None:
    """Terminate backend *pid* and wait until it is gone."""
    pg.sql("SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 5
    while pg.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]):
        assert time.monotonic() < deadline
        time.sleep(0.01)


class Driver:
    """How to reach one driver's connection from an endpoint."""

    def __init__(
        self, make: Callable[[tether.Lifecycle, Postgres], tether.Resource[Any]], kind: str
    ) -> None:
        self.make, self.kind = make, kind

    async def pid(self, c: Any) -> int:
        if self.kind == "sqlalchemy":
            raw = await (await c.connection()).get_raw_connection()
            return int(raw.driver_connection.get_server_pid())
        if self.kind == "psycopg":
            return int(c.info.backend_pid)
        return int(c.get_server_pid())

    async def execute(self, c: Any, sql: str) -> None:
        if self.kind == "sqlalchemy":
            from sqlalchemy import text

            await c.execute(text(sql))
        else:
            await c.execute(sql)


DRIVERS = [
    Driver(lambda lc, pg: tpg.connection(lc, tpg.pool(lc, pg.dsn, max_size=2)), "asyncpg"),
    Driver(
        lambda lc, pg: tpg.connection(lc, tpg.pool(lc, pg.dsn, max_size=2), transaction=True),
        "asyncpg",
    ),
    Driver(
        lambda lc, pg: tpsy.connection(lc, tpsy.pool(lc, pg.dsn, max_size=2), transaction=True),
        "psycopg",
    ),
    Driver(
        lambda lc, pg: tsa.session(lc, tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=2)),
        "sqlalchemy",
    ),
]
IDS = ["asyncpg", "asyncpg-transaction", "psycopg-transaction", "sqlalchemy"]


class Note(BaseModel):
    text: str


def make_app(pg: Postgres, driver: Driver, table: str) -> tuple[FastAPI, list[str]]:
    lc = tether.Lifecycle()
    conn = driver.make(lc, pg)
    C = Annotated[Any, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)
    calls: list[str] = []

    @app.post("/read-once")
    @idempotent
    async def read_once(c: C) -> str:
        """Loses its connection the first time only."""
        calls.append("read-once")
        if len(calls) == 1:
            kill(pg, await driver.pid(c))
        await driver.execute(c, "SELECT 1")
        return "read"

    @app.post("/write")
    async def write(c: C) -> str:
        """Not declared idempotent: writes, loses its connection, is not run again."""
        calls.append("write")
        await driver.execute(c, f"INSERT INTO {table} VALUES (1)")
        kill(pg, await driver.pid(c))
        await driver.execute(c, "SELECT 1")
        return "written"

    @app.put("/notes/{key}")
    @idempotent
    async def put_note(key: int, note: Note, c: C) -> dict[str, Any]:
        """A PUT with a JSON body: run again, it reads the same body."""
        calls.append("put")
        if len(calls) == 1:
            kill(pg, await driver.pid(c))
        await driver.execute(c, "SELECT 1")
        return {"key": key, "text": note.text}

    @app.post("/form")
    @idempotent
    async def form(c: C, text: Annotated[str, Form()]) -> str:
        """A form body (its files are closed once the request fails): not run again."""
        calls.append("form")
        kill(pg, await driver.pid(c))
        await driver.execute(c, "SELECT 1")
        return text

    @app.post("/read-after-noticed")
    @idempotent
    async def read_after_noticed(c: C) -> str:
        """Loses its connection the first time, and the driver notices before its query
        (asyncpg's pool then detaches the connection it handed out)."""
        calls.append("read-after-noticed")
        if len(calls) == 1:
            kill(pg, await driver.pid(c))
            await asyncio.sleep(0.3)
        await driver.execute(c, "SELECT 1")
        return "read"

    @app.post("/write-after-noticed")
    async def write_after_noticed(c: C) -> str:
        """Writes, loses its connection, and returns once the driver noticed: the commit
        cannot be sent."""
        calls.append("write-after-noticed")
        await driver.execute(c, f"INSERT INTO {table} VALUES (1)")
        kill(pg, await driver.pid(c))
        await asyncio.sleep(0.3)
        return "written"

    @app.post("/swallow")
    @idempotent
    async def swallow(c: C) -> str:
        """Writes and loses its connection the first time, catches the query's error and
        returns: the commit cannot go out."""
        calls.append("swallow")
        await driver.execute(c, f"INSERT INTO {table} VALUES (1)")
        if len(calls) == 1:
            kill(pg, await driver.pid(c))
            try:
                await driver.execute(c, "SELECT 1")
            except Exception:
                pass
        return "swallowed"

    @app.post("/always-lost")
    @idempotent(retries=2)
    async def always_lost(c: C) -> str:
        calls.append("always-lost")
        kill(pg, await driver.pid(c))
        await driver.execute(c, "SELECT 1")
        return "never"

    return app, calls


@pytest.mark.parametrize("driver", DRIVERS, ids=IDS)
def test_an_idempotent_route_runs_again_on_a_fresh_connection(
    postgres: Postgres, table: str, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    app, calls = make_app(postgres, driver, table)
    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="tether"):
        answer = client.post("/read-once")
    assert (answer.status_code, answer.json()) == (200, "read")
    assert calls == ["read-once", "read-once"]
    assert any(
        "POST /read-once lost its connection" in r.getMessage()
        and "running it again (idempotent, retry 1 of 1)" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("driver", DRIVERS, ids=IDS)
def test_a_route_not_declared_idempotent_is_answered_503_once(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    app, calls = make_app(postgres, driver, table)
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/write")
        if IDS[DRIVERS.index(driver)] == "asyncpg":
            # Without a transaction the insert committed on its own, and whether the
            # failing statement ran is unknown: a 500, never presented as safe to retry.
            assert answer.status_code == 500
            assert postgres.sql(f"SELECT count(*) FROM {table}") == [(1,)]
        else:
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            assert re.fullmatch(LOST_MID_TRANSACTION, answer.json()["detail"], re.S)
            assert postgres.sql(f"SELECT count(*) FROM {table}") == [(0,)]  # rolled back
        assert calls == ["write"]
        assert client.post("/read-once").status_code == 200  # the pool works on


@pytest.mark.parametrize("driver", DRIVERS[1:2], ids=IDS[1:2])
def test_a_retried_request_reads_its_body_again(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    app, calls = make_app(postgres, driver, table)
    with TestClient(app) as client:
        answer = client.put("/notes/7", json={"text": "kept"})
    assert (answer.status_code, answer.json()) == (200, {"key": 7, "text": "kept"})
    assert calls == ["put", "put"]


@pytest.mark.parametrize("driver", DRIVERS[1:2], ids=IDS[1:2])
def test_a_request_with_a_form_body_is_not_run_again(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    app, calls = make_app(postgres, driver, table)
    with TestClient(app) as client:
        answer = client.post("/form", data={"text": "once"})
    assert answer.status_code == 503
    assert "the connection was lost mid-transaction" in answer.json()["detail"]
    assert calls == ["form"]


@pytest.mark.parametrize("driver", DRIVERS[1:2], ids=IDS[1:2])
def test_retries_are_bounded(postgres: Postgres, table: str, driver: Driver) -> None:
    app, calls = make_app(postgres, driver, table)
    with TestClient(app) as client:
        answer = client.post("/always-lost")
    assert answer.status_code == 503
    assert calls == ["always-lost"] * 3


def test_idempotent_refuses_zero_retries() -> None:
    with pytest.raises(ValueError, match=r"^idempotent\(retries=0\): retries must be 1 or more\.$"):
        idempotent(retries=0)


@pytest.mark.parametrize("driver", DRIVERS, ids=IDS)
def test_a_connection_lost_and_noticed_before_the_query_is_run_again(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    """The connection is lost while the endpoint awaits something else, so the driver has
    noticed by its next query: asyncpg's pool has then taken the connection back, and the
    query raises "released back to the pool" (a 500 before). It is a lost connection: the
    idempotent route runs again."""
    app, calls = make_app(postgres, driver, table)
    with TestClient(app) as client:
        answer = client.post("/read-after-noticed")
    assert (answer.status_code, answer.json()) == (200, "read")
    assert calls == ["read-after-noticed"] * 2


@pytest.mark.parametrize("driver", [DRIVERS[1], DRIVERS[3]], ids=[IDS[1], IDS[3]])
def test_a_commit_on_a_connection_lost_and_noticed_is_a_503(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    """The endpoint wrote and returned; the connection was lost and asyncpg noticed before
    the `COMMIT`, so it refused to send it: nothing was committed, a 503 with Retry-After (a
    500 before). (psycopg reads of the loss only in answer to the `COMMIT` it sent: whether
    that committed cannot be known, and it stays a 500.)"""
    app, calls = make_app(postgres, driver, table)
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/write-after-noticed")
        assert answer.status_code == 503, answer.text
        assert "retry-after" in answer.headers
        assert re.fullmatch(COMMIT_NOT_SENT, answer.json()["detail"], re.S)
        assert postgres.sql(f"SELECT count(*) FROM {table}") == [(0,)]
        assert calls == ["write-after-noticed"]
        assert client.post("/read-once").status_code == 200  # the pool works on


@pytest.mark.parametrize("driver", DRIVERS[1:3], ids=IDS[1:3])
def test_a_lost_connection_whose_error_the_endpoint_caught_is_run_again(
    postgres: Postgres, table: str, driver: Driver
) -> None:
    """The endpoint caught the error of a statement that met the lost connection, and
    returned: the driver knows the connection is lost and refuses to send `COMMIT`, so
    nothing was committed and the idempotent route runs again (psycopg: a 500 before)."""
    app, calls = make_app(postgres, driver, table)
    with TestClient(app) as client:
        answer = client.post("/swallow")
    assert (answer.status_code, answer.json()) == (200, "swallowed")
    assert calls == ["swallow"] * 2
    assert postgres.sql(f"SELECT count(*) FROM {table}") == [(1,)]  # the second run's
