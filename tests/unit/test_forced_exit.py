"""A forced exit: the server stops without its lifespan shutdown (uvicorn's second Ctrl-C
during the drain), and `asyncio.run` then cancels every task at once, tether's holder
tasks of the app resources included, in no set order.

Before, each holder took its cancel for its generator's own task group cancelling it: the
app resources closed at once, in task-cancel order (a resource before what uses it), and
each was logged at ERROR as "failed while the app ran". Now they close as at a shutdown:
what uses one first, each once, with one WARNING that says what happened."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest

import tether

pytestmark = pytest.mark.anyio


def _app(events: list[str]) -> tuple[tether.Lifecycle, tether.Resource[str]]:
    """settings <- cache <- feed (app resources), cache <- marker (a request resource)."""
    lc = tether.Lifecycle(close_timeout=2, drain_timeout=2)

    @lc.resource(scope="app")
    async def settings() -> AsyncIterator[str]:
        yield "settings"
        events.append("settings close")

    @lc.resource(scope="app")
    async def cache(settings: str) -> AsyncIterator[str]:
        yield "cache"
        events.append("cache close")

    @lc.resource(scope="app")
    async def feed(cache: str) -> AsyncIterator[str]:
        yield "feed"
        events.append("feed close")

    @lc.resource
    async def marker(cache: str) -> AsyncIterator[str]:
        try:
            yield "marker"
        except BaseException as exc:
            events.append(f"marker rollback {type(exc).__name__}")
            raise
        finally:
            events.append("marker close")

    return lc, marker


def _forced_exit(lc: tether.Lifecycle, marker: tether.Resource[str], app_first: bool) -> None:
    """Serve on a loop of its own with a unit of work in flight, then end the loop as
    `asyncio.run` does on a forced exit: every task cancelled at once (the holders of the
    app resources in open order, the app scope's task first or last), and awaited."""
    loop = asyncio.new_event_loop()
    try:
        up = asyncio.Event()
        in_flight = asyncio.Event()

        async def serve() -> None:
            async with lc.lifespan(None):
                up.set()
                await asyncio.Event().wait()  # the lifespan's `receive()`: no shutdown

        async def request() -> None:
            async with lc.scope("GET /sleep") as s:
                await s.get(marker)
                in_flight.set()
                await asyncio.sleep(60)

        async def start() -> asyncio.Task[None]:
            app = asyncio.create_task(serve(), name="lifespan")
            await up.wait()
            asyncio.create_task(request(), name="request")
            await in_flight.wait()
            return app

        app = loop.run_until_complete(start())
        by_name = {t.get_name(): t for t in asyncio.all_tasks(loop)}
        holders = [by_name[f"tether:{name}"] for name in ("settings", "cache", "feed")]
        others = [t for t in asyncio.all_tasks(loop) if t not in holders and t is not app]
        order = [app, *holders, *others] if app_first else [*holders, *others, app]
        for task in order:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*order, return_exceptions=True))
    finally:
        loop.close()


@pytest.mark.parametrize("app_first", [False, True], ids=["holders-first", "app-first"])
def test_a_forced_exit_closes_the_app_resources_as_a_shutdown(
    caplog: pytest.LogCaptureFixture, app_first: bool
) -> None:
    events: list[str] = []
    lc, marker = _app(events)
    with caplog.at_level(logging.INFO, logger="tether"):
        _forced_exit(lc, marker, app_first)
    closes = [e for e in events if "close" in e]
    # Each once, what uses one before it: the unit of work, then the reverse open order.
    assert closes == ["marker close", "feed close", "cache close", "settings close"], events
    assert "failed while the app ran" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in warned if "cancelled from outside" in m] == [
        "tether: the app scope was cancelled from outside, every task at once (a forced "
        "exit: the server stopped without its lifespan shutdown, a second Ctrl-C); the app "
        "resources are closed as at a shutdown, each after what uses it"
    ]
    assert lc.state is tether.State.CLOSED


@pytest.fixture
async def server_handler() -> AsyncIterator[list[float]]:
    """A SIGTERM handler registered through the running loop (a server's, as hypercorn's)."""
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: calls.append(time.perf_counter()))
    try:
        yield calls
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_a_def_open_stopped_by_sigterm_logs_no_retry(
    server_handler: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A `def` open's attempt that ends (its timeout=) after SIGTERM stopped the start is
    followed by no retry, and none is announced (before: "... retrying in 0.10 s")."""
    lc = tether.Lifecycle(close_timeout=3)
    attempts: list[float] = []

    @lc.resource(scope="app", retries=6, timeout=0.6, backoff=0.1)
    def hang() -> Iterator[str]:
        attempts.append(time.perf_counter())
        time.sleep(1.0)
        yield "hang"

    asyncio.get_running_loop().call_later(0.2, signal.raise_signal, signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.lifespan(None):
            pass
    assert len(attempts) == 1
    assert "retrying in" not in caplog.text, caplog.text
    assert "The start was interrupted by SIGTERM" in caplog.text
