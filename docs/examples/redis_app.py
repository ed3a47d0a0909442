"""A page-view counter and cache on Redis with tether. See docs/integrations/redis.md.

Run it against Redis::

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn docs.examples.redis_app:app

    curl -X POST localhost:8000/views/home
    curl localhost:8000/views/home
    curl localhost:8000/health/ready
"""

from __future__ import annotations

import os
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI

import tether
from tether.fastapi import health_router
from tether.integrations import redis as tredis


def redis_url() -> str:
    """Read when the app starts (never at import): secrets stay out of module state."""
    return os.environ["REDIS_URL"]


lc = tether.Lifecycle()

# One client for the app, over redis-py's pool: PING at startup (an unreachable server is
# a StartupError), PING as its health check, aclose() at shutdown. With max_connections a
# command waits up to pool_timeout for a free connection, then the request is a 503.
cache = tredis.client(
    lc,
    redis_url,
    max_connections=20,
    pool_timeout=2.0,
    decode_responses=True,
    client_name="views-example",
)
Redis = Annotated[aioredis.Redis, Depends(cache)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


@app.post("/views/{page}")
async def view(page: str, r: Redis) -> dict[str, int]:
    return {"views": await r.incr(f"views:{page}")}


@app.get("/views/{page}")
async def views(page: str, r: Redis) -> dict[str, int]:
    return {"views": int(await r.get(f"views:{page}") or 0)}
