"""dishka, through its FastAPI integration: ``setup_dishka``, ``@inject`` and ``FromDishka[T]``.

The pools are APP-scoped async generator factories, the connections REQUEST-scoped ones. dishka
makes APP objects lazily; the lifespan asks for the pools at startup (the documented way to open
them eagerly) and closes the container at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable

import aiosqlite
import asyncpg
from dishka import Provider, Scope, make_async_container, provide
from dishka.integrations.fastapi import FromDishka, inject, setup_dishka
from fastapi import FastAPI

from bench import common
from bench.common import C, D, E, F, G, H, I, Null, SqlitePool


class Resources(Provider):
    @provide(scope=Scope.APP)
    async def pg_pool(self) -> AsyncIterable[asyncpg.Pool]:
        pool = await common.open_pg_pool()
        yield pool
        await common.close_pg_pool(pool)

    @provide(scope=Scope.APP)
    async def sqlite_pool(self) -> AsyncIterable[SqlitePool]:
        pool = await SqlitePool.open()
        yield pool
        await pool.close()

    @provide(scope=Scope.REQUEST)
    async def null(self) -> AsyncIterable[Null]:
        yield Null()

    @provide(scope=Scope.REQUEST)
    async def pg_conn(self, pool: asyncpg.Pool) -> AsyncIterable[asyncpg.Connection]:
        async with pool.acquire() as conn:
            yield conn

    @provide(scope=Scope.REQUEST)
    async def sqlite_conn(self, pool: SqlitePool) -> AsyncIterable[aiosqlite.Connection]:
        conn = await pool.acquire()
        yield conn
        pool.release(conn)

    @provide(scope=Scope.REQUEST)
    def h(self, c: C, d: D) -> Iterable[H]:
        yield from common.make_h(c, d)

    @provide(scope=Scope.REQUEST)
    async def i(self, e: E, f: F) -> AsyncIterable[I]:
        async with common.i_context(e, f) as i:
            yield i


graph = Provider(scope=Scope.REQUEST)
graph.provide(C)
graph.provide(D)
graph.provide(E)
graph.provide(F)
graph.provide(G)

container = make_async_container(Resources(), graph)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await container.get(SqlitePool)
    if common.pg_dsn():
        await container.get(asyncpg.Pool)
    try:
        yield
    finally:
        await container.close()


app = FastAPI(lifespan=lifespan)


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
@inject
async def null(n: FromDishka[Null]):
    return {"ok": n is not None}


@app.get("/pg")
@inject
async def pg(conn: FromDishka[asyncpg.Connection]):
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
@inject
async def sqlite(conn: FromDishka[aiosqlite.Connection]):
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
@inject
async def graph7(
    c: FromDishka[C],
    cc: FromDishka[C],
    ccc: FromDishka[C],
    d: FromDishka[D],
    dd: FromDishka[D],
    e: FromDishka[E],
    f: FromDishka[F],
    g: FromDishka[G],
    h: FromDishka[H],
    i: FromDishka[I],
):
    return {"ok": common.graph_ok(c, cc, ccc, d, dd, e, f, g, h, i)}


setup_dishka(container, app)
