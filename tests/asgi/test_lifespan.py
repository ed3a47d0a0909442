"""`lc.lifespan(wrap=user_lifespan)`: the app's own lifespan, inside tether's app scope."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

import tether


def _app(events: list[str], *, fail: bool = False) -> FastAPI:
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def settings() -> AsyncIterator[dict[str, str]]:
        events.append("open settings")
        yield {"greeting": "hello"}
        events.append("close settings")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append(f"app startup sees {lc.get(settings)['greeting']!r}")
        if fail:
            raise RuntimeError("cache warm-up failed")
        yield {"visits": [0]}
        events.append("app shutdown")

    app = FastAPI(lifespan=lc.lifespan(wrap=lifespan))

    @app.get("/")
    async def root(
        request: Request, s: Annotated[dict[str, str], Depends(settings)]
    ) -> dict[str, Any]:
        request.state.visits[0] += 1
        return {"greeting": s["greeting"], "visits": request.state.visits[0]}

    return app


def test_the_wrapped_lifespan_runs_inside_the_app_scope_and_its_state_reaches_requests() -> None:
    """App resources open before the app's own lifespan starts (it may use them) and close
    after it ends; the state it yields is every request's `request.state`."""
    events: list[str] = []
    with TestClient(_app(events)) as client:
        assert client.get("/").json() == {"greeting": "hello", "visits": 1}
        assert client.get("/").json() == {"greeting": "hello", "visits": 2}
    assert events == [
        "open settings",
        "app startup sees 'hello'",
        "app shutdown",
        "close settings",
    ]


def test_a_wrapped_lifespan_that_fails_closes_the_app_resources() -> None:
    """The app's own startup failing fails the start with its error, and what tether opened
    is closed."""
    events: list[str] = []
    with (
        pytest.raises(RuntimeError, match=r"^cache warm-up failed$"),
        TestClient(_app(events, fail=True)),
    ):
        pass  # pragma: no cover
    assert events == ["open settings", "app startup sees 'hello'", "close settings"]


@pytest.mark.anyio
async def test_lc_lifespan_of_the_app_runs_the_wrapped_lifespan_too() -> None:
    """`async with lc.lifespan(app):` (around httpx's `ASGITransport`, which runs no
    lifespan) of an app made with `lc.lifespan(wrap=...)` runs the app's own lifespan too,
    as the server does (before: tether's alone, so the app's startup never ran)."""
    events: list[str] = []
    app = _app(events)
    lc = app.router.lifespan_context.__tether_wraps__[0]  # type: ignore[attr-defined]
    async with lc.lifespan(app) as state:
        assert state == {"visits": [0]}  # the wrapped lifespan's
        assert events == ["open settings", "app startup sees 'hello'"]
    assert events[-2:] == ["app shutdown", "close settings"]
