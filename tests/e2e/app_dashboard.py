"""An app with tether's dashboard, for the browser test: a request can be held open, and
the pool's check can be broken, from outside."""

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException

import tether
from tether.fastapi import dashboard_router

lc = tether.Lifecycle(leak_threshold=1.0, sweep_interval=0.1)


class Pool:
    def __init__(self) -> None:
        self.up = True
        self.release = anyio.Event()
        self.in_use = 0

    async def ping(self) -> None:
        if not self.up:
            raise ConnectionError("connection refused by 127.0.0.1:5432")


@lc.resource(scope="app", check=lambda p: p.ping())
async def pool() -> AsyncIterator[Pool]:
    yield Pool()


# The figures a driver's pool reports (an integration sets this on its pools).
pool.pool_stats = lambda p: tether.PoolStats(
    name="pool",
    max=4,
    open=p.in_use + 1,
    in_use=p.in_use,
    idle=1,
    waiting=None,
    created=5,
    discarded=1,
)


@lc.resource
async def conn(pool: Pool) -> AsyncIterator[Pool]:
    pool.in_use += 1
    try:
        yield pool
    finally:
        pool.in_use -= 1


def admin(x_token: Annotated[str, Header()] = "") -> None:
    if x_token != "let-me-in":
        raise HTTPException(401, "admins only")


app = FastAPI(lifespan=lc.lifespan)
app.include_router(dashboard_router(lc, refresh=0.2))
# The same figures again, behind a token.
app.include_router(dashboard_router(lc, prefix="/guarded", dependencies=[Depends(admin)]))


@app.get("/hold")
async def hold(c: Annotated[Pool, Depends(conn)]) -> str:
    """Holds its connection until /release."""
    await c.release.wait()
    c.release = anyio.Event()
    return "released"


@app.post("/release")
async def release() -> None:
    lc.get(pool).release.set()


@app.post("/break")
async def break_pool() -> None:
    lc.get(pool).up = False
