"""SQLAlchemy: a connection lost after the endpoint's own `session.commit()` (review
transactions, bug 2), and SQLSTATE 25006 in the unit's own read-only transaction.

The endpoint writes an order and commits it itself (documented as supported), writes more, and
its backend is terminated (`pg_terminate_backend`: a restart, a failover, an admin). The order
is durable. tether used to answer 503 "the connection was lost mid-transaction, so nothing was
committed" with Retry-After, and ran an `@idempotent` route again, committing the order twice;
the same at the release point ("lost before COMMIT, which was not sent, so nothing was
committed"). Now it is a 500, logged with `_common.lost_after_commit`'s message, and the route
is not run again. Without a commit of the endpoint's own (or with a savepoint only), the 503
and the retry stay.

A write refused as read-only by the unit's own read-only transaction (`SET TRANSACTION READ
ONLY`, `postgresql_readonly`) used to be classed as a failover: a 503 with Retry-After (a retry
that never succeeds) and the pool's connections replaced. Only a server read-only for every
session is one (`tests/integration/test_failover.py`); this is the endpoint's error, a 500,
and the pool keeps its connections.

Ground truth: the rows in the table, read from another connection, and the backends' pids.
"""

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import anyio.to_thread
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import tether
from tests.integration.drivers import set_read_only
from tests.servers import Postgres
from tether.fastapi import idempotent
from tether.integrations import sqlalchemy as tsa
from tether.integrations._common import LostAfterCommit

pytestmark = pytest.mark.servers

DRIVERS = ["asyncpg", "psycopg"]

LOST_AFTER_COMMIT = (
    r"Pool '{pool}': the connection was lost after the endpoint's own commit\(\), so what it "
    r"committed stays and what came after was rolled back \({cause}\)\. The request is not "
    r"retried: running it again would repeat what was committed\. Make the work after a "
    r"commit safe to lose, or commit once, at the end \(tether does that\)\."
)
LOST_MID_TRANSACTION = (
    r"Pool '{pool}': the connection was lost mid-transaction, so nothing was committed "
    r"\(.+\)\. Retry shortly; if it persists, check the database\."
)


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    name = f"sa_lac_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (id serial PRIMARY KEY, v text NOT NULL)")
    postgres.sql(f"GRANT ALL ON {name} TO tether")
    postgres.sql(f"GRANT ALL ON SEQUENCE {name}_id_seq TO tether")
    yield name
    postgres.sql(f"DROP TABLE {name}")


def kill(pg: Postgres, pid: int) -> None:
    """Terminate backend *pid* and wait until it is gone."""
    pg.sql("SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 5
    while pg.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def committed(pg: Postgres, table: str) -> list[str]:
    return [row[0] for row in pg.sql(f"SELECT v FROM {table} ORDER BY id")]


def lost_after_commit(caplog: pytest.LogCaptureFixture) -> list[LostAfterCommit]:
    """The `LostAfterCommit` errors tether logged as it closed the session."""
    return [
        r.exc_info[1]
        for r in caplog.records
        if r.name == "tether" and r.exc_info and isinstance(r.exc_info[1], LostAfterCommit)
    ]


def async_app(pg: Postgres, driver: str, table: str) -> tuple[FastAPI, list[str], tether.Lifecycle]:
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, pg.url(f"postgresql+{driver}"), pool_size=2, max_overflow=0)
    session = tsa.session(lc, engine)
    S = Annotated[Any, Depends(session)]
    # Begins its transactions itself: its `session.begin()` block commits at its end.
    L = Annotated[Any, Depends(tsa.session(lc, engine, name="lazy", connect=False))]
    app = FastAPI(lifespan=lc.lifespan)
    calls: list[str] = []

    async def pid(s: Any) -> int:
        return int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    async def insert(s: Any, v: str) -> None:
        await s.execute(text(f"INSERT INTO {table} (v) VALUES (:v)"), {"v": v})

    async def commit_then_lose(s: Any, tag: str) -> str:
        calls.append(tag)
        await insert(s, f"{tag}: order")
        await s.commit()  # the order is durable now
        await anyio.to_thread.run_sync(kill, pg, await pid(s))
        await insert(s, f"{tag}: audit")  # the connection is gone
        return "written"

    @app.post("/plain")
    async def plain(s: S) -> str:
        return await commit_then_lose(s, "plain")

    @app.post("/idempotent")
    @idempotent
    async def idem(s: S) -> str:
        return await commit_then_lose(s, "idempotent")

    @app.post("/begin-block")
    @idempotent
    async def begin_block(s: L) -> str:
        calls.append("begin-block")
        async with s.begin():
            await insert(s, "begin-block: order")
        await anyio.to_thread.run_sync(kill, pg, await pid(s))
        await insert(s, "begin-block: audit")
        return "written"

    @app.post("/at-release")
    @idempotent
    async def at_release(s: S) -> str:
        """Loses its connection after its last statement, before tether's COMMIT."""
        calls.append("at-release")
        await insert(s, "at-release: order")
        await s.commit()
        await insert(s, "at-release: audit")
        await anyio.to_thread.run_sync(kill, pg, await pid(s))
        await asyncio.sleep(0.2)  # the driver reads the close: asyncpg then refuses COMMIT
        return "written"

    @app.post("/no-commit")
    @idempotent
    async def no_commit(s: S) -> str:
        """The control: no commit of its own; loses its connection the first time only."""
        calls.append("no-commit")
        await insert(s, "no-commit: order")
        if len(calls) == 1:
            await anyio.to_thread.run_sync(kill, pg, await pid(s))
        await insert(s, "no-commit: audit")
        return "written"

    @app.post("/savepoint")
    async def savepoint(s: S) -> str:
        """A savepoint released is not a commit: nothing is durable when the connection goes."""
        calls.append("savepoint")
        async with s.begin_nested():
            await insert(s, "savepoint: order")
        await anyio.to_thread.run_sync(kill, pg, await pid(s))
        await insert(s, "savepoint: audit")
        return "written"

    return app, calls, lc


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("route", ["plain", "idempotent", "begin-block"])
def test_a_connection_lost_after_the_endpoints_commit_is_a_500_and_not_run_again(
    postgres: Postgres, table: str, driver: str, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, calls, _ = async_app(postgres, driver, table)
    with TestClient(app, raise_server_exceptions=False) as client:
        caplog.set_level(logging.WARNING, logger="tether")
        r = client.post(f"/{route}")
    # Was: 503 with Retry-After, "nothing was committed"; the idempotent route ran twice.
    assert r.status_code == 500
    assert "retry-after" not in r.headers
    assert calls == [route]
    assert committed(postgres, table) == [f"{route}: order"]
    [error] = lost_after_commit(caplog)
    cause = r"\w+: .+"  # the driver's own error, described
    assert re.fullmatch(LOST_AFTER_COMMIT.format(pool="engine", cause=cause), str(error), re.S)
    assert isinstance(error.__cause__, sa_exc.DBAPIError)
    assert error.resource == "engine"


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_connection_lost_before_tethers_commit_after_the_endpoints_is_a_500(
    postgres: Postgres, table: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At the release point: asyncpg refuses to send COMMIT (it read the close). That was a
    503 "which was not sent, so nothing was committed", and the idempotent route ran again."""
    app, calls, _ = async_app(postgres, driver, table)
    with TestClient(app, raise_server_exceptions=False) as client:
        caplog.set_level(logging.WARNING, logger="tether")
        r = client.post("/at-release")
    assert r.status_code == 500
    assert "retry-after" not in r.headers
    assert r.json() == {"detail": "Internal Server Error"}
    assert calls == ["at-release"]
    assert committed(postgres, table) == ["at-release: order"]
    if driver == "asyncpg":  # psycopg sends COMMIT, which fails: a 500 as before
        [error] = lost_after_commit(caplog)
        cause = r"InterfaceError: .+"
        assert re.fullmatch(LOST_AFTER_COMMIT.format(pool="engine", cause=cause), str(error))


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("route", ["no-commit", "savepoint"])
def test_without_a_commit_of_its_own_a_lost_connection_is_still_a_503_and_retried(
    postgres: Postgres, table: str, driver: str, route: str
) -> None:
    """The control: nothing committed, so the 503 with Retry-After (and, for an idempotent
    route, a second run) stay. A released savepoint is not a commit."""
    app, calls, _ = async_app(postgres, driver, table)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post(f"/{route}")
    if route == "no-commit":  # idempotent: run again on a fresh connection, and committed
        assert (r.status_code, r.json()) == (200, "written")
        assert calls == [route, route]
        assert committed(postgres, table) == ["no-commit: order", "no-commit: audit"]
    else:
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert re.fullmatch(LOST_MID_TRANSACTION.format(pool="engine"), r.json()["detail"])
        assert calls == [route]
        assert committed(postgres, table) == []


@pytest.mark.parametrize("route", ["plain", "idempotent"])
def test_sync_session_a_connection_lost_after_the_endpoints_commit_is_a_500(
    postgres: Postgres, table: str, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(
        lc, postgres.url("postgresql+psycopg"), name="sync_engine", pool_size=2, max_overflow=0
    )
    session = tsa.sync_session(lc, engine)
    S = Annotated[Any, Depends(session)]
    app = FastAPI(lifespan=lc.lifespan)
    calls: list[str] = []

    def commit_then_lose(s: Any, tag: str) -> str:
        calls.append(tag)
        s.execute(text(f"INSERT INTO {table} (v) VALUES (:v)"), {"v": f"{tag}: order"})
        s.commit()
        kill(postgres, s.execute(text("SELECT pg_backend_pid()")).scalar_one())
        s.execute(text(f"INSERT INTO {table} (v) VALUES (:v)"), {"v": f"{tag}: audit"})
        return "written"

    @app.post("/plain")
    def plain(s: S) -> str:
        return commit_then_lose(s, "plain")

    @app.post("/idempotent")
    @idempotent
    def idem(s: S) -> str:
        return commit_then_lose(s, "idempotent")

    with TestClient(app, raise_server_exceptions=False) as client:
        caplog.set_level(logging.WARNING, logger="tether")
        r = client.post(f"/{route}")
    assert r.status_code == 500
    assert "retry-after" not in r.headers
    assert calls == [route]
    assert committed(postgres, table) == [f"{route}: order"]
    [error] = lost_after_commit(caplog)
    cause = r"AdminShutdown: .+"
    pattern = LOST_AFTER_COMMIT.format(pool="sync_engine", cause=cause)
    assert re.fullmatch(pattern, str(error), re.S)


# --------------------------------------------------------------------------- 25006


@pytest.mark.parametrize("driver", [*DRIVERS, "sync"])
@pytest.mark.parametrize(
    "case", ["set-transaction-read-only", "postgresql_readonly", "read-only-engine"]
)
def test_a_read_only_write_of_the_units_own_is_its_error_not_a_failover(
    postgres: Postgres, table: str, driver: str, case: str
) -> None:
    """A write refused (25006) by the unit's own read-only transaction, or by an engine the
    app made read-only on purpose, was answered 503 with Retry-After ("as a replica does") and
    the connection and every older one of the pool replaced. It is the endpoint's error: a
    500, and the pool keeps its connection."""
    lc = tether.Lifecycle()
    options = {"postgresql_readonly": True} if case == "postgresql_readonly" else None
    connect_args: dict[str, Any] = {}
    if case == "read-only-engine" and driver == "asyncpg":
        connect_args = {"server_settings": {"default_transaction_read_only": "on"}}
    elif case == "read-only-engine":
        connect_args = {"options": "-c default_transaction_read_only=on"}
    S: Any
    if driver == "sync":
        url = postgres.url("postgresql+psycopg")
        engine = tsa.sync_engine(lc, url, pool_size=1, max_overflow=0, connect_args=connect_args)
        S = Annotated[Any, Depends(tsa.sync_session(lc, engine, execution_options=options))]
    else:
        url = postgres.url(f"postgresql+{driver}")
        aengine = tsa.engine(lc, url, pool_size=1, max_overflow=0, connect_args=connect_args)
        S = Annotated[Any, Depends(tsa.session(lc, aengine, execution_options=options))]
    app = FastAPI(lifespan=lc.lifespan)

    def sql(s: Any, statement: str) -> Any:
        return s.execute(text(statement))

    if driver == "sync":

        @app.get("/pid")
        def pid(s: S) -> int:
            return int(sql(s, "SELECT pg_backend_pid()").scalar_one())

        @app.post("/write")
        def write(s: S) -> str:
            if case == "set-transaction-read-only":
                sql(s, "SET TRANSACTION READ ONLY")
            sql(s, f"INSERT INTO {table} (v) VALUES ('refused')")
            return "written"

    else:

        @app.get("/pid")
        async def apid(s: S) -> int:
            return int((await sql(s, "SELECT pg_backend_pid()")).scalar_one())

        @app.post("/write")
        async def awrite(s: S) -> str:
            if case == "set-transaction-read-only":
                await sql(s, "SET TRANSACTION READ ONLY")
            await sql(s, f"INSERT INTO {table} (v) VALUES ('refused')")
            return "written"

    with TestClient(app, raise_server_exceptions=False) as client:
        before = client.get("/pid").json()
        for _ in range(2):
            r = client.post("/write")
            assert r.status_code == 500  # was 503, Retry-After: 1, "as a replica does"
            assert "retry-after" not in r.headers
        assert client.get("/pid").json() == before  # was a new backend: the pool replaced
        figures = lc.stats().pools["engine"]
        assert (figures.created, figures.discarded) == (1, 0)
    assert committed(postgres, table) == []


@pytest.mark.anyio
@pytest.mark.fastapi_free
@pytest.mark.parametrize("driver", [*DRIVERS, "sync"])
async def test_a_read_only_write_of_the_units_own_on_a_busy_pool_is_still_its_error(
    postgres: Postgres, table: str, driver: str
) -> None:
    """The same on a pool of 1 that another unit waits for: the check of the server (a
    checkout of its own, after the unit's rollback gave the connection back) must not lose
    the connection to the waiter and time out, which would be taken for a failover (a 503
    after `pool_timeout`, the pool replaced). It takes the connection the unit gave back."""
    lc = tether.Lifecycle()
    session: Any
    if driver == "sync":
        url = postgres.url("postgresql+psycopg")
        engine = tsa.sync_engine(lc, url, pool_size=1, max_overflow=0, pool_timeout=1)
        session = tsa.sync_session(lc, engine)
    else:
        url = postgres.url(f"postgresql+{driver}")
        session = tsa.session(lc, tsa.engine(lc, url, pool_size=1, max_overflow=0, pool_timeout=1))

    async def sql(s: Any, statement: str) -> Any:
        if driver == "sync":
            return await anyio.to_thread.run_sync(s.execute, text(statement))
        return await s.execute(text(statement))

    pids: list[int] = []

    async def waiter() -> None:  # waits for the pool's one connection, then holds it 1.5 s
        async with lc.scope() as scope:
            s = await scope.get(session)
            pids.append((await sql(s, "SELECT pg_backend_pid()")).scalar_one())
            await asyncio.sleep(1.5)

    async with lc.run():
        # A check that lost its turn: ResourceUnavailable (503) after the 1 s pool_timeout.
        with pytest.raises(sa_exc.DBAPIError, match="read-only transaction"):
            async with lc.scope() as scope:
                s = await scope.get(session)
                pids.append((await sql(s, "SELECT pg_backend_pid()")).scalar_one())
                await sql(s, "SET TRANSACTION READ ONLY")
                waiting = asyncio.create_task(waiter())
                await asyncio.sleep(0.2)
                await sql(s, f"INSERT INTO {table} (v) VALUES ('refused')")
        await waiting
        figures = next(iter(lc.stats().pools.values()))
    assert pids[0] == pids[1]
    assert figures.created == 1  # the pool kept its connection


# --------------------------------------------------------------------------- a read-only server


@pytest.fixture(scope="module")
def own_pg() -> Iterator[Postgres]:
    """A server of this module only: the tests switch it to read-only and back."""
    with Postgres() as server:
        yield server


@pytest.fixture
def own_table(own_pg: Postgres) -> Iterator[str]:
    name = f"sa_lac_{uuid.uuid4().hex[:8]}"
    own_pg.sql(f"CREATE TABLE {name} (id serial PRIMARY KEY, v text NOT NULL)")
    own_pg.sql(f"GRANT ALL ON {name} TO tether")
    own_pg.sql(f"GRANT ALL ON SEQUENCE {name}_id_seq TO tether")
    yield name
    own_pg.sql(f"DROP TABLE {name}")


@pytest.mark.parametrize("driver", ["asyncpg", "sync"])
@pytest.mark.parametrize("commits", [True, False], ids=["after-commit", "no-commit"])
def test_a_server_turned_read_only_is_a_failover_and_after_a_commit_a_500(
    own_pg: Postgres, own_table: str, driver: str, commits: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The server the pool reaches turns read-only (a failover) under the unit of work. Without
    a commit of its own: the 503 of a failover, and the pool's connections replaced (the
    check of the server, which now runs on that error only, finds it so; on `sync_session`
    too). After the endpoint's own commit: a 500, not run again, as for a lost connection:
    the order stays; the pool is replaced all the same."""
    lc = tether.Lifecycle()
    S: Any
    if driver == "sync":
        engine = tsa.sync_engine(lc, own_pg.url("postgresql+psycopg"), pool_size=2, max_overflow=0)
        S = Annotated[Any, Depends(tsa.sync_session(lc, engine))]
    else:
        aengine = tsa.engine(lc, own_pg.url("postgresql+asyncpg"), pool_size=2, max_overflow=0)
        S = Annotated[Any, Depends(tsa.session(lc, aengine))]
    app = FastAPI(lifespan=lc.lifespan)
    calls: list[str] = []
    insert = f"INSERT INTO {own_table} (v) VALUES (:v)"

    if driver == "sync":

        @app.get("/pid")
        def pid(s: S) -> int:
            return int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())

        @app.post("/write")
        @idempotent
        def write(s: S) -> str:
            calls.append("write")
            if not commits and len(calls) == 1:  # before the transaction begins
                set_read_only(own_pg, True)
            s.execute(text(insert), {"v": "order"})
            if commits:
                s.commit()
            if commits:  # the next transaction is read-only
                set_read_only(own_pg, True)
            s.execute(text(insert), {"v": "audit"})
            return "written"

    else:

        @app.get("/pid")
        async def apid(s: S) -> int:
            return int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())

        @app.post("/write")
        @idempotent
        async def awrite(s: S) -> str:
            calls.append("write")
            if not commits and len(calls) == 1:  # before the transaction begins
                await anyio.to_thread.run_sync(set_read_only, own_pg, True)
            await s.execute(text(insert), {"v": "order"})
            if commits:
                await s.commit()
            if commits:  # the next transaction is read-only
                await anyio.to_thread.run_sync(set_read_only, own_pg, True)
            await s.execute(text(insert), {"v": "audit"})
            return "written"

    with TestClient(app, raise_server_exceptions=False) as client:
        old = {client.get("/pid").json() for _ in range(4)}
        caplog.set_level(logging.WARNING, logger="tether")
        try:
            r = client.post("/write")
        finally:
            set_read_only(own_pg, False)
        if commits:
            assert r.status_code == 500
            assert "retry-after" not in r.headers
            [error] = lost_after_commit(caplog)
            cause = (
                r"the server refused a write as read-only, as a replica does: "
                r".+: cannot execute INSERT in a read-only transaction"  # (SQLAlchemy's form)
            )
            assert re.fullmatch(LOST_AFTER_COMMIT.format(pool="engine", cause=cause), str(error))
        else:
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["detail"].startswith(
                "Pool 'engine': the database refused a write as read-only (SQLSTATE 25006)"
            )
        # An idempotent route runs again after a failover's 503 (and is refused again here),
        # not after a commit of its own.
        assert calls == (["write"] if commits else ["write", "write"])
        served = {client.get("/pid").json() for _ in range(4)}
        assert not served & old, "a request reached a connection from before the failover"
    assert committed(own_pg, own_table) == (["order"] if commits else [])


# ------------------------------------------------------------- lost during its own commit()


class ReplyCutter:
    """A TCP proxy to PostgreSQL, on a loop of its own, that once armed lets the next
    ``COMMIT`` through to the server, lets the server run it, and then cuts the client's
    connection before the server's answer reaches it: a network cut (or a crash) between
    the server's commit and the client hearing of it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ReplyCutter":
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        self.server = started.result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._pair, "127.0.0.1", 0)

    async def _pair(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def back() -> None:
            with contextlib.suppress(Exception):
                while data := await sr.read(65536):
                    cw.write(data)
                    await cw.drain()

        answers = asyncio.create_task(back())
        try:
            while data := await cr.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    answers.cancel()  # the server's answer will not reach the client
                    sw.write(data)
                    await sw.drain()
                    await asyncio.sleep(0.5)  # the server commits
                    cw.transport.abort()
                    sw.close()
                    return
                sw.write(data)
                await sw.drain()
        except Exception:
            pass
        finally:
            answers.cancel()
            sw.close()
            cw.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_connection_lost_during_the_endpoints_commit_is_a_500_and_not_run_again(
    postgres: Postgres, table: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint's own `commit()` reached the server, which committed, and the answer was
    lost with the connection: whether it committed cannot be known from the client. It was a
    503 "nothing was committed" with Retry-After, and the idempotent route ran again: the
    order was written twice. It is a 500, and the route runs once."""
    with ReplyCutter(postgres.port) as cutter:
        lc = tether.Lifecycle()
        url = make_url(postgres.url(f"postgresql+{driver}")).set(port=cutter.port)
        engine = tsa.engine(lc, url, pool_size=2, max_overflow=0)
        session = tsa.session(lc, engine)
        app = FastAPI(lifespan=lc.lifespan)
        runs: list[int] = []

        @app.post("/order")
        @idempotent
        async def order(s: Annotated[Any, Depends(session)]) -> str:
            runs.append(1)
            await s.execute(text(f"INSERT INTO {table} (v) VALUES ('order')"))
            cutter.armed = len(runs) == 1
            await s.commit()
            await s.execute(text(f"INSERT INTO {table} (v) VALUES ('audit')"))
            return "written"

        with (
            caplog.at_level(logging.WARNING),
            TestClient(app, raise_server_exceptions=False) as client,
        ):
            response = client.post("/order")
    assert response.status_code == 500
    assert "retry-after" not in response.headers
    assert runs == [1]
    assert committed(postgres, table) == ["order"]  # the server did commit it, once
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "during the endpoint's own commit(), so whether the server committed" in said


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("how", ["in-its-flush", "after-a-failed-commit"])
def test_lost_before_the_commit_was_sent_is_still_a_503_and_retried(
    postgres: Postgres, table: str, driver: str, how: str
) -> None:
    """A connection lost in the flush of the endpoint's `commit()` (`add()` then `commit()`:
    its INSERT fails, no COMMIT is sent), or after a `commit()` that failed in its flush and
    was rolled back: nothing was committed, so the 503 and the idempotent retry stay (a first
    version of the check above answered these 500, and did not run the route again)."""

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        v: Mapped[str]

    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url(f"postgresql+{driver}"), pool_size=2, max_overflow=0)
    session = tsa.session(lc, engine)
    app = FastAPI(lifespan=lc.lifespan)
    runs: list[int] = []
    postgres.sql(f"INSERT INTO {table} (id, v) VALUES (-1, 'taken')")

    @app.post("/order")
    @idempotent
    async def order(s: Annotated[Any, Depends(session)]) -> str:
        runs.append(1)
        if how == "after-a-failed-commit":
            s.add(Row(id=-1, v="duplicate"))
            with pytest.raises(sa_exc.IntegrityError):
                await s.commit()  # its flush fails: no COMMIT is sent
            await s.rollback()
        pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        if len(runs) == 1:
            await anyio.to_thread.run_sync(kill, postgres, pid)
        s.add(Row(v="order"))
        await s.commit()  # its flush's INSERT meets the lost connection
        return "written"

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/order")
    assert response.status_code == 200, response.text  # run again, on a new connection
    assert len(runs) == 2
    assert committed(postgres, table) == ["taken", "order"]


def test_a_commit_asyncpg_refused_to_send_is_still_a_503_and_retried(
    postgres: Postgres, table: str
) -> None:
    """The server ended the session and asyncpg read the close before the endpoint's own
    `commit()`: asyncpg refuses to send COMMIT ("the underlying connection is closed"), so
    nothing was committed. The 503 and the idempotent retry, not the 500 "cannot be known"
    of a COMMIT whose answer was lost."""
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=2, max_overflow=0)
    session = tsa.session(lc, engine)
    app = FastAPI(lifespan=lc.lifespan)
    runs: list[int] = []

    @app.post("/order")
    @idempotent
    async def order(s: Annotated[Any, Depends(session)]) -> str:
        runs.append(1)
        await s.execute(text(f"INSERT INTO {table} (v) VALUES ('order')"))
        if len(runs) == 1:
            pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await anyio.to_thread.run_sync(kill, postgres, pid)
            await asyncio.sleep(0.3)  # asyncpg reads the close
        await s.commit()
        return "written"

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/order")
    assert response.status_code == 200, response.text
    assert len(runs) == 2
    assert committed(postgres, table) == ["order"]
