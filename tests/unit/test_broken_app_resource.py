"""An app resource whose generator keeps a task of its own around its yield (a token
refresher, a listener), as docs/operations.md supports, and that task fails.

Before, the service hung: the resource's own task group cancelled the task that held it, so
its dependents were closed at once, it was never closed (its ``finally`` never ran), its
error was never logged, every request got a 503 "shutting down", liveness stayed 200, and
the shutdown waited for it for ever (uvicorn until SIGKILL, ``lc.run()`` never returned).
Now it is closed at once, in its own task, its failure is logged naming it, and the app runs
on without it: what needs it answers 503, both probes fail, and the shutdown is prompt."""

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
    events: list[str], *, fails_after: float
) -> tuple[tether.Lifecycle, tether.Resource[str]]:
    """base <- token (a task group around its yield, its refresher failing) <- api."""
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
            await anyio.sleep(fails_after)
            raise ConnectionError("auth server unreachable")

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
DOWN = (
    "App resource 'token' failed while the app ran (ConnectionError: auth server unreachable): "
    "it is closed, and opens again only when the process restarts (/health/live fails for "
    "that)."
)


async def test_a_task_of_an_app_resource_failing_closes_it_and_the_app_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    lc, token = refreshing(events, fails_after=0.1)
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
