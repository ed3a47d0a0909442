"""A SQLAlchemy session still in use by another task as its unit of work ends.

A task the unit of work started and did not await (``asyncio.ensure_future(s.execute(...))``)
still runs a query on the session when the unit ends. Before, the session's close waited
for it: psycopg's commit waited for its connection's lock the whole ``close_timeout``
(10 s), then the connection was abandoned with a ``TimeoutError``; asyncpg refused the commit
at once with its raw ``InterfaceError: another operation is in progress``. Now, as tether's
psycopg integration does for its connections, the connection is hung up under that task
within moments (its query fails with a connection error), discarded (the pool replaces it),
and a warning names the session and the cause. A task still waiting for a connection for the
session (the pool's wait, or a connect) is cancelled instead: it never takes one after the
unit's end.
"""

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.util import await_only

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

DRIVERS = ["psycopg", "asyncpg"]
APP = "tether-sa-held"

HELD = (
    "tether: session 'session': its connection is still in use at the end of its unit of "
    "work, by a task still using the session after its unit of work ended (a task started "
    "with it and not awaited, or the other operation of an `asyncio.gather` that failed); "
    "hung up under that task (its operation fails with a connection error) and discarded "
    "(the pool replaces it), the unit of work rolled back. Await every task using the "
    "session before the unit of work ends, or give each task a session of its own (`async "
    "with lc.scope() as s: await s.get(session)` in the task)."
)

NOT_COMMITTED = (
    "Session 'session' was still in use by another task when its unit of work ended (a task "
    "started with it and not awaited, or the other operation of an asyncio.gather that "
    "failed), so its transaction could not be committed: the connection was hung up under "
    "that task and discarded, and the unit of work rolled back."
)


NOT_COMMITTED_WAITING = (
    "Session 'session' was still in use by another task when its unit of work ended (a task "
    "started with it and not awaited, or the other operation of an asyncio.gather that "
    "failed), so its transaction could not be committed: that task, still waiting for a "
    "connection for the session, was cancelled, and the unit of work rolled back."
)

WAITING = (
    "tether: session 'session': a task still using the session after its unit of work ended "
    "(a task started with it and not awaited, or the other operation of an `asyncio.gather` "
    "that failed) is still waiting for a connection for it (the pool's wait, or a connect); "
    "that task is cancelled, so that it never takes a connection outside the unit of work, "
    "and the unit of work rolled back."
)


def make(lc: tether.Lifecycle, pg: Postgres, driver: str) -> Any:
    # One connection, no overflow: the next unit of work gets one only if it came back.
    engine = tsa.engine(
        lc, pg.url(f"postgresql+{driver}"), pool_size=1, max_overflow=0, application_name=APP
    )
    return tsa.session(lc, engine)


def pool(lc: tether.Lifecycle) -> Any:
    return lc.stats().pools["engine"]


async def select_one(lc: tether.Lifecycle, session: Any) -> None:
    async with asyncio.timeout(5), lc.scope() as s:
        ss = await s.get(session)
        assert (await ss.execute(text("SELECT 1"))).scalar() == 1


async def orphan_fails(orphan: "asyncio.Future[Any]") -> None:
    """The task's query (30 s on the server) fails with a connection error within moments."""
    with pytest.raises(sa_exc.DBAPIError) as caught:
        async with asyncio.timeout(10):
            await orphan
    assert caught.value.connection_invalidated, caught.value


async def ended_on_the_server(pg: Postgres) -> None:
    """The backend that ran the task's query is gone within moments (it would notice its
    client left only as it sent the result, 30 s later), its transaction with it."""
    async with asyncio.timeout(3):
        while any("pg_sleep(30)" in row["query"] for row in pg.activity(APP)):
            await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_task_still_querying_is_hung_up_not_waited_for(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    lc = tether.Lifecycle()
    session = make(lc, postgres, driver)
    async with lc.run():
        for _ in range(2):  # the first connection, then the one the pool made to replace it
            discarded = pool(lc).discarded or 0
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="tether"):
                started = time.monotonic()
                with pytest.raises(tether.ScopeError) as refused:
                    async with lc.scope() as s:
                        ss = await s.get(session)
                        orphan = asyncio.ensure_future(ss.execute(text("SELECT pg_sleep(30)")))
                        await asyncio.sleep(0.1)  # the query is on the server
                took = time.monotonic() - started
            assert took < 5, took  # (before: close_timeout, 10 s)
            assert str(refused.value).startswith(NOT_COMMITTED)
            assert HELD in caplog.text, caplog.text
            await orphan_fails(orphan)
            await ended_on_the_server(postgres)
            stats = pool(lc)
            assert stats.in_use == 0
            assert stats.discarded == discarded + 1  # never handed back in a state not known
            await select_one(lc, session)  # a clean connection, in the pool's one slot


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_failing_unit_keeps_its_own_error(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    """The unit of work failed (its rollback finds the session in use): its own exception
    is what it raises, promptly, and the connection is discarded all the same."""
    lc = tether.Lifecycle()
    session = make(lc, postgres, driver)
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"):
            started = time.monotonic()
            with pytest.raises(LookupError, match="the endpoint's own"):
                async with lc.scope() as s:
                    ss = await s.get(session)
                    orphan = asyncio.ensure_future(ss.execute(text("SELECT pg_sleep(30)")))
                    await asyncio.sleep(0.1)
                    raise LookupError("the endpoint's own")
            took = time.monotonic() - started
        assert took < 5, took
        assert HELD in caplog.text, caplog.text
        await orphan_fails(orphan)
        await ended_on_the_server(postgres)
        assert pool(lc).in_use == 0
        assert pool(lc).discarded == 1
        await select_one(lc, session)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_task_about_to_finish_is_waited_for(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    """A query that ends within moments (the other query of a gather that failed) is waited
    for: the connection is kept, nothing is warned of."""
    lc = tether.Lifecycle()
    session = make(lc, postgres, driver)
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.scope() as s:
                ss = await s.get(session)
                other = asyncio.ensure_future(ss.execute(text("SELECT pg_sleep(0.2)")))
                await asyncio.sleep(0.05)
        assert other.done()
        await other  # its query ran to its end
        assert "still in use" not in caplog.text, caplog.text
        assert pool(lc).discarded == 0
        await select_one(lc, session)


#: A query SQLite takes seconds over (counting to 300 million).
SLOW_SQLITE = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000000) "
    "SELECT count(*) FROM c"
)


@pytest.mark.skipif(
    sqlalchemy.__version__.startswith("2.0."),
    reason="SQLAlchemy 2.0's aiosqlite adapter has no execute lock to tell a query running "
    "in another task by: the close waits for it, as before (docs/integrations/sqlalchemy.md)",
)
@pytest.mark.timeout(90)
async def test_aiosqlite_query_still_running_is_interrupted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosqlite's query runs in its thread: it is interrupted (``sqlite3``'s
    ``interrupt()``), the connection discarded (before: the close waited for it the whole
    ``close_timeout``)."""
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, f"sqlite+aiosqlite:///{tmp_path / 'held.db'}", pool_size=1)
    session = tsa.session(lc, engine)
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"):
            started = time.monotonic()
            with pytest.raises(tether.ScopeError) as refused:
                async with lc.scope() as s:
                    ss = await s.get(session)
                    orphan = asyncio.ensure_future(ss.execute(text(SLOW_SQLITE)))
                    await asyncio.sleep(0.2)  # the query runs
            took = time.monotonic() - started
        assert took < 5, took
        assert str(refused.value).startswith(NOT_COMMITTED)
        assert HELD in caplog.text, caplog.text
        with pytest.raises(sa_exc.OperationalError, match="interrupted"):
            async with asyncio.timeout(10):
                await orphan
        assert pool(lc).in_use == 0
        assert pool(lc).discarded == 1
        await select_one(lc, session)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_hang_up_replaces_that_connection_only(postgres: Postgres, driver: str) -> None:
    """The task's connection error is a disconnect, on which SQLAlchemy replaces every
    connection of the pool: only the one hung up is replaced (before, with psycopg, a pool of
    3 made 3 new ones)."""
    lc = tether.Lifecycle()
    engine = tsa.engine(
        lc, postgres.url(f"postgresql+{driver}"), pool_size=3, max_overflow=0, application_name=APP
    )
    session = tsa.session(lc, engine)

    async def three_at_once() -> None:
        async def one() -> None:
            async with lc.scope() as s:
                ss = await s.get(session)
                await ss.execute(text("SELECT pg_sleep(0.05)"))

        async with asyncio.timeout(10):
            await asyncio.gather(one(), one(), one())

    async with lc.run():
        await three_at_once()  # the pool's three connections made
        made = pool(lc).created
        with pytest.raises(tether.ScopeError):
            async with lc.scope() as s:
                ss = await s.get(session)
                orphan = asyncio.ensure_future(ss.execute(text("SELECT pg_sleep(30)")))
                await asyncio.sleep(0.1)  # the query is on the server
        await orphan_fails(orphan)
        await three_at_once()
        assert pool(lc).created == made + 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("where", ["pool", "pool after a commit", "connect", "pool, failing"])
async def test_a_task_still_waiting_for_a_connection_is_cancelled(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, driver: str, where: str
) -> None:
    """A task the unit started is still getting the session its connection as the unit ends:
    waiting for the pool (a pool of one, held elsewhere; the session declared with
    ``connect=False``, or its connection given back by the endpoint's commit), or connecting.
    Before, the rollback and the close each waited 5 s for it and failed with SQLAlchemy's
    ``IllegalStateChangeError`` (10 s, a 500); the task then took the connection after the
    unit's end, ran its query, and left the connection checked out, idle in transaction,
    for good: every later unit of work timed out. Now it is cancelled within moments."""
    lc = tether.Lifecycle()
    engine = tsa.engine(
        lc,
        postgres.url(f"postgresql+{driver}"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=20,
        application_name=APP,
    )
    session = tsa.session(lc, engine, connect=where == "pool after a commit")
    async with lc.run():
        eng = lc.get(engine)
        let_go = asyncio.Event()
        holding = asyncio.Event()

        async def hold() -> None:  # the pool's one connection, elsewhere
            async with eng.connect() as conn:
                await conn.execute(text("SELECT 1"))
                holding.set()
                await let_go.wait()

        def slow_connect(*args: Any) -> None:  # (in SQLAlchemy's greenlet)
            await_only(asyncio.sleep(30))

        holder = None
        if where == "connect":
            await eng.dispose()  # the next checkout connects
            event.listen(eng.sync_engine, "do_connect", slow_connect)
        elif where != "pool after a commit":
            holder = asyncio.ensure_future(hold())
            await holding.wait()
        with caplog.at_level(logging.WARNING, logger="tether"):
            started = time.monotonic()
            with pytest.raises((tether.ScopeError, LookupError)) as raised:
                async with lc.scope() as s:
                    ss = await s.get(session)
                    if where == "pool after a commit":
                        await ss.commit()  # its connection back to the pool
                        holder = asyncio.ensure_future(hold())
                        await holding.wait()
                    orphan = asyncio.ensure_future(ss.execute(text("SELECT 42")))
                    await asyncio.sleep(0.1)  # the task waits for its connection
                    assert not orphan.done()
                    if where == "pool, failing":
                        raise LookupError("the endpoint's own")
            took = time.monotonic() - started
        assert took < 3, took  # (before: 10 s)
        if where == "pool, failing":
            assert raised.type is LookupError  # a failed unit keeps its own error
        else:
            assert raised.type is tether.ScopeError
            assert str(raised.value).startswith(NOT_COMMITTED_WAITING)
        assert WAITING in caplog.text, caplog.text
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(3):
                await orphan
        let_go.set()
        if holder is not None:
            await holder
        await asyncio.sleep(0.2)  # (before: the task took the connection, ran its query)
        assert not any("SELECT 42" in row["query"] for row in postgres.activity(APP))
        assert pool(lc).in_use == 0  # (before: 1 for good)
        assert pool(lc).discarded == 0  # no connection was taken: none to discard
        if where == "connect":
            event.remove(eng.sync_engine, "do_connect", slow_connect)
        await select_one(lc, session)
