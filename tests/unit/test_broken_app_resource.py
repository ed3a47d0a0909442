"""An app resource whose generator keeps a task of its own around its yield (a token
refresher, a listener), as docs/operations.md supports, and that task fails.

Before, the service hung: the resource's own task group cancelled the task that held it, so
its dependents were closed at once, it was never closed (its ``finally`` never ran), its
error was never logged, every request got a 503 "shutting down", liveness stayed 200, and
the shutdown waited for it for ever (uvicorn until SIGKILL, ``lc.run()`` never returned).
Now it is closed at once, in its own task, its failure is logged naming it, and the app runs
on without it: what needs it answers 503, both probes fail, and the shutdown is prompt."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tether.fastapi import health_router

pytestmark = pytest.mark.anyio


def refreshing(
    events: list[str], *, fails_after: float | None, group: str = "anyio"
) -> tuple[tether.Lifecycle, tether.Resource[str]]:
    """base <- token (a task group around its yield, anyio's or asyncio's, its refresher
    failing after *fails_after* seconds, never if None) <- api."""
    lc = tether.Lifecycle(close_timeout=2)

    @lc.resource(scope="app")
    async def base() -> AsyncIterator[str]:
        try:
            yield "base"
        finally:
            events.append("close base")

    @lc.resource(scope="app")
    async def token(base: str) -> AsyncIterator[str]:
        async def refresh() -> None:
            if fails_after is None:
                await anyio.sleep_forever()
            await anyio.sleep(fails_after)
            raise ConnectionError("auth server unreachable")

        if group == "asyncio":  # Python's own: it cancels the task itself, not a scope
            async with asyncio.TaskGroup() as native:
                refreshing = native.create_task(refresh())
                try:
                    yield "token"
                finally:
                    events.append("close token")
                    refreshing.cancel()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh)
            try:
                yield "token"
            finally:
                events.append("close token")
                tg.cancel_scope.cancel()

    @lc.resource(scope="app")
    async def api(token: str) -> AsyncIterator[str]:
        try:
            yield f"api with {token}"
        finally:
            events.append("close api")

    return lc, token


BROKE = (
    "tether: app resource 'token' failed while the app ran: ConnectionError: auth server "
    "unreachable; it is closed, and the app goes on without it: what needs it answers 503, "
    "/health/ready and /health/live fail, so that the process is restarted"
)
DEPENDS = (
    "App resource 'api' depends on 'token', which failed while the app ran: 'token' is "
    "closed, and opens again only when the process restarts (/health/live fails for that)."
)
DOWN = (
    "App resource 'token' failed while the app ran (ConnectionError: auth server unreachable): "
    "it is closed, and opens again only when the process restarts (/health/live fails for "
    "that)."
)


@pytest.mark.parametrize("group", ["anyio", "asyncio"])
async def test_a_task_of_an_app_resource_failing_closes_it_and_the_app_goes_on(
    caplog: pytest.LogCaptureFixture, group: str
) -> None:
    """With anyio's task group or Python's own `asyncio.TaskGroup` (which cancels the task
    itself: it shut the whole app scope down under the running server, every route 500)."""
    events: list[str] = []
    lc, token = refreshing(events, fails_after=0.1, group=group)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            with anyio.fail_after(5):
                while "close token" not in events:
                    await anyio.sleep(0.02)
            assert events == ["close token"]  # at once, and it alone
            with pytest.raises(tether.ResourceUnavailable) as info:
                lc.get(token)
            assert str(info.value) == DOWN
            with pytest.raises(tether.ResourceUnavailable) as info:  # built on it: no more
                lc.get(lc.resources["api"])
            assert str(info.value) == DEPENDS
            assert lc.get(lc.resources["base"]) == "base"
            report = await lc.health()
            assert not report.ok
    assert events == ["close token", "close api", "close base"]  # each once, in order
    assert time.monotonic() - started < 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [BROKE]
    assert errors[0].exc_info is not None  # with the task group's traceback


async def test_a_task_failing_while_the_app_starts_fails_the_start_naming_it() -> None:
    """...and a resource still opening is stopped, not waited for (it was a bare
    `RuntimeError: generator didn't yield`, after the other one had opened)."""
    events: list[str] = []
    lc, token = refreshing(events, fails_after=0.1)

    @lc.resource(scope="app")
    async def slow() -> AsyncIterator[str]:
        await anyio.sleep(30)
        yield "slow"  # pragma: no cover

    started = time.monotonic()
    with pytest.raises(tether.StartupError) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert str(info.value).startswith(
        "App resource 'token' failed to open: ConnectionError: auth server unreachable."
    )
    assert time.monotonic() - started < 10
    assert events.count("close token") == 1


def test_served_the_probes_fail_and_what_needs_it_answers_503() -> None:
    events: list[str] = []
    lc, token = refreshing(events, fails_after=0.1)
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc))

    @app.get("/token")
    async def use(t: Annotated[str, Depends(token)]) -> str:
        return t  # pragma: no cover

    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while "close token" not in events and time.monotonic() < deadline:
            time.sleep(0.02)
        r = client.get("/token")
        assert (r.status_code, r.json()["detail"]) == (503, DOWN)
        assert client.get("/health/ready").status_code == 503
        live = client.get("/health/live")
        assert (live.status_code, live.json()["broken"]) == (503, ["token"])
    assert events == ["close token", "close api", "close base"]


async def test_cancelled_from_outside_a_healthy_task_group_resource_closes_in_order() -> None:
    """The app scope's caller cancelled (a worker stopped by SIGTERM) while `token` keeps a
    healthy task group, and `api` depends on it: it hung for ever, `base` closed before
    `token`; or, without a dependent, a clean cancel was logged as a failed cleanup."""
    events: list[str] = []
    lc, token = refreshing(events, fails_after=None)
    started = time.monotonic()
    with anyio.move_on_after(0.3) as scope:
        async with lc.run():
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert events == ["close api", "close token", "close base"]
    assert time.monotonic() - started < 5


async def test_an_override_that_breaks_answers_as_the_resource_would() -> None:
    """An app resource overridden before the start (a fake with its own task group) that
    breaks: the resource's 503, not a ScopeError saying it was overridden while running."""
    events: list[str] = []
    lc, token = refreshing(events, fails_after=None)
    fake_events: list[str] = []
    _, fake = refreshing(fake_events, fails_after=0.1)
    with lc.override(token, fake.factory):
        async with lc.run():
            with anyio.fail_after(5):
                while "close token" not in fake_events:
                    await anyio.sleep(0.02)
            with pytest.raises(tether.ResourceUnavailable) as info:
                lc.get(token)
    assert str(info.value) == DOWN
