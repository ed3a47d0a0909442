"""features-floor: handler-floor plus the least bookkeeping DESIGN.md's contract needs.

Not in the default run (``--only features-floor``, ``python -m bench.concurrent``): it answers
one question, what the issue's in-process target leaves for the features the public contract
names, written by hand with nothing else. On top of ``handler-floor``'s mechanism (a unit of
work in a contextvar, opened on first use, closed in reverse when FastAPI's handler returns):

- ``lc.stats()``: per resource, opened, closed, in use, max in use, wait time and max, hold time
  and max (a clock read when the open starts, one when it ends, one at close);
- drain and leak detection: a registry of live units (a set) and a count of units;
- a close shielded from cancellation: whether the task is in an anyio cancel scope, read from
  anyio's own bookkeeping as tether reads it (asyncio's task, one weak reference).

No failure handling, no overrides, no disconnects, no release with the response, no
at-most-once across tasks: less than tether does, so a floor for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from collections.abc import Callable
from typing import Any

from anyio._backends._asyncio import _task_states
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute, request_response

from bench import common
from bench.apps.wrapper_floor import lifespan, pg_conn, sqlite_conn
from bench.common import C, D, E, F, G

_unit: contextvars.ContextVar[Unit] = contextvars.ContextVar("features_floor_unit")
_now = time.perf_counter
_anyio_tasks = _task_states.data
_current_task = asyncio.current_task


class Counters:
    __slots__ = (
        "closed",
        "hold_time",
        "in_use",
        "max_hold_time",
        "max_in_use",
        "max_wait_time",
        "opened",
        "wait_time",
    )

    def __init__(self) -> None:
        self.opened = self.closed = self.in_use = self.max_in_use = 0
        self.wait_time = self.max_wait_time = self.hold_time = self.max_hold_time = 0.0


COUNTERS: dict[Any, Counters] = {}
UNITS: set[Unit] = set()
TOTAL = [0]


class Unit:
    __slots__ = ("__weakref__", "entries", "values")

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.entries: list[Any] = []


def wrap(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def unit_handler(request: Request) -> Any:
        unit = Unit()
        task = _current_task()
        UNITS.add(unit)
        TOTAL[0] += 1
        token = _unit.set(unit)
        try:
            try:
                response = await handler(request)
            finally:
                _unit.reset(token)
            state = _anyio_tasks.get(weakref.ref(task))  # type: ignore[arg-type]
            assert state is None or getattr(state, "cancel_scope", True) is None
            entries = unit.entries
            while entries:
                factory, gen, opened_at = entries.pop()
                if hasattr(gen, "__anext__"):
                    try:
                        await gen.__anext__()
                    except StopAsyncIteration:
                        pass
                else:
                    next(gen, None)
                c = COUNTERS[factory]
                c.closed += 1
                c.in_use -= 1
                held = _now() - opened_at
                c.hold_time += held
                if held > c.max_hold_time:
                    c.max_hold_time = held
            return response
        finally:
            UNITS.discard(unit)

    return unit_handler


async def use(factory: Callable[..., Any], *args: Any) -> Any:
    unit = _unit.get()
    value = unit.values.get(factory, unit)
    if value is unit:
        t0 = _now()
        gen = factory(*args)
        value = await gen.__anext__() if hasattr(gen, "__anext__") else next(gen)
        now = _now()
        c = COUNTERS.get(factory)
        if c is None:
            c = COUNTERS[factory] = Counters()
        waited = now - t0
        c.wait_time += waited
        if waited > c.max_wait_time:
            c.max_wait_time = waited
        c.opened += 1
        c.in_use += 1
        if c.in_use > c.max_in_use:
            c.max_in_use = c.in_use
        unit.entries.append((factory, gen, now))
        unit.values[factory] = value
    return value


app = FastAPI(lifespan=lifespan)


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


for route in app.routes:
    if isinstance(route, APIRoute) and route.path != "/none":
        route.app = request_response(wrap(route.get_route_handler()))
