"""Sync resources open and close in worker threads through tether's own limiters."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import pytest

import tether

from ._messages import exactly, open_timeout, startup

pytestmark = pytest.mark.anyio


@pytest.fixture
async def small_default_threadpool() -> AsyncIterator[None]:
    """anyio's default thread limiter cut to 2 tokens for the test, restored after."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    before = limiter.total_tokens
    limiter.total_tokens = 2
    try:
        yield
    finally:
        limiter.total_tokens = before


def _pool(size: int) -> queue.Queue[int]:
    pool: queue.Queue[int] = queue.Queue(maxsize=size)
    for i in range(size):
        pool.put(i)
    return pool


class TestThreads:
    async def test_sync_generator_opens_and_closes_in_worker_thread(self) -> None:
        """A `def` generator runs its open and its cleanup off the event loop thread."""
        lc = tether.Lifecycle()
        loop_thread = threading.get_ident()
        threads: dict[str, int] = {}

        @lc.resource
        def conn() -> Iterator[str]:
            threads["open"] = threading.get_ident()
            yield "conn"
            threads["close"] = threading.get_ident()

        async with lc.scope() as s:
            assert await s.get(conn) == "conn"
        assert set(threads) == {"open", "close"}
        assert threads["open"] != loop_thread
        assert threads["close"] != loop_thread

    async def test_sync_context_manager_in_worker_thread(self) -> None:
        """A @contextmanager factory is entered and exited off the event loop thread."""
        lc = tether.Lifecycle()
        loop_thread = threading.get_ident()
        threads: list[int] = []

        @lc.resource(scope="app")
        @contextmanager
        def engine() -> Iterator[str]:
            threads.append(threading.get_ident())
            yield "engine"
            threads.append(threading.get_ident())

        async with lc.run():
            assert lc.get(engine) == "engine"
        assert len(threads) == 2
        assert loop_thread not in threads

    async def test_plain_function_runs_inline_unless_asked(self) -> None:
        """A plain `def` runs on the loop thread by default, and in a thread with `thread=True`."""
        lc = tether.Lifecycle()
        loop_thread = threading.get_ident()

        @lc.resource
        def inline() -> int:
            return threading.get_ident()

        @lc.resource(thread=True)
        def threaded() -> int:
            return threading.get_ident()

        async with lc.scope() as s:
            assert await s.get(inline) == loop_thread
            assert await s.get(threaded) != loop_thread


class TestNoDeadlock:
    @pytest.mark.parametrize("app_running", [True, False], ids=["in-run", "no-run"])
    @pytest.mark.usefixtures("small_default_threadpool")
    async def test_many_scopes_share_a_small_sync_pool(self, app_running: bool) -> None:
        """50 concurrent scopes on a sync pool of 2 all finish even with a 2-thread default pool."""
        lc = tether.Lifecycle()
        pool = _pool(2)
        out: list[int] = []

        @lc.resource(concurrency=2)
        def conn() -> Iterator[int]:
            item = pool.get(timeout=5)
            try:
                yield item
            finally:
                pool.put(item)

        async def job(i: int) -> None:
            async with lc.scope(f"job {i}") as s:
                await s.get(conn)
                await anyio.sleep(0.001)
                out.append(i)

        async def all_jobs() -> None:
            with anyio.fail_after(4):
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(job, i)

        if app_running:
            async with lc.run():
                await all_jobs()
        else:
            await all_jobs()
        assert sorted(out) == list(range(50))
        assert pool.qsize() == 2
        stats = lc.stats().resources["conn"]
        assert (stats.opened, stats.closed, stats.in_use) == (50, 50, 0)
        assert stats.max_in_use <= 2


class TestCancellation:
    async def test_cancelled_scope_still_runs_sync_cleanup(self) -> None:
        """A scope cancelled while its sync resource is open still returns the item to the pool."""
        lc = tether.Lifecycle()
        pool = _pool(1)
        seen: list[str] = []

        @lc.resource
        def conn() -> Iterator[int]:
            item = pool.get(timeout=5)
            try:
                yield item
            except BaseException as exc:
                seen.append(type(exc).__name__)
                raise
            finally:
                pool.put(item)

        with anyio.CancelScope() as cs:
            async with lc.scope() as s:
                await s.get(conn)
                assert pool.qsize() == 0
                cs.cancel()
                await anyio.sleep(1)
        assert cs.cancelled_caught
        assert pool.qsize() == 1
        assert seen == [anyio.get_cancelled_exc_class().__name__]

    async def test_cancelled_while_opening_still_closes_what_opened(self) -> None:
        """A scope cancelled while a sync open waits in its thread closes the value it then gets."""
        lc = tether.Lifecycle()
        pool: queue.Queue[int] = queue.Queue(maxsize=1)
        waiting = threading.Event()
        closed: list[int] = []

        @lc.resource
        def conn() -> Iterator[int]:
            waiting.set()
            item = pool.get(timeout=5)
            try:
                yield item
            finally:
                closed.append(item)
                pool.put(item)

        async def give_item_later() -> None:
            await anyio.to_thread.run_sync(waiting.wait, 5)
            await anyio.sleep(0.05)
            pool.put(7)

        async with anyio.create_task_group() as tg:
            tg.start_soon(give_item_later)
            with anyio.move_on_after(0.02) as cs:
                async with lc.scope() as s:
                    await s.get(conn)
                    await anyio.sleep(1)  # pragma: no cover
        assert cs.cancelled_caught
        assert closed == [7]
        assert pool.qsize() == 1
        stats = lc.stats().resources["conn"]
        assert (stats.opened, stats.closed) == (1, 1)

    async def test_task_cancel_while_opening_still_closes_what_opened(self) -> None:
        """The same with a one-shot ``task.cancel()`` (a client that went away, a server
        shutting down): it cancels the future of the thread, anyio's shield notwithstanding;
        the value the thread opens is still recorded, then closed, and the task ends
        cancelled."""
        import asyncio

        lc = tether.Lifecycle()
        events: list[str] = []
        in_thread = threading.Event()

        @lc.resource
        def conn() -> Iterator[str]:
            in_thread.set()
            time.sleep(0.2)  # connecting
            events.append("opened")
            try:
                yield "conn"
            finally:
                events.append("closed")

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(conn)  # the cancellation is delivered once the open is over
                await anyio.sleep(1)
                events.append("not cancelled")  # pragma: no cover

        task = asyncio.ensure_future(job())
        await anyio.to_thread.run_sync(in_thread.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert events == ["opened", "closed"]
        stats = lc.stats().resources["conn"]
        assert (stats.opened, stats.closed, stats.in_use) == (1, 1, 0)

    async def test_task_cancel_while_waiting_for_a_thread_token_opens_nothing(self) -> None:
        """Waiting for a token of the resource's limiter is not shielded: a cancelled wait
        ends at once, and nothing is opened for it."""
        import asyncio

        lc = tether.Lifecycle()
        release = threading.Event()
        opened: list[int] = []

        @lc.resource(concurrency=1)
        def conn() -> Iterator[int]:
            opened.append(1)
            release.wait(5)
            yield len(opened)

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(conn)

        holder = asyncio.ensure_future(job())
        while not opened:
            await anyio.sleep(0.01)
        waiter = asyncio.ensure_future(job())
        await anyio.sleep(0.05)  # waiting for the only token
        waiter.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert time.monotonic() - t0 < 1.0
        release.set()
        await holder
        assert opened == [1]

    async def test_task_group_cancellation_returns_items(self) -> None:
        """Cancelling many tasks that hold sync pool items gives every item back."""
        lc = tether.Lifecycle()
        pool = _pool(3)
        holding = anyio.Semaphore(0)

        @lc.resource(concurrency=3)
        def conn() -> Iterator[int]:
            item = pool.get(timeout=5)
            try:
                yield item
            finally:
                pool.put(item)

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(conn)
                holding.release()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(job)
            for _ in range(3):
                await holding.acquire()
            assert pool.qsize() == 0
            tg.cancel_scope.cancel()
        assert pool.qsize() == 3


class TestTimeout:
    """`timeout=` bounds a sync open in a thread too: the caller gets `ResourceUnavailable`
    at the deadline, the thread (which nothing can interrupt) is left to finish, and what
    it opens then is closed in it."""

    @pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
    async def test_a_sync_open_that_hangs_ends_at_its_timeout(self, anyio_backend: str) -> None:
        lc = tether.Lifecycle()
        pool: queue.Queue[int] = queue.Queue(maxsize=1)
        events: list[str] = []

        @lc.resource(timeout=0.2)
        def conn() -> Iterator[int]:
            item = pool.get(timeout=5)  # the pool is empty: waits in the thread
            events.append(f"opened {item}")
            try:
                yield item
            finally:
                events.append(f"closed {item}")
                pool.put(item)

        async with lc.run():
            t0 = time.monotonic()
            with pytest.raises(
                tether.ResourceUnavailable, match=exactly(open_timeout("conn", "0.2"))
            ):
                async with lc.scope() as s:
                    await s.get(conn)
            assert 0.15 < time.monotonic() - t0 < 1.5
            assert events == []
            pool.put(7)  # the pool hands the thread a connection after the deadline
            with anyio.fail_after(5):
                while events != ["opened 7", "closed 7"]:
                    await anyio.sleep(0.01)
            assert pool.qsize() == 1  # given back, by the thread
            stats = lc.stats().resources["conn"]
            assert (stats.timeouts, stats.opened, stats.in_use) == (1, 0, 0)

    async def test_the_thread_keeps_its_token_until_it_ends(self) -> None:
        """A hung backend holds as many threads as the limiter allows, no more: past its
        deadline the thread still holds its token, so the next open waits for it, and
        times out, without starting another thread."""
        lc = tether.Lifecycle()
        release = threading.Event()
        started: list[int] = []

        @lc.resource(timeout=0.1, concurrency=1)
        def conn() -> Iterator[int]:
            started.append(1)
            release.wait(5)
            yield len(started)

        async def one() -> int:
            async with lc.scope() as s:
                return await s.get(conn)

        async with lc.run():
            for _ in range(2):
                with pytest.raises(tether.ResourceUnavailable):
                    await one()
            assert started == [1]
            release.set()
            with anyio.fail_after(5):  # the token comes back when the thread ends
                while True:
                    try:
                        assert await one() == 2
                        break
                    except tether.ResourceUnavailable:
                        await anyio.sleep(0.05)
            assert lc.stats().resources["conn"].timeouts >= 2

    async def test_a_sync_app_resource_that_hangs_fails_startup_in_time(self) -> None:
        """At startup: a `def` pool whose connect hangs fails the start at its `timeout=`,
        naming it, instead of holding the app's startup until the connect gives up."""
        lc = tether.Lifecycle()
        release = threading.Event()

        @lc.resource(scope="app", timeout=0.2)
        def engine() -> Iterator[str]:
            release.wait(5)  # a connect that hangs
            yield "engine"

        t0 = time.monotonic()
        cause = open_timeout("engine", "0.2")
        with pytest.raises(
            tether.StartupError,
            match=startup("engine", f"ResourceUnavailable: {cause}".rstrip(".")),
        ):
            async with lc.run():
                pass  # pragma: no cover
        assert time.monotonic() - t0 < 1.5
        release.set()


async def test_a_plain_def_given_a_timeout_runs_in_a_thread_bounded_by_it() -> None:
    """A plain `def` app resource runs inline by default; given `timeout=`, it runs in a
    thread, so the timeout is kept and the event loop goes on meanwhile (a 2 s blocking
    connect with timeout=0.3 opened after 2 s, with the loop blocked all along)."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app", timeout=0.3)
    def client() -> str:
        time.sleep(2)  # a blocking connect to a server that does not answer
        return "client"

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.05)
            ticks += 1

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        message = startup("client", f"ResourceUnavailable: {open_timeout('client', '0.3')[:-1]}")
        with pytest.raises(tether.StartupError, match=message):
            async with lc.run():
                pass  # pragma: no cover
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 1.5
    assert ticks >= 3  # the loop ran while the function blocked its thread


class TestCleanupBurst:
    """A burst of sync cleanups, more than the close limiter's threads (review sync, defect
    2): the wait for a thread counted toward ``close_timeout``, and a cleanup abandoned while
    it still waited for one never ran (with a sync session: a connection checked out, idle in
    transaction, for good; its request answered 500 while others' abandoned commits went on)."""

    async def test_every_cleanup_runs_however_long_it_waits_for_a_thread(self) -> None:
        lc = tether.Lifecycle(close_timeout=1.0, sync_threads=2)  # 4 threads for cleanups
        closed: list[int] = []

        @lc.resource
        def session() -> Iterator[str]:
            yield "session"
            time.sleep(0.6)  # a slow commit, well within close_timeout
            closed.append(1)

        failures: list[BaseException] = []

        async def unit() -> None:
            try:
                async with lc.scope() as s:
                    await s.get(session)
            except Exception as exc:
                failures.append(exc)

        async with lc.run():
            async with anyio.create_task_group() as tg:
                for _ in range(12):  # three rounds of 4: the third waited 1.2 s for a thread
                    tg.start_soon(unit)
            stats = lc.stats()["session"]
        assert failures == []  # was 4+ TimeoutErrors: "took longer than close_timeout=1 s"
        assert len(closed) == 12  # was 8 or fewer: the cleanups that never started
        assert (stats.closed, stats.in_use, stats.timeouts) == (12, 0, 0)

    async def test_as_many_cleanups_run_at_once_as_values_may_be_open(self) -> None:
        """A resource whose ``concurrency`` is above the close limiter's threads gets as
        many: its burst of cleanups runs at once, not in rounds."""
        lc = tether.Lifecycle(sync_threads=2)
        lock = threading.Lock()
        running = [0, 0]  # now, most at once
        all_in = threading.Barrier(8, timeout=5)

        @lc.resource(concurrency=8)
        def session() -> Iterator[str]:
            yield "session"
            with lock:
                running[0] += 1
                running[1] = max(running)
            all_in.wait()  # broken (an error) unless all 8 run at once
            with lock:
                running[0] -= 1

        async def unit() -> None:
            async with lc.scope() as s:
                await s.get(session)

        async with lc.run():
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(unit)
        assert running == [0, 8]  # was at most 4 at once (max(sync_threads, 4))
