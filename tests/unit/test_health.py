"""`await lc.health()`: every check, run concurrently, each bounded in time."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio


class Pool:
    def __init__(self, name: str, *, fail: bool = False, delay: float = 0.0) -> None:
        self.name = name
        self.fail = fail
        self.delay = delay
        self.pings = 0
        self.started = self.ended = 0.0  # when the last ping started, and ended (or was cut)

    async def ping(self) -> None:
        self.pings += 1
        self.started = time.perf_counter()
        try:
            await anyio.sleep(self.delay)
        finally:
            self.ended = time.perf_counter()
        if self.fail:
            raise ConnectionError(f"{self.name} at postgresql://app:s3cret@db/app is down")


def _lifecycle(**timeouts: float) -> tether.Lifecycle:
    lc = tether.Lifecycle(check_timeout=timeouts.get("default", 5.0))

    @lc.resource(scope="app", check=lambda p: p.ping())
    def healthy() -> Pool:
        return Pool("healthy", delay=1.0)

    @lc.resource(scope="app", check=lambda p: p.ping())
    def broken() -> Pool:
        return Pool("broken", fail=True)

    @lc.resource(scope="app", check=lambda p: p.ping(), check_timeout=0.6)
    def slow() -> Pool:
        return Pool("slow", delay=10)

    @lc.resource(scope="app")
    def unchecked() -> Pool:
        return Pool("unchecked")

    return lc


class TestHealth:
    async def test_report_of_every_check(self) -> None:
        """A passing check is ok; a raising one and a too-slow one are failing, with an error."""
        lc = _lifecycle()
        async with lc.run():
            t0 = time.perf_counter()
            report = await lc.health()
            elapsed = time.perf_counter() - t0
            pools = {name: lc._app_value(lc._resources[name]) for name in ("healthy", "slow")}
        assert report.state == "running"
        assert not report.ok
        assert [c.name for c in report.checks] == ["healthy", "broken", "slow"]
        healthy, broken, slow = report.checks
        assert (healthy.ok, healthy.status, healthy.error) == (True, "ok", None)
        assert (broken.ok, broken.status) == (False, "failing")
        assert broken.error == ("ConnectionError: broken at postgresql://app:***@db/app is down")
        assert (slow.ok, slow.status) == (False, "failing")
        assert slow.error == "check did not finish within 0.6 s"
        # Concurrent: the 1 s check and the 0.6 s one overlap, each starting before the other
        # ended (in turn, one starts once the other ended). Read from the pings' own times,
        # not a stopwatch, which a loaded machine's stall of a second or two would fail.
        assert pools["slow"].started < pools["healthy"].ended, pools
        assert pools["healthy"].started < pools["slow"].ended, pools
        # The 10 s check was cut at its 0.6 s timeout, for the report as for the call; the
        # lower bounds hold however loaded the machine (a sleep never ends early), the upper
        # ones leave 4 s for it and still catch a check waited for (10 s) or milliseconds.
        assert elapsed < 5
        assert 0.99 < healthy.latency < 5
        assert 0.59 < slow.latency < 5
        assert report["broken"] is broken

    async def test_all_passing_is_ok(self) -> None:
        """When the app runs and every check passes, the report is ok, with latencies recorded."""
        lc = tether.Lifecycle()
        calls: list[str] = []

        @lc.resource(scope="app", check=lambda v: calls.append(v))
        def sync_checked() -> str:
            return "sync"

        async def probe(v: str) -> None:
            await anyio.sleep(0.01)
            calls.append(v)

        @lc.resource(scope="app", check=probe)
        def async_checked() -> str:
            return "async"

        async with lc.run():
            report = await lc.health()
        assert report.ok
        assert sorted(calls) == ["async", "sync"]
        assert all(c.latency >= 0 for c in report.checks)
        assert report["async_checked"].latency >= 0.009
        assert report.as_dict()["status"] == "ok"
        assert set(report.as_dict()["checks"]) == {"sync_checked", "async_checked"}

    async def test_request_resource_check_opens_its_own_scope(self) -> None:
        """A check on a request resource opens the value in a scope of its own and closes it."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource(check=lambda c: events.append(f"check {c}"))
        async def conn() -> AsyncIterator[str]:
            events.append("open")
            yield "conn"
            events.append("close")

        async with lc.run():
            report = await lc.health()
        assert report.ok
        assert events == ["open", "check conn", "close"]

    async def test_not_running_is_not_ok(self) -> None:
        """Before startup (and after shutdown) the report is not ok and no check runs."""
        lc = _lifecycle()
        report = await lc.health()
        assert report.state == "created"
        assert not report.ok
        assert [(c.name, c.ok, c.error) for c in report.checks] == [
            ("healthy", False, "app is created"),
            ("broken", False, "app is created"),
            ("slow", False, "app is created"),
        ]
        async with lc.run():
            pass
        report = await lc.health()
        assert report.state == "closed"
        assert not report.ok

    async def test_no_checks_running_is_ok(self) -> None:
        """A running app with no checks is healthy."""
        lc = tether.Lifecycle()
        async with lc.run():
            report = await lc.health()
        assert report.ok
        assert report.checks == []
        assert report.as_dict() == {"status": "ok", "state": "running", "checks": {}}

    async def test_a_saturated_pool_is_reported_without_running_its_check(self) -> None:
        """A pool's integration says when every connection is in use: the check, which would
        queue behind the traffic, is not run; busy and serving passes with a note, stuck fails
        with the reason; otherwise the check runs as usual."""
        lc = tether.Lifecycle()
        verdict: list[tuple[bool, str] | None] = [None]

        @lc.resource(scope="app", check=lambda p: p.ping())
        def db() -> Pool:
            return Pool("db", delay=10)  # a check that would queue behind the traffic

        db.saturation = lambda p: verdict[0]
        async with lc.run():
            pool = lc._app_value(db)
            verdict[0] = (True, "busy: all 2 connections in use")
            busy = await lc.health()
            verdict[0] = (False, "saturated: and none handed out for 6.0 s")
            stuck = await lc.health()
            assert pool.pings == 0
            verdict[0] = None
            pool.delay = 0.0
            calm = await lc.health()
            assert pool.pings == 1
        assert (busy.ok, busy["db"].detail, busy["db"].error) == (
            True, "busy: all 2 connections in use", None
        )  # fmt: skip
        assert busy.as_dict()["checks"]["db"]["detail"] == "busy: all 2 connections in use"
        # Read from the pool's figures, not the check (which would take its check_timeout,
        # 5 s): the latency spans a few lines run without awaiting; 2 s allows for a stall.
        assert busy["db"].latency < 2
        assert (stuck.ok, stuck["db"].detail) == (False, None)
        assert stuck["db"].error == "saturated: and none handed out for 6.0 s"
        assert (calm.ok, calm["db"].detail) == (True, None)
        assert "detail" not in calm.as_dict()["checks"]["db"]


async def test_a_checks_own_timeout_error_is_reported_as_it_is() -> None:
    """A check that fails with a TimeoutError of its own (a driver's read timeout) is
    reported with that error, not as the check running out of `check_timeout`."""
    lc = tether.Lifecycle()

    async def check(value: str) -> None:
        raise TimeoutError("read from 10.0.0.5:6379 timed out after 0.5 s")

    @lc.resource(scope="app", check=check)
    def cache() -> str:
        return "cache"

    async with lc.run():
        report = await lc.health()
    assert report["cache"].error == "TimeoutError: read from 10.0.0.5:6379 timed out after 0.5 s"


async def test_a_check_that_blocks_past_its_timeout_is_failing() -> None:
    """A sync check that blocks the event loop cannot be interrupted by its timeout: it is
    reported failing, saying why (before, it passed)."""
    lc = tether.Lifecycle()

    def check(value: str) -> None:
        time.sleep(0.3)  # a sync ping

    @lc.resource(scope="app", check=check, check_timeout=0.1)
    def legacy() -> str:
        return "legacy"

    async with lc.run():
        report = await lc.health()
    result = report["legacy"]
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("check took 0.3")
    assert result.error.endswith(
        " s, longer than check_timeout=0.1 s, blocking the event loop meanwhile: make it async "
        "(or run it in a thread)"
    )


async def test_a_resource_overridden_with_none_is_not_checked_and_a_stand_in_is() -> None:
    """`lc.override(cache, None)` (a test or script without Redis) left readiness failing
    with "AttributeError: 'NoneType' object has no attribute 'ping'"; a stand-in without
    what the check calls failed the same way, naming neither the override nor the fix."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app", check=lambda p: p.ping())
    def cache() -> Pool:
        return Pool("cache")

    class DictCache(dict[str, str]):
        pass

    with lc.override(cache, None):
        async with lc.run():
            report = await lc.health()
    assert report.ok
    assert report["cache"].detail == "replaced by None: not checked"
    with lc.override(cache, DictCache()):
        async with lc.run():
            report = await lc.health()
    assert not report.ok
    assert report["cache"].error == (
        "AttributeError: 'DictCache' object has no attribute 'ping' (the resource is replaced "
        "by lc.override(), and its check ran on the stand-in: give the stand-in what the check "
        "calls, or override with None, which is not checked)"
    )
    with lc.override(cache, lambda: Pool("stand-in")):  # a stand-in with a ping: checked
        async with lc.run():
            assert (await lc.health()).ok
