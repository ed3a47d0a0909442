"""An asyncpg app served by a real uvicorn (tests/serving.py) for the disconnect tests.

Its DSN and application_name come from the environment, read when the lifespan starts.
"""

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

import tether
from tether.integrations import asyncpg as tpg

lc = tether.Lifecycle(drain_timeout=float(os.environ.get("TETHER_TEST_DRAIN", "30")))
pool = tpg.pool(
    lc,
    lambda: os.environ["TETHER_TEST_DSN"],
    min_size=1,
    max_size=int(os.environ.get("TETHER_TEST_MAX_SIZE", "2")),
    server_settings={"application_name": os.environ.get("TETHER_TEST_APP_NAME", "tether-test")},
)
conn = tpg.connection(lc, pool)
tx = tpg.connection(lc, pool, name="tx", transaction=True)
stream_tx = tpg.connection(lc, pool, name="stream_tx", transaction=True, release="response")

app = FastAPI(lifespan=lc.lifespan)

if os.environ.get("TETHER_TEST_MIDDLEWARE"):
    # A BaseHTTPMiddleware in the stack (pain.md T4.1: disconnects with and without one).
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import Response

    async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-mw"] = "1"
        return response

    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)

Conn = Annotated[asyncpg.Connection, Depends(conn)]
Tx = Annotated[asyncpg.Connection, Depends(tx)]

# The routes that write live on an included router, as most apps' routes do (FastAPI 0.137+
# serves them through per-inclusion copies of their apps).
writes = APIRouter()


@app.get("/sleep")
async def sleep(c: Conn, seconds: float = 5.0) -> dict[str, str]:
    await c.execute("SELECT pg_sleep($1)", seconds)
    return {"status": "slept"}


@writes.get("/sleep-tx")
async def sleep_tx(c: Tx, seconds: float = 5.0) -> dict[str, str]:
    await c.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (x int)")
    await c.execute("INSERT INTO scratch VALUES (1)")
    await c.execute("SELECT pg_sleep($1)", seconds)
    return {"status": "slept"}


class Sleep(BaseModel):
    seconds: float


@writes.post("/sleep-body")
async def sleep_body(c: Tx, body: Sleep) -> dict[str, str]:
    # A request with a body: FastAPI has read it when the endpoint runs, so the client's
    # going away can be listened for.
    await c.execute("SELECT pg_sleep($1)", body.seconds)
    return {"status": "slept"}


@app.get("/pid")
async def pid(c: Conn) -> dict[str, object]:
    # A clean connection is in no transaction: the server assigned no transaction id yet.
    row = await c.fetchrow(
        "SELECT pg_backend_pid() AS pid, pg_current_xact_id_if_assigned() IS NULL AS fresh_tx"
    )
    assert row is not None
    return {"pid": row["pid"], "fresh_tx": row["fresh_tx"] and not c.is_in_transaction()}


@writes.post("/write-slow/{table}/{key}")
async def write_slow(table: str, key: int, c: Tx, seconds: float = 0.3) -> dict[str, str]:
    # A write, then a slow query, in the unit of work's transaction (committed at the end).
    await c.execute(f"INSERT INTO {table} (k) VALUES ($1)", key)
    await c.execute("SELECT pg_sleep($1)", seconds)
    return {"status": "written"}


@writes.get("/write-then-stream/{table}/{key}")
async def write_then_stream(
    table: str, key: int, c: Annotated[asyncpg.Connection, Depends(stream_tx)]
) -> StreamingResponse:
    # A write, then a long body streamed in the same transaction: committed only if the
    # whole body goes out.
    await c.execute(f"INSERT INTO {table} (k) VALUES ($1)", key)

    async def body() -> AsyncIterator[bytes]:
        for i in range(3000):
            yield f"chunk {i} {await c.fetchval('SELECT $1::int', i)}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(body(), media_type="text/plain")


app.include_router(writes)
