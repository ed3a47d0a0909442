"""An app with app resources in a chain (settings <- cache <- feed) and a request resource
on `cache`, a request of which sleeps: for a forced exit (a second Ctrl-C) mid-request."""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI

import tether


def say(event: str) -> None:
    print(f"EVENT {event}", flush=True)


lc = tether.Lifecycle()


@lc.resource(scope="app")
async def settings() -> AsyncIterator[str]:
    say("settings open")
    yield "settings"
    say("settings close")


@lc.resource(scope="app")
async def cache(settings: str) -> AsyncIterator[str]:
    say("cache open")
    yield "cache"
    say("cache close")


@lc.resource(scope="app")
async def feed(cache: str) -> AsyncIterator[str]:
    say("feed open")
    yield "feed"
    say("feed close")


@lc.resource
async def marker(cache: str) -> AsyncIterator[str]:
    say("marker open")
    try:
        yield "marker"
    finally:
        say("marker close")


app = FastAPI(lifespan=lc.lifespan)


@app.get("/sleep")
async def sleep(m: Annotated[str, Depends(marker)], f: Annotated[str, Depends(feed)]) -> dict:
    say("sleep start")
    await asyncio.sleep(5)
    return {"slept": m}
