"""Routes declared `@idempotent` run again when the server rolls their transaction back for a
conflict with a concurrent one: a serialization failure (SQLSTATE 40001), in a statement or at
`COMMIT`, or a deadlock (40P01). Nothing of the transaction was committed, and running it
again is what the server asks for. A route not declared so answers the error (a 500), once.

Before, only a lost connection was retried: two concurrent SERIALIZABLE increments answered a
200 and a 500, and the counter went up once. Real PostgreSQL; the two requests are made to
meet (each reads before either writes) with an event, on their first run only."""

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.servers import Postgres
from tether.fastapi import idempotent
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.timeout(60)]

KINDS = ["asyncpg", "psycopg", "sqlalchemy"]


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    name = f"conflict_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (id int PRIMARY KEY, n int)")
    postgres.sql(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
    postgres.sql(f"GRANT ALL ON {name} TO tether")
    yield name
    postgres.sql(f"DROP TABLE {name}")


class Db:
    """One driver's serializable unit of work, through tether's integration."""

    def __init__(self, kind: str, lc: tether.Lifecycle, pg: Postgres) -> None:
        self.kind = kind
        if kind == "asyncpg":
            pool = tpg.pool(lc, pg.dsn, max_size=4)
            self.res = tpg.connection(lc, pool, transaction=True, isolation="serializable")
        elif kind == "psycopg":
            pool = tpsy.pool(lc, pg.dsn, max_size=4)
            self.res = tpsy.connection(lc, pool, transaction=True, isolation="serializable")
        else:
            engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=4)
            self.res = tsa.session(
                lc, engine, execution_options={"isolation_level": "SERIALIZABLE"}
            )

    async def value(self, c: Any, sql: str, *args: Any) -> Any:
        if self.kind == "asyncpg":
            return await c.fetchval(sql.replace("%s", "$1"), *args)
        if self.kind == "psycopg":
            row = await (await c.execute(sql, args)).fetchone()
            return None if row is None else row[0]
        from sqlalchemy import text

        named = sql.replace("%s", ":a")
        return (await c.execute(text(named), {"a": args[0]} if args else {})).scalar()

    async def run(self, c: Any, sql: str, *args: Any) -> None:
        if self.kind == "asyncpg":
            await c.execute(sql.replace("%s", "$1"), *args)
        elif self.kind == "psycopg":
            await c.execute(sql, args)
        else:
            from sqlalchemy import text

            await c.execute(text(sql.replace("%s", ":a")), {"a": args[0]} if args else {})


def make(pg: Postgres, kind: str, table: str, declared: bool) -> tuple[FastAPI, list[str]]:
    lc = tether.Lifecycle()
    db = Db(kind, lc, pg)
    C = Annotated[Any, Depends(db.res)]
    app = FastAPI(lifespan=lc.lifespan)
    runs: list[str] = []
    met = asyncio.Event()
    first_done = asyncio.Event()
    arrived: list[str] = []

    async def meet(who: str) -> None:
        """Wait until both first runs got here."""
        arrived.append(who)
        if len(arrived) == 2:
            met.set()
        await asyncio.wait_for(met.wait(), 10)

    async def increment(c: Any, who: str) -> int:
        runs.append(who)
        first = len(runs) <= 2  # (a run again meets nobody)
        n = await db.value(c, f"SELECT n FROM {table} WHERE id = 1")
        if first:  # the first runs meet: each has read before either writes
            await meet(who)
        await db.run(c, f"UPDATE {table} SET n = %s WHERE id = 1", n + 1)
        return int(n + 1)

    async def skew(c: Any, who: str) -> int:
        """Reads both rows, writes one: two of these are a write skew, which SERIALIZABLE
        refuses at the second COMMIT (the first has committed by then)."""
        runs.append(who)
        first = len(runs) <= 2  # (a run again meets nobody)
        total = await db.value(c, f"SELECT sum(n) FROM {table}")
        await db.run(c, f"UPDATE {table} SET n = n + 1 WHERE id = %s", 1 if who == "a" else 2)
        if first:
            await meet(who)
            if who == "b":  # commits after "a" did
                await asyncio.wait_for(first_done.wait(), 10)
        return int(total)

    async def deadlock(c: Any, who: str) -> str:
        """Updates its row, then the other's: two of these, met after their first update,
        wait for each other until the server ends one of them (40P01)."""
        runs.append(who)
        first = len(runs) <= 2  # (a run again meets nobody)
        mine, other = (1, 2) if who == "a" else (2, 1)
        await db.run(c, f"UPDATE {table} SET n = n + 1 WHERE id = %s", mine)
        if first:
            await meet(who)
        await db.run(c, f"UPDATE {table} SET n = n + 10 WHERE id = %s", other)
        return who

    if declared:

        @app.post("/deadlock/{who}")
        @idempotent
        async def deadlock_declared(who: str, c: C) -> str:
            return await deadlock(c, who)

        @app.post("/inc/{who}")
        @idempotent
        async def inc_declared(who: str, c: C) -> int:
            return await increment(c, who)

        @app.post("/skew/{who}")
        @idempotent
        async def skew_declared(who: str, c: C) -> int:
            return await skew(c, who)

    else:

        @app.post("/inc/{who}")
        async def inc(who: str, c: C) -> int:
            return await increment(c, who)

    app.state.first_done = first_done
    return app, runs


async def serve(app: FastAPI) -> Any:
    """A client of *app*; what the app raised to the server (a 500's cause) is kept in the
    client's `app_errors`, for the assertions' messages."""
    errors: list[str] = []

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except Exception as exc:
            errors.append(f"{scope.get('path')}: {type(exc).__name__}: {exc}")
            raise

    transport = httpx.ASGITransport(app=recorded, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)
    client.app_errors = errors  # type: ignore[attr-defined]
    return client


@pytest.mark.parametrize("kind", KINDS)
async def test_a_serialization_failure_runs_an_idempotent_route_again(
    postgres: Postgres, table: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, runs = make(postgres, kind, table, declared=True)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with app.router.lifespan_context(app), await serve(app) as client:
            a, b = await asyncio.gather(client.post("/inc/a"), client.post("/inc/b"))
    assert (a.status_code, b.status_code) == (200, 200), (a.text, b.text)
    assert sorted([a.json(), b.json()]) == [1, 2]
    assert postgres.sql(f"SELECT n FROM {table} WHERE id = 1") == [(2,)]
    assert len(runs) == 3, runs  # one of them ran again
    again = [r.getMessage() for r in caplog.records if "running it again" in r.getMessage()]
    assert len(again) == 1, again
    assert (
        "had its transaction rolled back by the server for a conflict with a concurrent "
        in again[0]
    )
    assert "(idempotent, retry 1 of 1)" in again[0]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_route_not_declared_idempotent_answers_the_conflict_once(
    postgres: Postgres, table: str, kind: str
) -> None:
    app, runs = make(postgres, kind, table, declared=False)
    async with app.router.lifespan_context(app), await serve(app) as client:
        a, b = await asyncio.gather(client.post("/inc/a"), client.post("/inc/b"))
    assert sorted([a.status_code, b.status_code]) == [200, 500], (a.text, b.text)
    assert postgres.sql(f"SELECT n FROM {table} WHERE id = 1") == [(1,)]
    assert len(runs) == 2, runs


@pytest.mark.parametrize("kind", KINDS)
async def test_a_serialization_failure_at_commit_runs_an_idempotent_route_again(
    postgres: Postgres, table: str, kind: str
) -> None:
    """The conflict is found at tether's own COMMIT, after the endpoint returned: the route
    runs again all the same (the response has not started), and both writes stand."""
    app, runs = make(postgres, kind, table, declared=True)
    async with app.router.lifespan_context(app), await serve(app) as client:
        first = asyncio.ensure_future(client.post("/skew/a"))
        second = asyncio.ensure_future(client.post("/skew/b"))
        a = await first
        app.state.first_done.set()
        b = await second
    assert (a.status_code, b.status_code) == (200, 200), (a.text, b.text)
    assert a.json() == 0
    assert b.json() == 1  # its second run read what "a" committed
    assert postgres.sql(f"SELECT id, n FROM {table} ORDER BY id") == [(1, 1), (2, 1)]
    # The two first runs start in either order; "b", refused at its COMMIT, runs again.
    assert sorted(runs[:2]) == ["a", "b"], runs
    assert runs[2:] == ["b"], runs


@pytest.mark.parametrize("kind", KINDS)
async def test_a_deadlock_runs_an_idempotent_route_again(
    postgres: Postgres, table: str, kind: str
) -> None:
    app, runs = make(postgres, kind, table, declared=True)
    async with app.router.lifespan_context(app), await serve(app) as client:
        a, b = await asyncio.gather(client.post("/deadlock/a"), client.post("/deadlock/b"))
    assert (a.status_code, b.status_code) == (200, 200), (a.text, b.text, client.app_errors)
    assert postgres.sql(f"SELECT id, n FROM {table} ORDER BY id") == [(1, 11), (2, 11)]
    assert len(runs) == 3, runs
