"""Streamed httpx responses left open when their unit of work ends are closed by tether
(tether.integrations.httpx), against a real uvicorn upstream (tests/serving.py); streams
read correctly, or handed to the response body, are left alone."""

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

import tether
import tether.fastapi
from tests.serving import Server
from tether.integrations import httpx as thttpx

pytestmark = pytest.mark.anyio

BODY = b"".join(b"%04d;" % i for i in range(40))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("tests.integration.app_httpx_streams:app", tmp_path_factory.mktemp("up"))
    yield server
    server.stop()


def leaked(unit: str, url: str, line: int, function: str) -> str:
    return (
        f"tether: {unit} ended with a streamed response of httpx client 'http' still open "
        f"(GET {url}, opened at {__file__}:{line} in {function}): tether closed it, so its "
        f"connection went back to the pool. Read it within `async with client.stream(...)`, "
        f"or close it: `await response.aclose()`."
    )


def line_of(marker: str) -> int:
    """The line of this file marked ``# opened: <marker>``."""
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.endswith(f"# opened: {marker}"))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tether" and r.levelno >= logging.WARNING
    ]


def make_app(upstream: Server) -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle()
    http = thttpx.client(
        lc,
        base_url=upstream.base_url.replace("http://", "http://user:pw-123@"),
        limits=httpx.Limits(max_connections=2),
        timeout=httpx.Timeout(5.0, pool=0.5),
    )
    H = Annotated[httpx.AsyncClient, Depends(http)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/sent")
    async def sent(c: H) -> dict[str, int]:
        r = await c.send(c.build_request("GET", "/chunks?n=3"), stream=True)  # opened: sent
        return {"status": r.status_code}  # never read nor closed

    @app.get("/entered")
    async def entered(c: H) -> dict[str, int]:
        r = await c.stream("GET", "/chunks", params={"n": 3}).__aenter__()  # opened: entered
        return {"status": r.status_code}  # never exited

    @app.get("/failed")
    async def failed(c: H) -> None:
        await c.send(c.build_request("GET", "/chunks?n=3"), stream=True)  # opened: failed
        raise HTTPException(409, "taken")

    @app.get("/within")
    async def within(c: H) -> dict[str, int]:
        async with c.stream("GET", "/chunks", params={"n": 3}) as r:
            return {"status": r.status_code}  # closed unread by the context manager

    @app.get("/read")
    async def read(c: H) -> dict[str, str]:
        r = await c.send(c.build_request("GET", "/chunks?n=3"), stream=True)
        try:
            return {"body": (await r.aread()).decode()}
        finally:
            await r.aclose()

    @app.get("/proxy")
    async def proxy(c: H) -> StreamingResponse:
        r = await c.send(c.build_request("GET", "/chunks?n=40"), stream=True)
        return StreamingResponse(r.aiter_raw(), background=BackgroundTask(r.aclose))

    @app.get("/proxy-kept")
    @tether.fastapi.release("response")
    async def proxy_kept(c: H) -> StreamingResponse:
        r = await c.send(c.build_request("GET", "/chunks?n=40"), stream=True)
        return StreamingResponse(r.aiter_raw(), background=BackgroundTask(r.aclose))

    @app.get("/relayed")
    async def relayed(c: H) -> StreamingResponse:
        r = await c.send(c.build_request("GET", "/chunks?n=40"), stream=True)

        async def body() -> AsyncIterator[bytes]:  # reads it after the handler returned
            async for chunk in r.aiter_bytes():
                yield chunk

        return StreamingResponse(body())

    @app.get("/opened-in-body")
    async def opened_in_body(c: H) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with c.stream("GET", "/chunks", params={"n": 40}) as r:
                async for chunk in r.aiter_bytes():
                    yield chunk

        return StreamingResponse(body())

    return app, lc


async def in_use(lc: tether.Lifecycle) -> Any:
    return lc.stats().pools["http"].in_use


async def test_streams_left_open_are_closed_when_the_request_ends(
    upstream: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool of two, four requests each leaving a streamed response open: all answered
    (without tether, the fourth waits the pool timeout: 503), the pool empty after, one
    warning per stream naming the route, the URL (password redacted), where it was opened
    and the fix, and each counted as a leak of the client."""
    app, lc = make_app(upstream)
    url = f"http://user:***@127.0.0.1:{upstream.port}/chunks"
    caplog.set_level(logging.INFO, logger="tether")
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
    ):
        for path in ("/sent", "/entered", "/sent", "/entered"):
            response = await client.get(path)
            assert response.status_code == 200, response.text
        assert await in_use(lc) == 0
        assert lc.stats().resources["http"].leaks == 4
        sent = leaked("GET /sent", url, line_of("sent"), "sent")
        entered = leaked("GET /entered", url, line_of("entered"), "entered")
        assert warnings_of(caplog) == [sent, entered] * 2
        assert "pw-123" not in caplog.text

        # A request failing after leaving one: closed too, the failure answered as it was.
        caplog.clear()
        response = await client.get("/failed")
        assert (response.status_code, response.json()) == (409, {"detail": "taken"})
        assert await in_use(lc) == 0
        assert lc.stats().resources["http"].leaks == 5
        failed = leaked("GET /failed", url, line_of("failed"), "failed")
        assert warnings_of(caplog) == [failed]


async def test_streams_read_or_closed_are_left_alone(
    upstream: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """`async with client.stream()`, and a stream read and closed by hand: no warning, no
    leak, the pool empty after; many in a row on a pool of two."""
    app, lc = make_app(upstream)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
    ):
        for _ in range(5):
            assert (await client.get("/within")).json() == {"status": 200}
            assert (await client.get("/read")).json() == {"body": "0000;0001;0002;"}
        assert await in_use(lc) == 0
        assert lc.stats().resources["http"].leaks == 0
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("path", ["/proxy", "/proxy-kept", "/relayed", "/opened-in-body"])
async def test_a_stream_relayed_to_the_client_is_not_closed_under_it(
    upstream: Server, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A streamed response handed to the response's body (a proxy, the route released at
    the handler or at the response; a generator reading it after the handler returned; or
    opened in the body itself) is relayed whole: tether closes it only
    after the response's last byte, and then finds it closed (no warning): three in a row
    on a pool of two."""
    app, lc = make_app(upstream)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
    ):
        for _ in range(3):  # more than the pool's two connections
            async with client.stream("GET", path) as response:
                assert response.status_code == 200
                assert await response.aread() == BODY
        assert await in_use(lc) == 0
        assert lc.stats().resources["http"].leaks == 0
    assert warnings_of(caplog) == []


async def test_a_stream_left_open_in_a_scope_is_closed_at_its_end(
    upstream: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """In `lc.scope()` (a job, a test): closed when the block ends, named by its label.
    Outside any unit of work (the app scope's own code), a stream is left to its owner."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url=upstream.base_url, limits=httpx.Limits(max_connections=1))
    async with lc.run():
        c = lc.get(http)
        for _ in range(2):
            async with lc.scope("nightly job") as s:
                job = await s.get(http)
                await job.send(job.build_request("GET", "/chunks?n=2"), stream=True)  # opened: job
        assert await in_use(lc) == 0
        assert lc.stats().resources["http"].leaks == 2
        url = f"{upstream.base_url}/chunks"
        function = "test_a_stream_left_open_in_a_scope_is_closed_at_its_end"
        assert warnings_of(caplog) == [leaked("nightly job", url, line_of("job"), function)] * 2

        outside = await c.send(c.build_request("GET", "/chunks?n=2"), stream=True)
        assert not outside.is_closed
        assert await outside.aread() == b"0000;0001;"
        await outside.aclose()


async def test_a_stream_left_open_in_a_nested_scope_is_closed_at_its_end(
    upstream: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit per item inside a consumer's longer one (or per message of a WebSocket): a
    stream an item forgets is closed as that item's unit ends, named by its label. It went
    to the outer unit, open until the consumer ended: with a pool of one, the next item
    waited the pool timeout and failed (trial 24)."""
    lc = tether.Lifecycle()
    http = thttpx.client(
        lc, base_url=upstream.base_url, limits=httpx.Limits(max_connections=1), timeout=2
    )
    async with lc.run(), lc.scope("consumer"):
        for _ in range(2):
            async with lc.scope("item") as s:
                job = await s.get(http)
                await job.send(job.build_request("GET", "/chunks?n=2"), stream=True)  # opened: item
            assert await in_use(lc) == 0
    url = f"{upstream.base_url}/chunks"
    function = "test_a_stream_left_open_in_a_nested_scope_is_closed_at_its_end"
    assert warnings_of(caplog) == [leaked("item", url, line_of("item"), function)] * 2


async def test_a_stream_cut_short_by_the_client_going_away_is_closed_quietly(
    upstream: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit of work ended by the client going away (tether's ``ClientDisconnected``, as
    when a relayed body is cut short): its streams are closed, logged at INFO, not counted."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url=upstream.base_url, limits=httpx.Limits(max_connections=1))
    caplog.set_level(logging.INFO, logger="tether")
    async with lc.run():
        with pytest.raises(tether.ClientDisconnected):
            async with lc.scope("GET /relay") as s:
                c = await s.get(http)
                await c.send(c.build_request("GET", "/chunks?n=2"), stream=True)
                raise tether.ClientDisconnected("The client went away during GET /relay.")
        assert await in_use(lc) == 0
        assert lc.stats().resources["http"].leaks == 0
        assert warnings_of(caplog) == []
        assert (
            "tether: GET /relay ended (the client went away) with a streamed response of "
            f"httpx client 'http' still open (GET {upstream.base_url}/chunks): tether "
            "closed it." in caplog.messages
        )


async def test_callers_giving_up_together_leave_no_connection_slot_behind(
    upstream: Server,
) -> None:
    """Five requests hold a pool of five on a slow upstream, ten more wait; the holders are
    cancelled, then at the next turn the waiters (callers that all gave up, each request's
    task cancelled as its client left). httpcore left the connections it had given the
    waiters connecting for good: every later call a 503 with the upstream healthy (trial
    25, encode/httpcore#1093). tether drops them: the pool serves."""
    import asyncio

    lc = tether.Lifecycle()
    http = thttpx.client(
        lc,
        base_url=upstream.base_url,
        limits=httpx.Limits(max_connections=5),
        timeout=httpx.Timeout(5, pool=1),
    )
    async with lc.run():
        c = lc.get(http)
        holders = [asyncio.create_task(c.get("/chunks?n=4&seconds=0.5")) for _ in range(5)]
        await asyncio.sleep(0.3)
        waiters = [asyncio.create_task(c.get("/chunks?n=1")) for _ in range(10)]
        await asyncio.sleep(0.3)
        for task in holders:
            task.cancel()
        await asyncio.sleep(0)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*holders, *waiters, return_exceptions=True)
        answers = await asyncio.gather(*(c.get("/chunks?n=1") for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5
        assert lc.stats().pools["http"].in_use == 0
