"""A WebSocket still open when a shutdown's ``drain_timeout`` passes (granian runs the
lifespan shutdown while sockets are still served) is cancelled, rolls back, and is then
closed by tether with 1012, "service restart", so that its client reconnects (to another
instance) instead of seeing the server drop it; a handshake the endpoint had not accepted
yet is refused as one that comes while the app drains. On an app's route, on a route of an
included router (FastAPI 0.137+ serves those through `unit_for_connection`), and on an
app's route that declares no resource and opens one lazily (`await conn(websocket)`).

`Socket` (tests/asgi/test_websocket_faults.py) drives one connection in-process, as a
server does, in an asyncio task of its own: the task tether cancels.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import fastapi
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket, WebSocketDisconnect

import tether
from tests.asgi.test_websocket_faults import Socket

pytestmark = pytest.mark.anyio

SHUTTING_DOWN = "The service is shutting down; retry shortly."
RESTART = {"type": "websocket.close", "code": 1012, "reason": SHUTTING_DOWN}


def _app(events: list[str], **options: Any) -> tuple[FastAPI, tether.Lifecycle]:
    """`/ws/hold` (on the app) and `/r/ws/hold` (an included router's) take the connection,
    accept, and wait for a message; `/ws/lazy` declares none and opens it lazily;
    `/ws/unaccepted` takes it and waits before accepting."""
    lc = tether.Lifecycle(**options)

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        events.append("close pool")

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        try:
            yield "conn"
        except BaseException as exc:
            events.append(f"rollback conn ({type(exc).__name__})")
            raise
        events.append("commit conn")

    Conn = Annotated[str, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)
    router = APIRouter()

    async def hold(websocket: WebSocket, c: Conn) -> None:
        await websocket.accept()
        await websocket.send_text(c)
        try:
            await websocket.receive_text()
        except WebSocketDisconnect:
            pass

    async def lazy(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await conn(websocket))
        await websocket.receive_text()

    async def unaccepted(websocket: WebSocket, c: Conn) -> None:
        events.append("holding before the accept")
        await anyio.sleep_forever()

    app.add_api_websocket_route("/ws/hold", hold)
    app.add_api_websocket_route("/ws/lazy", lazy)
    app.add_api_websocket_route("/ws/unaccepted", unaccepted)
    router.add_api_websocket_route("/ws/hold", hold)
    app.include_router(router, prefix="/r")
    return app, lc


# A resource opened lazily on a WebSocket route that declares none needs FastAPI 0.118+ (its
# exit stack for the connection); before, it raises `ScopeError` (docs/release-point.md).
LAZY = pytest.param(
    "/ws/lazy",
    marks=pytest.mark.skipif(
        tuple(int(p) for p in fastapi.__version__.split(".")[:2]) < (0, 118),
        reason="a WebSocket route's lazily opened resource needs FastAPI 0.118+",
    ),
)


@pytest.mark.parametrize("path", ["/ws/hold", "/r/ws/hold", LAZY])
async def test_a_socket_open_past_drain_timeout_is_closed_with_1012(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    app, lc = _app(events, drain_timeout=0.2, close_timeout=5)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.lifespan(app):
            socket = Socket(app, path)
            await socket.wait_sent(2)
            t0 = anyio.current_time()
        elapsed = anyio.current_time() - t0
        sent = await socket.ended()
    assert elapsed < 2, elapsed
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[-1] == RESTART
    # Rolled back before the pool closed, as before; the cancel still reaches the server.
    assert events == ["rollback conn (CancelledError)", "close pool"]
    assert isinstance(socket.error, asyncio.CancelledError)
    warnings = [r.getMessage() for r in caplog.records if "drain_timeout" in r.getMessage()]
    assert warnings == [
        "tether: 1 unit of work still in flight after drain_timeout=0.2 s, cancelled: "
        f"WEBSOCKET {path}"
    ]


@pytest.mark.parametrize("http_response", [True, False], ids=["http_response", "close_only"])
async def test_a_handshake_not_accepted_past_drain_timeout_is_refused(http_response: bool) -> None:
    """Cancelled before its endpoint accepted it: refused as a handshake that comes while the
    app drains, a 503 with Retry-After where the server lets the app answer it with HTTP,
    else a close with 1013 before the accept."""
    events: list[str] = []
    app, lc = _app(events, drain_timeout=0.2, close_timeout=5)
    async with lc.lifespan(app):
        socket = Socket(app, "/ws/unaccepted", http_response=http_response)
        with anyio.fail_after(5):
            while not events:
                await anyio.sleep(0.01)
    sent = await socket.ended()
    if http_response:
        start, body = sent
        assert (start["type"], start["status"]) == ("websocket.http.response.start", 503)
        assert (b"retry-after", b"5") in start["headers"]
        assert body["body"] == b'{"detail":"' + SHUTTING_DOWN.encode() + b'"}'
    else:
        assert sent == [{"type": "websocket.close", "code": 1013, "reason": SHUTTING_DOWN}]
    assert events[1:] == ["rollback conn (CancelledError)", "close pool"]


async def test_a_socket_the_client_left_during_the_drain_is_not_sent_a_close() -> None:
    """A socket that ended on its own while the app drained (its client left) commits or
    rolls back as it chose, and is sent nothing more: only a cancel by the drain closes
    with 1012."""
    events: list[str] = []
    app, lc = _app(events, drain_timeout=5, close_timeout=5)
    async with anyio.create_task_group() as tg:
        started, stop = anyio.Event(), anyio.Event()

        async def serve() -> None:
            async with lc.lifespan(app):
                started.set()
                await stop.wait()

        tg.start_soon(serve)
        await started.wait()
        socket = Socket(app, "/ws/hold")
        await socket.wait_sent(2)
        stop.set()
        while lc.state is not tether.State.DRAINING:
            await anyio.sleep(0.01)
        socket.leave()
        sent = await socket.ended()
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    assert socket.error is None
    assert events == ["commit conn", "close pool"]


async def test_a_socket_cancelled_by_its_server_while_running_is_not_sent_1012() -> None:
    """A cancel that is not the drain's (the server's own, while the app runs) is left as
    it was: rolled back, no close of tether's."""
    events: list[str] = []
    app, lc = _app(events)
    async with lc.lifespan(app):
        socket = Socket(app, "/ws/hold")
        await socket.wait_sent(2)
        socket.task.cancel()
        sent = await socket.ended()
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    assert events == ["rollback conn (CancelledError)", "close pool"]
