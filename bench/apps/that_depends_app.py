"""that-depends, through its FastAPI integration: ``DIContextMiddleware`` and ``Depends(provider)``.

The pools are ``Resource`` providers (opened by ``init_resources`` at startup, torn down at
shutdown); the request resources are ``ContextResource`` providers in the REQUEST scope, which
the middleware enters for every request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import aiosqlite
import asyncpg
from fastapi import Depends, FastAPI
from that_depends import BaseContainer, providers
from that_depends.providers import DIContextMiddleware
from that_depends.providers.context_resources import ContextScopes

from bench import common
from bench.common import C, D, E, F, G, H, I, Null, SqlitePool


async def pg_pool() -> AsyncIterator[asyncpg.Pool | None]:
    pool = await common.open_pg_pool()
    try:
        yield pool
    finally:
        await common.close_pg_pool(pool)


async def sqlite_pool() -> AsyncIterator[SqlitePool]:
    pool = await SqlitePool.open()
    try:
        yield pool
    finally:
        await pool.close()


async def null() -> AsyncIterator[Null]:
    yield Null()


async def pg_conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn:
        yield conn


async def sqlite_conn(pool: SqlitePool) -> AsyncIterator[aiosqlite.Connection]:
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        pool.release(conn)


def graph_node(cls: type) -> providers.ContextResource:
    """A request-scoped node of /graph7: a generator that yields ``cls(*deps)``."""

    def make(*deps: object) -> Iterator[object]:
        yield cls(*deps)

    return make


REQUEST = ContextScopes.REQUEST


class Container(BaseContainer):
    pg_pool = providers.Resource(pg_pool)
    sqlite_pool = providers.Resource(sqlite_pool)
    null = providers.ContextResource(null).with_config(scope=REQUEST)
    pg_conn = providers.ContextResource(pg_conn, pool=pg_pool).with_config(scope=REQUEST)
    sqlite_conn = providers.ContextResource(sqlite_conn, pool=sqlite_pool).with_config(
        scope=REQUEST
    )
    c = providers.ContextResource(graph_node(C)).with_config(scope=REQUEST)
    d = providers.ContextResource(graph_node(D), c).with_config(scope=REQUEST)
    e = providers.ContextResource(graph_node(E), c, d).with_config(scope=REQUEST)
    f = providers.ContextResource(graph_node(F), c, d, e).with_config(scope=REQUEST)
    g = providers.ContextResource(graph_node(G), c, d, e, f).with_config(scope=REQUEST)
    h = providers.ContextResource(common.make_h, c=c, d=d).with_config(scope=REQUEST)
    i = providers.ContextResource(common.make_i, e=e, f=f).with_config(scope=REQUEST)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await Container.sqlite_pool.resolve()
    if common.pg_dsn():
        await Container.pg_pool.resolve()
    try:
        yield
    finally:
        await Container.tear_down()


app = FastAPI(lifespan=lifespan)
app.add_middleware(DIContextMiddleware, Container, scope=REQUEST)


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null_route(n: Annotated[Null, Depends(Container.null)]):
    return {"ok": n is not None}


@app.get("/pg")
async def pg(conn: Annotated[asyncpg.Connection, Depends(Container.pg_conn)]):
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
async def sqlite(conn: Annotated[aiosqlite.Connection, Depends(Container.sqlite_conn)]):
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
async def graph7(
    c: Annotated[C, Depends(Container.c)],
    cc: Annotated[C, Depends(Container.c)],
    ccc: Annotated[C, Depends(Container.c)],
    d: Annotated[D, Depends(Container.d)],
    dd: Annotated[D, Depends(Container.d)],
    e: Annotated[E, Depends(Container.e)],
    f: Annotated[F, Depends(Container.f)],
    g: Annotated[G, Depends(Container.g)],
    h: Annotated[H, Depends(Container.h)],
    i: Annotated[I, Depends(Container.i)],
):
    return {"ok": common.graph_ok(c, cc, ccc, d, dd, e, f, g, h, i)}
