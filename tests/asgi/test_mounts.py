"""Routes of a sub-app mounted on the app (`app.mount`): tether serves them like the app's
own, whether the sub-app is mounted as it is or inside middleware."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

import tether


@pytest.mark.parametrize(
    "wrap",
    [lambda sub: sub, lambda sub: CORSMiddleware(sub, allow_origins=["*"]),
     lambda sub: GZipMiddleware(CORSMiddleware(sub, allow_origins=["*"]))],
    ids=["as-is", "in-middleware", "in-two-middlewares"],
)  # fmt: skip
def test_a_mounted_sub_app_gets_its_resources_and_closes_them(wrap: Any) -> None:
    events: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        events.append("open")
        try:
            yield "conn"
        finally:
            events.append("close")

    sub = FastAPI()

    @sub.get("/x")
    async def x(c: Annotated[str, Depends(conn)]) -> str:
        events.append("endpoint")
        return c

    app = FastAPI(lifespan=lc.lifespan)
    app.mount("/sub", wrap(sub))
    with TestClient(app) as client:
        r = client.get("/sub/x")
        assert (r.status_code, r.json()) == (200, "conn")
        assert events == ["open", "endpoint", "close"]
        assert lc.stats().resources["conn"].in_use == 0
