"""A `ResourceUnavailable` the app's own code raises with a `retry_after` that is no finite
number of seconds: its 503 still goes out, with `Retry-After: 1` and a WARNING naming the
value (the declaration refuses such a value; an exception raised by hand is not checked)."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.routes import WrappingRoute

WARNING = (
    "tether: a ResourceUnavailable was raised with retry_after={!r}, which is not a finite "
    "number of seconds; its 503 is sent with Retry-After: 1. Raise it with a finite number "
    "of seconds, e.g. retry_after=1."
)


def app_raising(retry_after: Any, wrapping: bool) -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)
    if wrapping:
        app.router.route_class = WrappingRoute

    @app.get("/")
    async def root(c: Annotated[str, Depends(conn)]) -> str:
        raise tether.ResourceUnavailable(
            "upstream busy", resource="upstream", retry_after=retry_after
        )

    return app, lc


def served(app: FastAPI, lc: tether.Lifecycle) -> httpx.Response:
    async def main() -> httpx.Response:
        async with lc.lifespan(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get("/")

    return asyncio.run(main())


@pytest.mark.parametrize("wrapping", [False, True], ids=["handler", "handle"])
@pytest.mark.parametrize(
    ("given", "sent"),
    [(2.6, "3"), (0, "1"), (-5, "1"), ("7", "7"), (1e308, "86400"), (10**400, "86400")],
    ids=["rounded", "zero", "negative", "numeric-string", "huge", "huge-int"],
)
def test_a_finite_retry_after_is_sent_in_whole_seconds_from_1_to_a_day(
    given: Any, sent: str, wrapping: bool, caplog: pytest.LogCaptureFixture
) -> None:
    r = served(*app_raising(given, wrapping))
    assert r.status_code == 503
    assert r.json() == {"detail": "upstream busy"}
    assert r.headers["retry-after"] == sent
    assert "retry_after=" not in caplog.text


@pytest.mark.parametrize("wrapping", [False, True], ids=["handler", "handle"])
@pytest.mark.parametrize("given", [float("inf"), float("-inf"), float("nan"), "soon", None])
def test_a_retry_after_that_is_no_number_still_answers_503_with_1_second(
    given: Any, wrapping: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "tether"):
        r = served(*app_raising(given, wrapping))
    assert r.status_code == 503
    assert r.json() == {"detail": "upstream busy"}
    if given is None:  # no Retry-After asked for
        assert "retry-after" not in r.headers
        return
    assert r.headers["retry-after"] == "1"
    assert WARNING.format(given) in caplog.messages


@pytest.mark.parametrize("expose_errors", [True, False])
@pytest.mark.parametrize("where", ["factory", "endpoint"])
def test_raised_without_a_resource_name_is_a_503(where: str, expose_errors: bool) -> None:
    """`ResourceUnavailable("busy")` raised the natural way (no `resource=`) was a
    TypeError, a 500 (trial 16). Raised by a resource's factory it names that resource."""
    lc = tether.Lifecycle(expose_errors=expose_errors)

    @lc.resource
    async def upstream() -> AsyncIterator[str]:
        if where == "factory":
            raise tether.ResourceUnavailable("the upstream is busy", retry_after=5)
        yield "upstream"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(u: Annotated[str, Depends(upstream)]) -> str:
        raise tether.ResourceUnavailable("the upstream is busy", retry_after=5)

    response = served(app, lc)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    named = "'upstream'" if where == "factory" else "A resource"
    detail = (
        "the upstream is busy" if expose_errors else f"{named} is unavailable now. Retry later."
    )
    assert response.json() == {"detail": detail}
