"""starlette-raw: hand-written acquire/release in plain Starlette handlers: the absolute floor."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench import common
from bench.common import C, D, E, F, G, Null


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.pg = await common.open_pg_pool()
    app.state.sqlite = await common.SqlitePool.open()
    try:
        yield
    finally:
        await app.state.sqlite.close()
        await common.close_pg_pool(app.state.pg)


async def none(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def null(request: Request) -> JSONResponse:
    n = Null()
    return JSONResponse({"ok": n is not None})


async def pg(request: Request) -> JSONResponse:
    async with request.app.state.pg.acquire() as conn:
        v = await conn.fetchval(common.PG_QUERY)
    return JSONResponse({"v": v})


async def sqlite(request: Request) -> JSONResponse:
    pool = request.app.state.sqlite
    conn = await pool.acquire()
    try:
        v = await common.sqlite_value(conn)
    finally:
        pool.release(conn)
    return JSONResponse({"v": v})


async def graph7(request: Request) -> JSONResponse:
    c = C()
    d = D(c)
    e = E(c, d)
    f = F(c, d, e)
    g = G(c, d, e, f)
    with common.h_context(c, d) as h:
        async with common.i_context(e, f) as i:
            ok = common.graph_ok(c, c, c, d, d, e, f, g, h, i)
    return JSONResponse({"ok": ok})


app = Starlette(
    routes=[
        Route("/none", none),
        Route("/null", null),
        Route("/pg", pg),
        Route("/sqlite", sqlite),
        Route("/graph7", graph7),
    ],
    lifespan=lifespan,
)
