"""A gateway calling another HTTP service through tether's httpx client.

See docs/integrations/httpx.md. The file holds both services: ``upstream`` (a stand-in for
the service called) and ``app`` (the gateway, one ``httpx.AsyncClient`` for all its requests)::

    uvicorn docs.examples.httpx_app:upstream --port 8001
    UPSTREAM_URL=http://127.0.0.1:8001 uvicorn docs.examples.httpx_app:app

    curl localhost:8000/greet/ada
    curl localhost:8000/health/ready
"""

from __future__ import annotations

import os
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI

import tether
from tether.fastapi import health_router
from tether.integrations import httpx as thttpx

# --------------------------------------------------------------------------- the upstream

upstream = FastAPI()


@upstream.get("/health")
async def upstream_health() -> dict[str, str]:
    return {"status": "ok"}


@upstream.get("/names/{name}")
async def upstream_name(name: str) -> dict[str, str]:
    return {"name": name.capitalize()}


# --------------------------------------------------------------------------- the gateway

lc = tether.Lifecycle()

# One client for the app: made at startup (UPSTREAM_URL is read then, not at import), with
# explicit timeouts and pool limits, checked by GET /health on the upstream, closed at
# shutdown. An upstream that cannot be reached, or a pool with no connection free within
# the pool timeout, makes the request a 503 with Retry-After.
names = thttpx.client(
    lc,
    name="names",
    base_url=lambda: os.environ["UPSTREAM_URL"],
    timeout=httpx.Timeout(5.0, pool=1.0),
    limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
    health_url="/health",
)
Names = Annotated[httpx.AsyncClient, Depends(names)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


@app.get("/greet/{name}")
async def greet(name: str, client: Names) -> dict[str, str]:
    response = await client.get(f"/names/{name}")
    response.raise_for_status()
    return {"greeting": f"Hello, {response.json()['name']}!"}
