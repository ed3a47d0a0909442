"""A response whose body fails after it started: one tether line names the route and the
values that closed with the failure (the server's traceback names neither)."""

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

import tether
from tests.inprocess import http_scope

CUT = (
    "tether: GET /stream: the response failed (ConnectionError: database lost) after it "
    "started: the client gets it cut short, and 'session' closed with that failure (what was "
    "not committed is rolled back)"
)


def recorded_session(lc: tether.Lifecycle, closes: list[str], **options: Any) -> Any:
    """A request resource "session" that records how it closed."""

    @lc.resource(**options)
    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        except BaseException as exc:
            closes.append(f"rollback: {type(exc).__name__}")
            raise
        closes.append("commit")

    return session


def make_app(closes: list[str]) -> tuple[tether.Lifecycle, FastAPI]:
    lc = tether.Lifecycle()
    session = recorded_session(lc, closes, release="response")
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/stream")
    async def stream(s: Annotated[str, Depends(session)], fail: bool = True) -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            await anyio.sleep(0.05)
            if fail:
                raise ConnectionError("database lost")
            yield b"last\n"

        return StreamingResponse(body())

    return lc, app


async def serve(app: FastAPI, query: bytes, *, leave: bool = False) -> list[dict[str, Any]]:
    """One request; *leave*: the client goes away once the first chunk is out."""
    sent: list[dict[str, Any]] = []
    gone = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not hasattr(receive, "asked"):
            receive.asked = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b"", "more_body": False}
        if leave:
            await gone.wait()
            return {"type": "http.disconnect"}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            gone.set()

    scope = http_scope("GET", "/stream")
    scope["query_string"] = query
    try:
        await app(scope, receive, send)
    except ConnectionError:
        pass  # what the server gets, and logs with its traceback
    return sent


@pytest.mark.anyio
async def test_a_body_failing_mid_stream_is_named_with_its_route_and_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closes: list[str] = []
    lc, app = make_app(closes)
    async with lc.lifespan(app):
        with caplog.at_level(logging.WARNING, "tether"):
            sent = await serve(app, b"fail=true")
    assert sent[0]["status"] == 200
    assert closes == ["rollback: ConnectionError"]
    assert [r.getMessage() for r in caplog.records if r.name == "tether"] == [CUT]


@pytest.mark.anyio
async def test_a_client_leaving_a_stream_and_a_stream_that_ends_log_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closes: list[str] = []
    lc, app = make_app(closes)
    async with lc.lifespan(app):
        with caplog.at_level(logging.WARNING, "tether"):
            await serve(app, b"fail=false", leave=True)
            sent = await serve(app, b"fail=false")
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert closes == ["rollback: ClientDisconnected", "commit"]
    assert [r.getMessage() for r in caplog.records if r.name == "tether"] == []


def test_a_generator_endpoint_failing_mid_stream_is_named_with_what_it_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sse = pytest.importorskip("fastapi.sse", reason="generator endpoints are FastAPI 0.137+")
    from fastapi.testclient import TestClient

    closes: list[str] = []
    lc = tether.Lifecycle()
    session = recorded_session(lc, closes)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/stream", response_class=sse.EventSourceResponse)
    async def stream(s: Annotated[str, Depends(session)]) -> AsyncIterator[dict[str, int]]:
        yield {"a": 1}
        raise ConnectionError("database lost")

    with TestClient(app) as client, caplog.at_level(logging.WARNING, "tether"):
        with pytest.raises(Exception) as raised:
            client.get("/stream")
    assert raised.group_contains(ConnectionError) or isinstance(raised.value, ConnectionError)
    assert [c.split(":")[0] for c in closes] == ["rollback"]  # (FastAPI's task group's error)
    assert [r.getMessage() for r in caplog.records if r.name == "tether"] == [CUT]


@pytest.mark.anyio
async def test_a_stream_the_servers_shutdown_cancels_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn cancels a stream still running when its --timeout-graceful-shutdown runs out."""
    import asyncio

    closes: list[str] = []
    lc, app = make_app(closes)
    async with lc.lifespan(app):
        with caplog.at_level(logging.WARNING, "tether"):
            task = asyncio.get_running_loop().create_task(serve(app, b"fail=false"))
            await anyio.sleep(0.02)  # the first chunk is out
            task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
            with pytest.raises(asyncio.CancelledError):
                await task
    assert closes == ["rollback: CancelledError"]
    assert [r.getMessage() for r in caplog.records if r.name == "tether"] == [
        "tether: GET /stream: the response was cancelled by the server's shutdown (uvicorn's "
        "--timeout-graceful-shutdown ran out) after it started: the client gets it cut short, "
        "and 'session' closed with that failure (what was not committed is rolled back)"
    ]
