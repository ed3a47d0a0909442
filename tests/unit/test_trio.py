"""The core on trio: tether uses anyio only outside its ASGI glue, so scopes work there too."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import anyio
import pytest

import tether

from ._messages import close_timeout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def test_app_and_request_resources_open_and_close_in_order() -> None:
    """App resources open at run and close after; request values close in reverse at scope end."""
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        events.append("open pool")
        yield "pool"
        events.append("close pool")

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        events.append("open conn")
        yield f"conn of {pool}"
        await anyio.sleep(0.001)  # a cleanup that waits
        events.append("close conn")

    @lc.resource
    def tx(conn: str) -> str:
        return f"tx on {conn}"

    async with lc.run():
        async with lc.scope() as s:
            assert await s.get(tx) == "tx on conn of pool"
        events.append("scope over")
    assert events == ["open pool", "open conn", "close conn", "scope over", "close pool"]
    stats = lc.stats().resources
    assert (stats["conn"].opened, stats["conn"].closed, stats["conn"].in_use) == (1, 1, 0)


async def test_waiting_cleanup_finishes_when_the_scope_is_cancelled() -> None:
    """A cancelled task group does not cut a cleanup short; the cancellation comes after it."""
    lc = tether.Lifecycle()
    events: list[str] = []
    holding = anyio.Event()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
        finally:
            await anyio.sleep(0.01)
            events.append("returned")

    async def job() -> None:
        async with lc.scope() as s:
            await s.get(conn)
            holding.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(job)
        await holding.wait()
        tg.cancel_scope.cancel()
    assert events == ["returned"]


async def test_hanging_cleanup_is_bounded_by_close_timeout() -> None:
    """A cleanup still running at close_timeout is abandoned and reported as a TimeoutError."""
    lc = tether.Lifecycle(close_timeout=0.1)

    @lc.resource
    async def stuck() -> AsyncIterator[str]:
        yield "stuck"
        await anyio.sleep_forever()

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=close_timeout("stuck", "0.1")):
        async with lc.scope() as s:
            await s.get(stuck)
    assert 0.09 < time.perf_counter() - t0 < 1
    assert lc.stats().resources["stuck"].timeouts == 1


async def test_generator_that_yields_twice_fails_its_cleanup() -> None:
    """A generator that yields a second time is closed and reported, as on asyncio."""
    lc = tether.Lifecycle()
    closed: list[str] = []

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
            yield "again"
        finally:
            closed.append("conn")

    expected = re.escape(
        "Resource 'conn': its generator yielded more than once. A generator resource "
        "yields its value once (`yield value`), then cleans up: look for a second `yield` "
        "(in a loop, or in a `finally` or an `except` after the first one). tether closed the "
        "generator."
    )
    with pytest.raises(RuntimeError, match=rf"^{expected}$"):
        async with lc.scope() as s:
            await s.get(conn)
    assert closed == ["conn"]


async def test_testing_running_is_the_app_scope_on_trio() -> None:
    """`tether.testing.running` holds the app scope on trio too (no task to hand it to)."""
    from tether.testing import running

    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    async with running(lc):
        assert lc.get(pool) == "pool"
        assert lc.state.value == "running"
    assert lc.state.value == "closed"


def test_a_fastapi_app_on_trio_outlives_a_slow_request() -> None:
    """A FastAPI app served on trio (`TestClient(backend="trio")`, hypercorn's trio worker):
    a request that runs past the moment tether starts watching for disconnects (asyncio
    only) leaves the app running (before, the watcher's `asyncio` call failed in the app
    scope's task group, which closed every app resource under the running server)."""
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    lc = tether.Lifecycle(sweep_interval=0.05)
    events: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        events.append("close pool")

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        yield f"conn of {pool}"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/slow")
    async def slow(c: str = Depends(conn)) -> str:
        await anyio.sleep(0.5)
        return c

    with TestClient(app, backend="trio") as client:
        assert client.get("/slow").json() == "conn of pool"
        time.sleep(0.2)
        assert (lc.state, events) == (tether.State.RUNNING, [])
        assert client.get("/slow").json() == "conn of pool"
    assert events == ["close pool"]
