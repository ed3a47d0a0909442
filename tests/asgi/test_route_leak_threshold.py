"""`@tether.fastapi.leak_threshold(...)`: a route's units of work with a leak threshold of
their own, in place of the Lifecycle's: a WebSocket that holds its connection while the socket
is open by design, a long stream. On an HTTP route (served through FastAPI's request handler,
and through tether's route wrapper for a route class that wraps its own app), on a WebSocket
route of the app, and on one of an included router (served through `unit_for_connection` on
FastAPI 0.137+)."""

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket, WebSocketDisconnect

import tether
import tether.fastapi
from tests.asgi.test_websocket_faults import Socket, waiting_for_a_message
from tests.inprocess import client_of
from tests.routes import WrappingRoute

pytestmark = pytest.mark.anyio


def _app(lifecycle_threshold: float | None) -> tuple[FastAPI, tether.Lifecycle, anyio.Event]:
    """Routes that hold `conn` until *release* is set, each in two versions: `/plain/...`
    (the Lifecycle's threshold) and `/marked/...` (`leak_threshold(None)`, or `(0.1)` at
    `/short/...`)."""
    lc = tether.Lifecycle(leak_threshold=lifecycle_threshold, sweep_interval=0.02)
    release = anyio.Event()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    Conn = Annotated[str, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)
    own = APIRouter(route_class=WrappingRoute)
    included = APIRouter()

    def get() -> Callable[..., Any]:
        async def get(c: Conn) -> str:
            await release.wait()
            return c

        return get

    def ws() -> Callable[..., Any]:
        async def ws(websocket: WebSocket, c: Conn) -> None:
            await websocket.accept()
            await websocket.send_text(c)
            try:
                await waiting_for_a_message(websocket)
            except WebSocketDisconnect:
                pass

        return ws

    marks = {
        "plain": lambda fn: fn,
        "marked": tether.fastapi.leak_threshold(None),
        "short": tether.fastapi.leak_threshold(0.1),
    }
    for name, mark in marks.items():  # a function each: the mark is the endpoint's attribute
        app.add_api_route(f"/{name}/get", mark(get()))
        own.add_api_route(f"/{name}/own", mark(get()))
        app.add_api_websocket_route(f"/{name}/ws", mark(ws()))
        included.add_api_websocket_route(f"/{name}/ws", mark(ws()))
    app.include_router(own)
    app.include_router(included, prefix="/r")
    return app, lc, release


def _reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " held for " in r.getMessage()]


async def _hold_all(
    app: FastAPI, lc: tether.Lifecycle, release: anyio.Event, kinds: list[str], wait: float
) -> None:
    """Hold a unit of work on every route of *kinds* for *wait* seconds."""
    async with lc.lifespan(app), client_of(app) as client, anyio.create_task_group() as tg:
        sockets = []
        for kind in kinds:
            tg.start_soon(client.get, f"/{kind}/get")
            tg.start_soon(client.get, f"/{kind}/own")
            for prefix in ("", "/r"):
                socket = Socket(app, f"{prefix}/{kind}/ws")
                await socket.wait_sent(2)
                sockets.append(socket)
        await anyio.sleep(wait)
        release.set()
        for socket in sockets:
            socket.leave()
            await socket.ended()


async def test_a_route_marked_none_is_never_reported(caplog: pytest.LogCaptureFixture) -> None:
    """With the Lifecycle's threshold at 0.1 s, the unmarked routes' values held for a second
    are reported, each once; those of the routes marked `leak_threshold(None)` are not."""
    app, lc, release = _app(0.1)
    with caplog.at_level(logging.WARNING, logger="tether"):
        await _hold_all(app, lc, release, ["plain", "marked"], 1.0)
    reported = sorted(m.split(" by ", 1)[1].split(";")[0] for m in _reports(caplog))
    assert reported == [
        "GET /plain/get",
        "GET /plain/own",
        "WEBSOCKET /plain/ws",
        "WEBSOCKET /r/plain/ws",
    ]
    assert lc.stats().resources["conn"].leaks == 4


async def test_a_route_marked_with_seconds_is_reported_where_the_lifecycle_reports_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the Lifecycle's leak detection off, the routes marked `leak_threshold(0.1)` are
    still reported, with their own threshold in the message; the others are not."""
    app, lc, release = _app(None)
    with caplog.at_level(logging.WARNING, logger="tether"):
        await _hold_all(app, lc, release, ["plain", "short"], 1.0)
    reports = _reports(caplog)
    assert all("(leak_threshold=0.1 s)" in m for m in reports), reports
    reported = sorted(m.split(" by ", 1)[1].split(";")[0] for m in reports)
    assert reported == [
        "GET /short/get",
        "GET /short/own",
        "WEBSOCKET /r/short/ws",
        "WEBSOCKET /short/ws",
    ]


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        (
            "60",
            TypeError,
            "tether.fastapi.leak_threshold(): seconds='60' is a str, not a number of "
            "seconds. Pass a positive number of seconds (or None), e.g. seconds=3600, or None "
            "for no leak reports of this route (a setting read from the environment is a "
            "string: convert it with float()).",
        ),
        (
            0,
            ValueError,
            "tether.fastapi.leak_threshold(): seconds=0 must be a positive number of "
            "seconds (or None).",
        ),
    ],
)
def test_a_bad_threshold_is_refused_naming_the_fix(
    given: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        tether.fastapi.leak_threshold(given)
    assert str(caught.value) == message
