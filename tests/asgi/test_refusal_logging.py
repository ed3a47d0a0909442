"""The 503s of an outage, logged: the first refusal of a route for a resource in full, the
next ones within `tether.fastapi.QUIET` seconds counted and said in one line when that
window ends. Before, each refused request logged its own WARNING: 38 identical lines in a
20 s database outage at 2 requests per second, and in step with traffic."""

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
import tether.fastapi

pytestmark = pytest.mark.anyio


def make(
    down: dict[str, bool], *, pooled: bool = False, timed_out: bool = False
) -> tuple[FastAPI, tether.Lifecycle]:
    """`/a` and `/b` on a request resource `conn` refused while *down*, naming "pool"; with
    *pooled*, `conn` is opened from an app resource "pool", as the integrations' are."""
    lc = tether.Lifecycle(sweep_interval=0.05)

    async def refused_while_down() -> AsyncIterator[str]:
        if down["db"]:
            raise tether.ResourceUnavailable(
                "'pool' cannot reach the database", resource="pool", timed_out=timed_out
            )
        yield "conn"

    if pooled:

        @lc.resource(scope="app")
        async def pool() -> AsyncIterator[str]:
            yield "pool"

        @lc.resource
        async def conn(pool: str) -> AsyncIterator[str]:
            async for value in refused_while_down():
                yield value

    else:
        conn = lc.resource(name="conn")(refused_while_down)

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/a")
    async def a(c: Annotated[str, Depends(conn)]) -> str:
        return c

    @app.get("/b")
    async def b(c: Annotated[str, Depends(conn)]) -> str:
        return c

    return app, lc


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]


async def test_an_outage_logs_a_line_per_route_and_window_not_per_request(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tether.fastapi, "QUIET", 0.5)
    down = {"db": True}
    app, lc = make(down)
    caplog.set_level(logging.WARNING, logger="tether")
    transport = httpx.ASGITransport(app=app)
    async with lc.lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for _ in range(5):
            assert (await c.get("/a")).status_code == 503
        assert (await c.get("/b")).status_code == 503
        first = "ResourceUnavailable: 'pool' cannot reach the database"
        assert refusals(caplog) == [
            f"tether: GET /a answered 503: {first}",
            f"tether: GET /b answered 503: {first}",
        ]
        with anyio.fail_after(5):  # the window ends: its count said, once
            while len(refusals(caplog)) < 3:
                await anyio.sleep(0.05)
        await anyio.sleep(0.2)
        summary = refusals(caplog)[2]
        assert summary.startswith("tether: GET /a answered 503 4 more times in the last "), summary
        assert summary.endswith(f" s (not logged one by one; the last: {first})"), summary
        assert len(refusals(caplog)) == 3  # /b refused nothing more: no line for it
        down["db"] = False
        assert (await c.get("/a")).status_code == 200
        await anyio.sleep(1.2)  # a window with no refusal: the next is logged in full
        down["db"] = True
        assert (await c.get("/a")).status_code == 503
        assert refusals(caplog)[-1] == f"tether: GET /a answered 503: {first}"


async def test_what_a_window_counted_is_said_as_the_app_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refusals counted in a window the app stops in are said then, not lost."""
    app, lc = make({"db": True})
    caplog.set_level(logging.WARNING, logger="tether")
    transport = httpx.ASGITransport(app=app)
    async with lc.lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for _ in range(3):
            assert (await c.get("/a")).status_code == 503
        assert len(refusals(caplog)) == 1
    said = refusals(caplog)
    assert len(said) == 2, said
    assert said[1].startswith("tether: GET /a answered 503 2 more times in the last "), said


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tether" and r.levelno >= 30]


async def test_the_end_of_an_outage_is_said_once_after_what_its_windows_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = {"db": True}
    app, lc = make(down, pooled=True)
    caplog.set_level(logging.WARNING, logger="tether")
    transport = httpx.ASGITransport(app=app)
    async with lc.lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for path in ("/a", "/a", "/a", "/b"):
            assert (await c.get(path)).status_code == 503
        down["db"] = False
        await anyio.sleep(0.3)  # no request yet: nothing opened, the outage goes on
        assert not [line for line in lines(caplog) if "opens again" in line]
        assert (await c.get("/b")).status_code == 200
        with anyio.fail_after(5):
            while not [line for line in lines(caplog) if "opens again" in line]:
                await anyio.sleep(0.05)
        assert (await c.get("/a")).status_code == 200
        await anyio.sleep(0.3)
        said = lines(caplog)
        assert said[:2] == [
            "tether: GET /a answered 503: ResourceUnavailable: 'pool' cannot reach the database",
            "tether: GET /b answered 503: ResourceUnavailable: 'pool' cannot reach the database",
        ]
        assert said[2].startswith("tether: GET /a answered 503 2 more times in the last "), said
        assert said[3].startswith("tether: 'pool' opens again: 4 units of work refused for it "), (
            said
        )
        assert said[3].endswith(" s"), said
        assert len(said) == 4, said
        down["db"] = True  # a new outage: its first refusal logged in full again
        assert (await c.get("/a")).status_code == 503
        assert lines(caplog)[-1] == said[0]


async def test_a_pool_too_busy_for_its_traffic_is_no_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = {"db": True}
    app, lc = make(down, pooled=True, timed_out=True)
    caplog.set_level(logging.WARNING, logger="tether")
    transport = httpx.ASGITransport(app=app)
    async with lc.lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/a")).status_code == 503
        down["db"] = False
        assert (await c.get("/a")).status_code == 200
        await anyio.sleep(0.3)
    assert [line for line in lines(caplog) if "opens again" in line] == []
