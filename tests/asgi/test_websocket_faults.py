"""WebSocket units of work when something goes wrong, on an app's route and on a route of an
included router (FastAPI 0.137+ serves those through `unit_for_connection`; before, through
`_TetherRoute._websocket` as an app's route): refused while draining, a failed commit, a
drain that runs out, a leak report.

`Socket` drives one WebSocket connection on the ASGI app in-process, as a server does
(tests/integration/test_websocket_pools.py uses it against a real PostgreSQL pool).
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket, WebSocketDisconnect

import tether

pytestmark = pytest.mark.anyio

SHUTTING_DOWN = "The service is shutting down; retry shortly."


class Socket:
    """One WebSocket connection to *app* at *path*, served in an asyncio task of its own (the
    server's task for the connection: what tether cancels); ``sent`` holds what the app sent.
    The client sends ``websocket.disconnect`` once the app closed, or with `leave`."""

    def __init__(self, app: Any, path: str, *, http_response: bool = True) -> None:
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
            "subprotocols": [],
            "state": {},
            "extensions": {"websocket.http.response": {}} if http_response else {},
        }
        self.app = app
        self.incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
        self.sent: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except BaseException as exc:  # what reaches the server
            self.error = exc

    async def _receive(self) -> dict[str, Any]:
        while not self.incoming:
            await asyncio.sleep(0.01)
        return self.incoming.pop(0)

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "websocket.close":
            self.incoming.append({"type": "websocket.disconnect", "code": message["code"]})

    def say(self, text: str) -> None:
        self.incoming.append({"type": "websocket.receive", "text": text})

    def leave(self) -> None:
        self.incoming.append({"type": "websocket.disconnect", "code": 1000})

    async def wait_sent(self, count: int) -> None:
        with anyio.fail_after(10):
            while len(self.sent) < count and not self.task.done():
                await asyncio.sleep(0.01)

    async def ended(self) -> list[dict[str, Any]]:
        with anyio.fail_after(10):
            await asyncio.wait({self.task})
        return self.sent

    def kinds(self) -> list[str]:
        return [m["type"] for m in self.sent]


def _app(
    events: list[str], **options: Any
) -> tuple[FastAPI, tether.Lifecycle, anyio.Event, list[bool]]:
    """An app with the same WebSocket routes at /ws/... and, through an included router, at
    /r/ws/...: `hold` takes the connection and waits for a message; `failcommit` ends
    normally, and the connection's commit fails."""
    lc = tether.Lifecycle(**options)
    release = anyio.Event()
    fail_commit = [False]

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
        if fail_commit[0]:
            events.append("commit failed")
            raise RuntimeError("commit failed: deferred constraint violated")
        events.append("commit conn")

    Conn = Annotated[str, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)
    router = APIRouter()

    async def hold(websocket: WebSocket, c: Conn) -> None:
        await websocket.accept()
        await websocket.send_text(c)
        try:
            await waiting_for_a_message(websocket)
        except WebSocketDisconnect:
            pass

    async def failcommit(websocket: WebSocket, c: Conn) -> None:
        await websocket.accept()
        await websocket.send_text("written")

    for target, prefix in ((app, ""), (router, "")):
        target.add_api_websocket_route(f"{prefix}/ws/hold", hold)
        target.add_api_websocket_route(f"{prefix}/ws/failcommit", failcommit)
    app.include_router(router, prefix="/r")
    return app, lc, release, fail_commit


async def waiting_for_a_message(websocket: WebSocket) -> str:
    return await websocket.receive_text()


PATHS = ["/ws", "/r/ws"]


async def test_included_routes_handshake_is_refused_while_draining() -> None:
    """While the app drains, a handshake to a route of an included router is refused as one to
    an app's route is: 503 with Retry-After where the server lets the app answer it, else a
    close with 1013 before the accept; nothing reaches the server."""
    events: list[str] = []
    app, lc, _, _ = _app(events, drain_timeout=10)
    async with anyio.create_task_group() as tg:
        started, stop = anyio.Event(), anyio.Event()

        async def serve() -> None:
            async with lc.lifespan(app):
                started.set()
                await stop.wait()

        tg.start_soon(serve)
        await started.wait()
        holder = Socket(app, "/ws/hold")
        await holder.wait_sent(2)
        stop.set()
        while lc.state is not tether.State.DRAINING:
            await anyio.sleep(0.01)
        refused: dict[Any, list[dict[str, Any]]] = {}
        for path in PATHS:
            refused[path] = await Socket(app, f"{path}/hold").ended()
            refused[path, "close"] = await Socket(app, f"{path}/hold", http_response=False).ended()
        holder.leave()
        await holder.ended()
    for path in PATHS:
        start, body = refused[path]
        assert (start["type"], start["status"]) == ("websocket.http.response.start", 503)
        assert (b"retry-after", b"5") in start["headers"]
        assert body["body"] == b'{"detail":"' + SHUTTING_DOWN.encode() + b'"}'
        assert refused[path, "close"] == [
            {"type": "websocket.close", "code": 1013, "reason": SHUTTING_DOWN}
        ]
    assert lc.stats().units_refused == 4


@pytest.mark.parametrize("path", PATHS)
async def test_failed_commit_closes_the_socket_with_1011_and_is_logged_once(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that fails once the endpoint returned: logged once by tether, the open socket
    closed with 1011, and not raised to the server (which would log it again), on both
    kinds of route."""
    events: list[str] = []
    app, lc, _, fail_commit = _app(events)
    fail_commit[0] = True
    with caplog.at_level(logging.ERROR):
        async with lc.lifespan(app):
            socket = Socket(app, f"{path}/failcommit")
            sent = await socket.ended()
    assert socket.error is None
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[-1]["code"] == 1011
    assert events[:1] == ["commit failed"]
    failures = [r for r in caplog.records if r.exc_info and "commit failed" in str(r.exc_info[1])]
    assert len(failures) == 1
    assert failures[0].name == "tether"


@pytest.mark.parametrize("path", PATHS)
async def test_drain_cancels_a_websocket_still_running(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket still open at drain_timeout is cancelled, as an HTTP request is: its
    connection rolls back before the pool closes, the shutdown does not wait out
    close_timeout, and the warning names it as cancelled."""
    events: list[str] = []
    app, lc, _, _ = _app(events, drain_timeout=0.2, close_timeout=5)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.lifespan(app):
            socket = Socket(app, f"{path}/hold")
            await socket.wait_sent(2)
            t0 = anyio.current_time()
        elapsed = anyio.current_time() - t0
        await socket.ended()
    assert elapsed < 2, elapsed
    assert events == ["rollback conn (CancelledError)", "close pool"]
    assert isinstance(socket.error, asyncio.CancelledError)
    warnings = [r.getMessage() for r in caplog.records if "drain_timeout" in r.getMessage()]
    assert warnings == [
        "tether: 1 unit of work still in flight after drain_timeout=0.2 s, cancelled: "
        f"WEBSOCKET {path}/hold"
    ]


@pytest.mark.parametrize("path", PATHS)
async def test_leak_report_says_where_the_socket_waits(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket holding its connection past leak_threshold is reported with where its task
    waits, as a request is."""
    events: list[str] = []
    app, lc, _, _ = _app(events, leak_threshold=0.1, sweep_interval=0.02)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.lifespan(app):
            socket = Socket(app, f"{path}/hold")
            await socket.wait_sent(2)
            with anyio.fail_after(5):
                while not any(" held for " in r.getMessage() for r in caplog.records):
                    await anyio.sleep(0.02)
            socket.leave()
            await socket.ended()
    (report,) = [r.getMessage() for r in caplog.records if " held for " in r.getMessage()]
    first, _, stack = report.partition("\n")
    assert first.startswith("tether: resource 'conn' held for ")
    assert first.endswith(f"by WEBSOCKET {path}/hold; the request is now at:")
    assert "in waiting_for_a_message" in stack


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_drain_warning_names_the_units_it_could_not_cancel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On trio tether knows no task to cancel: the drain warning says so, rather than
    claiming it cancelled them."""
    events: list[str] = []
    _, lc, _, _ = _app(events, drain_timeout=0.1, close_timeout=0.2)
    (conn,) = [r for r in lc._resources.values() if r.name == "conn"]
    holding = anyio.Event()

    async def stuck_job() -> None:
        async with lc.scope("stuck job") as s:
            await s.get(conn)
            holding.set()
            await anyio.sleep_forever()

    with caplog.at_level(logging.WARNING, logger="tether"):
        async with anyio.create_task_group() as tg:
            async with lc.run():
                tg.start_soon(stuck_job)
                await holding.wait()
            tg.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if "drain_timeout" in r.getMessage()]
    assert warnings == [
        "tether: 1 unit of work still in flight after drain_timeout=0.1 s, cancelled: none; "
        "not cancelled (no asyncio task to cancel, as on trio): stuck job: they get up to "
        "close_timeout=0.2 s to end before the app resources close under them; end them from "
        "the server's shutdown (its graceful timeout)"
    ]
