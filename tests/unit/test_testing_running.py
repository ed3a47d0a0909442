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


@pytest.mark.anyio
async def test_rolled_back_turns_queue_behind_others_that_come_and_go() -> None:
    """Four units of work of a `rolled_back` block, each holding the one connection 0.3 s,
    with a 0.5 s acquire timeout: the last waits 0.9 s in all, but someone gets a turn in
    every 0.5 s, so none fails (before: the fourth failed, told the holder waited for it)."""
    import anyio

    from tether.testing import _Turns

    turns = _Turns("session", 0.5)
    done: list[int] = []

    async def unit(n: int) -> None:
        async with turns.turn():
            await anyio.sleep(0.3)
            done.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(unit, n)
    assert sorted(done) == [0, 1, 2, 3]
