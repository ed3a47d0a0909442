"""WebSockets against a real asyncpg pool of one connection, held by one open socket: a
handshake that cannot get a connection is answered 503 with Retry-After (as an HTTP request
is), a socket that asks for one after its accept is closed with 1013; and a socket still in a
query at drain_timeout is cancelled, its query stopped, before the pool closes. On an app's
route and on a route of an included router."""

import logging
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import asyncpg
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket, WebSocketDisconnect
from starlette.testclient import TestClient, WebSocketDenialResponse
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import tether
from tests.asgi.test_websocket_faults import Socket
from tests.servers import Postgres
from tests.serving import Server
from tether.integrations import asyncpg as tpg

pytestmark = [pytest.mark.servers]

PATHS = ["/ws", "/r/ws"]


def _app(pg: Postgres, table: str = "", **options: Any) -> tuple[FastAPI, tether.Lifecycle]:
    """Routes at /ws/... and, through an included router, at /r/ws/...: `hold` keeps the
    pool's connection until the client leaves; `late` asks for one after its accept;
    `failcommit` writes to *table* a row twice (its unique constraint refuses the commit)."""
    lc = tether.Lifecycle(**options)
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=1, acquire_timeout=0.3)
    conn = tpg.connection(lc, pool, transaction=True)
    Conn = Annotated[asyncpg.Connection, Depends(conn)]

    @lc.resource
    async def token() -> str:
        return "token"

    app = FastAPI(lifespan=lc.lifespan)
    router = APIRouter()

    async def hold(websocket: WebSocket, c: Conn) -> None:
        await websocket.accept()
        await websocket.send_text(str(await c.fetchval("SELECT 1")))
        try:
            while True:
                text = await websocket.receive_text()
                await c.execute("SELECT pg_sleep($1)", float(text))
        except WebSocketDisconnect:
            pass

    async def late(websocket: WebSocket, t: Annotated[str, Depends(token)]) -> None:
        await websocket.accept()
        c = await conn(websocket)  # pragma: no cover - the pool is full
        await websocket.send_text(str(await c.fetchval("SELECT 1")))  # pragma: no cover

    @app.get("/http")
    async def http(c: Conn) -> int:
        return int(await c.fetchval("SELECT 1"))  # pragma: no cover - the pool is full

    async def failcommit(websocket: WebSocket, c: Conn) -> None:
        await websocket.accept()
        await c.execute(f"INSERT INTO {table} VALUES (1), (1)")
        await websocket.send_text("written")

    for target in (app, router):
        target.add_api_websocket_route("/ws/hold", hold)
        target.add_api_websocket_route("/ws/late", late)
        target.add_api_websocket_route("/ws/failcommit", failcommit)
    app.include_router(router, prefix="/r")
    return app, lc


def test_full_pool_answers_a_handshake_503_and_closes_an_open_socket_1013(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """With the only connection held by an open socket, a handshake that needs one gets the
    503 with Retry-After that an HTTP request gets (not a 500 and a traceback), with one
    warning line each; a socket that asks for one after its accept is closed with 1013 (try
    again later)."""
    app, lc = _app(postgres)
    refused: dict[str, WebSocketDenialResponse] = {}
    closed: dict[str, WebSocketDisconnect] = {}
    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        with client.websocket_connect("/ws/hold") as holder:
            assert holder.receive_text() == "1"
            http = client.get("/http")
            for path in PATHS:
                with pytest.raises(WebSocketDenialResponse) as denied:
                    with client.websocket_connect(f"{path}/hold"):
                        pass  # pragma: no cover
                refused[path] = denied.value
                with client.websocket_connect(f"{path}/late") as late:
                    with pytest.raises(WebSocketDisconnect) as gone:
                        late.receive_text()
                closed[path] = gone.value
    assert http.status_code == 503
    for path in PATHS:
        response = refused[path]
        assert response.status_code == 503
        assert response.headers["retry-after"] == http.headers["retry-after"]
        assert response.json()["detail"].startswith("Pool 'pool' (size 1, in use 1")
        assert closed[path].code == 1013
        assert closed[path].reason == "'pool' is unavailable now. Retry later."
    answered = [r.getMessage() for r in caplog.records if " answered 503: " in r.getMessage()]
    assert [m.split(" answered")[0] for m in answered] == [
        "tether: GET /http",
        "tether: WEBSOCKET /ws/hold",
        "tether: WEBSOCKET /r/ws/hold",
    ]
    closes = [
        r.getMessage() for r in caplog.records if "closed the socket with 1013" in r.getMessage()
    ]
    assert [m.split(" closed")[0] for m in closes] == [
        "tether: WEBSOCKET /ws/late",
        "tether: WEBSOCKET /r/ws/late",
    ]
    assert lc.stats().units_in_flight == 0


@pytest.mark.anyio
@pytest.mark.parametrize("path", PATHS)
async def test_drain_cancels_a_socket_in_a_query_before_the_pool_closes(
    postgres: Postgres, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket 30 s into a query at drain_timeout is cancelled as an HTTP request is: the
    query stops and rolls back while the pool is still open, and the shutdown takes the drain
    and not close_timeout plus the pool's own timeout."""
    app, lc = _app(postgres, drain_timeout=0.5, close_timeout=5)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.lifespan(app):
            socket = Socket(app, f"{path}/hold")
            await socket.wait_sent(2)
            socket.say("30")
            await anyio.sleep(0.3)
            t0 = time.monotonic()
        elapsed = time.monotonic() - t0
        await socket.ended()
    assert elapsed < 3, elapsed
    check = await asyncpg.connect(postgres.dsn)
    try:
        busy = await check.fetch(
            "SELECT state FROM pg_stat_activity WHERE query = 'SELECT pg_sleep($1)' "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        await check.close()
    assert busy == []
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "tether: 1 unit of work still in flight after drain_timeout=0.5 s, cancelled: "
        f"WEBSOCKET {path}/hold"
    ) in messages
    assert not [m for m in messages if "did not close within" in m]


@pytest.mark.anyio
@pytest.mark.parametrize("path", PATHS)
async def test_full_pool_refusal_where_the_server_has_no_http_answer_and_with_an_app_handler(
    postgres: Postgres, path: str
) -> None:
    """Where the server does not let the app answer a handshake with HTTP, a full pool closes
    it with 1013 before the accept; an app with its own exception handler for
    ResourceUnavailable answers it with that handler, as on HTTP routes."""
    sent = {}
    for handler in (False, True):
        app, lc = _app(postgres)
        if handler:

            @app.exception_handler(tether.ResourceUnavailable)
            async def unavailable(websocket: WebSocket, exc: tether.ResourceUnavailable) -> None:
                await websocket.close(code=4003, reason="busy")

        async with lc.lifespan(app):
            holder = Socket(app, "/ws/hold")
            await holder.wait_sent(2)
            sent[handler] = await Socket(app, f"{path}/hold", http_response=handler).ended()
            holder.leave()
            await holder.ended()
    plain, handled = sent[False], sent[True]
    assert plain == [
        {
            "type": "websocket.close",
            "code": 1013,
            "reason": "'pool' is unavailable now. Retry later.",
        }
    ]
    assert handled == [{"type": "websocket.close", "code": 4003, "reason": "busy"}]


@pytest.mark.anyio
@pytest.mark.parametrize("path", PATHS)
async def test_failed_commit_closes_the_socket_1011_and_is_logged_once(
    postgres: Postgres, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that PostgreSQL refuses (a deferred unique constraint) once the endpoint
    returned: nothing is written, tether logs it once, the open socket is closed with 1011,
    and nothing is raised to the server (which would log it a second time)."""
    table = f"ws_deferred_{path.strip('/').replace('/', '_')}"
    setup = await asyncpg.connect(postgres.dsn)
    try:
        await setup.execute(f"DROP TABLE IF EXISTS {table}")
        await setup.execute(f"CREATE TABLE {table} (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        app, lc = _app(postgres, table)
        with caplog.at_level(logging.WARNING):
            async with lc.lifespan(app):
                socket = Socket(app, f"{path}/failcommit")
                sent = await socket.ended()
        rows = await setup.fetchval(f"SELECT count(*) FROM {table}")
        await setup.execute(f"DROP TABLE {table}")
    finally:
        await setup.close()
    assert socket.error is None
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[-1]["code"] == 1011
    assert rows == 0
    logged = [r for r in caplog.records if r.exc_info and "unique" in str(r.exc_info[1])]
    assert [r.name for r in logged] == ["tether"]


def test_full_pool_handshake_over_uvicorn_is_503_without_a_traceback(
    postgres: Postgres, tmp_path: Path
) -> None:
    """Over a real uvicorn: with the only connection held by an open socket, a handshake gets
    503 with Retry-After (not a 500), and the server logs tether's one line per refusal, not
    "Exception in ASGI application" with a traceback."""
    server = Server(
        "tests.e2e.app_websocket_pool:app", tmp_path, env={"DATABASE_URL": postgres.dsn}
    )
    url = f"ws://127.0.0.1:{server.port}"
    try:
        with connect(f"{url}/ws/hold") as holder:
            assert holder.recv(timeout=5) == "1"
            for path in PATHS:
                with pytest.raises(InvalidStatus) as refused:
                    connect(f"{url}{path}/hold", open_timeout=5)
                response = refused.value.response
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "1"
                assert b"Pool 'pool' (size 1, in use 1" in response.body
    finally:
        server.stop()
    out = server.output()
    assert "Exception in ASGI application" not in out, out
    assert out.count("tether: WEBSOCKET /ws/hold answered 503: ") == 1, out
    assert out.count("tether: WEBSOCKET /r/ws/hold answered 503: ") == 1, out


@pytest.mark.parametrize("path", PATHS)
def test_sigterm_over_uvicorn_closes_an_open_socket_with_1012(
    postgres: Postgres, tmp_path: Path, path: str
) -> None:
    """SIGTERM to a real uvicorn with a socket open on a pooled connection: the client gets
    close code 1012 (service restart: reconnect elsewhere), the server exits as on any SIGTERM
    within a few seconds (not held by the socket until a drain timeout), and logs no traceback."""
    server = Server(
        "tests.e2e.app_websocket_pool:app", tmp_path, env={"DATABASE_URL": postgres.dsn}
    )
    url = f"ws://127.0.0.1:{server.port}"
    try:
        with connect(f"{url}{path}/hold") as holder:
            assert holder.recv(timeout=5) == "1"
            sent = time.monotonic()
            server.terminate()
            with pytest.raises(ConnectionClosed) as closed:
                holder.recv(timeout=15)
        code = server.wait(15)
        took = time.monotonic() - sent
    finally:
        server.stop()
    out = server.output()
    assert closed.value.rcvd is not None, out
    assert closed.value.rcvd.code == 1012, out
    assert code in (0, -signal.SIGTERM), out  # uvicorn raises the signal again once stopped
    assert took < 10, out
    assert "Traceback" not in out, out
