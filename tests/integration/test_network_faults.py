"""The network between the app and a healthy PostgreSQL fails (reliability.md, test 5).

A TCP proxy (`tests/faultproxy.py`) sits between the app and the real server:

* **blackhole**: bytes stop flowing both ways and nothing is closed, as behind a dead switch
  or a firewall that drops packets. Nothing tells the driver: a query waits for a reply that
  never comes, a connection attempt hears nothing after its first packet. Every request must
  still end within its bounds (the acquire timeout for what tether runs while opening, the
  driver's command timeout for the endpoint's own query, `reset_timeout` for the release),
  and the app must serve again once the network is back, without leaving connections
  behind.
* **cut**: every connection is reset mid-query: requests fail at once, and the next ones
  are served on new connections.
"""

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from _pytest.logging import LogCaptureHandler
from fastapi import Depends, FastAPI

import tether
from tests.faultproxy import FaultProxy
from tests.integration.drivers import ASYNCPG_BEFORE_0_32, scalar
from tests.servers import Postgres, _pg_url
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

MAX_SIZE = 3
REQUESTS = 6  # twice the pool: some hold a blackholed connection, the others wait or connect


@pytest.fixture
def proxy(postgres: Postgres) -> Iterator[FaultProxy]:
    with FaultProxy(postgres.port) as p:
        yield p


def url(proxy: FaultProxy, scheme: str = "postgresql") -> str:
    return _pg_url(scheme, proxy.port, None, no_tls_probe=True)


def serve(conn: Any, lc: tether.Lifecycle) -> FastAPI:
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/q")
    async def q(c: Annotated[Any, Depends(conn)]) -> Any:
        return await scalar(c, "SELECT 1")

    @app.get("/sleep")
    async def sleep(c: Annotated[Any, Depends(conn)]) -> Any:
        return await scalar(c, "SELECT pg_sleep(5)")

    return app


# Each setup of the blackhole test: (resource, the statuses a blackholed request may get,
# tether's own message among them, the most seconds one may take: the timeouts involved
# plus a margin).


def asyncpg_transaction(
    lc: tether.Lifecycle, proxy: FaultProxy
) -> tuple[Any, set[int], str, float]:
    """BEGIN is tether's: bounded by acquire_timeout (1 s), so every request is a 503."""
    pool = tpg.pool(lc, url(proxy), min_size=2, max_size=MAX_SIZE, acquire_timeout=1)
    conn = tpg.connection(lc, pool, transaction=True, reset_timeout=1)
    message = (
        "Pool 'pool' could not give a connection: the database did not answer BEGIN within "
        "acquire_timeout=1 s (the connection was terminated; the network or the server may "
        "be down)."
    )
    return conn, {503}, message, 6.0


def asyncpg_command_timeout(
    lc: tether.Lifecycle, proxy: FaultProxy
) -> tuple[Any, set[int], str, float]:
    """The endpoint's own query, bounded by asyncpg's command_timeout (1 s): a 500 for those
    holding a connection (then released within reset_timeout, 1 s, and terminated), a 503
    for those waiting for one."""
    pool = tpg.pool(
        lc, url(proxy), min_size=2, max_size=MAX_SIZE, acquire_timeout=1, command_timeout=1
    )
    conn = tpg.connection(lc, pool, reset_timeout=1)
    return conn, {500, 503}, "connecting to the database took longer than acquire_timeout=1 s", 8.0


def sqlalchemy_session(lc: tether.Lifecycle, proxy: FaultProxy) -> tuple[Any, set[int], str, float]:
    """The pre-ping is tether's choice: the session's open is bounded by pool_timeout +
    connect_timeout (2 s), so every request is a 503, even with no command timeout.

    SQLAlchemy then invalidates the connection with asyncpg's ``close(timeout=2)``, which
    before asyncpg 0.32 waits for ever for the server to acknowledge the cancel of the
    ping (asyncpg #1356), inside SQLAlchemy's own shield: the request ends only when its
    client gives up. The SQLAlchemy guide says to use asyncpg 0.32 or later.
    """
    if ASYNCPG_BEFORE_0_32:
        pytest.skip("asyncpg < 0.32: close(timeout=) waits for ever on a pending cancel (#1356)")
    engine = tsa.engine(
        lc, url(proxy, "postgresql+asyncpg"), pool_size=MAX_SIZE, pool_timeout=1, connect_timeout=1
    )
    message = (  # after "Pool 'engine' (waiting N) could not give a connection: "
        "the database did not answer within 2 s (pool_timeout + connect_timeout): a pooled "
        "connection or a new one stopped answering (the network or the server may be down; "
        "the connection was discarded)."
    )
    return tsa.session(lc, engine), {503}, message, 8.0


def psycopg_connection(lc: tether.Lifecycle, proxy: FaultProxy) -> tuple[Any, set[int], str, float]:
    """The pre-ping (psycopg's pool check) is bounded by twice the pool's timeout (2 s); then
    psycopg itself spends up to 10 s cancelling the check's query before it gives up on the
    connection (5 s for the cancel request, 5 s for the query to end)."""
    pool = tpsy.pool(lc, url(proxy), min_size=2, max_size=MAX_SIZE, timeout=1)
    message = (  # after "Pool 'pool' (size 3, in use N, waiting N) could not give a connection: "
        "the database did not answer the check of a pooled connection within 2 x timeout=1 s "
        "(the network or the server may be down; the connection was closed)."
    )
    return tpsy.connection(lc, pool, transaction=True, reset_timeout=1), {503}, message, 16.0


async def served_again(client: httpx.AsyncClient, within: float) -> float:
    """Seconds until /q answers 200 again (asserting it does within *within*)."""
    started = time.monotonic()
    while True:
        r = await client.get("/q")
        if r.status_code == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < within, (r.status_code, r.text)
        await anyio.sleep(0.1)


@pytest.mark.parametrize(
    "make",
    [asyncpg_transaction, asyncpg_command_timeout, psycopg_connection, sqlalchemy_session],
    ids=["asyncpg-transaction", "asyncpg-command_timeout", "psycopg", "sqlalchemy"],
)
async def test_blackholed_network_every_request_ends_within_its_bounds(
    proxy: FaultProxy, make: Any
) -> None:
    lc = tether.Lifecycle()
    conn, statuses, message, bound = make(lc, proxy)
    app = serve(conn, lc)
    with _old_asyncpg_noise_tolerated():
        await _blackholed(lc, app, conn, proxy, statuses, message, bound)


@contextlib.contextmanager
def _old_asyncpg_noise_tolerated() -> Iterator[None]:
    """Before asyncpg 0.32 (the floors run 0.30) a connection closed while a cancellation of
    its query was in flight can leave a future of asyncpg's own with a
    ``ConnectionDoesNotExistError`` nobody retrieves ("Future exception was never retrieved";
    asyncpg's cancellation was reworked in 0.32). Seen in the floors, once in a serial CI run
    and once in three parallel runs before; never on 0.32. Tolerated there, for asyncpg's
    futures only: anything else the loop reports (a task of tether's) still fails the test,
    with its context."""
    if not ASYNCPG_BEFORE_0_32:
        yield
        return
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    unexpected = [
        r
        for r in reports
        if not (
            r.get("message") == "Future exception was never retrieved"
            and type(r.get("exception")).__name__ == "ConnectionDoesNotExistError"
        )
    ]
    assert not unexpected, unexpected


async def _blackholed(
    lc: tether.Lifecycle,
    app: Any,
    conn: Any,
    proxy: FaultProxy,
    statuses: set[int],
    message: str,
    bound: float,
) -> None:
    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/q")).status_code == 200  # pooled connections exist
            proxy.blackhole()
            answers: list[tuple[int, float, str | None, str]] = []

            async def ask() -> None:
                started = time.monotonic()
                r = await client.get("/q")
                detail = r.json().get("detail", "") if r.status_code == 503 else r.text
                took = time.monotonic() - started
                answers.append((r.status_code, took, r.headers.get("retry-after"), detail))

            with anyio.fail_after(bound + 10):  # a hang fails here, not in CI's timeout
                async with anyio.create_task_group() as tg:
                    for _ in range(REQUESTS):
                        tg.start_soon(ask)
            assert len(answers) == REQUESTS
            for status, took, retry_after, detail in answers:
                assert status in statuses, detail
                assert took < bound, (took, detail)
                if status == 503:
                    assert retry_after is not None
            assert any(message in detail for *_, detail in answers), answers

            proxy.restore()
            await served_again(client, within=10)
            for _ in range(5):
                assert (await client.get("/q")).status_code == 200
        assert lc.stats().resources[conn.name].in_use == 0
    # Closed with the app: the connections blackholed and given up on are closed too.
    # psycopg logs the exceptions of the connection attempts it gave up on, and their
    # tracebacks hold the sockets; pytest's log capture keeps the records: let go of them.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogCaptureHandler):
            handler.records.clear()  # in place: pytest keeps the list itself too
    gc.collect()
    with anyio.fail_after(5):
        while proxy.open_connections:
            await anyio.sleep(0.05)


def asyncpg_plain(lc: tether.Lifecycle, proxy: FaultProxy) -> Any:
    pool = tpg.pool(lc, url(proxy), min_size=2, max_size=MAX_SIZE, acquire_timeout=2)
    return tpg.connection(lc, pool, transaction=True, reset_timeout=1)


def psycopg_plain(lc: tether.Lifecycle, proxy: FaultProxy) -> Any:
    pool = tpsy.pool(lc, url(proxy), min_size=2, max_size=MAX_SIZE, timeout=2)
    return tpsy.connection(lc, pool, transaction=True, reset_timeout=1)


def sqlalchemy_plain(lc: tether.Lifecycle, proxy: FaultProxy) -> Any:
    engine = tsa.engine(lc, url(proxy, "postgresql+asyncpg"), pool_size=MAX_SIZE, pool_timeout=2)
    return tsa.session(lc, engine)


@pytest.mark.parametrize(
    "make",
    [asyncpg_plain, psycopg_plain, sqlalchemy_plain],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)
async def test_connections_reset_mid_query_fail_at_once_then_are_replaced(
    proxy: FaultProxy, make: Any
) -> None:
    """Three 5 s queries, the network resets their connections after 0.5 s: each answers 503
    at once (lost mid-transaction: nothing was committed, retrying is safe), and the next
    units of work are served on new connections."""
    lc = tether.Lifecycle()
    conn = make(lc, proxy)
    app = serve(conn, lc)
    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answers: list[tuple[int, float, str]] = []

            async def ask() -> None:
                started = time.monotonic()
                r = await client.get("/sleep")
                answers.append((r.status_code, time.monotonic() - started, r.text))

            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    for _ in range(MAX_SIZE):
                        tg.start_soon(ask)
                    await anyio.sleep(0.5)
                    proxy.cut()
            for status, took, text in answers:
                assert status == 503, text
                assert took < 3, (took, text)
                assert "the connection was lost mid-transaction" in text

            with anyio.fail_after(10):
                for _ in range(MAX_SIZE + 2):
                    assert (await client.get("/q")).status_code == 200
        assert lc.stats().resources[conn.name].in_use == 0
