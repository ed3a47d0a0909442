"""`lc.stats()`: per-resource counters and timings, and the units of work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio


class TestStats:
    async def test_request_resource_counters_and_timings(self) -> None:
        """Opened, closed, in use, max in use, errors, wait and hold times add up over scopes."""
        lc = tether.Lifecycle()
        fail = {"open": False, "close": False}

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            await anyio.sleep(0.02)
            if fail["open"]:
                raise ConnectionError("refused")
            yield "conn"
            if fail["close"]:
                raise RuntimeError("commit failed")

        both_open = anyio.Event()
        opened: list[str] = []

        async def hold() -> None:
            async with lc.scope() as s:
                await s.get(conn)
                opened.append("x")
                if len(opened) == 2:
                    both_open.set()
                await both_open.wait()
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            tg.start_soon(hold)
            await both_open.wait()
            during = lc.stats()
        assert during.units_in_flight == 2
        assert (during["conn"].in_use, during["conn"].opened, during["conn"].closed) == (2, 2, 0)

        stats = lc.stats()["conn"]
        assert stats.name == "conn"
        assert stats.scope == "request"
        assert (stats.opened, stats.closed, stats.in_use, stats.max_in_use) == (2, 2, 0, 2)
        assert stats.errors == 0
        # The lower bounds hold however loaded the machine (a sleep never ends early); the
        # upper ones leave seconds for its stalls and still catch milliseconds counted as
        # seconds (40 and 100 and more).
        assert 0.04 <= stats.wait_time < 5
        assert 0.02 <= stats.max_wait_time <= stats.wait_time
        assert stats.mean_wait_time == pytest.approx(stats.wait_time / 2)
        assert 0.1 <= stats.hold_time < 10
        assert 0.05 <= stats.max_hold_time <= stats.hold_time
        assert stats.mean_hold_time == pytest.approx(stats.hold_time / 2)

        fail["open"] = True
        with pytest.raises(ConnectionError, match=r"^refused$"):
            async with lc.scope() as s:
                await s.get(conn)
        fail["open"], fail["close"] = False, True
        with pytest.raises(RuntimeError, match=r"^commit failed$"):
            async with lc.scope() as s:
                await s.get(conn)

        snapshot = lc.stats()
        stats = snapshot["conn"]
        assert (stats.opened, stats.closed, stats.in_use, stats.max_in_use) == (3, 3, 0, 2)
        assert (stats.open_errors, stats.close_errors, stats.errors) == (1, 1, 2)
        assert (stats.leaks, stats.timeouts) == (0, 0)
        assert (snapshot.units_total, snapshot.units_in_flight, snapshot.units_refused) == (4, 0, 0)
        assert snapshot.state == "created"

    async def test_app_resource_counters(self) -> None:
        """An app resource is counted opened and in use while the app runs, closed after."""
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        async def pool() -> AsyncIterator[str]:
            await anyio.sleep(0.02)
            yield "pool"

        async with lc.run():
            running = lc.stats()
        stats = lc.stats()
        assert running.state == "running"
        assert running["pool"].scope == "app"
        assert (running["pool"].opened, running["pool"].in_use, running["pool"].closed) == (1, 1, 0)
        assert running["pool"].wait_time >= 0.02
        assert running["pool"].max_wait_time == running["pool"].wait_time
        assert stats.state == "closed"
        assert (stats["pool"].opened, stats["pool"].in_use, stats["pool"].closed) == (1, 0, 1)

    async def test_resources_not_used_are_listed_with_zeros(self) -> None:
        """Every registered resource appears in the stats, even one never opened."""
        lc = tether.Lifecycle()

        @lc.resource
        def conn() -> str:
            return "conn"  # pragma: no cover

        stats = lc.stats()
        assert list(stats.resources) == ["conn"]
        zero = stats["conn"]
        assert (zero.opened, zero.closed, zero.in_use, zero.errors, zero.leaks) == (0, 0, 0, 0, 0)
        assert (zero.mean_wait_time, zero.mean_hold_time) == (0.0, 0.0)

    async def test_dependency_failure_counts_once(self) -> None:
        """When a dependency fails to open, the error counts for it, not for its dependents."""
        lc = tether.Lifecycle()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            raise ConnectionError("refused")
            yield "conn"  # pragma: no cover

        @lc.resource
        async def tx(conn: str) -> AsyncIterator[str]:
            yield "tx"  # pragma: no cover

        with pytest.raises(ConnectionError, match=r"^refused$"):
            async with lc.scope() as s:
                await s.get(tx)
        stats = lc.stats()
        assert (stats["conn"].open_errors, stats["tx"].open_errors) == (1, 0)


class TestPoolFigures:
    # Made-up pool figures: connections in use at the app's shutdown too (no real pool).
    @pytest.mark.tether_unchecked
    async def test_pools_read_while_open_never_when_overridden_or_failing(self) -> None:
        """A pool's figures are read from its value while the app scope runs; a reader that
        fails, or a pool replaced by an override, is left out; closed, there are none."""
        lc = tether.Lifecycle()

        class FakePool:
            in_use = 2

        @lc.resource(scope="app")
        def pool() -> FakePool:
            return FakePool()

        @lc.resource(scope="app")
        def broken() -> object:
            return object()

        @lc.resource(scope="app")
        def replaced() -> FakePool:
            return FakePool()

        def figures(name: str) -> Any:
            return lambda p: tether.PoolStats(
                name=name, max=5, open=3, in_use=p.in_use, idle=1, waiting=None
            )

        pool.pool_stats = figures("pool")
        broken.pool_stats = figures("broken")  # object() has no in_use: the read fails
        replaced.pool_stats = figures("replaced")
        assert lc.stats().pools == {}
        with lc.override(replaced, FakePool()):
            async with lc.run():
                pools = lc.stats().pools
        assert pools == {
            "pool": tether.PoolStats(name="pool", max=5, open=3, in_use=2, idle=1, waiting=None)
        }
        assert lc.stats().pools == {}


async def test_an_open_cancelled_while_it_waits_is_no_open_error() -> None:
    """A unit of work cancelled while its resource opens (a client that gave up waiting for
    a full pool, a job's own timeout) counts no open error: nothing failed, and alerts on
    `tether_resource_errors_total{phase="open"}` must not fire on impatient clients. On both
    paths: a request (the open inlined in the endpoint's wrapper) and `lc.scope()`."""
    from fastapi import Depends, FastAPI

    from tests.inprocess import Exchange, http_scope

    lc = tether.Lifecycle()
    full = anyio.Event()  # never set: the pool stays full

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        await full.wait()
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(c: Any = Depends(conn)) -> str:
        return str(c)

    async with lc.lifespan(app):
        with anyio.move_on_after(0.1):
            await app(http_scope("GET", "/"), Exchange().receive, Exchange().send)
        with anyio.move_on_after(0.1):
            async with lc.scope() as s:
                await s.get(conn)
        stats = lc.stats()["conn"]
        assert (stats.opened, stats.open_errors, stats.timeouts) == (0, 0, 0)


async def test_a_name_stats_has_not_says_which_it_has() -> None:
    """`lc.stats().resources["x"]` (and `lc.stats()["x"]`, `.pools["x"]`) for a name it does
    not hold was a bare `KeyError: 'x'`. It names the names it holds, a close match, and for a
    pool, why a resource may have no figures there. Still a `KeyError`, and still a dict."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def orders_db() -> AsyncIterator[object]:
        yield object()

    @lc.resource
    async def session() -> AsyncIterator[int]:
        yield 1

    stats = lc.stats()
    with pytest.raises(KeyError) as info:
        stats.resources["order_db"]
    assert info.value.args == (
        "No resource named 'order_db' in lc.stats().resources; the Lifecycle's resources: "
        "'orders_db', 'session'. Did you mean 'orders_db'?",
    )
    with pytest.raises(KeyError, match=r"^\"No resource named 'nope' in .+'session'\.\"$"):
        stats["nope"]
    with pytest.raises(KeyError) as info:
        stats.pools["orders_db"]
    assert info.value.args == (
        "No pool named 'orders_db' in lc.stats().pools, which lists the open driver pools of "
        "tether's integrations, by resource name: none. 'orders_db' is a resource, but not one "
        "of them: not an integration's pool, not open (the Lifecycle is created), or "
        "overridden.",
    )
    async with lc.run():
        with pytest.raises(KeyError, match=r"\(the Lifecycle is running\)"):
            lc.stats().pools["orders_db"]
        with pytest.raises(KeyError) as info:
            lc.stats().pools["other"]
    assert info.value.args == (
        "No pool named 'other' in lc.stats().pools, which lists the open driver pools of "
        "tether's integrations, by resource name: none.",
    )
    assert stats.resources == {"orders_db": stats["orders_db"], "session": stats["session"]}
    assert isinstance(stats.pools, dict)
    assert stats.resources.get("nope") is None
    assert "nope" not in stats.resources


async def test_a_copy_of_the_stats_says_no_more_than_it_knows() -> None:
    """`dataclasses.asdict(lc.stats())` rebuilds the dicts: its pools said "No resource
    named ... in lc.stats().resources" (diff15, F3)."""
    import dataclasses

    lc = tether.Lifecycle()

    @lc.resource
    async def session() -> AsyncIterator[int]:
        yield 1

    copied = dataclasses.asdict(lc.stats())
    with pytest.raises(KeyError) as info:
        copied["pools"]["session"]
    assert info.value.args == (
        "No name 'session' in this copy of lc.stats()'s figures; the names: none.",
    )
    with pytest.raises(KeyError, match="the names: 'session'"):
        copied["resources"]["sesion"]
