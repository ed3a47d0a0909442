"""Shutdown drains: in-flight units finish (up to `drain_timeout`) before app resources close."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio


def _refused(label: str, state: str = "draining") -> str:
    return re.escape(
        f"Cannot start {label}: the application is shutting down ({state}). "
        f"Retry against another instance."
    )


def _lifecycle(
    events: list[str], **options: float
) -> tuple[tether.Lifecycle, tether.Resource[str]]:
    lc = tether.Lifecycle(**options)

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        events.append("close pool")

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        try:
            yield f"conn({pool})"
        finally:
            events.append("close conn")

    return lc, conn


class TestDrain:
    async def test_in_flight_unit_finishes_before_app_resources_close(self) -> None:
        """Leaving `lc.run()` waits for a unit holding a resource, then closes app resources."""
        events: list[str] = []
        lc, conn = _lifecycle(events, drain_timeout=5)
        holding = anyio.Event()

        async def job() -> None:
            async with lc.scope("job") as s:
                assert await s.get(conn) == "conn(pool)"
                holding.set()
                await anyio.sleep(0.2)
                events.append("job done")

        async with anyio.create_task_group() as tg:
            async with lc.run():
                tg.start_soon(job)
                await holding.wait()
                t0 = time.perf_counter()
            drained_in = time.perf_counter() - t0
        assert events == ["job done", "close conn", "close pool"]
        assert 0.15 < drained_in < 1

    async def test_new_scope_while_draining_is_refused(self) -> None:
        """A new `lc.scope()` while draining raises ResourceUnavailable; in-flight ones finish."""
        events: list[str] = []
        lc, conn = _lifecycle(events, drain_timeout=5)
        holding = anyio.Event()
        refused: list[tether.ResourceUnavailable] = []

        async def job() -> None:
            async with lc.scope("job") as s:
                await s.get(conn)
                holding.set()
                while lc.state is not tether.State.DRAINING:
                    await anyio.sleep(0.005)
                with pytest.raises(
                    tether.ResourceUnavailable,
                    match=rf"^{_refused('follow-up')}$",
                ) as info:
                    async with lc.scope("follow-up"):
                        pass  # pragma: no cover
                refused.append(info.value)
                events.append("job done")

        async with anyio.create_task_group() as tg:
            async with lc.run():
                tg.start_soon(job)
                await holding.wait()
        assert events == ["job done", "close conn", "close pool"]
        assert len(refused) == 1
        assert (refused[0].resource, refused[0].retry_after) == ("lifecycle", 5.0)
        assert lc.stats().units_refused == 1

    async def test_drain_timeout_bounds_the_wait(self, caplog: pytest.LogCaptureFixture) -> None:
        """A unit still running after `drain_timeout` is logged and cancelled: its values close
        (rolled back) before the app resources they use (before, the pool closed first, under
        the connection)."""
        events: list[str] = []
        lc, conn = _lifecycle(events, drain_timeout=0.1)
        holding = anyio.Event()

        async def stuck_job() -> None:
            async with lc.scope("stuck job") as s:
                await s.get(conn)
                holding.set()
                await anyio.sleep_forever()

        with caplog.at_level(logging.WARNING, logger="tether"):
            async with anyio.create_task_group() as tg:
                async with lc.run():
                    tg.start_soon(stuck_job)
                    await holding.wait()
                    t0 = time.perf_counter()
                elapsed = time.perf_counter() - t0
                assert events == ["close conn", "close pool"]
        assert 0.09 < elapsed < 1
        warnings = [r.getMessage() for r in caplog.records if "drain_timeout" in r.getMessage()]
        assert warnings == [
            "tether: 1 units of work still in flight after drain_timeout=0.1 s, cancelled: "
            "stuck job"
        ]

    async def test_scope_after_shutdown_is_refused(self) -> None:
        """Once the app scope has closed, a new unit of work is refused."""
        events: list[str] = []
        lc, _ = _lifecycle(events)
        async with lc.run():
            async with lc.scope():
                pass
        assert lc.state is tether.State.CLOSED
        with pytest.raises(tether.ResourceUnavailable, match=rf"^{_refused('scope', 'closed')}$"):
            async with lc.scope():
                pass  # pragma: no cover
