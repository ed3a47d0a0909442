"""A resource opened lazily on a WebSocket route that declares none: on FastAPI 0.118+ the
connection's exit stack gives it a unit of work; before, a `ScopeError`, which named the route
as "GET" and did not say that a newer FastAPI serves it (trial 12)."""

from collections.abc import AsyncIterator

import fastapi
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient

import tether

OLD = tuple(int(p) for p in fastapi.__version__.split(".")[:2]) < (0, 118)


def make() -> FastAPI:
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    @app.websocket("/ws/lazy")
    async def lazy(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await conn(websocket))
        await websocket.close()

    return app


@pytest.mark.skipif(OLD, reason="the connection's exit stack is FastAPI 0.118+")
def test_a_lazy_resource_on_a_websocket_route_is_served() -> None:
    with TestClient(make()) as client, client.websocket_connect("/ws/lazy") as socket:
        assert socket.receive_text() == "conn"


@pytest.mark.skipif(not OLD, reason="FastAPI before 0.118 only")
def test_before_fastapi_0_118_the_error_names_the_websocket_and_the_version() -> None:
    with TestClient(make()) as client, pytest.raises(tether.ScopeError) as info:
        with client.websocket_connect("/ws/lazy") as socket:
            socket.receive_text()
    message = str(info.value)
    assert "'/ws/lazy': WEBSOCKET /ws/lazy declares no tether resource" in message
    assert "or run FastAPI 0.118+, where such a route gets a unit of work of its own, " in message
