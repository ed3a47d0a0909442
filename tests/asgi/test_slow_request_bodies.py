"""A request body that arrives slowly (a phone's upload, a form over a slow link) on a route
that uses a request resource.

tether listens for the client going away on requests that run longer than
``tether.fastapi.WATCH_AFTER`` (0.2 s), once their body has been read. It took a body whose
read had not ended for one read in full (Starlette sets ``request._form = None`` as it makes
the request), and so read the rest of the body itself, in competition with the app: the app
then waited for ever (trial 18: any body over about 64 KB taking over 0.2 s, JSON, ``body()``,
``stream()``, a COPY import holding its connection mid-COPY). Served here from a task of its
own with a ``receive`` that gives the body in pieces, as uvicorn does.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI, Request

import tether
from tests.inprocess import http_scope

pytestmark = pytest.mark.anyio

BODY = json.dumps({f"k{i}": "x" * 20 for i in range(3000)}).encode()  # about 80 KB


def make() -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle()

    @lc.resource
    async def thing() -> AsyncIterator[str]:
        yield "thing"

    app = FastAPI(lifespan=lc.lifespan)
    Thing = Annotated[str, Depends(thing)]

    @app.post("/json")
    async def as_json(body: dict[str, str], t: Thing) -> int:
        return len(body)

    @app.post("/body")
    async def as_bytes(request: Request, t: Thing) -> int:
        return len(await request.body())

    @app.post("/stream")
    async def as_stream(request: Request, t: Thing) -> int:
        return sum([len(chunk) async for chunk in request.stream()])

    return app, lc


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("path", "answer"), [("/json", 3000), ("/body", len(BODY)),
                                              ("/stream", len(BODY))])  # fmt: skip
async def test_a_body_arriving_slowly_is_read_by_the_app(path: str, answer: int) -> None:
    app, lc = make()
    pieces = [BODY[i : i + 16384] for i in range(0, len(BODY), 16384)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            await anyio.sleep(0.15)  # the whole body: 0.9 s, past WATCH_AFTER
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await anyio.sleep_forever()  # the client stays
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("POST", path)
    scope["headers"] = [
        (b"host", b"test"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    async with lc.lifespan(app):
        with anyio.fail_after(10):
            await asyncio.get_running_loop().create_task(app(scope, receive, send))
    assert sent[0]["status"] == 200, sent
    assert json.loads(sent[1]["body"]) == answer
