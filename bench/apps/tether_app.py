"""tether: written against the public contract in DESIGN.md.

``lc.resource(scope="app")`` generators own the pools, ``lc.resource`` (request scope) generators
hand out one connection per request, and the app is ``FastAPI(lifespan=lc.lifespan)`` with
``Annotated[T, Depends(resource)]`` in the routes: the whole integration, as in the tutorial.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import aiosqlite
import asyncpg
from fastapi import Depends, FastAPI

import tether
from bench import common
from bench.common import C, D, E, F, G, H, I, Null, SqlitePool

lc = tether.Lifecycle()


@lc.resource(scope="app")
async def pg_pool() -> AsyncIterator[asyncpg.Pool | None]:
    pool = await common.open_pg_pool()
    try:
        yield pool
    finally:
        await common.close_pg_pool(pool)


@lc.resource(scope="app")
async def sqlite_pool() -> AsyncIterator[SqlitePool]:
    pool = await SqlitePool.open()
    try:
        yield pool
    finally:
        await pool.close()


@lc.resource
async def null() -> AsyncIterator[Null]:
    yield Null()


@lc.resource
async def pg_conn(pg_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pg_pool.acquire() as conn:
        yield conn


@lc.resource
async def sqlite_conn(sqlite_pool: SqlitePool) -> AsyncIterator[aiosqlite.Connection]:
    conn = await sqlite_pool.acquire()
    try:
        yield conn
    finally:
        sqlite_pool.release(conn)


# /graph7: C..G are plain async functions, H a sync generator, I an async generator; each
# resource's parameters name the resources it depends on.


@lc.resource
async def gc() -> C:
    return C()


@lc.resource
async def gd(gc: C) -> D:
    return D(gc)


@lc.resource
async def ge(gc: C, gd: D) -> E:
    return E(gc, gd)


@lc.resource
async def gf(gc: C, gd: D, ge: E) -> F:
    return F(gc, gd, ge)


@lc.resource
async def gg(gc: C, gd: D, ge: E, gf: F) -> G:
    return G(gc, gd, ge, gf)


# H is a sync context manager that does no I/O: tether runs it on the loop when asked
# (`thread=False`); by default a sync generator runs in a worker thread, as FastAPI's does.
@lc.resource(thread=False)
def gh(gc: C, gd: D) -> Iterator[H]:
    yield from common.make_h(gc, gd)


@lc.resource
async def gi(ge: E, gf: F) -> AsyncIterator[I]:
    async with common.i_context(ge, gf) as i:
        yield i


app = FastAPI(lifespan=lc.lifespan)


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null_route(n: Annotated[Null, Depends(null)]):
    return {"ok": n is not None}


@app.get("/pg")
async def pg(conn: Annotated[asyncpg.Connection, Depends(pg_conn)]):
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
async def sqlite(conn: Annotated[aiosqlite.Connection, Depends(sqlite_conn)]):
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
async def graph7(
    c: Annotated[C, Depends(gc)],
    cc: Annotated[C, Depends(gc)],
    ccc: Annotated[C, Depends(gc)],
    d: Annotated[D, Depends(gd)],
    dd: Annotated[D, Depends(gd)],
    e: Annotated[E, Depends(ge)],
    f: Annotated[F, Depends(gf)],
    g: Annotated[G, Depends(gg)],
    h: Annotated[H, Depends(gh)],
    i: Annotated[I, Depends(gi)],
):
    return {"ok": common.graph_ok(c, cc, ccc, d, dd, e, f, g, h, i)}
