"""handler-floor: tether's mechanism on FastAPI routes written by hand, with nothing else.

What any library pays that releases at the end of FastAPI's request handler (after the
endpoint and serialisation, before anything is sent), as tether does on `APIRoute`s: a wrapper
of the handler (``route.get_route_handler()``, the route's app rebuilt around it) sets a
contextvar to the request's unit of work; the endpoint asks for its resources (the same
generators as tether's app), opened on first use; the wrapper closes them, in reverse, when the
handler returns. No counters, no registry of units (drain, leaks, disconnects), no failure
handling, no overrides, no at-most-once across tasks: the least that mechanism costs, not
something to use. (`wrapper-floor` is the same for the route wrapper and ``send`` wrapper
tether falls back to.)
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute, request_response

from bench import common
from bench.apps.wrapper_floor import lifespan, pg_conn, sqlite_conn
from bench.common import C, D, E, F, G

# The handler resets it before anything is sent: timers set while the response goes out
# (uvicorn's keep-alive timer) do not see it, so it can hold the unit itself.
_unit: contextvars.ContextVar[Unit] = contextvars.ContextVar("handler_floor_unit")


class Unit:
    __slots__ = ("entries", "values")

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.entries: list[Any] = []


def wrap(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """FastAPI's request handler, with one unit of work per call."""

    async def unit_handler(request: Request) -> Any:
        unit = Unit()
        token = _unit.set(unit)
        try:
            response = await handler(request)
        finally:
            _unit.reset(token)
        entries = unit.entries
        while entries:
            gen = entries.pop()
            if hasattr(gen, "__anext__"):
                try:
                    await gen.__anext__()
                except StopAsyncIteration:
                    pass
            else:
                next(gen, None)
        return response

    return unit_handler


async def use(factory: Callable[..., Any], *args: Any) -> Any:
    """The value of ``factory`` (an async or sync generator) in this request, opened once."""
    unit = _unit.get()
    value = unit.values.get(factory, unit)
    if value is unit:
        gen = factory(*args)
        value = await gen.__anext__() if hasattr(gen, "__anext__") else next(gen)
        unit.entries.append(gen)
        unit.values[factory] = value
    return value


app = FastAPI(lifespan=lifespan)

# No return annotations, as in the other apps (see wrapper_floor).


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
    c = C()
    d = D(c)
    e = E(c, d)
    f = F(c, d, e)
    g = G(c, d, e, f)
    h = await use(common.make_h, c, d)
    i = await use(common.make_i, e, f)
    return {"ok": common.graph_ok(c, c, c, d, d, e, f, g, h, i)}


# The route's app rebuilt the way FastAPI builds it (this is the FastAPI of .venv-bench; no
# body-size limit is set, so no limit middleware around it).
for route in app.routes:
    if isinstance(route, APIRoute) and route.path != "/none":
        route.app = request_response(wrap(route.get_route_handler()))
