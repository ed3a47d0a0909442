"""Slow clients on a stream, FastAPI's own way: a ``yield`` dependency that checks a connection out
of a pool of 5 and holds a transaction open on it.

- ``/a/...``: the handler queries before returning; the stream does not touch the database.
- ``/b/...``: the stream body queries the database while it streams.
- ``.../default``: ``Depends(conn)``: FastAPI's default scope, released after the response.
- ``.../function``: ``Depends(conn, scope="function")``: released when the handler returns.

``/_stats`` tells how many connections the app holds now and held at most.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from bench import common

held = common.CheckoutCounter()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pg = await common.open_pg_pool(
        common.STREAM_POOL_SIZE, server_settings={"application_name": common.STREAM_APP_NAME}
    )
    try:
        yield
    finally:
        await common.close_pg_pool(app.state.pg)


app = FastAPI(lifespan=lifespan)


async def get_conn(request: Request) -> AsyncIterator[asyncpg.Connection]:
    timeout = common.stream_config()["acquire_timeout"]
    async with request.app.state.pg.acquire(timeout=timeout) as conn:
        held.take()
        try:
            async with conn.transaction():
                yield conn
        finally:
            held.give()


Conn = Annotated[asyncpg.Connection, Depends(get_conn)]
ConnFunction = Annotated[asyncpg.Connection, Depends(get_conn, scope="function")]


@app.get("/a/default")
async def a_default(conn: Conn):
    await conn.fetchval("SELECT 1")
    return StreamingResponse(common.stream_body(None), media_type="application/octet-stream")


@app.get("/a/function")
async def a_function(conn: ConnFunction):
    await conn.fetchval("SELECT 1")
    return StreamingResponse(common.stream_body(None), media_type="application/octet-stream")


@app.get("/b/default")
async def b_default(conn: Conn):
    return StreamingResponse(common.stream_body(conn), media_type="application/octet-stream")


@app.get("/b/function")
async def b_function(conn: ConnFunction):
    return StreamingResponse(common.stream_body(conn), media_type="application/octet-stream")


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/_stats")
async def stats():
    return {"now": held.now, "max": held.max, "acquired": held.acquired}
