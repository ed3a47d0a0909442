"""Slow clients on a stream, tether's way: the same pool of 5 and the same connection resource
(a transaction held open on it), once with ``release="handler"`` and once with
``release="response"``; ``timeout`` bounds the wait for a connection (then 503 + Retry-After).

Routes as in ``stream_fastapi``: ``/a/...`` queries in the handler only, ``/b/...`` in the stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

import tether
from bench import common

held = common.CheckoutCounter()
ACQUIRE_TIMEOUT = common.stream_config()["acquire_timeout"]

lc = tether.Lifecycle()


@lc.resource(scope="app")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    p = await common.open_pg_pool(
        common.STREAM_POOL_SIZE, server_settings={"application_name": common.STREAM_APP_NAME}
    )
    try:
        yield p
    finally:
        await common.close_pg_pool(p)


@contextlib.asynccontextmanager
async def _connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn:
        held.take()
        try:
            async with conn.transaction():
                yield conn
        finally:
            held.give()


@lc.resource(release="handler", timeout=ACQUIRE_TIMEOUT)
async def conn_handler(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with _connection(pool) as conn:
        yield conn


@lc.resource(release="response", timeout=ACQUIRE_TIMEOUT)
async def conn_response(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with _connection(pool) as conn:
        yield conn


app = FastAPI(lifespan=lc.lifespan)

ConnHandler = Annotated[asyncpg.Connection, Depends(conn_handler)]
ConnResponse = Annotated[asyncpg.Connection, Depends(conn_response)]


@app.get("/a/handler")
async def a_handler(conn: ConnHandler):
    await conn.fetchval("SELECT 1")
    return StreamingResponse(common.stream_body(None), media_type="application/octet-stream")


@app.get("/a/response")
async def a_response(conn: ConnResponse):
    await conn.fetchval("SELECT 1")
    return StreamingResponse(common.stream_body(None), media_type="application/octet-stream")


@app.get("/b/handler")
async def b_handler(conn: ConnHandler):
    return StreamingResponse(common.stream_body(conn), media_type="application/octet-stream")


@app.get("/b/response")
async def b_response(conn: ConnResponse):
    return StreamingResponse(common.stream_body(conn), media_type="application/octet-stream")


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/_stats")
async def stats():
    return {"now": held.now, "max": held.max, "acquired": held.acquired}
