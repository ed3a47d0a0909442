"""A request the server's shutdown cancels before its response started (uvicorn's
``--timeout-graceful-shutdown`` ran out; tether's ``drain_timeout`` ran out) is answered 503
with ``Retry-After``, which a load balancer retries on another instance, and its values roll
back; the cancellation then goes on to the server. Before, the server answered 500. Any other
cancel (a timeout middleware's) is left alone: the middleware answers.

Each request is served from an asyncio task of its own, as a server serves it: the task
the shutdown cancels. Through FastAPI's request handler (the app's routes), through a
route class that wraps its own app (tether wraps the route's ``send``), and behind a
``BaseHTTPMiddleware`` (``@app.middleware("http")``), whose task group cancels the route's
task with a cancel of its own (a 500 before: trial 17).
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request as StarletteRequest

import tether
from tests.inprocess import http_scope

pytestmark = pytest.mark.anyio

SHUTTING_DOWN = b'{"detail":"The service is shutting down; retry shortly."}'
GRACEFUL = "Task cancelled, timeout graceful shutdown exceeded"  # uvicorn's cancel message


class WrappedRoute(APIRoute):
    """A route class that wraps its own ASGI app (as per-route tracing does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = self.app

        async def traced(scope: Any, receive: Any, send: Any) -> None:
            await inner(scope, receive, send)

        self.app = traced


def make(events: list[str], route: str, **options: Any) -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle(**options)

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
        except BaseException as exc:
            events.append(f"rollback ({type(exc).__name__})")
            raise
        events.append("commit")

    app = FastAPI(lifespan=lc.lifespan)
    if route == "wrapped":
        app.router.route_class = WrappedRoute
    elif route == "middleware":

        @app.middleware("http")
        async def passing(request: StarletteRequest, call_next: Any) -> Any:
            return await call_next(request)

    @app.get("/slow")
    async def slow(c: Annotated[str, Depends(conn)]) -> str:
        events.append("started")
        await anyio.sleep(30)
        return c

    return app, lc


class Request:
    """One GET /slow, served from a task of its own."""

    def __init__(self, app: FastAPI) -> None:
        self.sent: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self.serve(app))

    async def serve(self, app: FastAPI) -> None:
        async def receive() -> dict[str, Any]:
            if not hasattr(receive, "read"):
                receive.read = True  # type: ignore[attr-defined]
                return {"type": "http.request", "body": b"", "more_body": False}
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        try:
            await app(http_scope("GET", "/slow"), receive, send)
        except BaseException as exc:
            self.error = exc
            raise

    @classmethod
    async def running(cls, app: FastAPI, events: list[str]) -> "Request":
        """One GET /slow, once its endpoint runs."""
        request = cls(app)
        with anyio.fail_after(5):
            while "started" not in events:
                await asyncio.sleep(0.01)
        return request

    async def ended(self) -> list[dict[str, Any]]:
        with anyio.fail_after(5):
            while not self.task.done():
                await asyncio.sleep(0.01)
        return self.sent


def answered_503(sent: list[dict[str, Any]]) -> None:
    assert sent[0]["type"] == "http.response.start", sent
    assert sent[0]["status"] == 503, sent
    assert (b"retry-after", b"5") in sent[0]["headers"], sent
    assert sent[1]["body"] == SHUTTING_DOWN, sent


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]


@pytest.mark.parametrize("route", ["handler", "wrapped", "middleware"])
async def test_uvicorns_cancel_past_its_graceful_timeout_is_answered_503(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    app, lc = make(events, route)
    caplog.set_level(logging.WARNING, logger="tether")
    async with lc.lifespan(app):
        request = await Request.running(app, events)
        request.task.cancel(msg=GRACEFUL)
        sent = await request.ended()
    answered_503(sent)
    assert events == ["started", "rollback (CancelledError)"]
    assert isinstance(request.error, asyncio.CancelledError)  # the cancellation goes on
    assert said(caplog) == [
        "tether: GET /slow answered 503: the server cancelled it as it shut down (uvicorn's "
        "--timeout-graceful-shutdown ran out); its values closed with the cancellation "
        "(rolled back)"
    ]


@pytest.mark.parametrize("route", ["handler", "wrapped", "middleware"])
async def test_tethers_cancel_past_drain_timeout_is_answered_503(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    app, lc = make(events, route, drain_timeout=0.2)
    caplog.set_level(logging.WARNING, logger="tether")
    async with lc.lifespan(app):
        request = await Request.running(app, events)
    sent = await request.ended()
    answered_503(sent)
    assert events == ["started", "rollback (CancelledError)"]
    # (The drain cancels the route's task: behind the middleware, a task of its task group,
    # whose end the middleware's own task takes as the response's.)
    assert route == "middleware" or isinstance(request.error, asyncio.CancelledError)
    assert said(caplog) == [
        "tether: GET /slow answered 503: the server cancelled it as it shut down "
        "(drain_timeout=0.2 s ran out); its values closed with the cancellation (rolled back)"
    ]


@pytest.mark.parametrize("route", ["handler", "wrapped", "middleware"])
async def test_another_cancel_is_left_to_whoever_cancelled(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    app, lc = make(events, route)
    caplog.set_level(logging.WARNING, logger="tether")
    async with lc.lifespan(app):
        request = await Request.running(app, events)
        request.task.cancel()  # a timeout middleware's, say: it answers 504 itself
        sent = await request.ended()
    assert sent == []
    assert events == ["started", "rollback (CancelledError)"]
    assert isinstance(request.error, asyncio.CancelledError)
    assert said(caplog) == []
