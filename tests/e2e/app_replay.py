"""A pure-ASGI middleware that reads the body and hands the app a `receive` replaying it,
on every call, without ever waiting (a common snippet), in front of a route with a request
resource (tests/e2e/test_replayed_body.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI

import tether

lc = tether.Lifecycle()


@lc.resource
async def conn() -> AsyncIterator[str]:
    yield "conn"


class ReplayBody:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


app = FastAPI(lifespan=lc.lifespan)
app.add_middleware(ReplayBody)


@app.get("/slow")
async def slow(c: Annotated[str, Depends(conn)]) -> str:
    await asyncio.sleep(0.5)  # long enough for tether to listen for the client leaving
    return c
