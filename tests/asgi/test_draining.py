"""While the app drains, new requests and new WebSocket handshakes are refused with a 503."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import httpx
from fastapi import Depends, FastAPI, WebSocket

import tether
from tests.inprocess import client_of

SHUTTING_DOWN = "The service is shutting down; retry shortly."


def _app() -> tuple[FastAPI, tether.Lifecycle, anyio.Event]:
    lc = tether.Lifecycle(drain_timeout=10)
    release = anyio.Event()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/hold")
    async def hold(c: Annotated[str, Depends(conn)]) -> str:
        await release.wait()
        return c

    @app.get("/other")
    async def other(c: Annotated[str, Depends(conn)]) -> str:
        return c  # pragma: no cover - refused while draining

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, c: Annotated[str, Depends(conn)]) -> None:
        await websocket.accept()
        await websocket.send_text(c)
        await websocket.close()

    return app, lc, release


async def _handshake(app: FastAPI, *, http_response: bool) -> list[dict[str, Any]]:
    """One WebSocket handshake on the ASGI app, as a server makes it: what the app sent."""
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "scheme": "ws",
        "http_version": "1.1",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}} if http_response else {},
    }
    incoming = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            incoming.append({"type": "websocket.disconnect", "code": message.get("code", 1000)})

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


def test_requests_and_websockets_are_refused_while_draining() -> None:
    """A unit in flight holds the drain open; meanwhile an HTTP request gets 503 with
    Retry-After, and a WebSocket handshake gets the same 503 where the server lets the app
    answer it with HTTP, else a close with 1013 (try again later) before it is accepted.
    Before the drain, the same WebSocket route is served."""
    app, lc, release = _app()
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with client_of(app) as client:
            async with anyio.create_task_group() as tg:
                async with lc.lifespan(app):
                    served = await _handshake(app, http_response=True)
                    assert [m["type"] for m in served] == [
                        "websocket.accept",
                        "websocket.send",
                        "websocket.close",
                    ]
                    assert served[1]["text"] == "conn"

                    async def hold() -> None:
                        seen["hold"] = await client.get("/hold")

                    tg.start_soon(hold)
                    while not lc.stats().units_in_flight:
                        await anyio.sleep(0.01)

                    async def while_draining() -> None:
                        while lc.state is not tether.State.DRAINING:
                            await anyio.sleep(0.01)
                        seen["http"] = await client.get("/other")
                        seen["ws"] = await _handshake(app, http_response=True)
                        seen["ws-close"] = await _handshake(app, http_response=False)
                        release.set()

                    tg.start_soon(while_draining)

    anyio.run(main)
    hold: httpx.Response = seen["hold"]
    assert (hold.status_code, hold.json()) == (200, "conn")
    refused: httpx.Response = seen["http"]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert refused.json() == {"detail": SHUTTING_DOWN}
    start, body = seen["ws"]
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 503
    assert (b"retry-after", b"5") in start["headers"]
    assert body["type"] == "websocket.http.response.body"
    assert body["body"] == b'{"detail":"' + SHUTTING_DOWN.encode() + b'"}'
    assert seen["ws-close"] == [{"type": "websocket.close", "code": 1013, "reason": SHUTTING_DOWN}]
    stats = lc.stats()
    assert (stats.units_total, stats.units_refused) == (2, 3)
