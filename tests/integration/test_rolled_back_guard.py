"""`rolled_back` hands out the connection as production does: a unit of work's connection is
unusable after the unit (tether.psycopg's `ResourceClosedError`, naming `release="response"`;
asyncpg's own "released back to the pool"), so a test catches a streaming body or a
background task that uses it too late; and the block's own connection is unusable after the
block. Against a real PostgreSQL.
"""

from typing import Annotated, Any

import asyncpg
import psycopg
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

Conn = psycopg.AsyncConnection[Any]

GIVEN_BACK = (
    "Connection 'tx' was given back to pool 'pool' at the end of its unit of work (in a "
    "request, release='handler' gives it back when the endpoint returns, before the "
    "response), and cannot be used after: the pool may have handed it to another request, "
    "and the statement would run in that one's transaction. A StreamingResponse body that "
    "queries needs release='response'; a background task, a connection of its own "
    "(`async with lc.scope() as s: await s.get(tx)`)."
)

BLOCK_OVER = (
    "Connection 'tx' of rolled_back(tx) was given back to its pool when the block ended (its "
    "transaction rolled back), and cannot be used after: the pool may have handed it to a "
    "unit of work. Query it inside the `async with rolled_back(tx) as conn:` block."
)


async def one(c: Any, sql: str) -> Any:
    row = await (await c.execute(sql)).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.fastapi_free
@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
async def test_psycopg_a_units_connection_is_unusable_after_it(
    postgres: Postgres, transaction: bool
) -> None:
    """`rolled_back` used to hand every unit of work the raw psycopg connection, which kept
    working after the unit: a statement on it then ran in the next unit's savepoint, where
    production raises. Each unit gets tether's guarded connection, as in production (still an
    `AsyncConnection`); the block's works until the block ends, then raises too."""
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1)
    tx = tpsy.connection(lc, pool, name="tx", transaction=transaction)
    async with lc.run():
        async with tpsy.rolled_back(tx) as block:
            assert isinstance(block, psycopg.AsyncConnection)
            async with lc.scope() as s:
                stale = await s.get(tx)
                assert isinstance(stale, psycopg.AsyncConnection)
                assert await one(stale, "SELECT 41 + 1") == 42
            for _ in range(2):  # one leak, however often used
                with pytest.raises(tether.ResourceClosedError) as caught:
                    await stale.execute("SELECT 1")
                assert str(caught.value) == GIVEN_BACK
                assert caught.value.resource == "tx"
            assert "given back to the pool" in repr(stale)
            async with lc.scope() as s:  # the next unit, and the block, still work
                assert await one(await s.get(tx), "SELECT 2") == 2
            assert await one(block, "SELECT 3") == 3
            assert lc.stats().resources["tx"].leaks == 1
        with pytest.raises(tether.ResourceClosedError) as caught:
            await block.execute("SELECT 1")
        assert str(caught.value) == BLOCK_OVER
        assert caught.value.resource == "tx"
        assert lc.stats().resources["tx"].leaks == 1  # the test's own misuse: no leak
        async with lc.scope() as s:  # the pool's connection, out of the block, is fine
            assert await one(await s.get(tx), "SELECT 4") == 4


def test_psycopg_a_streaming_body_fails_in_the_block_as_in_production(postgres: Postgres) -> None:
    """A StreamingResponse body that queries with release="handler": production raises the
    message naming release="response", and `rolled_back` used to let it run (the test passed,
    production failed). It raises in the block too; the next request still works."""
    lc = tether.Lifecycle()
    tx = tpsy.connection(lc, tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1), name="tx")
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/stream")
    async def stream(c: Annotated[Conn, Depends(tx)]) -> StreamingResponse:
        async def body() -> Any:
            yield "rows\n"
            yield f"{await one(c, 'SELECT 41 + 1')}\n"

        return StreamingResponse(body())

    @app.get("/plain")
    async def plain(c: Annotated[Conn, Depends(tx)]) -> int:
        return int(await one(c, "SELECT 41 + 1"))

    with TestClient(app) as client:
        with client.portal.wrap_async_context_manager(tpsy.rolled_back(tx)):
            with pytest.raises(tether.ResourceClosedError) as caught:
                client.get("/stream")
            assert str(caught.value) == GIVEN_BACK
            assert client.get("/plain").json() == 42
        assert lc.stats().resources["tx"].leaks == 1


RELEASED = "cannot call Connection.fetchval(): connection has been released back to the pool"


@pytest.mark.fastapi_free
@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
async def test_asyncpg_a_units_connection_is_unusable_after_it(
    postgres: Postgres, transaction: bool
) -> None:
    """asyncpg's `rolled_back` used to hand every unit of work the block's own pool proxy,
    which kept working after the unit: a statement on it then ran in the next unit's
    savepoint, where production's proxy, released, raises asyncpg's InterfaceError. Each
    unit gets a proxy of its own, released as it ends."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
    tx = tpg.connection(lc, pool, name="tx", transaction=transaction)
    async with lc.run():
        async with lc.scope() as s:  # production, for comparison
            production = await s.get(tx)
        with pytest.raises(asyncpg.InterfaceError) as caught:
            await production.fetchval("SELECT 1")
        assert str(caught.value) == RELEASED
        async with tpg.rolled_back(tx) as block:
            async with lc.scope() as s:
                stale = await s.get(tx)
                assert isinstance(stale, asyncpg.Connection)
                assert await stale.fetchval("SELECT 41 + 1") == 42
            with pytest.raises(asyncpg.InterfaceError) as caught:
                await stale.fetchval("SELECT 1")
            assert str(caught.value) == RELEASED
            async with lc.scope() as s:  # the next unit, and the block, still work
                assert await (await s.get(tx)).fetchval("SELECT 2") == 2
            assert await block.fetchval("SELECT 3") == 3
        with pytest.raises(asyncpg.InterfaceError) as caught:
            await block.fetchval("SELECT 1")
        assert str(caught.value) == RELEASED


def test_asyncpg_a_streaming_body_fails_in_the_block_as_in_production(postgres: Postgres) -> None:
    """A StreamingResponse body that queries with release="handler" fails in production
    (asyncpg's released proxy), and used to run in `rolled_back`. It fails in the block too."""
    lc = tether.Lifecycle()
    tx = tpg.connection(lc, tpg.pool(lc, postgres.dsn, min_size=1, max_size=1), name="tx")
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/stream")
    async def stream(c: Annotated[asyncpg.Connection, Depends(tx)]) -> StreamingResponse:
        async def body() -> Any:
            yield "rows\n"
            yield f"{await c.fetchval('SELECT 41 + 1')}\n"

        return StreamingResponse(body())

    @app.get("/plain")
    async def plain(c: Annotated[asyncpg.Connection, Depends(tx)]) -> int:
        return int(await c.fetchval("SELECT 41 + 1"))

    with TestClient(app) as client:
        with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
            client.get("/stream")  # production
        with client.portal.wrap_async_context_manager(tpg.rolled_back(tx)):
            with pytest.raises(asyncpg.InterfaceError) as caught:
                client.get("/stream")
            assert str(caught.value) == RELEASED
            assert client.get("/plain").json() == 42


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_streaming_body_with_release_response_works_in_the_block(
    postgres: Postgres, driver: str
) -> None:
    """The form the message above names: with `release="response"` the body's query runs,
    in the block as in production. The block's turn on its one connection was an anyio
    lock, which the task that closes the unit after the response (not the one that opened
    it) could not release: `RuntimeError: The current task is not holding this lock`."""
    lc = tether.Lifecycle()
    if driver == "psycopg":
        pool: Any = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1)
        tx: Any = tpsy.connection(lc, pool, name="tx", release="response")
        rolled_back: Any = tpsy.rolled_back

        async def query(c: Any) -> Any:
            return await one(c, "SELECT 41 + 1")
    else:
        pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
        tx = tpg.connection(lc, pool, name="tx", release="response")
        rolled_back = tpg.rolled_back

        async def query(c: Any) -> Any:
            return await c.fetchval("SELECT 41 + 1")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/stream")
    async def stream(c: Annotated[Any, Depends(tx)]) -> StreamingResponse:
        async def body() -> Any:
            yield "rows\n"
            yield f"{await query(c)}\n"

        return StreamingResponse(body())

    with TestClient(app) as client:
        with client.portal.wrap_async_context_manager(rolled_back(tx)):
            for _ in range(3):
                assert client.get("/stream").text == "rows\n42\n"
        assert lc.stats().resources["tx"].leaks == 0
