"""A server-side cursor read after its unit of work ended never touches the connection again.

A result opened with a server-side cursor (``stream()``, ``stream_scalars()``, ``yield_per``)
in an endpoint and read in its StreamingResponse body, after tether released the session at
the handler: the driver's cursor still held the pooled connection, so its FETCH ran on it
while another request held it. The server aborted that request's transaction, whose
``COMMIT`` then silently rolled back: 201, and its row lost. Now the cursor is closed when its
connection goes back to the pool, and reading it raises ``ResourceClosedError`` naming the
fix; the other request commits. Also with ``reset_session=False`` and behind PgBouncer.

And the commits tether refuses: a transaction psycopg says is aborted (however it was) is
not committed as a 200, and a refused commit gives its connection back rolled back, also
where tether's reset does not run (``pgbouncer=True``, ``reset_session=False``).
"""

import asyncio
import contextlib
import gc
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sqlalchemy import Column, Integer, MetaData, Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers

STREAM_CLOSED = (
    "Engine 'engine': a result read after its connection went back to the pool: its "
    "server-side cursor (stream(), stream_scalars(), yield_per) was opened in a unit of work "
    "that has ended (in a request, a session with release='handler' is closed when the "
    "endpoint returns, before the response), and reading it would run on a connection another "
    "unit of work may hold now, aborting its transaction. Read it before the endpoint "
    "returns, or declare the session it comes from with release='response' for a "
    "StreamingResponse body that reads it; a background task needs a session of its own "
    "(`async with lc.scope() as s: await s.get(session)`)."
)

FAILED = (
    "Engine 'engine': a statement of the unit of work's transaction failed and its error was "
    "caught, so the transaction was aborted and could not commit: nothing was committed (it was "
    "rolled back). Let the error propagate (tether rolls back and answers it), or run what may "
    "fail in a savepoint ({savepoint}) and carry on after it."
)

WAIT = 10.0  # seconds a step of a test waits for the other request


@pytest.fixture
def tables(postgres: Postgres) -> Iterator[tuple[Table, Table]]:
    suffix = uuid.uuid4().hex[:8]
    source, orders = f"ss_source_{suffix}", f"ss_orders_{suffix}"
    postgres.sql(f"CREATE TABLE {source} (id int PRIMARY KEY)")
    postgres.sql(f"INSERT INTO {source} SELECT g FROM generate_series(1, 1000) g")
    postgres.sql(f"CREATE TABLE {orders} (id int PRIMARY KEY)")
    md = MetaData()
    yield Table(source, md, Column("id", Integer)), Table(orders, md, Column("id", Integer))
    postgres.sql(f"DROP TABLE {source}, {orders}")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("driver", "options", "through_bouncer"),
    [
        ("asyncpg", {}, False),
        ("psycopg", {}, False),
        ("asyncpg", {"reset_session": False}, False),
        ("psycopg", {"reset_session": False}, False),
        ("asyncpg", {"pgbouncer": True}, True),
    ],
    ids=["asyncpg", "psycopg", "asyncpg-no-reset", "psycopg-no-reset", "asyncpg-pgbouncer"],
)
async def test_a_stream_read_after_the_release_never_costs_another_request_its_commit(
    driver: str,
    options: dict[str, Any],
    through_bouncer: bool,
    postgres: Postgres,
    request: pytest.FixtureRequest,
    tables: tuple[Table, Table],
) -> None:
    source, orders = tables
    server = request.getfixturevalue("pgbouncer") if through_bouncer else postgres
    lc = tether.Lifecycle()
    eng = tsa.engine(lc, server.url(f"postgresql+{driver}"), pool_size=1, **options)
    session = tsa.session(lc, eng)  # release="handler"
    S = Annotated[AsyncSession, Depends(session)]
    app = FastAPI(lifespan=lc.lifespan)
    opened, order_written, exported = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: dict[str, Any] = {}

    @app.get("/export")
    async def export(s: S) -> StreamingResponse:
        result = await s.stream_scalars(select(source.c.id).order_by(source.c.id))

        async def body() -> AsyncIterator[str]:
            try:
                await asyncio.wait_for(order_written.wait(), WAIT)  # the order holds it now
                async for i in result:
                    yield f"{i}\n"
            except Exception as exc:
                seen["error"] = exc
            finally:
                exported.set()

        opened.set()
        return StreamingResponse(body())

    @app.post("/order/{i}", status_code=201)
    async def order(i: int, s: S) -> dict[str, int]:
        await s.execute(insert(orders).values(id=i))
        order_written.set()
        await asyncio.wait_for(exported.wait(), WAIT)  # e.g. awaiting a payment API
        return {"id": i}

    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            exporting = asyncio.create_task(client.get("/export"))
            await asyncio.wait_for(opened.wait(), WAIT)
            r = await client.post("/order/1")  # waits for the export's connection
            await exporting
        # The order's answer is the truth: 201 and its row committed (a 500 would be honest
        # too, never a 201 with the row lost).
        assert (r.status_code, postgres.sql(f"SELECT id FROM {orders.name}")) == (201, [(1,)])
        error = seen.get("error")
        assert isinstance(error, tether.ResourceClosedError), repr(error)
        assert str(error) == STREAM_CLOSED
        assert lc.get(eng).sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_sync_yield_per_read_after_the_release_never_costs_another_request_its_commit(
    driver: str,
    postgres: Postgres,
    tables: tuple[Table, Table],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same with sync_session: a ``yield_per`` result read in a sync StreamingResponse
    body (the threadpool) while a ``def`` endpoint holds the connection. Nothing logged at
    ERROR on the way (psycopg2 closes a named cursor only in its own transaction: SQLAlchemy
    logged "Error closing cursor" with a traceback as the result was read)."""
    source, orders = tables
    lc = tether.Lifecycle()
    eng = tsa.sync_engine(lc, postgres.url(f"postgresql+{driver}"), pool_size=1)
    session = tsa.sync_session(lc, eng)
    S = Annotated[Session, Depends(session)]
    app = FastAPI(lifespan=lc.lifespan)
    opened, order_written, exported = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    @app.get("/export")
    def export(s: S) -> StreamingResponse:
        statement = select(source.c.id).order_by(source.c.id).execution_options(yield_per=50)
        result = s.execute(statement).scalars()

        def body() -> Iterator[str]:
            try:
                assert order_written.wait(WAIT)
                for i in result:
                    yield f"{i}\n"
            except Exception as exc:
                seen["error"] = exc
            finally:
                exported.set()

        opened.set()
        return StreamingResponse(body())

    @app.post("/order/{i}", status_code=201)
    def order(i: int, s: S) -> dict[str, int]:
        s.execute(insert(orders).values(id=i))
        order_written.set()
        assert exported.wait(WAIT)
        return {"id": i}

    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        exporting = threading.Thread(target=client.get, args=("/export",))
        exporting.start()
        assert opened.wait(WAIT)
        try:
            r = client.post("/order/1")
        finally:
            exporting.join(WAIT)
        assert (r.status_code, postgres.sql(f"SELECT id FROM {orders.name}")) == (201, [(1,)])
        error = seen.get("error")
        assert isinstance(error, tether.ResourceClosedError), repr(error)
        assert str(error) == STREAM_CLOSED
        assert lc.get(eng).pool.checkedout() == 0  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_transaction_aborted_behind_sqlalchemys_back_is_not_committed_as_a_200(
    kind: str, postgres: Postgres, tables: tuple[Table, Table], caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg says with no round trip that the transaction is aborted: a statement failed on
    the driver's own connection (which SQLAlchemy does not see fail), its error caught. The
    commit is refused (a 500 naming the cause), not a 200 with nothing committed; and the
    connection goes back clean."""
    _, orders = tables
    lc = tether.Lifecycle()
    url = postgres.url("postgresql+psycopg")
    app = FastAPI(lifespan=lc.lifespan)
    if kind == "async":
        eng: Any = tsa.engine(lc, url, pool_size=1)
        session: Any = tsa.session(lc, eng)

        @app.post("/order/{i}")
        async def order(i: int, s: Annotated[AsyncSession, Depends(session)]) -> dict[str, int]:
            await s.execute(insert(orders).values(id=i))
            if i == 1:
                raw: Any = (await (await s.connection()).get_raw_connection()).driver_connection
                try:
                    await raw.execute("SELECT 1/0")
                except Exception:
                    pass  # "the order is written anyway"
            return {"id": i}

        savepoint = "`async with session.begin_nested():`"
    else:
        eng = tsa.sync_engine(lc, url, pool_size=1)
        session = tsa.sync_session(lc, eng)

        @app.post("/order/{i}")
        def sync_order(i: int, s: Annotated[Session, Depends(session)]) -> dict[str, int]:
            s.execute(insert(orders).values(id=i))
            if i == 1:
                driver: Any = s.connection().connection.driver_connection
                try:
                    driver.execute("SELECT 1/0")
                except Exception:
                    pass
            return {"id": i}

        savepoint = "`with session.begin_nested():`"

    with TestClient(app, raise_server_exceptions=False) as client:
        with caplog.at_level(logging.ERROR):
            r = client.post("/order/1")
        assert r.status_code == 500, r.text
        assert postgres.sql(f"SELECT id FROM {orders.name}") == []
        message = FAILED.format(savepoint=savepoint)
        assert any(message in record.getMessage() for record in caplog.records), [
            record.getMessage() for record in caplog.records
        ]
        assert client.post("/order/2").status_code == 200  # the connection went back clean
        assert postgres.sql(f"SELECT id FROM {orders.name}") == [(2,)]


LEFT_OPEN = "connection returned inside an open transaction"


@pytest.mark.parametrize(
    ("kind", "options", "through_bouncer"),
    [
        ("asyncpg", {}, False),
        ("asyncpg", {"pgbouncer": True}, True),
        ("asyncpg", {"reset_session": False}, False),
        ("psycopg", {"reset_session": False}, False),
        ("sync", {}, False),
        ("sync", {"reset_session": False}, False),
    ],
    ids=[
        "asyncpg",
        "asyncpg-pgbouncer",
        "asyncpg-no-reset",
        "psycopg-no-reset",
        "sync",
        "sync-no-reset",
    ],
)
def test_a_refused_commit_gives_its_connection_back_rolled_back(
    kind: str,
    options: dict[str, Any],
    through_bouncer: bool,
    postgres: Postgres,
    request: pytest.FixtureRequest,
    tables: tuple[Table, Table],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caught failed statement: tether refuses the commit (500). The connection goes back to
    the pool rolled back, also where tether's reset does not run (``pgbouncer=True``,
    ``reset_session=False``): the next request commits (it got a 503 "cannot connect",
    the connection "idle in transaction (aborted)"), and no warning blames the endpoint for
    a transaction it never began."""
    _, orders = tables
    server = request.getfixturevalue("pgbouncer") if through_bouncer else postgres
    lc = tether.Lifecycle()
    app = FastAPI(lifespan=lc.lifespan)
    if kind == "sync":
        url = server.url("postgresql+psycopg")
        eng: Any = tsa.sync_engine(lc, url, pool_size=1, **options)
        sync_session = tsa.sync_session(lc, eng)

        @app.post("/order/{i}")
        def sync_order(i: int, s: Annotated[Session, Depends(sync_session)]) -> dict[str, int]:
            s.execute(insert(orders).values(id=i))
            if i == 1:
                try:
                    s.execute(text("SELECT 1/0"))  # a statement that fails, its error caught
                except Exception:
                    pass
            return {"id": i}

    else:
        eng = tsa.engine(lc, server.url(f"postgresql+{kind}"), pool_size=1, **options)
        session = tsa.session(lc, eng)

        @app.post("/order/{i}")
        async def order(i: int, s: Annotated[AsyncSession, Depends(session)]) -> dict[str, int]:
            await s.execute(insert(orders).values(id=i))
            if i == 1:
                try:
                    await s.execute(text("SELECT 1/0"))
                except Exception:
                    pass
            return {"id": i}

    with TestClient(app, raise_server_exceptions=False) as client:
        with caplog.at_level(logging.WARNING, logger="tether"):
            assert client.post("/order/1").status_code == 500
        assert not [r.getMessage() for r in caplog.records if LEFT_OPEN in r.getMessage()]
        r = client.post("/order/2")  # on the same connection (pool_size=1)
        assert r.status_code == 200, r.text
        assert postgres.sql(f"SELECT id FROM {orders.name}") == [(2,)]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_under_rolled_back_a_stream_read_after_the_unit_fails_as_in_production(
    postgres: Postgres, driver: str
) -> None:
    """`rolled_back(session)` keeps the block's one connection out of the pool, so the
    checkin that ends a unit's server-side cursors never ran: the body read on, the test
    passed, and production failed. Each unit's cursors end with the unit, as at checkin."""
    lc = tether.Lifecycle()
    url = postgres.dsn.replace("postgresql:", f"postgresql+{driver}:")
    session = tsa.session(lc, tsa.engine(lc, url, pool_size=1, max_overflow=0))
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/export")
    async def export(s: Annotated[AsyncSession, Depends(session)]) -> StreamingResponse:
        result = await s.stream(text("SELECT g FROM generate_series(1, 5) g"))

        async def body() -> Any:
            async for row in result:
                yield f"{row[0]}\n"

        return StreamingResponse(body())

    with TestClient(app) as client:
        for block in (False, True):
            if block:
                context: Any = client.portal.wrap_async_context_manager(tsa.rolled_back(session))
            else:
                context = contextlib.nullcontext()
            with context, pytest.raises(tether.ResourceClosedError) as caught:
                client.get("/export")
            assert str(caught.value) == STREAM_CLOSED


def test_a_connection_held_long_keeps_no_context_of_its_streams(postgres: Postgres) -> None:
    """A connection held for many streamed queries (a job's `engine.connect()`, a WebSocket's
    session): each statement's context was kept until the connection went back, about 3 KB
    a query, without bound. Only those whose result the app still holds are kept."""
    from sqlalchemy.engine.default import DefaultExecutionContext

    def contexts() -> int:
        gc.collect()
        return sum(isinstance(o, DefaultExecutionContext) for o in gc.get_objects())

    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, postgres.dsn.replace("postgresql:", "postgresql+psycopg:"))

    async def main() -> int:
        async with lc.run():
            eng = lc.get(engine)
            with eng.connect() as conn:
                for _ in range(3):  # warm: the pool's own, SQLAlchemy's caches
                    list(conn.execution_options(yield_per=10).execute(text("SELECT 1")))
                before = contexts()
                for _ in range(200):
                    result = conn.execution_options(yield_per=10).execute(
                        text("SELECT g FROM generate_series(1, 20) g")
                    )
                    assert len(list(result)) == 20
                    del result
                return contexts() - before

    assert anyio.run(main) < 20


def test_a_job_committing_inside_its_psycopg2_read_loop_keeps_the_pool(
    postgres: Postgres, tables: tuple[Table, Table]
) -> None:
    """A Core connection that commits while a server-side cursor result is read (a batch
    job's loop) on psycopg2: the next read raises ResourceClosedError saying the transaction
    ended, and the pool is kept. tether closed the cursor at the commit, psycopg2 then said
    "cursor already closed", which SQLAlchemy reads as a disconnect: it invalidated every
    connection of the pool, another unit's held one too."""
    source, _ = tables
    lc = tether.Lifecycle()
    eng = tsa.sync_engine(lc, postgres.url("postgresql+psycopg2"), pool_size=2)

    async def job() -> None:
        async with lc.run(), lc.scope("batch") as unit:
            engine = await unit.get(eng)
            other = engine.connect()  # another unit of work's connection, held meanwhile
            other_pid = other.execute(text("SELECT pg_backend_pid()")).scalar()
            with pytest.raises(tether.ResourceClosedError) as info, engine.connect() as c:
                batch_pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
                statement = select(source.c.id).order_by(source.c.id)
                result = c.execution_options(stream_results=True, max_row_buffer=5).execute(
                    statement
                )
                for i, _row in enumerate(result):
                    if i == 2:
                        c.commit()
            other.close()
            with engine.connect() as a, engine.connect() as b:  # both kept in the pool
                pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in (a, b)}
            assert pids == {other_pid, batch_pid}
            assert str(info.value) == (
                "Engine 'engine': a result read after the transaction it was opened in ended (a "
                "commit or rollback while it was being read): its server-side cursor (stream(), "
                "stream_scalars(), yield_per) lived in that transaction. Read it to the end "
                "before committing, or commit on a connection of its own."
            )
            assert lc.stats().pools["engine"].discarded == 0

    anyio.run(job)
