"""wrapper-floor: tether's mechanism written by hand, with nothing else, for reference.

What any library pays that keeps tether's release point with a Python wrapper per request:
a wrapper of the route's ASGI app sets a contextvar to the request's unit of work and wraps
``send``; the endpoint asks for its resources (the same generators as tether's app), opened on
first use; ``send`` closes them, in reverse, when ``http.response.start`` goes out. No counters,
no registry of units (drain, leaks, disconnects), no failure handling, no overrides, no at-most-
once across tasks: the least that mechanism costs, not something to use.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request

from bench import common
from bench.common import C, D, E, F, G

# A weak reference, as tether holds it: timers set during a request copy its context (uvicorn's
# keep-alive timer), and a strong one keeps every request's objects alive for the collector.
_unit: contextvars.ContextVar[Callable[[], Unit | None]] = contextvars.ContextVar("floor_unit")


class Unit:
    __slots__ = ("__weakref__", "entries", "send", "started", "values")

    def __init__(self, send: Any) -> None:
        self.values: dict[Any, Any] = {}
        self.entries: list[Any] = []
        self.send = send
        self.started = False

    async def send_wrapper(self, message: dict[str, Any]) -> None:
        if not self.started and message["type"] == "http.response.start":
            self.started = True
            entries = self.entries
            while entries:
                gen = entries.pop()
                if hasattr(gen, "__anext__"):
                    try:
                        await gen.__anext__()
                    except StopAsyncIteration:
                        pass
                else:
                    next(gen, None)
        await self.send(message)


class UnitRoute:
    """Wraps a route's ASGI app: one unit of work per call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        unit = Unit(send)
        token = _unit.set(weakref.ref(unit))
        try:
            await self.app(scope, receive, unit.send_wrapper)
        finally:
            _unit.reset(token)


async def use(factory: Callable[..., Any], *args: Any) -> Any:
    """The value of ``factory`` (an async or sync generator) in this request, opened once."""
    unit = _unit.get()()
    assert unit is not None
    value = unit.values.get(factory, unit)
    if value is unit:
        gen = factory(*args)
        value = await gen.__anext__() if hasattr(gen, "__anext__") else next(gen)
        unit.entries.append(gen)
        unit.values[factory] = value
    return value


async def pg_conn(pool: Any) -> AsyncIterator[Any]:
    async with pool.acquire() as conn:
        yield conn


async def sqlite_conn(pool: common.SqlitePool) -> AsyncIterator[Any]:
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        pool.release(conn)


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

# The routes have no return annotation, as in the other apps: FastAPI would serialize through a
# response model then, a different (faster) path than the others take.


@app.get("/none")
async def none():
    return {"ok": True}


@app.get("/null")
async def null():
    n = await use(common.null_resource)
    return {"ok": n is not None}


@app.get("/pg")
async def pg(request: Request):
    conn = await use(pg_conn, request.app.state.pg)
    return {"v": await conn.fetchval(common.PG_QUERY)}


@app.get("/sqlite")
async def sqlite(request: Request):
    conn = await use(sqlite_conn, request.app.state.sqlite)
    return {"v": await common.sqlite_value(conn)}


@app.get("/graph7")
async def graph7():
    # The plain resources C..G have no cleanup: made directly, as a library would.
    c = C()
    d = D(c)
    e = E(c, d)
    f = F(c, d, e)
    g = G(c, d, e, f)
    h = await use(common.make_h, c, d)
    i = await use(common.make_i, e, f)
    return {"ok": common.graph_ok(c, c, c, d, d, e, f, g, h, i)}


for route in app.routes:
    if getattr(route, "path", "/none") != "/none":
        route.app = UnitRoute(route.app)  # type: ignore[attr-defined]
