"""An ``idempotent`` server-sent events endpoint (FastAPI 0.137+) whose first attempt lost
its connection: that attempt's values close before the retry opens its own, as on any
route. Before, they stayed open (a connection checked out) until the retried stream ended:
on a pool at its limit the retry waited for its own first connection and answered 503."""

from collections.abc import AsyncIterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tether.fastapi import idempotent

sse = pytest.importorskip("fastapi.sse", reason="FastAPI streams server-sent events from 0.137 on")


def test_the_failed_attempt_closes_before_the_retry() -> None:
    lc = tether.Lifecycle()
    events: list[str] = []
    opened = {"tx": 0, "flaky": 0}

    @lc.resource
    async def tx() -> AsyncIterator[int]:
        opened["tx"] += 1
        n = opened["tx"]
        events.append(f"open tx{n}")
        try:
            yield n
        except BaseException as exc:
            events.append(f"rollback tx{n} ({type(exc).__name__})")
            raise
        else:
            events.append(f"commit tx{n}")

    @lc.resource
    async def flaky(tx: int) -> int:
        opened["flaky"] += 1
        if opened["flaky"] == 1:
            raise tether.ResourceUnavailable("lost", resource="flaky", lost=True)
        return 1

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/events", response_class=sse.EventSourceResponse)
    @idempotent
    async def stream(
        t: Annotated[int, Depends(tx)], f: Annotated[int, Depends(flaky)]
    ) -> AsyncIterator[dict[str, int]]:
        for i in range(2):
            events.append(f"yield {i} (tx{t})")
            yield {"i": i}

    with TestClient(app) as client:
        answer = client.get("/events")
        assert answer.status_code == 200
        assert answer.text.count("data: ") == 2
        assert lc.stats().units_in_flight == 0
    assert events == [
        "open tx1",
        "rollback tx1 (ResourceUnavailable)",
        "open tx2",
        "yield 0 (tx2)",
        "yield 1 (tx2)",
        "commit tx2",
    ]
