"""Calling an ASGI app in-process, as a server would, without a server."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx


@asynccontextmanager
async def client_of(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling *app* in-process. httpx's `ASGITransport` runs no lifespan:
    enter the app's own (`lc.lifespan(app)`) around it."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
        yield client


def http_scope(method: str, path: str) -> dict[str, Any]:
    """The scope of one HTTP/1.1 request from 127.0.0.1 (ASGI spec 2.3, as uvicorn sends)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-length", b"0")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


class Exchange:
    """The ``receive`` and ``send`` of one in-process request with an empty body; what the
    app sends is kept in ``sent``."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def statuses(self) -> list[int]:
        return [m["status"] for m in self.sent if m["type"] == "http.response.start"]


def timeout_middleware(app: Any, seconds: float) -> Any:
    """The usual request-timeout middleware: ``asyncio.wait_for`` around the app, and 504
    when it times out (it cancels the request's task from outside tether)."""

    async def timed(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        try:
            await asyncio.wait_for(app(scope, receive, send), seconds)
        except TimeoutError:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"timed out"})

    return timed


def staying_client() -> Any:
    """The ``receive`` of a request with an empty body whose client stays: the body, then
    nothing (a disconnect never comes)."""
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # the client stays
        raise AssertionError  # pragma: no cover

    return receive
