"""Routes a wrapped user lifespan adds before its `yield` (a plugin's router) are served
through tether like the others (before: a ScopeError, "the route was added after the app
started")."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient

import tether


def test_routes_added_by_the_wrapped_lifespan_are_taken_over() -> None:
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        events.append("conn open")
        yield f"conn of {pool}"
        events.append("conn close")

    plugin = APIRouter()

    @plugin.get("/p")
    async def p(c: Annotated[str, Depends(conn)]) -> dict[str, str]:
        events.append("endpoint")
        return {"conn": c}

    @asynccontextmanager
    async def user(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        app.include_router(plugin, prefix="/plugin")
        yield {}

    app = FastAPI(lifespan=lc.lifespan(wrap=user))
    with TestClient(app) as client:
        response = client.get("/plugin/p")
    assert response.status_code == 200, response.text
    assert response.json() == {"conn": "conn of pool"}
    # Closed at tether's release point: before the response started.
    assert events == ["conn open", "endpoint", "conn close"]
