"""A request reaching an app whose lifespan ended goes on, as before the app started: an app
resource it asks for is a `ScopeError` naming the fix, not a 503 "shutting down".

Only in-process: a server stops serving before the lifespan ends. The common case is a test
client used without `with` after an earlier test ran the app and closed it.
"""

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.unit._messages import exactly

CLOSED = (
    "App resource 'pool' is not open: the app scope is closed, its lifespan ended (an "
    "earlier test ran the app, or it shut down). In tests, run the lifespan around each "
    "test: enter the client (`with TestClient(app) as client:`), or, with httpx's "
    "`ASGITransport`, which never runs a lifespan, wrap the client in `async with "
    "lc.lifespan(app):`; elsewhere, `async with lc.run():`."
)


def _app() -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        yield f"conn of {pool}"

    @lc.resource
    async def clock() -> AsyncIterator[str]:
        yield "tick"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/conn")
    async def read(c: Annotated[str, Depends(conn)]) -> str:
        return c

    @app.get("/clock")
    async def tick(c: Annotated[str, Depends(clock)]) -> str:
        return c  # a request resource that needs no app resource

    @app.get("/plain")
    async def plain() -> str:
        return "plain"

    return app, lc


def test_test_client_without_with_after_an_earlier_test() -> None:
    app, lc = _app()
    with TestClient(app) as client:  # an earlier test: ran the app and closed it
        assert client.get("/conn").json() == "conn of pool"
    assert lc.state is tether.State.CLOSED

    client = TestClient(app)  # this test forgot `with`
    with pytest.raises(tether.ScopeError, match=exactly(CLOSED)):
        client.get("/conn")
    # Routes that need no app resource work, as before the app started.
    assert client.get("/clock").json() == "tick"
    assert client.get("/plain").json() == "plain"
    assert lc.stats().units_refused == 0  # nothing was refused: no 503 was sent

    with TestClient(app) as client:  # and the next test that enters the client is fine
        assert client.get("/conn").json() == "conn of pool"


def test_server_error_response_on_a_closed_app() -> None:
    app, lc = _app()
    with TestClient(app) as client:
        assert client.get("/conn").status_code == 200
    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/conn")
    assert response.status_code == 500  # the error, not "shutting down; retry"
    assert "Retry-After" not in response.headers
    assert lc.stats().units_refused == 0


@pytest.mark.anyio
async def test_asgi_transport_after_the_lifespan_ended() -> None:
    app, lc = _app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        async with lc.lifespan(app):
            assert (await client.get("/conn")).json() == "conn of pool"
        with pytest.raises(tether.ScopeError, match=exactly(CLOSED)):
            await client.get("/conn")
        assert (await client.get("/plain")).json() == "plain"
    assert lc.stats().units_refused == 0
