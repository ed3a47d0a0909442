"""tether.integrations.psycopg: small fixes from the reviews of the psycopg integration, against
a real PostgreSQL.

- a connection given back closed or mid-query after the pool closed (a unit of work still
  running as the app shuts down) was not counted as discarded: psycopg_pool closes what comes
  back to a closed pool without counting it. asyncpg's is counted, and so is psycopg's when
  the pool is open or drained (``drain()``, tether's answer to a failover): a clean connection
  retired so is not discarded, one given back closed is;
- the warning for a connection still held at its unit's end blamed a generator left open, or
  a query of another task, whichever held it: it says which now (a task waits on the
  connection's socket: a query, another task's or a generator's close; none: a generator
  suspended between rows), or both where the loop cannot tell (uvloop). The ``gather`` case
  is pinned in ``test_psycopg_held.py``.
"""

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


def _connection(lc: tether.Lifecycle, postgres: Postgres, driver: str) -> tuple[Any, Any]:
    """A pool of two and a connection resource of it."""
    module: Any = tpg if driver == "asyncpg" else tpsy
    pool = module.pool(lc, postgres.dsn, name="pg", min_size=2, max_size=2)
    return pool, module.connection(lc, pool)


async def _retire(p: Any, driver: str, how: str) -> None:
    """The pool's connections retired: all at once (``close()``), or replaced (psycopg's
    ``drain()``, asyncpg's ``expire_connections()``)."""
    if how == "close":
        await p.close()
    elif driver == "asyncpg":
        await p.expire_connections()
    else:
        await p.drain()


@pytest.mark.parametrize("how", ["close", "drain"])
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("busy", [False, True], ids=["clean", "busy"])
async def test_a_connection_given_back_busy_after_the_pool_closed_is_discarded(
    postgres: Postgres, driver: str, how: str, busy: bool
) -> None:
    """A unit of work holds a connection as its pool closes (or drains); it ends with a query
    still running on it in another task (a ``gather`` whose other query failed), so tether
    closes it: one discarded, with either driver, the pool closed or drained. A unit that
    ends clean gives back a connection that is retired, not discarded."""
    lc = tether.Lifecycle()
    pool, conn = _connection(lc, postgres, driver)
    async with lc.run():
        p = lc.get(pool)
        retiring = None
        try:
            async with lc.scope() as s:
                c = await s.get(conn)
                await c.execute("SELECT 1")
                retiring = asyncio.create_task(_retire(p, driver, how))
                await asyncio.sleep(0.1)
                if busy:
                    await asyncio.gather(c.execute("SELECT 1/0"), c.execute("SELECT pg_sleep(1.5)"))
        except Exception:
            assert busy
        await asyncio.wait_for(retiring, 10)
        await asyncio.sleep(0.2)  # psycopg_pool returns a connection in a worker task
        assert lc.stats().pools["pg"].discarded == (1 if busy else 0)


HELD = (
    "tether: 'conn': the connection is still held at the end of its unit of work (its lock is "
    "taken): {by}; closed (the pool replaces it). Close such a generator in the endpoint "
    "(`async with contextlib.aclosing(...)`), and await every task using the connection "
    "before the unit of work ends (or give each its own connection)."
)
BY_A_QUERY = (
    "by a query still running on it: in another task (`asyncio.gather` of queries on one "
    "connection, one of which failed, or a task not awaited), or in a `cursor.stream()` or "
    "`conn.notifies()` generator being closed, whose cancel of its query took longer than 0.5 s"
)
BY_A_GENERATOR = (
    "by a `cursor.stream()` or `conn.notifies()` generator left open (kept alive by a "
    "reference, such as an exception's traceback)"
)


def _held(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "still held" in r.getMessage()]


@pytest.mark.parametrize(
    ("anyio_backend", "by"),
    [
        ("asyncio", BY_A_GENERATOR),
        (("asyncio", {"use_uvloop": True}), f"{BY_A_GENERATOR}, or {BY_A_QUERY}"),
    ],
    ids=["asyncio", "uvloop"],
)
async def test_a_stream_left_open_is_named_as_such(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, by: str
) -> None:
    """A ``stream()`` generator suspended between rows as the unit ends (a reference keeps it)
    holds the connection: the warning names the generator, not a query of another task (no
    task waits on the connection). uvloop's loop cannot say whether one does: both named."""
    lc = tether.Lifecycle()
    conn = tpsy.connection(lc, tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1))
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.scope() as s:
                c = await s.get(conn)
                rows = c.cursor().stream("SELECT generate_series(1, 1000000)")
                assert await anext(rows) == (1,)
        assert _held(caplog) == [HELD.format(by=by)]
        with contextlib.suppress(Exception):
            await rows.aclose()


async def test_a_task_not_awaited_is_named_as_a_query(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A query left running in a task the unit did not await: the warning names a query still
    running on the connection (a task waits on it), not a generator left open."""
    lc = tether.Lifecycle()
    conn = tpsy.connection(lc, tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1))
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.scope() as s:
                c = await s.get(conn)
                orphan = asyncio.ensure_future(c.execute("SELECT pg_sleep(30)"))
                await asyncio.sleep(0.1)  # the query is on the server
        assert _held(caplog) == [HELD.format(by=BY_A_QUERY)]
        with pytest.raises(psycopg.OperationalError):
            async with asyncio.timeout(10):
                await orphan
