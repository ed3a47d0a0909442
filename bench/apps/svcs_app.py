"""svcs, through its FastAPI integration: ``svcs.fastapi.lifespan`` and ``DepContainer``.

The lifespan opens the pools and registers them as values (closed with the registry); the
request resources are factories, async generators where they clean up, that take the request's
``svcs.Container`` to reach what they depend on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiosqlite
import asyncpg
import svcs
from fastapi import FastAPI

from bench import common
from bench.common import C, D, E, F, G, H, I, Null, SqlitePool


async def null_factory() -> AsyncIterator[Null]:
    yield Null()


async def pg_conn_factory(svcs_container: svcs.Container) -> AsyncIterator[asyncpg.Connection]:
    pool = await svcs_container.aget(asyncpg.Pool)
    async with pool.acquire() as conn:
        yield conn


async def sqlite_conn_factory(
    svcs_container: svcs.Container,
) -> AsyncIterator[aiosqlite.Connection]:
    pool = await svcs_container.aget(SqlitePool)
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        pool.release(conn)


def d_factory(svcs_container: svcs.Container) -> D:
    return D(svcs_container.get(C))


def e_factory(svcs_container: svcs.Container) -> E:
    c, d = svcs_container.get(C, D)
    return E(c, d)


def f_factory(svcs_container: svcs.Container) -> F:
    c, d, e = svcs_container.get(C, D, E)
    return F(c, d, e)


def g_factory(svcs_container: svcs.Container) -> G:
    c, d, e, f = svcs_container.get(C, D, E, F)
    return G(c, d, e, f)


def h_factory(svcs_container: svcs.Container) -> Iterator[H]:
    c, d = svcs_container.get(C, D)
    yield from common.make_h(c, d)


async def i_factory(svcs_container: svcs.Container) -> AsyncIterator[I]:
    e, f = await svcs_container.aget(E, F)
    async with common.i_context(e, f) as i:
        yield i


@svcs.fastapi.lifespan
async def lifespan(app: FastAPI, registry: svcs.Registry) -> AsyncIterator[dict[str, object]]:
    pg_pool = await common.open_pg_pool()
    if pg_pool is not None:
        registry.register_value(asyncpg.Pool, pg_pool, on_registry_close=pg_pool.close)
    sqlite_pool = await SqlitePool.open()
    registry.register_value(SqlitePool, sqlite_pool, on_registry_close=sqlite_pool.close)
    registry.register_factory(Null, null_factory)
    registry.register_factory(asyncpg.Connection, pg_conn_factory)
    registry.register_factory(aiosqlite.Connection, sqlite_conn_factory)
    registry.register_factory(C, C)
    registry.register_factory(D, d_factory)
    registry.register_factory(E, e_factory)
    registry.register_factory(F, f_factory)
    registry.register_factory(G, g_factory)
    registry.register_factory(H, h_factory)
    registry.register_factory(I, i_factory)
    yield {}


app = FastAPI(lifespan=lifespan)


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null(services: svcs.fastapi.DepContainer):
    n = await services.aget(Null)
    return {"ok": n is not None}


@app.get("/pg")
async def pg(services: svcs.fastapi.DepContainer):
    conn = await services.aget(asyncpg.Connection)
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
async def sqlite(services: svcs.fastapi.DepContainer):
    conn = await services.aget(aiosqlite.Connection)
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
async def graph7(services: svcs.fastapi.DepContainer):
    c, cc, ccc, d, dd, e, f, g, h = services.get(C, C, C, D, D, E, F, G, H)
    i = await services.aget(I)
    return {"ok": common.graph_ok(c, cc, ccc, d, dd, e, f, g, h, i)}
