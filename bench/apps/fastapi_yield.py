"""fastapi-yield: ``Depends`` on async generators, with the pools on ``app.state``.

The FastAPI tutorial pattern. The graph's C..G are ``async def`` dependencies, H a sync generator
(FastAPI runs it in its threadpool) and I an async generator, as in wireup's FastAPI setup.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import aiosqlite
import asyncpg
from fastapi import Depends, FastAPI, Request

from bench import common
from bench.common import C, D, E, F, G, H, I, Null


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


async def get_null() -> AsyncIterator[Null]:
    yield Null()


async def get_pg(request: Request) -> AsyncIterator[asyncpg.Connection]:
    async with request.app.state.pg.acquire() as conn:
        yield conn


async def get_sqlite(request: Request) -> AsyncIterator[aiosqlite.Connection]:
    pool = request.app.state.sqlite
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        pool.release(conn)


async def get_c() -> C:
    return C()


async def get_d(c: Annotated[C, Depends(get_c)]) -> D:
    return D(c)


async def get_e(c: Annotated[C, Depends(get_c)], d: Annotated[D, Depends(get_d)]) -> E:
    return E(c, d)


async def get_f(
    c: Annotated[C, Depends(get_c)],
    d: Annotated[D, Depends(get_d)],
    e: Annotated[E, Depends(get_e)],
) -> F:
    return F(c, d, e)


async def get_g(
    c: Annotated[C, Depends(get_c)],
    d: Annotated[D, Depends(get_d)],
    e: Annotated[E, Depends(get_e)],
    f: Annotated[F, Depends(get_f)],
) -> G:
    return G(c, d, e, f)


def get_h(c: Annotated[C, Depends(get_c)], d: Annotated[D, Depends(get_d)]) -> Iterator[H]:
    yield from common.make_h(c, d)


async def get_i(
    e: Annotated[E, Depends(get_e)], f: Annotated[F, Depends(get_f)]
) -> AsyncIterator[I]:
    async with common.i_context(e, f) as i:
        yield i


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null(n: Annotated[Null, Depends(get_null)]):
    return {"ok": n is not None}


@app.get("/pg")
async def pg(conn: Annotated[asyncpg.Connection, Depends(get_pg)]):
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
async def sqlite(conn: Annotated[aiosqlite.Connection, Depends(get_sqlite)]):
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
async def graph7(
    c: Annotated[C, Depends(get_c)],
    cc: Annotated[C, Depends(get_c)],
    ccc: Annotated[C, Depends(get_c)],
    d: Annotated[D, Depends(get_d)],
    dd: Annotated[D, Depends(get_d)],
    e: Annotated[E, Depends(get_e)],
    f: Annotated[F, Depends(get_f)],
    g: Annotated[G, Depends(get_g)],
    h: Annotated[H, Depends(get_h)],
    i: Annotated[I, Depends(get_i)],
):
    return {"ok": common.graph_ok(c, cc, ccc, d, dd, e, f, g, h, i)}
