"""`rolled_back` of tether.integrations.asyncpg and psycopg against a real PostgreSQL.

Every request and `lc.scope()` unit of work gets the block's connection, in a savepoint of
its own inside one outer transaction: what they write is visible in the block, behaves as
in production (a failing request, an endpoint's own commit, a duplicate key, a nested
savepoint), and is gone after it, seen from another connection.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import asyncpg
import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

import tether
from tests.servers import Postgres
from tests.unit._messages import exactly
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy

pytestmark = pytest.mark.servers

DRIVERS = ["asyncpg", "psycopg"]
TABLE = "rb_items"


@pytest.fixture
def items(postgres: Postgres) -> Iterator[None]:
    postgres.sql(f"DROP TABLE IF EXISTS {TABLE}")
    postgres.sql(f"CREATE TABLE {TABLE} (id int PRIMARY KEY)")
    postgres.sql(f"GRANT ALL ON {TABLE} TO tether")
    yield
    postgres.sql(f"DROP TABLE IF EXISTS {TABLE}")


def rows(postgres: Postgres) -> list[int]:
    return [r[0] for r in postgres.sql(f"SELECT id FROM {TABLE} ORDER BY id")]


class Driver:
    """What differs between asyncpg and psycopg: the placeholders, fetching, the errors."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.module: Any = tpg if name == "asyncpg" else tpsy
        self.unique: type[Exception] = (
            asyncpg.UniqueViolationError if name == "asyncpg" else psycopg.errors.UniqueViolation
        )

    async def execute(self, c: Any, sql: str, *args: Any) -> None:
        if self.name == "asyncpg":
            await c.execute(sql.replace("%s", "$1"), *args)
        else:
            await c.execute(sql, args)

    async def ids(self, c: Any) -> list[int]:
        sql = f"SELECT id FROM {TABLE} ORDER BY id"
        if self.name == "asyncpg":
            return [r[0] for r in await c.fetch(sql)]
        return [r[0] for r in await (await c.execute(sql)).fetchall()]


def make_app(
    postgres: Postgres, driver: Driver, *, transaction: bool
) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[Any]]:
    lc = tether.Lifecycle()
    pool = driver.module.pool(lc, postgres.dsn, min_size=1, max_size=4)
    conn = driver.module.connection(lc, pool, transaction=transaction)
    app = FastAPI(lifespan=lc.lifespan)
    insert = f"INSERT INTO {TABLE} (id) VALUES (%s)"

    @app.post("/items/{item_id}")
    async def create(item_id: int, c: Annotated[Any, Depends(conn)], fail: bool = False) -> int:
        await driver.execute(c, insert, item_id)
        if fail:
            raise HTTPException(409, "no")
        return item_id

    @app.post("/blocks-then-fail/{item_id}")
    async def blocks_then_fail(item_id: int, c: Annotated[Any, Depends(conn)]) -> None:
        async with c.transaction():  # committed in autocommit mode, a savepoint otherwise
            await driver.execute(c, insert, item_id)
        async with c.transaction():
            await driver.execute(c, insert, item_id + 1)
            raise HTTPException(409, "no")

    @app.post("/nested/{item_id}")
    async def nested(item_id: int, c: Annotated[Any, Depends(conn)]) -> str:
        await driver.execute(c, insert, item_id)
        try:
            async with c.transaction():
                await driver.execute(c, insert, item_id)  # duplicate key
        except driver.unique:
            return "duplicate"
        return "inserted twice?"

    @app.post("/commit-then-fail/{item_id}")
    async def commit_then_fail(item_id: int, c: Annotated[Any, Depends(conn)]) -> None:
        await driver.execute(c, insert, item_id)
        await c.commit()  # psycopg's: kept until the block ends
        await driver.execute(c, insert, item_id + 1)
        raise HTTPException(409, "no")

    @app.get("/items")
    async def list_items(c: Annotated[Any, Depends(conn)]) -> list[int]:
        return await driver.ids(c)

    return app, lc, conn


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan and an in-process client, on the test's event loop."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        yield client


async def one_test(
    app: FastAPI, lc: tether.Lifecycle, conn: tether.Resource[Any], driver: Driver
) -> list[Any]:
    """One test's worth of writes inside `rolled_back`: what the app and the block saw."""
    seen: list[Any] = []
    async with running(app) as client, driver.module.rolled_back(conn) as c:
        seen.append((await client.post("/items/1")).status_code)
        seen.append((await client.post("/items/2?fail=true")).status_code)
        seen.append((await client.post("/blocks-then-fail/3")).status_code)
        seen.append((await client.post("/items/1")).status_code)  # duplicate key: 500
        seen.append((await client.post("/nested/5")).json())
        # Ten at once: they take turns on the block's connection.
        batch = await asyncio.gather(*(client.post(f"/items/{i}") for i in range(10, 20)))
        seen.append(sorted({r.status_code for r in batch}))
        async with lc.scope("job") as unit:  # a unit of work outside requests too
            await driver.execute(await unit.get(conn), f"INSERT INTO {TABLE} VALUES (%s)", 30)
        seen.append((await client.get("/items")).json())
        seen.append(await driver.ids(c))
    return seen


@pytest.mark.parametrize("transaction", [True, False], ids=["transaction", "autocommit"])
@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.anyio
async def test_rolled_back_leaves_postgres_as_it_was(
    postgres: Postgres, items: None, name: str, transaction: bool
) -> None:
    """Two "tests" writing the same rows through the app, each in `rolled_back`: both pass,
    each sees its own writes as production would have kept them, and the table is empty
    after each, seen from another connection."""
    driver = Driver(name)
    app, lc, conn = make_app(postgres, driver, transaction=transaction)
    # Autocommit keeps what a failing request wrote before it failed (2, and 3 whose block
    # committed); a transaction keeps nothing of it.
    kept = [1, 5, *range(10, 20), 30] if transaction else [1, 2, 3, 5, *range(10, 20), 30]
    expected = [200, 409, 409, 500, "duplicate", [200], kept, kept]
    for _ in range(2):
        assert await one_test(app, lc, conn, driver) == expected
        assert rows(postgres) == []
    # Without the block, the app writes for real again.
    async with running(app) as client:
        assert (await client.post("/items/1")).status_code == 200
    assert rows(postgres) == [1]


@pytest.mark.anyio
async def test_psycopg_commit_in_the_endpoint_then_failing(postgres: Postgres, items: None) -> None:
    """psycopg's `conn.commit()` in an endpoint releases the unit's savepoint and opens
    another: what it committed is kept, what follows is rolled back by the failure, and
    the block still rolls everything back."""
    driver = Driver("psycopg")
    app, _, conn = make_app(postgres, driver, transaction=True)
    for _ in range(2):
        async with running(app) as client, tpsy.rolled_back(conn) as c:
            assert (await client.post("/commit-then-fail/1")).status_code == 409
            assert await driver.ids(c) == [1]
        assert rows(postgres) == []


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.anyio
async def test_a_caught_error_fails_the_commit_as_in_production(
    postgres: Postgres, items: None, name: str
) -> None:
    """A statement that failed in a unit of work's transaction, its error caught: the
    commit fails with tether's message (as in production), nothing of the unit is kept,
    and the block's connection goes on."""
    driver = Driver(name)
    lc = tether.Lifecycle()
    pool = driver.module.pool(lc, postgres.dsn, min_size=1, max_size=2)
    conn = driver.module.connection(lc, pool, transaction=True)
    async with lc.run(), driver.module.rolled_back(conn) as c:
        with pytest.raises(Exception, match="could not commit") as caught:
            async with lc.scope("job") as unit:
                cx = await unit.get(conn)
                await driver.execute(cx, f"INSERT INTO {TABLE} VALUES (%s)", 1)
                with pytest.raises(driver.unique):
                    await driver.execute(cx, f"INSERT INTO {TABLE} VALUES (%s)", 1)
        assert "failed and its error was caught" in str(caught.value)
        async with lc.scope("job") as unit:
            await driver.execute(await unit.get(conn), f"INSERT INTO {TABLE} VALUES (%s)", 2)
        assert await driver.ids(c) == [2]
    assert rows(postgres) == []


@pytest.mark.parametrize("name", DRIVERS)
def test_rolled_back_with_test_client(postgres: Postgres, items: None, name: str) -> None:
    """Under `TestClient`: the block runs on the app's loop through the client's portal."""
    driver = Driver(name)
    app, _, conn = make_app(postgres, driver, transaction=True)
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(2):
            with client.portal.wrap_async_context_manager(driver.module.rolled_back(conn)):
                assert client.post("/items/1").status_code == 200
                assert client.post("/items/2?fail=true").status_code == 409
                assert client.post("/items/1").status_code == 500
                assert client.get("/items").json() == [1]
            assert rows(postgres) == []
        assert client.get("/items").json() == []


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.anyio
async def test_rolled_back_misuse_says_what_to_pass(postgres: Postgres, name: str) -> None:
    driver = Driver(name)
    lc = tether.Lifecycle()
    pool = driver.module.pool(lc, postgres.dsn, min_size=1, max_size=2)
    conn = driver.module.connection(lc, pool)

    for wrong in (pool, "conn"):
        with pytest.raises(
            TypeError,
            match=exactly(
                f"rolled_back(): {wrong!r} is not a connection made by "
                f"tether.integrations.{name}.connection(); pass that resource (the one "
                "endpoints depend on)."
            ),
        ):
            async with driver.module.rolled_back(wrong):
                pass
    with pytest.raises(
        tether.ScopeError,
        match=exactly(
            "App resource 'pool' is not open: the app scope is created. Start it with "
            "`FastAPI(lifespan=lc.lifespan)` (and `with TestClient(app):` in tests) or "
            "`async with lc.run():`."
        ),
    ):
        async with driver.module.rolled_back(conn):
            pass


@pytest.mark.parametrize("name", DRIVERS)
def test_rolled_back_on_another_loop_than_the_app(postgres: Postgres, name: str) -> None:
    """With `TestClient`, the app runs on the portal's loop: a block entered on another
    loop is refused, naming the fix."""
    driver = Driver(name)
    app, _, conn = make_app(postgres, driver, transaction=True)

    async def block() -> None:
        async with driver.module.rolled_back(conn):
            pass

    with TestClient(app):
        with pytest.raises(
            tether.ScopeError,
            match=exactly(
                "Pool 'pool' was opened on another event loop than the one using it now. A "
                "pool belongs to the loop (and the process) that opened it: open it in the "
                "lifespan of each worker, and in tests run the app and the test on one loop "
                "(`with TestClient(app)` or one anyio/pytest-asyncio loop scope; with TestClient, "
                "run async code on its loop: `client.portal.call(...)`, "
                "`client.portal.wrap_async_context_manager(...)`)."
            ),
        ):
            anyio.run(block)
