"""wireup, through its FastAPI integration: ``Injected[T]`` in routes, ``WireupRoute`` and
``setup(container, app)``.

The pools are singleton async generator factories (closed with the container at shutdown), the
connections scoped ones. Singletons are made lazily, so the lifespan asks for the pools at
startup to open them eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiosqlite
import asyncpg
import wireup
import wireup.integration.fastapi
from fastapi import FastAPI
from wireup import Injected, injectable
from wireup.integration.fastapi import WireupRoute

from bench import common
from bench.common import C, D, E, F, G, H, I, Null, SqlitePool


@injectable
async def pg_pool() -> AsyncIterator[asyncpg.Pool]:
    pool = await common.open_pg_pool()
    try:
        yield pool
    finally:
        await common.close_pg_pool(pool)


@injectable
async def sqlite_pool() -> AsyncIterator[SqlitePool]:
    pool = await SqlitePool.open()
    try:
        yield pool
    finally:
        await pool.close()


@injectable(lifetime="scoped")
async def null() -> AsyncIterator[Null]:
    yield Null()


@injectable(lifetime="scoped")
async def pg_conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn:
        yield conn


@injectable(lifetime="scoped")
async def sqlite_conn(pool: SqlitePool) -> AsyncIterator[aiosqlite.Connection]:
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        pool.release(conn)


@injectable(lifetime="scoped")
def h(c: C, d: D) -> Iterator[H]:
    yield from common.make_h(c, d)


@injectable(lifetime="scoped")
async def i(e: E, f: F) -> AsyncIterator[I]:
    async with common.i_context(e, f) as value:
        yield value


container = wireup.create_async_container(
    injectables=[
        pg_pool,
        sqlite_pool,
        null,
        pg_conn,
        sqlite_conn,
        injectable(C, lifetime="scoped"),
        injectable(D, lifetime="scoped"),
        injectable(E, lifetime="scoped"),
        injectable(F, lifetime="scoped"),
        injectable(G, lifetime="scoped"),
        h,
        i,
    ]
)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await container.get(SqlitePool)
    if common.pg_dsn():
        await container.get(asyncpg.Pool)
    yield


app = FastAPI(lifespan=lifespan)
# wireup's documented optimization ("Improve Injection Performance"): WireupRoute hides the
# Injected[...] parameters from FastAPI, which would otherwise resolve each of them as a sync
# dependency in its threadpool. Set on the app's own router, so the routes stay on the app as
# in every other variant.
app.router.route_class = WireupRoute


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null_route(n: Injected[Null]):
    return {"ok": n is not None}


@app.get("/pg")
async def pg(conn: Injected[asyncpg.Connection]):
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
async def sqlite(conn: Injected[aiosqlite.Connection]):
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
async def graph7(
    c: Injected[C],
    cc: Injected[C],
    ccc: Injected[C],
    d: Injected[D],
    dd: Injected[D],
    e: Injected[E],
    f: Injected[F],
    g: Injected[G],
    h: Injected[H],
    i: Injected[I],
):
    return {"ok": common.graph_ok(c, cc, ccc, d, dd, e, f, g, h, i)}


wireup.integration.fastapi.setup(container, app)
