"""A `COMMIT` that waits longer than `close_timeout` (for a lock another transaction holds on a
deferred unique constraint) is cancelled on the server: the client's 500 at `close_timeout`
is the outcome, nothing is committed, and no backend is left running it. Before, every wait of
the cleanup after the deadline was cancelled at once, so the driver's cancel request never
reached the server: the client got its 500 and the `COMMIT` went through once the lock was
free (trial 8, on asyncpg, psycopg and SQLAlchemy)."""

import asyncio
import os
import re
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.servers import Postgres
from tests.serving import Server

pytestmark = [pytest.mark.anyio, pytest.mark.servers]

CLOSE_TIMEOUT = 1.0
HELD = 5.0  # how long the other transaction holds the key


def make(
    kind: str, dsn: str, name: str, close_timeout: float = CLOSE_TIMEOUT, driver: str = "asyncpg"
) -> FastAPI:
    """The app of *kind*, its Lifecycle in ``app.state.lc`` (*driver*: SQLAlchemy's)."""
    lc = tether.Lifecycle(close_timeout=close_timeout)
    app = FastAPI(lifespan=lc.lifespan)
    app.state.lc = lc
    if kind == "asyncpg":
        from tether.integrations import asyncpg as tpg

        pool = tpg.pool(lc, dsn, max_size=2, server_settings={"application_name": name})
        tx = tpg.connection(lc, pool, transaction=True)

        @app.post("/orders/{k}")
        async def order(k: int, c: Annotated[Any, Depends(tx)]) -> int:
            await c.execute("INSERT INTO slow_orders (k) VALUES ($1)", k)
            return k

    elif kind == "psycopg":
        from tether.integrations import psycopg as tpsy

        pool = tpsy.pool(lc, dsn, max_size=2, kwargs={"application_name": name})
        tx = tpsy.connection(lc, pool, transaction=True)

        @app.post("/orders/{k}")
        async def order(k: int, c: Annotated[Any, Depends(tx)]) -> int:
            await c.execute("INSERT INTO slow_orders (k) VALUES (%s)", [k])
            return k

    else:
        from sqlalchemy import text

        from tether.integrations import sqlalchemy as tsa

        named = {"server_settings": {"application_name": name}}  # asyncpg's way
        engine = tsa.engine(
            lc,
            dsn.replace("postgresql://", f"postgresql+{driver}://", 1),
            pool_size=2,
            connect_args=named if driver == "asyncpg" else {"application_name": name},
        )
        session = tsa.session(lc, engine)

        @app.post("/orders/{k}")
        async def order(k: int, s: Annotated[Any, Depends(session)]) -> int:
            await s.execute(text("INSERT INTO slow_orders (k) VALUES (:k)"), {"k": k})
            return k

    return app


def served() -> FastAPI:
    """For uvicorn (`--factory`): the app of the environment's driver, DSN and name."""
    env = os.environ
    return make(env["SLOW_KIND"], env["SLOW_DSN"], env["SLOW_NAME"], float(env["SLOW_CLOSE"]))


def orders_table(postgres: Postgres) -> None:
    postgres.sql("DROP TABLE IF EXISTS slow_orders")
    postgres.sql(
        "CREATE TABLE slow_orders (k int, CONSTRAINT slow_orders_k UNIQUE (k) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    postgres.sql("GRANT ALL ON slow_orders TO tether")


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "sqlalchemy"])
async def test_a_commit_past_close_timeout_is_cancelled_on_the_server(
    kind: str, postgres: Postgres
) -> None:
    orders_table(postgres)
    name = f"slow-commit-{kind}"
    app = make(kind, postgres.dsn, name)
    other = await asyncpg.connect(postgres.dsn)
    try:
        await other.execute("BEGIN")
        await other.execute("INSERT INTO slow_orders (k) VALUES (1)")  # holds k=1
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
        ):
            started = time.monotonic()
            answer = await client.post("/orders/1")  # its COMMIT waits for k=1
            took = time.monotonic() - started
            assert answer.status_code == 500, answer.text
            assert took < CLOSE_TIMEOUT + 16, took  # the bound, and the salvage's
            # The COMMIT is no longer waiting on the server: it was cancelled.
            waiting = [r for r in postgres.activity(name) if r["state"] != "idle"]
            assert waiting == []
        await other.execute("ROLLBACK")  # k=1 free: a COMMIT still waiting would go through
        await anyio.sleep(0.5)
    finally:
        await other.close()
    assert postgres.sql("SELECT count(*) FROM slow_orders") == [(0,)]
    assert postgres.activity(name) == []


def slow_driver_cancel(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's own cancel request slowed 2 s (the server slow to take it, as under
    load), and tether's salvage of a close cut short at 0.5 s: over while the driver cancels."""
    import tether._scope

    if kind == "asyncpg":
        import asyncpg.connection

        cancel = asyncpg.connection.Connection._cancel

        async def slow_cancel(self: Any, *args: Any, **kwargs: Any) -> None:
            await anyio.sleep(2)
            await cancel(self, *args, **kwargs)

        monkeypatch.setattr(asyncpg.connection.Connection, "_cancel", slow_cancel)
    else:
        import psycopg

        try_cancel = psycopg.AsyncConnection._try_cancel

        async def slow_try_cancel(self: Any, *args: Any, **kwargs: Any) -> None:
            await anyio.sleep(2)
            await try_cancel(self, *args, **kwargs)

        monkeypatch.setattr(psycopg.AsyncConnection, "_try_cancel", slow_try_cancel)
    monkeypatch.setattr(tether._scope, "SALVAGE", 0.5)


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "sqlalchemy"])
async def test_a_salvage_given_up_still_ends_the_backend_and_gives_back(
    kind: str,
    postgres: Postgres,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The salvage over while the driver still cancels the `COMMIT` (CI's load did it at 5
    and 10 s, on psycopg): psycopg closes the connection (asyncpg's is terminated, its
    cancel request with it), and every await of the cleanup after is cancelled as it comes.
    The backend is still ended on the server, and the connection given back, before the
    client gets its 500. Before, the `COMMIT` went on waiting, and went through once the
    lock was free (psycopg's pool counted the connection in use for good; then the 500 came
    before the end, and the `COMMIT` could still go through after it; on asyncpg, nothing
    ended it, and the log blamed the unit for a "connection returned inside an open
    transaction")."""
    slow_driver_cancel(kind, monkeypatch)
    orders_table(postgres)
    name = f"slow-commit-given-up-{kind}"
    app = make(kind, postgres.dsn, name, driver="psycopg")
    lc: tether.Lifecycle = app.state.lc
    other = await asyncpg.connect(postgres.dsn)
    try:
        await other.execute("BEGIN")
        await other.execute("INSERT INTO slow_orders (k) VALUES (1)")  # holds k=1
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
        ):
            answer = await client.post("/orders/1")  # its COMMIT waits for k=1
            assert answer.status_code == 500, answer.text
            # Ended (from a task of its own) before the client got its 500: the COMMIT
            # could not go through after it (CI's load had the 500 first).
            assert [r for r in postgres.activity(name) if r["state"] != "idle"] == []
            assert not any(pool.in_use for pool in lc.stats().pools.values())
            assert (await client.post("/orders/2")).status_code == 200  # the pool serves
        await other.execute("ROLLBACK")  # k=1 free: a COMMIT still waiting would go through
        await anyio.sleep(0.5)
    finally:
        await other.close()
    assert postgres.sql("SELECT k FROM slow_orders") == [(2,)]
    assert not [r for r in caplog.records if "inside an open transaction" in r.getMessage()]


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "sqlalchemy"])
async def test_a_given_up_commit_on_a_full_server_is_cancelled_with_a_cancel_request(
    kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The salvage given up on (as above) for two `COMMIT`s at once while the server is at
    max_connections: tether's connection to end each backend is refused ("too many
    clients"; asyncpg's pool has none idle to end it from either), so each backend gets a
    cancel request, which needs no slot, made as its connection was. Before, the end was
    tried for 2 s (1 s on asyncpg) and given up, and the `COMMIT`s went through once the
    lock was free, after the clients' 500s (trial 33)."""
    slow_driver_cancel(kind, monkeypatch)
    caplog.set_level("INFO", "tether")
    with Postgres(max_connections=12) as full:
        orders_table(full)
        name = "slow-commit-full"
        app = make(kind, full.dsn, name, driver="psycopg")
        other = await asyncpg.connect(full.dsn)
        fillers: list[asyncpg.Connection] = []
        try:
            await other.execute("BEGIN")
            await other.execute("INSERT INTO slow_orders (k) VALUES (1), (2)")  # holds both
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c,
            ):
                # The pool's two connections made, then every slot left taken.
                warm = await gather(c, "/orders/100", "/orders/101")
                assert [r.status_code for r in warm] == [200, 200]
                with pytest.raises(asyncpg.TooManyConnectionsError):
                    for _ in range(20):
                        fillers.append(await asyncpg.connect(full.dsn))
                answers = await gather(c, "/orders/1", "/orders/2")  # their COMMITs wait
                assert [r.status_code for r in answers] == [500, 500], answers
                await other.execute("ROLLBACK")  # free: a COMMIT still waiting commits
                await anyio.sleep(0.5)
        finally:
            for filler in fillers:
                await filler.close()
            await other.close()
        assert full.sql("SELECT k FROM slow_orders ORDER BY k") == [(100,), (101,)]
    said = [r.getMessage() for r in caplog.records if "cancel request" in r.getMessage()]
    # One or both: the backend of a COMMIT cancelled first ends, and frees a slot, which the
    # end of the other may then have.
    assert len(said) in (1, 2), said
    for line in said:
        assert re.fullmatch(
            r"tether: ('conn'|engine 'engine'): could not end backend \d+ on the server "
            r"\(\w+: .*too many clients already\): its query was cancelled with a cancel "
            r"request",
            line,
        ), line


async def gather(client: httpx.AsyncClient, *paths: str) -> list[httpx.Response]:
    """POST each of *paths* at once."""
    async with anyio.create_task_group() as tg:
        answers: dict[str, httpx.Response] = {}

        async def post(path: str) -> None:
            answers[path] = await client.post(path)

        for path in paths:
            tg.start_soon(post, path)
    return [answers[path] for path in paths]


def test_a_commit_waiting_at_sigterm_is_cancelled_before_the_process_exits(
    postgres: Postgres, tmp_path: Path
) -> None:
    """uvicorn with `--timeout-graceful-shutdown 2`, `close_timeout=4`, a `COMMIT` waiting for
    a lock when SIGTERM comes: the process exits once the close is cut short, and the
    `COMMIT` with it. Before, the backend went on waiting after the process had exited, and
    committed once the lock was free, after the client's 500 (trial 8)."""
    orders_table(postgres)
    name = "slow-commit-sigterm"
    env = {"SLOW_KIND": "asyncpg", "SLOW_DSN": postgres.dsn, "SLOW_NAME": name, "SLOW_CLOSE": "4"}
    server = Server(
        "tests.integration.test_slow_commit:served",
        tmp_path,
        "--factory",
        "--timeout-graceful-shutdown",
        "2",
        env=env,
    )
    hold = psycopg_holding_k1(postgres)
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        deadline = time.monotonic() + 10
        while not any("COMMIT" in r["query"] for r in postgres.activity(name)):
            assert time.monotonic() < deadline, postgres.activity(name)
            time.sleep(0.05)
        server.terminate()
        server.wait(20)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 500 ")
        assert postgres.activity(name) == []  # no backend outlives the process
    finally:
        sock.close()
        server.stop()
        hold.rollback()  # k=1 free: a COMMIT still waiting would go through now
        hold.close()
    time.sleep(0.5)
    assert postgres.sql("SELECT count(*) FROM slow_orders") == [(0,)]


def psycopg_holding_k1(postgres: Postgres) -> Any:
    """A connection whose open transaction holds k=1 (sync: the test drives a process)."""
    import psycopg

    conn = psycopg.connect(postgres.dsn)
    conn.execute("INSERT INTO slow_orders (k) VALUES (1)")
    return conn


async def test_an_asyncpg_pool_terminated_under_a_commit_cancels_it_first(
    postgres: Postgres,
) -> None:
    """The pool's close ran out (a forced exit closes the pool beside a unit still closing,
    trial 37): its connections in use are sent a cancel request before the pool terminates
    them. Before, a `COMMIT` waiting for a lock stayed on the server after the process had
    exited, and committed once the lock was free, after the client's 500."""
    from tether.integrations.asyncpg import _close_pool

    orders_table(postgres)
    other = await asyncpg.connect(postgres.dsn)
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=1)
    try:
        await other.execute("BEGIN")
        await other.execute("INSERT INTO slow_orders (k) VALUES (1)")  # holds k=1
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO slow_orders (k) VALUES (1)")
        commit = asyncio.ensure_future(conn.execute("COMMIT"))  # waits for k=1
        await asyncio.sleep(0.3)
        await _close_pool(pool, "pool", 0.5)
        with pytest.raises(Exception):  # noqa: B017, PT011 - cancelled, or its socket gone
            await commit
        await other.execute("ROLLBACK")  # k=1 free: a COMMIT still waiting would go through
        await anyio.sleep(0.5)
    finally:
        await other.close()
        pool.terminate()
    assert postgres.sql("SELECT count(*) FROM slow_orders") == [(0,)]
