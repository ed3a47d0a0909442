"""The warning for a psycopg connection still held as its unit of work ends says what holds
it: a query still running on it (another task's, or a generator's close), or a generator
left open (``tests/integration/test_psycopg_small_fixes.py``).

``asyncio.gather`` of two queries on one connection, the first of which fails: the gather
raises at once, the second query still runs, holding the connection's lock, as the unit of
work ends. The warning blamed a ``stream()`` or ``notifies()`` generator, which there is none
of.
"""

import asyncio
import logging

import psycopg
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

HELD = (
    "the connection is still held at the end of its unit of work (its lock is taken): by a "
    "query still running on it: in another task (`asyncio.gather` of queries on one "
    "connection, one of which failed, or a task not awaited), or in a `cursor.stream()` or "
    "`conn.notifies()` generator being closed, whose cancel of its query took longer than "
    "0.5 s; closed (the pool replaces it). Close such a generator in the endpoint (`async "
    "with contextlib.aclosing(...)`), and await every task using the connection before the "
    "unit of work ends (or give each its own connection)."
)


async def test_a_gather_still_running_is_named(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1)
    conn = tpsy.connection(lc, pool)
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"):
            with pytest.raises(Exception, match="division by zero"):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    await asyncio.gather(c.execute("SELECT 1/0"), c.execute("SELECT pg_sleep(2)"))
        assert f"tether: 'conn': {HELD}" in caplog.text, caplog.text
        async with lc.scope() as s:  # the pool replaced it
            c = await s.get(conn)
            assert await (await c.execute("SELECT 1")).fetchone() == (1,)


async def test_the_task_still_running_fails_at_once_rather_than_hang(postgres: Postgres) -> None:
    """A query left running in a task the unit of work did not await, when the unit ends: the
    connection is hung up under it, and that task's query fails with psycopg's "server closed
    the connection" within moments (before: the connection was closed under the waiting
    query, whose wait never woke: the task hung for good; and psycopg's C code resuming a
    wait on a closed connection reads freed memory, a segfault seen under load)."""
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=2)
    conn = tpsy.connection(lc, pool, transaction=False)
    async with lc.run():
        for _ in range(3):
            async with lc.scope() as s:
                c = await s.get(conn)
                orphan = asyncio.ensure_future(c.execute("SELECT pg_sleep(30)"))
                await asyncio.sleep(0.1)  # the query is on the server
            with pytest.raises(psycopg.OperationalError, match="server closed the connection"):
                async with asyncio.timeout(10):  # (the query itself takes 30 s)
                    await orphan
        # Its backend is ended as the connection goes back (PostgreSQL notices a client gone
        # only when it next writes to it: the query would run its 30 s, holding a slot).
        async with asyncio.timeout(5):
            while any("pg_sleep(30)" in row["query"] for row in postgres.activity()):
                await asyncio.sleep(0.05)
        async with lc.scope() as s:  # the pool replaced it
            c = await s.get(conn)
            assert await (await c.execute("SELECT 1")).fetchone() == (1,)


async def test_a_holder_between_two_turns_of_its_wait_lets_go_before_the_close(
    postgres: Postgres,
) -> None:
    """psycopg's wait yields to the loop with no reader or writer registered when the loop has
    been busy (its ``await sleep(0)``): a holder there is not "waiting on the socket", yet it
    resumes into the connection. The hang-up gives it its turn, and it fails on the shut socket
    and lets go, before the connection is closed (before: closed at once under it)."""
    aconn = await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True)
    seen: list[bool] = []

    async def holder() -> None:
        async with aconn.lock:  # as psycopg's query holds it
            await asyncio.sleep(0)  # psycopg's `sleep(0)` between two waits
            seen.append(aconn.closed)  # resumed: closed under it?

    task = asyncio.create_task(holder())
    await asyncio.sleep(0)  # the holder takes the lock and yields
    assert aconn.lock.locked()
    async with asyncio.timeout(5):  # in this task (wait_for's own task would let it run first)
        await tpsy._hang_up_held(aconn)
    await task
    assert seen == [False]
    assert aconn.closed
