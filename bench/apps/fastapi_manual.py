"""fastapi-manual: the same hand-written code in FastAPI routes with no dependency.

The floor for anything built on FastAPI.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request

from bench import common
from bench.common import C, D, E, F, G, Null


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pg = await common.open_pg_pool()
    app.state.sqlite = await common.SqlitePool.open()
    try:
        yield
    finally:
        await app.state.sqlite.close()
        await common.close_pg_pool(app.state.pg)


app = FastAPI(lifespan=lifespan)


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null():
    n = Null()
    return {"ok": n is not None}


@app.get("/pg")
async def pg(request: Request):
    async with request.app.state.pg.acquire() as conn:
        v = await conn.fetchval(common.PG_QUERY)
    return {"v": v}


@app.get("/sqlite")
async def sqlite(request: Request):
    pool = request.app.state.sqlite
    conn = await pool.acquire()
    try:
        v = await common.sqlite_value(conn)
    finally:
        pool.release(conn)
    return {"v": v}


@app.get("/graph7")
async def graph7():
    c = C()
    d = D(c)
    e = E(c, d)
    f = F(c, d, e)
    g = G(c, d, e, f)
    with common.h_context(c, d) as h:
        async with common.i_context(e, f) as i:
            ok = common.graph_ok(c, c, c, d, d, e, f, g, h, i)
    return {"ok": ok}
