"""An app whose readiness fails for `drain_delay` seconds after SIGTERM while it serves."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI

import tether
from tether.fastapi import health_router


def say(event: str) -> None:
    print(f"EVENT {event}", flush=True)


lc = tether.Lifecycle(drain_delay=3)


@lc.resource(scope="app")
async def pool() -> AsyncIterator[str]:
    say("pool open")
    yield "pool"
    say("pool close")


@lc.resource
async def conn(pool: str) -> AsyncIterator[str]:
    yield f"conn of {pool}"


app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


@app.get("/ok")
async def ok(c: Annotated[str, Depends(conn)]) -> dict[str, str]:
    return {"conn": c}
