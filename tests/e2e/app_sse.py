"""Endpoints FastAPI streams as server-sent events (0.137+), with a request resource that
prints how it closed and whether the generator was still running then (tests/e2e/test_sse.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.sse import EventSourceResponse

import tether

lc = tether.Lifecycle()


@lc.resource
async def tx() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"running": False}
    try:
        yield state
    except BaseException:
        print(f"EVENT rollback running={state['running']}", flush=True)
        raise
    else:
        print(f"EVENT commit running={state['running']}", flush=True)


Tx = Annotated[dict[str, Any], Depends(tx)]
app = FastAPI(lifespan=lc.lifespan)


@app.get("/events", response_class=EventSourceResponse)
async def events(t: Tx, fail_at: int = -1, work: float = 0.0) -> AsyncIterator[dict[str, int]]:
    t["running"] = True
    try:
        for i in range(3):
            if i == fail_at:
                raise RuntimeError("boom in the generator")
            await asyncio.sleep(work)  # a query
            yield {"i": i}
    finally:
        t["running"] = False


@app.get("/sync-events", response_class=EventSourceResponse)
def sync_events(t: Tx, fail_at: int = -1, work: float = 0.0) -> Iterator[dict[str, int]]:
    for i in range(3):
        if i == fail_at:
            raise RuntimeError("boom in the generator")
        t["running"] = True  # a query, in FastAPI's worker thread
        time.sleep(work)
        t["running"] = False
        yield {"i": i}
