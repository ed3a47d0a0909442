"""`tether.testing.running(lc, app)`: the app's lifespan, as a server and `TestClient` run it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import tether
from tether.testing import running


@pytest.mark.anyio
async def test_running_runs_the_users_lifespan_that_tether_wraps() -> None:
    """`FastAPI(lifespan=lc.lifespan(wrap=user_lifespan))`: the user's startup and shutdown
    run under `running(lc, app)` (inside the app scope, with app resources), as under
    `TestClient`; they were skipped."""
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource(scope="app")
    async def settings() -> AsyncIterator[dict[str, int]]:
        yield {"x": 1}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append(f"startup {lc.get(settings)}")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lc.lifespan(wrap=lifespan))

    @app.get("/")
    async def root() -> list[str]:
        return events

    transport = httpx.ASGITransport(app=app)
    async with running(lc, app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/")).json() == ["startup {'x': 1}"]
    assert events == ["startup {'x': 1}", "shutdown"]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["attribute", "called"])
async def test_running_with_tethers_own_lifespan(how: str) -> None:
    """`FastAPI(lifespan=lc.lifespan)` and `lc.lifespan()`: the app scope, and the app's routes
    taken over, as before."""
    lc = tether.Lifecycle()
    opened: list[Any] = []

    @lc.resource(scope="app")
    async def thing() -> AsyncIterator[int]:
        opened.append("open")
        yield 1
        opened.append("closed")

    app = FastAPI(lifespan=lc.lifespan if how == "attribute" else lc.lifespan())
    async with running(lc, app):
        assert lc.get(thing) == 1
    assert opened == ["open", "closed"]
