"""A unit of work cancelled while it waits for a connection of a full pool, against a real
PostgreSQL (reliability.md, test 7: "a connection handed to a waiter that is cancelled at that
moment is reclaimed").

Both connections of a pool of two are held and two more units of work wait for one. Then one
holder lets its connection go, and the first waiter is cancelled at its k-th wake-up: the
moment what it waited for is done (the pool handed it the connection, a reply came in) and it
has not run yet. That is the race a cancellation from outside meets (a client that
disconnects, a timeout): it arrives together with the connection. Every wake-up of a clean
run is tried, both ways (``task.cancel()`` and an anyio cancel scope). Whatever the moment,
what a user would notice:

* the cancellation is not swallowed: the waiter ends, and holds no connection after;
* the connection goes to the second waiter promptly (not after the acquire timeout): the
  pool lost no slot;
* afterwards tether counts nothing in use and nobody waiting, the pool has both connections
  back, the server shows no busy backend, and both connections serve at once again.

It found that on Python 3.11 psycopg's pool lost such a cancellation (``asyncio.wait_for``
returned the connection and dropped it, CPython gh-86296): the waiter ran on as if nothing
had happened. tether's psycopg pool now delivers it and gives the connection back.

Then a readiness check (``lc.health()``, the pool's ``SELECT 1``) is cancelled at each of its
wake-ups, and at each turn of the loop, as a probe whose client gave up is: its connection
goes back, the next report is ok.

Bounded: 4 drivers × 2 ways × (the wake-ups of a clean run, about 5 to 15), and as many
probes.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import anyio
import pytest

from tests.integration.drivers import ASYNCPG_BEFORE_0_32, DRIVERS, Driver, settled
from tests.servers import Postgres
from tests.wakeups import cancelled_at_turn, cancelled_at_wake_up, woken

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

BUSY = {"active", "idle in transaction", "idle in transaction (aborted)"}


class Round:
    """Two holders with the pool's two connections, and two waiters queued behind them."""

    def __init__(self, d: Driver) -> None:
        self.d = d
        self.got: set[str] = set()  # who got a connection
        self.used: set[str] = set()  # who got one and ran a query on it
        self.let_go = {name: asyncio.Event() for name in ("a", "b", "w1", "w2")}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}

    async def unit(self, name: str) -> None:
        with anyio.CancelScope() as cs:
            self.scopes[name] = cs
            async with self.d.lc.scope() as s:
                c = await s.get(self.d.conn)
                self.got.add(name)
                assert await self.d.scalar(c, "SELECT 1", ()) == 1
                self.used.add(name)
                await self.let_go[name].wait()

    def start(self, name: str) -> None:
        self.tasks[name] = asyncio.ensure_future(self.unit(name))

    async def queue_up(self) -> None:
        self.start("a")
        self.start("b")
        await settled(lambda: {"a", "b"} <= self.used, "both holders served")
        self.start("w1")
        await asyncio.sleep(0.02)  # w1 first in line
        self.start("w2")
        await asyncio.sleep(0.05)
        assert not {"w1", "w2"} & self.got, "a waiter was served from a full pool"

    async def wake_ups(self, k: int | None = None) -> int:
        """Let holder a go; count w1's wake-ups until it has used its connection (or
        ended), or until its *k*-th, if given, for the caller to cancel it. Return the count."""
        self.let_go["a"].set()
        w1, wake_ups = self.tasks["w1"], 0
        deadline = time.monotonic() + 5
        while not w1.done() and "w1" not in self.used:
            if woken(w1):
                wake_ups += 1
                if wake_ups == k:
                    return wake_ups
            assert time.monotonic() < deadline, "the first waiter was never served"
            await asyncio.sleep(0)
        return wake_ups


@pytest.mark.parametrize("driver_name", sorted(DRIVERS))
async def test_a_waiter_cancelled_as_it_is_handed_a_connection_loses_none(
    postgres: Postgres, driver_name: str
) -> None:
    app_name = f"tt-waiters-{driver_name}-{uuid.uuid4().hex[:6]}"
    d = DRIVERS[driver_name](postgres.dsn, app_name)

    async def server_idle() -> bool:
        rows = await asyncio.to_thread(postgres.activity, app_name)
        return len(rows) <= 2 and not any(r["state"] in BUSY for r in rows)

    async def nothing_left(what: str) -> None:
        stats = d.lc.stats()
        assert stats.resources[d.conn.name].in_use == 0, f"{what}: tether counts one in use"
        await settled(lambda: d.checked_out() == 0, f"{what}: pool all back")
        for pool in d.lc.stats().pools.values():
            assert pool.waiting in (0, None), f"{what}: {pool.waiting} counted waiting"
        await settled(server_idle, f"{what}: no busy backend, at most 2")

    async def finish(r: Round, what: str) -> None:
        for name in ("b", "w2"):
            r.let_go[name].set()
        with anyio.fail_after(10):
            await asyncio.wait(r.tasks.values())
        await nothing_left(what)

    async with d.lc.run():
        # A clean hand-over: how many times the first waiter wakes up until it has its
        # connection and has used it.
        r = Round(d)
        await r.queue_up()
        points = await r.wake_ups()
        assert 1 <= points <= 100, points
        r.let_go["w1"].set()
        await settled(lambda: "w2" in r.used, "clean: second waiter served", 5.0)
        await finish(r, "clean")

        served_first = {True: 0, False: 0}  # the cancelled waiter had got a connection
        for how in ("task.cancel", "cancel scope"):
            for k in range(1, points + 2):
                what = f"{how} at wake-up {k} of {points}"
                r = Round(d)
                await r.queue_up()
                await r.wake_ups(k)
                w1 = r.tasks["w1"]
                if how == "task.cancel":
                    w1.cancel("at the hand-over")
                else:
                    r.scopes["w1"].cancel()
                await asyncio.wait({w1}, timeout=5)
                assert w1.done(), f"{what}: the cancellation was lost, the waiter runs on"
                if how == "task.cancel":
                    assert w1.cancelled(), f"{what}: the cancellation was swallowed"
                    # With its message: anyio knows its own cancellations by it.
                    with pytest.raises(asyncio.CancelledError, match="at the hand-over"):
                        w1.result()
                else:
                    assert not w1.cancelled(), f"{what}: the cancellation escaped its scope"
                    assert w1.exception() is None, f"{what}: {w1.exception()!r}"
                    assert r.scopes["w1"].cancelled_caught, f"{what}: not cancelled"
                served_first["w1" in r.got] += 1

                # The second waiter gets the connection now, not after an acquire timeout.
                await settled(lambda: "w2" in r.used, f"{what}: second waiter served", 3.0)
                await finish(r, what)

        # The sweep reached both sides of the hand-over. A sync session waits for its
        # connection in a thread, which cannot be interrupted: it always gets it, and its
        # close gives it back.
        assert served_first[True], served_first
        assert served_first[False] or driver_name.endswith("-sync"), served_first

        # The pool still serves both connections at once.
        r = Round(d)
        r.start("a")
        r.start("b")
        await settled(lambda: {"a", "b"} <= r.used, "both connections at once", 5.0)
        for event in r.let_go.values():
            event.set()
        await asyncio.wait(r.tasks.values())


@pytest.mark.parametrize("driver_name", sorted(DRIVERS))
async def test_a_readiness_check_cancelled_at_each_wake_up_gives_its_connection_back(
    postgres: Postgres, driver_name: str
) -> None:
    """``lc.health()`` (what ``/health/ready`` runs: the pool's ``SELECT 1``) cancelled at each
    of its wake-ups, as a probe whose client gave up is: the check's connection goes back to
    the pool, and the next report is healthy."""
    app_name = f"tt-probe-{driver_name}-{uuid.uuid4().hex[:6]}"
    d = DRIVERS[driver_name](postgres.dsn, app_name)
    async with d.lc.run():
        _, wake_ups = await cancelled_at_wake_up(None, d.lc.health())
        fired_any = False
        for k in range(1, 3 * wake_ups + 6):
            fired, _ = await cancelled_at_wake_up(k, d.lc.health())
            fired_any |= fired
            what = f"health() cancelled at wake-up {k} of {wake_ups}"
            await settled(lambda: d.checked_out() == 0, f"{what}: pool all back")
            with anyio.fail_after(5):
                report = await d.lc.health()
            assert report.ok, f"{what}: {report.as_dict()}"
            if not fired:
                break
        assert fired_any

        # At each turn of the loop, whatever the check is doing then, both ways.
        if ASYNCPG_BEFORE_0_32 and driver_name in ("asyncpg", "sqlalchemy"):
            return  # their sockets would reach a later test as a ResourceWarning
        for how in ("task.cancel", "cancel scope"):
            fired_count = 0
            for k in range(1, 2000):
                if not await cancelled_at_turn(k, d.lc.health(), how=how):
                    break
                fired_count += 1
                what = f"health() cancelled by {how} at turn {k}"
                await settled(lambda: d.checked_out() == 0, f"{what}: pool all back")
                with anyio.fail_after(5):
                    report = await d.lc.health()
                assert report.ok, f"{what}: {report.as_dict()}"
            assert 1 <= fired_count < 1999, (how, fired_count)
