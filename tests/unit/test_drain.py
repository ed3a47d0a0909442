"""Shutdown drains: in-flight units finish (up to `drain_timeout`) before app resources close."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator

import anyio
import pytest

import tether
from tether._lifecycle import broken

pytestmark = pytest.mark.anyio


def _refused(label: str) -> str:
    return re.escape(
        f"Cannot start {label}: the application is shutting down (draining). "
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
            "tether: 1 unit of work still in flight after drain_timeout=0.1 s, cancelled: stuck job"
        ]

    async def test_scope_after_shutdown_is_not_refused_as_draining(self) -> None:
        """Once the app scope has closed, a new unit of work is no longer refused as if the
        app were shutting down (a job's unit test after a test that ran the app): what it
        asks of the closed app scope says so (tests/unit/test_app_scope.py)."""
        events: list[str] = []
        lc, _ = _lifecycle(events)
        async with lc.run():
            async with lc.scope():
                pass
        assert lc.state is tether.State.CLOSED
        async with lc.scope():
            pass
        assert lc.stats().units_refused == 0


async def test_a_consumer_loop_an_app_resource_runs_stops_with_it_at_shutdown() -> None:
    """An app resource runs a queue consumer: a task taking one unit of work per message,
    cancelled in its cleanup. At shutdown the message in hand is finished, the loop's next
    unit waits instead of being refused, and the cleanup's cancel stops it there (before:
    refused, the task died of `ResourceUnavailable`, and the cleanup's `await` failed the
    shutdown with `ShutdownError`)."""
    import asyncio
    import contextlib

    lc = tether.Lifecycle(drain_timeout=5)
    handled: list[str] = []
    in_hand = anyio.Event()

    @lc.resource
    async def work_conn() -> AsyncIterator[str]:
        yield "conn"
        handled.append("committed")

    @lc.resource(scope="app")
    async def consumer() -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                async with lc.scope("consume message") as s:
                    await s.get(work_conn)
                    in_hand.set()
                    await asyncio.sleep(0.2)  # handling one message

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        handled.append("consumer stopped")

    started = time.perf_counter()
    async with lc.run():
        await in_hand.wait()
        started = time.perf_counter()
    assert time.perf_counter() - started < 2  # not drain_timeout
    assert handled[-2:] == ["committed", "consumer stopped"]
    assert lc.stats().units_refused == 0


async def test_a_consumer_loop_stopped_by_a_flag_ends_after_its_next_message() -> None:
    """The other way to stop a consumer: its cleanup sets a flag the loop checks between
    messages, then awaits the task. The loop's next unit of work, asked for while the app
    drains, waits until that cleanup begins and then runs (its pool is still open), and the
    loop sees the flag after it (refused, the task died and failed the shutdown; held until
    the app scope closed, it would never end)."""
    import asyncio

    lc = tether.Lifecycle(drain_timeout=5, close_timeout=5)
    handled: list[str] = []
    in_hand = anyio.Event()

    @lc.resource
    async def work_conn() -> AsyncIterator[str]:
        yield "conn"
        handled.append("committed")

    @lc.resource(scope="app")
    async def consumer() -> AsyncIterator[None]:
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                async with lc.scope("consume message") as s:
                    await s.get(work_conn)
                    in_hand.set()
                    await asyncio.sleep(0.2)

        task = asyncio.create_task(loop())
        yield
        stop.set()
        await task
        handled.append("consumer stopped")

    async with lc.run():
        await in_hand.wait()
        started = time.perf_counter()
    assert time.perf_counter() - started < 3  # not close_timeout
    assert handled[-1] == "consumer stopped"
    assert handled.count("committed") >= 2
    assert lc.stats().units_refused == 0


async def test_a_task_an_app_resource_left_running_is_refused_once_the_app_closed() -> None:
    """A consumer whose resource's cleanup forgot to stop it asks for a unit of work after
    the app scope closed: refused, saying what to fix (not admitted as a job's unit test is)."""
    import asyncio

    lc = tether.Lifecycle()
    tasks: list[asyncio.Task[None]] = []
    outcome: list[str] = []
    go = asyncio.Event()

    @lc.resource(scope="app")
    async def consumer() -> AsyncIterator[None]:
        async def loop() -> None:
            await go.wait()
            try:
                async with lc.scope("consume message"):
                    outcome.append("admitted")
            except tether.ResourceUnavailable as exc:
                outcome.append(str(exc))

        tasks.append(asyncio.create_task(loop()))
        yield  # and never stops it

    async with lc.run():
        pass
    go.set()
    await tasks[0]
    assert outcome == [
        "Cannot start consume message: the application has shut down, and its app resources "
        "are closed. Stop the task that starts it in the cleanup of the app resource that "
        "started it (after its `yield`)."
    ]


async def test_a_consumer_in_a_task_group_outlives_an_outage_and_a_crash_is_seen() -> None:
    """The docs' consumer (docs/operations.md): a task group around the resource's `yield`,
    the loop catching `ResourceUnavailable` per message. Before, the docs' example used a bare
    `asyncio.create_task`: a loop that died (its database down) died unseen, liveness stayed
    200, and the failure surfaced only at shutdown, as a failed cleanup."""
    import asyncio

    lc = tether.Lifecycle(drain_timeout=5)
    down = {"db": True, "crash": False}
    handled: list[str] = []
    queue: asyncio.Queue[str] = asyncio.Queue()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        if down["db"]:
            raise tether.ResourceUnavailable("'pool' cannot reach the database", resource="pool")
        yield "conn"

    async def handle(message: str, c: str) -> None:
        if down["crash"]:
            raise RuntimeError("a bug in handle()")
        handled.append(message)

    @lc.resource(scope="app")
    async def consumer() -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                message = await queue.get()
                try:
                    async with lc.scope("consume message") as s:
                        await handle(message, await s.get(conn))
                except tether.ResourceUnavailable:  # the database is down: retry it later
                    await queue.put(message)
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            yield
            tg.cancel_scope.cancel()

    async with lc.run():
        await queue.put("first")
        await anyio.sleep(0.2)  # the outage: retried, not lost, the loop alive
        assert handled == []
        down["db"] = False
        with anyio.fail_after(5):
            while handled != ["first"]:
                await anyio.sleep(0.01)
        assert (await lc.health()).ok
        down["crash"] = True
        await queue.put("second")
        with anyio.fail_after(5):
            while not broken(lc):
                await anyio.sleep(0.01)
        assert broken(lc) == ["consumer"]  # /health/live answers 503 naming it


def consuming_app(*, depends: bool) -> tuple[tether.Lifecycle, list[str], anyio.Event]:
    """A pool that opens only once the consumer's loop has asked for a connection of it, and
    a consumer (taking the pool as a parameter, if *depends*) whose loop asks as it opens."""
    lc = tether.Lifecycle()
    asked = anyio.Event()
    got: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        with anyio.move_on_after(0.5):  # (opened first, it waits in vain)
            await asked.wait()
        yield "pool"

    @lc.resource
    async def conn(pool: str) -> str:
        return f"conn of {pool}"

    async def loop() -> None:
        try:
            async with lc.scope("consume message") as s:
                got.append(await s.get(conn))
        finally:
            asked.set()

    async def consume() -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            yield
            tg.cancel_scope.cancel()

    if depends:

        @lc.resource(scope="app")
        async def consumer(pool: str) -> AsyncIterator[None]:
            async for _ in consume():
                yield

    else:

        @lc.resource(scope="app")
        async def consumer() -> AsyncIterator[None]:  # type: ignore[no-redef]
            async for _ in consume():
                yield

    return lc, got, asked


async def test_a_consumer_using_a_pool_it_does_not_depend_on_is_told_to_depend_on_it() -> None:
    """The docs' consumer asked for a connection of a pool it did not take as a parameter:
    both open at once, and with a message waiting at boot its loop asked while the pool
    still opened. The app failed to start, told to start the app scope with
    `FastAPI(lifespan=lc.lifespan)`, which was starting (trial 31). It is told to take the
    pool as a parameter; taking it, the consumer runs."""
    lc, got, _ = consuming_app(depends=False)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover
    assert str(caught.value).startswith(
        "App resource 'consumer' failed to open: ScopeError: App resource 'pool' is not open "
        "yet: the app scope is starting, and app resources that do not depend on each other "
        "open at the same time. An app resource whose code uses 'pool' as it opens (a task it "
        "starts before its `yield`: a consumer's loop), directly or through a request "
        "resource made from it, must depend on it: take it as a parameter of its factory "
        "(`pool: ...`), so that it opens first, and closes after."
    ), str(caught.value)
    lc, got, asked = consuming_app(depends=True)
    async with lc.run():
        await asked.wait()
    assert got == ["conn of pool"]


@pytest.mark.parametrize("case", ["depends_on_the_asker", "itself"])
async def test_an_app_resource_asking_for_one_that_cannot_open_first_is_not_told_to_depend(
    case: str,
) -> None:
    """The advice to take the resource as a parameter was given where following it makes a
    cycle: asked for by the resource it depends on, or by itself (trial 33)."""
    lc = tether.Lifecycle()

    async def asking(name: str) -> AsyncIterator[str]:
        async def loop() -> None:
            lc.get(lc.resources[name])

        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            await anyio.sleep(0.1)  # the loop asks before the value is yielded
            yield "b"
            tg.cancel_scope.cancel()

    @lc.resource(scope="app", retries=2, backoff=5)
    async def b() -> AsyncIterator[str]:
        async for value in asking("a" if case == "depends_on_the_asker" else "b"):
            yield value

    @lc.resource(scope="app")
    async def a(b: str) -> str:
        return f"a of {b}"

    started = time.monotonic()
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover
    assert time.monotonic() - started < 4  # not retried: the same order comes again
    said = str(caught.value)
    assert said.endswith(
        "Fix the cause above: a mistake in the configuration or the code, which no retry mends."
    ), said
    if case == "itself":
        assert (
            "App resource 'b' is not open yet: it is the resource whose code asks for it, " in said
        )
    else:
        assert (
            "App resource 'a' is not open yet: it depends on 'b', whose code asks for it as 'b' "
            "opens, so it opens after. Use it only once the app has started (after the "
            "lifespan's startup), or pass the value it needs to the code that asks for it."
        ) in said, said
    assert "take it as a parameter" not in said
