"""tether's own opens and closes, cancelled at each wake-up of a unit of work (see
``tests/wakeups.py``): a graph of async generators, a sync generator opened in a thread with a
``timeout=``, and a second task of the unit asking for the same value at the same time. Whatever the moment:

* the cancellation is not swallowed;
* every value opened is closed exactly once, dependents before their dependencies;
* the counters say nothing is in use, and no thread token is held.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import tether
from tests.wakeups import cancelled_at_wake_up

pytestmark = pytest.mark.anyio

STEP = 0.002  # seconds each open and close waits


def make() -> tuple[tether.Lifecycle, list[tuple[str, str, int]], list[tether.Resource[int]]]:
    """A lifecycle with c <- b <- a (async generators) and s (sync, in a thread); the events
    ("open" / "close", resource, value) in order."""
    lc = tether.Lifecycle()
    events: list[tuple[str, str, int]] = []
    ids = itertools.count()

    @lc.resource
    async def c() -> AsyncIterator[int]:
        await asyncio.sleep(STEP)
        value = next(ids)
        events.append(("open", "c", value))
        try:
            yield value
        finally:
            await asyncio.sleep(STEP)
            events.append(("close", "c", value))

    @lc.resource
    async def b(c: int) -> AsyncIterator[int]:
        await asyncio.sleep(STEP)
        value = next(ids)
        events.append(("open", "b", value))
        try:
            yield value
        finally:
            await asyncio.sleep(STEP)
            events.append(("close", "b", value))

    @lc.resource
    async def a(b: int) -> AsyncIterator[int]:
        await asyncio.sleep(0)
        value = next(ids)
        events.append(("open", "a", value))
        try:
            yield value
        finally:
            events.append(("close", "a", value))

    @lc.resource(timeout=5)
    def s() -> Iterator[int]:
        time.sleep(STEP)
        value = next(ids)
        events.append(("open", "s", value))
        try:
            yield value
        finally:
            time.sleep(STEP)
            events.append(("close", "s", value))

    return lc, events, [a, b, c, s]


@pytest.mark.parametrize("helper", [False, True], ids=["one task", "two tasks"])
async def test_a_unit_of_work_cancelled_at_each_wake_up_closes_everything_once(
    helper: bool,
) -> None:
    """One task opens everything itself (each of its opens' awaits is swept), or a second
    task of the unit asks for the same value first (the first task waits for its open)."""
    lc, events, (a, b, c, s) = make()

    helpers: list[asyncio.Future[int]] = []

    async def unit() -> None:
        async with lc.scope() as sc:
            if helper:
                helpers.append(asyncio.ensure_future(sc.get(a)))
            await sc.get(a)
            await sc.get(s)
            for h in helpers:
                await h
            await asyncio.sleep(STEP)

    async with lc.run():
        _, wake_ups = await cancelled_at_wake_up(None, unit())
        assert wake_ups >= (4 if helper else 7), wake_ups
        fired_any = False
        for k in range(1, 3 * wake_ups + 6):
            events.clear()
            fired, _ = await cancelled_at_wake_up(k, unit())
            fired_any |= fired
            what = f"wake-up {k} of {wake_ups}"
            # The helper ends too (with the value, or the unit's end), never left waiting.
            if helpers:
                await asyncio.wait(helpers, timeout=5)
            assert all(h.done() for h in helpers), f"{what}: a task of the unit still waits"
            for h in helpers:
                if not h.cancelled():
                    h.exception()  # retrieved
            helpers.clear()
            opened = [(r, v) for kind, r, v in events if kind == "open"]
            closed = [(r, v) for kind, r, v in events if kind == "close"]
            assert sorted(opened) == sorted(closed), f"{what}: {events}"
            assert len(set(opened)) == len(opened), f"{what}: opened twice: {events}"
            assert len([r for r, _ in opened if r == "a"]) <= 1, f"{what}: {events}"
            order = [r for r, _ in closed if r in "abc"]
            assert order == ["a", "b", "c"][3 - len(order) :], f"{what}: {events}"
            for res in (a, b, c, s):
                stats = lc.stats().resources[res.name]
                assert stats.in_use == 0, f"{what}: {res.name} in use"
                assert stats.opened == stats.closed, f"{what}: {res.name} {stats}"
            if not fired:
                break
        assert fired_any
        # The thread limiter has every token back: a full set of opens at once still works.
        async with lc.scope() as sc:
            with anyio.fail_after(5):
                assert await sc.get(s) >= 0
