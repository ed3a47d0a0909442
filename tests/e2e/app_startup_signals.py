"""An app whose last app resource cannot open yet (its backend is not up): it retries at
startup, each attempt hanging until its timeout=, when the server is sent a signal."""

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI

import tether


def say(event: str) -> None:
    print(f"EVENT {event}", flush=True)


lc = tether.Lifecycle()
attempts = 0


@lc.resource(scope="app")
async def settings() -> AsyncIterator[str]:
    say("settings open")
    yield "settings"
    say("settings close")


@lc.resource(scope="app", retries=6, timeout=2, backoff=0.1)
async def backend(settings: str) -> AsyncIterator[str]:
    global attempts
    attempts += 1
    say(f"backend attempt {attempts}")
    await asyncio.sleep(100)  # a connect to a server that is not up: never answered
    yield "backend"


app = FastAPI(lifespan=lc.lifespan)
