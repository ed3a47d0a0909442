"""`rolled_back` (asyncpg, psycopg) in a test suite, against a real PostgreSQL: a unit of work
the test left holding the block's connection, which the block's end waited for, is reported by
the pytest plugin; a failed statement the test ran on the block's connection makes the next
unit of work fail naming it and the fix, not with PostgreSQL's bare "current transaction is
aborted"."""

from __future__ import annotations

from typing import Any

import asyncpg
import psycopg
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.servers]

DRIVERS = {"asyncpg": tpg, "psycopg": tpsy}

APP = """
import asyncio
from typing import Annotated, Any

from fastapi import Depends, FastAPI

import tether
import tether.integrations.{driver} as driver

lc = tether.Lifecycle(drain_timeout=2)
pool = driver.pool(lc, DSN, min_size=1, max_size=2)
tx = driver.connection(lc, pool, name="tx", transaction=True)
app = FastAPI(lifespan=lc.lifespan)


@app.post("/spawn/{{seconds}}")
async def spawn(seconds: float, c: Annotated[Any, Depends(tx)]) -> int:
    async def job() -> None:
        async with lc.scope("nightly export") as s:
            c2 = await s.get(tx)
            await c2.execute("INSERT INTO review_notes (text) VALUES ('job')")
            await asyncio.sleep(seconds)

    app.state.job = asyncio.create_task(job())
    return 1
"""

SUITE = """
import time

import pytest
from fastapi.testclient import TestClient

import tether.integrations.{driver} as driver
from app import app, tx


@pytest.fixture(scope="module")
def client():
    with TestClient(app) as c:
        yield c


@pytest.fixture
def db(client):
    with client.portal.wrap_async_context_manager(driver.rolled_back(tx)) as c:
        yield c


def test_leaves_a_job(client, db) -> None:
    assert client.post("/spawn/2.5").status_code == 200


def test_a_job_that_ends_at_once(client, db) -> None:
    assert client.post("/spawn/0.2").status_code == 200


def test_nothing_left() -> None:
    time.sleep(0.5)
"""


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_a_unit_the_blocks_end_waited_for_is_reported(
    pytester: pytest.Pytester, postgres: Postgres, driver: str
) -> None:
    """A job the test left running, holding the block's connection: the end of the
    `rolled_back` fixture waited (up to 10 s) for it before rolling back, the teardown took
    that long, and the plugin, which looks after the fixtures, found nothing: the test passed,
    slower. The wait is noted, and the test errors, naming the unit, as for a shutdown's drain;
    one that gives the connection back within the plugin's second is fine."""
    postgres.sql("CREATE TABLE IF NOT EXISTS review_notes (id serial PRIMARY KEY, text text)")
    pytester.makepyfile(app=f"DSN = {postgres.dsn!r}\n" + APP.format(driver=driver))
    pytester.makepyfile(test_block=SUITE.format(driver=driver))
    pytester.makeini(
        "[pytest]\naddopts = -p no:asyncio\nfilterwarnings =\n    error\n"
        # Starlette < 0.47 (FastAPI 0.115's) imports a name anyio >= 4.16 deprecates.
        "    ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning\n"
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=2 state='running'> still "
            "held 'tx' when rolled_back(tx) ended after the test (a fixture's teardown), and "
            "the block waited for it to give it back before rolling back:",
            "  - 'nightly export' (in flight *s) holds 'tx' (acquired at *app.py:* in job), "
            "gave it back * s after the test",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
        ]
    )
    assert "test_a_job_that_ends_at_once" not in result.stdout.str().split("ERRORS")[-1]
    assert postgres.sql("SELECT count(*) FROM review_notes") == [(0,)]  # rolled back


def test_a_unit_the_blocks_end_gave_up_on_is_reported(
    pytester: pytest.Pytester, postgres: Postgres
) -> None:
    """The job still holds the block's connection when the block's wait for it runs out: the
    block rolls back under it. That worst case was not noted (the test passed, 10 s slower,
    trial 26); it is reported as the block's, saying the block gave up."""
    postgres.sql("CREATE TABLE IF NOT EXISTS review_notes (id serial PRIMARY KEY, text text)")
    pytester.makepyfile(app=f"DSN = {postgres.dsn!r}\n" + APP.format(driver="asyncpg"))
    suite = SUITE.format(driver="asyncpg").replace(
        '@pytest.fixture(scope="module")',
        "driver.SETTLE = 0.5  # the block's wait, short for the test\n\n\n"
        '@pytest.fixture(scope="module")',
        1,
    )
    pytester.makepyfile(test_block=suite)
    pytester.makeini(
        "[pytest]\naddopts = -p no:asyncio\nfilterwarnings =\n    error\n"
        "    ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning\n"
    )
    result = pytester.runpytest_subprocess("-k", "leaves_a_job")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=2 state='running'> still "
            "held 'tx' when rolled_back(tx) ended after the test (a fixture's teardown), and "
            "the block waited for it to give it back before rolling back:",
            "  - 'nightly export' (in flight *s) holds 'tx' (acquired at *app.py:* in job), "
            "still held it * s after the test, when the block gave up waiting and rolled back "
            "under it",
        ]
    )


ABORTED = (
    "rolled_back(tx): the block's transaction is aborted, so no unit of work can run in it: "
    "a statement run on the block's connection (the one `async with rolled_back(tx) as conn:` "
    "yields), outside any unit of work, failed (one the test expects to fail, in "
    "`pytest.raises`?), and PostgreSQL ignores every later command of the transaction until "
    "it is rolled back. Run a statement that may fail on the block's connection in a "
    "savepoint (`async with conn.transaction():`): its failure then rolls back to the "
    "savepoint only, and the block carries on."
)

UNIQUE = {"asyncpg": asyncpg.UniqueViolationError, "psycopg": psycopg.errors.UniqueViolation}


async def _count(c: Any) -> int:
    if isinstance(c, psycopg.AsyncConnection):
        row = await (await c.execute("SELECT count(*) FROM review_keys")).fetchone()
        assert row is not None
        return int(row[0])
    return int(await c.fetchval("SELECT count(*) FROM review_keys"))


@pytest.mark.anyio
@pytest.mark.fastapi_free
@pytest.mark.parametrize("driver", sorted(DRIVERS))
async def test_a_failed_statement_on_the_blocks_connection_is_named(
    postgres: Postgres, driver: str
) -> None:
    """The test checks a constraint on the block's connection, its error caught (as
    `pytest.raises` does): the block's transaction is aborted, and every later unit of work
    used to fail with PostgreSQL's "current transaction is aborted". It fails with a
    `RuntimeError` naming the cause and the fix; the statement in a savepoint, as the message
    says, leaves the block working."""
    postgres.sql("CREATE TABLE IF NOT EXISTS review_keys (k text PRIMARY KEY)")
    m: Any = DRIVERS[driver]
    lc = tether.Lifecycle()
    tx = m.connection(lc, m.pool(lc, postgres.dsn, min_size=1, max_size=2), name="tx")
    async with lc.run():
        async with m.rolled_back(tx) as c:
            await c.execute("INSERT INTO review_keys VALUES ('a')")
            async with c.transaction():  # the fix: a savepoint
                pass
            with pytest.raises(UNIQUE[driver]):
                async with c.transaction():
                    await c.execute("INSERT INTO review_keys VALUES ('a')")
            async with lc.scope() as s:  # the block carries on
                assert await _count(await s.get(tx)) == 1
            with pytest.raises(UNIQUE[driver]):
                await c.execute("INSERT INTO review_keys VALUES ('a')")
            for _ in range(2):  # each unit of work after, a request or a scope
                with pytest.raises(RuntimeError) as caught:
                    async with lc.scope() as s:
                        await s.get(tx)
                assert str(caught.value) == ABORTED
        async with lc.scope() as s:  # the block rolled back; the pool's connection is fine
            assert await _count(await s.get(tx)) == 0


@pytest.mark.anyio
@pytest.mark.fastapi_free
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_failed_statement_on_the_blocks_connection_is_named_sqlalchemy(
    postgres: Postgres, driver: str
) -> None:
    """The same with `tsa.rolled_back(session)`: the message names SQLAlchemy's savepoint."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import text

    from tether.integrations import sqlalchemy as tsa

    postgres.sql("CREATE TABLE IF NOT EXISTS review_keys (k text PRIMARY KEY)")
    lc = tether.Lifecycle()
    url = postgres.dsn.replace("postgresql:", f"postgresql+{driver}:")
    session = tsa.session(lc, tsa.engine(lc, url, pool_size=1, max_overflow=0), name="tx")
    async with lc.run():
        async with tsa.rolled_back(session) as c:
            await c.execute(text("INSERT INTO review_keys VALUES ('a')"))
            with pytest.raises(sa_exc.IntegrityError):
                async with c.begin_nested():
                    await c.execute(text("INSERT INTO review_keys VALUES ('a')"))
            async with lc.scope() as s:  # the block carries on
                count = await (await s.get(session)).scalar(
                    text("SELECT count(*) FROM review_keys")
                )
                assert count == 1
            with pytest.raises(sa_exc.IntegrityError):
                await c.execute(text("INSERT INTO review_keys VALUES ('a')"))
            with pytest.raises(RuntimeError) as caught:
                async with lc.scope() as s:
                    await s.get(session)
            assert str(caught.value) == ABORTED.replace(
                "`async with conn.transaction():`", "`async with conn.begin_nested():`"
            )
