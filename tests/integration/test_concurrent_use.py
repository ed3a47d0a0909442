"""One request resource used by two tasks at once (pain.md T4.4).

`asyncio.gather` over two queries on the unit of work's connection or session: tether either
lets the driver serialise them (psycopg's connections and SQLAlchemy's connected sessions hold
a lock) or raises its own `ScopeError` naming the resource and the fix. The driver's raw error
(asyncpg's `InterfaceError: another operation is in progress`, SQLAlchemy's "concurrent
operations are not permitted" and `IllegalStateChangeError`) never reaches the caller, and the
connection never stays checked out, or busy on the server, after the unit of work.
"""

import asyncio
import logging
import time
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.integration.drivers import scalar
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

APP = "tether-concurrent-use"


def asyncpg_conn(lc: tether.Lifecycle, pg: Postgres, transaction: bool) -> Any:
    pool = tpg.pool(lc, pg.dsn, max_size=2, server_settings={"application_name": APP})
    return tpg.connection(lc, pool, transaction=transaction)


def sqlalchemy_session(lc: tether.Lifecycle, pg: Postgres, driver: str) -> Any:
    engine = tsa.engine(lc, pg.url(f"postgresql+{driver}"), pool_size=2, application_name=APP)
    return tsa.session(lc, engine, connect=False)  # connects on first use: the race is there


async def pool_in_use(lc: tether.Lifecycle) -> int:
    return sum(p.in_use or 0 for p in lc.stats().pools.values())


async def settled(lc: tether.Lifecycle, pg: Postgres) -> None:
    """Within 5 s: no connection checked out, none of the app's backends busy."""
    with anyio.fail_after(5):
        while await pool_in_use(lc) or any(
            row["state"] != "idle" for row in pg.activity(APP)
        ):  # fmt: skip
            await anyio.sleep(0.05)


CASES = {
    "asyncpg": (lambda lc, pg: asyncpg_conn(lc, pg, False), "Connection 'conn'", "asyncpg"),
    "asyncpg-transaction": (lambda lc, pg: asyncpg_conn(lc, pg, True), "Connection 'conn'", "asyncpg"),
    "sqlalchemy-asyncpg": (lambda lc, pg: sqlalchemy_session(lc, pg, "asyncpg"), "Session 'session'", "SQLAlchemy"),
    "sqlalchemy-psycopg": (lambda lc, pg: sqlalchemy_session(lc, pg, "psycopg"), "Session 'session'", "SQLAlchemy"),
}  # fmt: skip


@pytest.mark.parametrize("group", [False, True], ids=["gather", "task-group"])
@pytest.mark.parametrize("case", list(CASES))
async def test_two_tasks_on_one_resource_get_tethers_error_and_nothing_stays_busy(
    postgres: Postgres, case: str, group: bool
) -> None:
    """With asyncio.gather, and in a task group, whose error is a group of the driver's
    (trial 35: asyncpg's came through, inside an ExceptionGroup)."""
    make, named, driver = CASES[case]
    lc = tether.Lifecycle()
    conn = make(lc, postgres)
    async with lc.run():
        for _ in range(3):  # the first use of a connection, then pooled ones
            with pytest.raises(tether.ScopeError) as caught:
                async with lc.scope() as s:
                    c = await s.get(conn)
                    if group:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(scalar, c, "SELECT pg_sleep(0.2)")
                            tg.start_soon(scalar, c, "SELECT pg_sleep(0.2)")
                    else:
                        await asyncio.gather(
                            scalar(c, "SELECT pg_sleep(0.2)"), scalar(c, "SELECT pg_sleep(0.2)")
                        )
            message = str(caught.value)
            assert message.startswith(f"{named} was used by two tasks at once (asyncio.gather")
            assert f"and {driver} refused the second" in message
            assert f"`async with lc.scope() as s: await s.get({conn.name})` in the task" in message
            await settled(lc, postgres)
            async with lc.scope() as s:  # the next unit of work is served, on a clean connection
                c = await s.get(conn)
                assert await scalar(c, "SELECT 1") == 1


@pytest.mark.parametrize("case", ["psycopg", "sqlalchemy-connected"])
async def test_drivers_that_serialise_run_both(postgres: Postgres, case: str) -> None:
    """psycopg's connection, and a session connected when it opens (tether's default), take a
    lock per operation: both queries run, one after the other."""
    lc = tether.Lifecycle()
    if case == "psycopg":
        pool = tpsy.pool(lc, postgres.dsn, max_size=2)
        conn = tpsy.connection(lc, pool, transaction=True)
    else:
        engine = tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=2)
        conn = tsa.session(lc, engine)
    async with lc.run():
        started = time.monotonic()
        async with lc.scope() as s:
            c = await s.get(conn)
            results = await asyncio.gather(
                scalar(c, "SELECT 1 FROM pg_sleep(0.2)"), scalar(c, "SELECT 2 FROM pg_sleep(0.2)")
            )
        assert results == [1, 2]
        assert time.monotonic() - started >= 0.4  # one after the other
        assert await pool_in_use(lc) == 0


async def test_over_http_it_is_a_500_with_tethers_message(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    conn = asyncpg_conn(lc, postgres, True)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/both")
    async def both(c: Annotated[Any, Depends(conn)]) -> list[Any]:
        return list(await asyncio.gather(c.fetchval("SELECT 1"), c.fetchval("SELECT 2")))

    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            with caplog.at_level(logging.WARNING, logger="tether"):
                r = await client.get("/both")
        # What the app raises (what a test, an exception handler, an error tracker sees) is
        # tether's error, caused by asyncpg's: it was asyncpg's, and tether's only in the
        # log (trial 16).
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            with pytest.raises(tether.ScopeError, match="used by two tasks at once") as raised:
                await client.get("/both")
            assert "another operation is in progress" in str(raised.value.__cause__)
    assert r.status_code == 500
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "ScopeError: Connection 'conn' was used by two tasks at once" in logged
    assert "another operation is in progress" not in r.text


# ------------------------------------------- a task still running a query as the unit ends


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transaction", [False, True], ids=["conn", "transaction"])
async def test_an_asyncpg_task_still_querying_as_the_unit_ends_is_named_in_the_log(
    postgres: Postgres, transaction: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A task the endpoint started with its connection, not awaited, still runs a query when
    the unit of work ends. The connection is terminated under it (asyncpg cannot reset it),
    and the WARNING names the unit of work, the task and the fix. Before, it read
    "connection could not be reset (InterfaceError: ... another operation is in progress)",
    and with ``transaction=True`` tether's own failed COMMIT was blamed on the endpoint
    ("connection returned inside an open transaction; ... commit or roll back the
    transactions you start"), then the raw InterfaceError was the 500's. With a transaction
    nothing is committed, and the unit fails with a ScopeError saying why; without one, the
    endpoint's own statements ran in autocommit, and its answer stands."""
    lc = tether.Lifecycle()
    conn = asyncpg_conn(lc, postgres, transaction)
    app = FastAPI(lifespan=lc.lifespan)
    tasks: list[asyncio.Task[Any]] = []
    postgres.sql("DROP TABLE IF EXISTS left_running")
    postgres.sql("CREATE TABLE left_running (who text)")
    postgres.sql("GRANT ALL ON left_running TO tether")

    @app.post("/leaky")
    async def leaky(c: Annotated[Any, Depends(conn)]) -> str:
        await c.execute("INSERT INTO left_running VALUES ('endpoint')")
        task = asyncio.ensure_future(c.execute("SELECT pg_sleep(2)"))
        tasks.append(task)
        await asyncio.sleep(0.1)  # its query is on the server
        return "ok"

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        with caplog.at_level(logging.WARNING, logger="tether"):
            started = time.monotonic()
            r = await client.post("/leaky")
            took = time.monotonic() - started
        assert took < 1.5, took  # not behind the task's 2 s query
        with pytest.raises(Exception) as task_failed:  # noqa: PT011 - asyncpg's, as it is
            await asyncio.wait_for(tasks[0], 5)
        assert "closed" in str(task_failed.value).lower(), task_failed.value
        await settled(lc, postgres)
        written = [who for (who,) in postgres.sql("SELECT who FROM left_running")]
        if transaction:
            assert r.status_code == 500, r.text
            assert written == []  # nothing committed
        else:
            assert r.status_code == 200, r.text
            assert written == ["endpoint"]  # autocommitted as it ran
        # The next request on the pool is served.
        tasks.clear()
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    fix = (
        "Await every task using the connection before the unit of work ends, or give the task "
        "a connection of its own (`async with lc.scope() as s: await s.get(conn)` in the task)."
    )
    if transaction:  # the unit's error, logged as its close failing
        said = (
            "tether: closing resource 'conn': ScopeError: Connection 'conn' was still in use by "
            "another task when its unit of work ended (a task started with it and not awaited, "
            "or the other operation of an asyncio.gather that failed), so its transaction "
            "could not be committed: the connection was terminated under that task (its query "
            "fails), and the unit of work rolled back. "
            "Await every task using the connection before the unit of work ends, or give each "
            "task a connection of its own (`async with lc.scope() as s: await s.get(conn)` in "
            "the task)."
        )
    else:
        said = (
            "tether: 'conn': a task still ran a query on the connection when its unit of work "
            "(POST /leaky) ended (a task started with it and not awaited); the connection was "
            "terminated under it (its query fails), and its backend with it. "
        ) + fix
    assert warnings == [said], warnings
    postgres.sql("DROP TABLE IF EXISTS left_running")
