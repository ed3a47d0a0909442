"""Request scopes: `async with lc.scope() as s: await s.get(res)`."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import tether

from ._messages import close_timeout, unit_ended

pytestmark = pytest.mark.anyio


class TestLazyOpening:
    async def test_nothing_opens_unless_asked(self) -> None:
        """A request resource (and what it depends on) opens only when something asks for it."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            events.append("open conn")
            yield "conn"
            events.append("close conn")

        @lc.resource
        async def session(conn: str) -> AsyncIterator[str]:
            events.append("open session")
            yield "session"
            events.append("close session")

        @lc.resource
        def unrelated() -> str:
            events.append("open unrelated")
            return "x"

        async with lc.scope():
            pass
        assert events == []
        async with lc.scope() as s:
            assert await s.get(conn) == "conn"
        assert events == ["open conn", "close conn"]

    async def test_at_most_once_under_concurrent_gets(self) -> None:
        """Asked concurrently by several tasks and through dependents, a value opens once."""
        lc = tether.Lifecycle()
        opened: list[object] = []

        @lc.resource
        async def conn() -> AsyncIterator[object]:
            await anyio.sleep(0.05)
            value = object()
            opened.append(value)
            yield value

        @lc.resource
        def users(conn: object) -> object:
            return conn

        @lc.resource
        async def orders(conn: object) -> object:
            await anyio.sleep(0.01)
            return conn

        @lc.resource
        async def report(users: object, orders: object) -> AsyncIterator[tuple[object, object]]:
            yield (users, orders)

        got: list[object] = []
        async with lc.scope() as s:

            async def ask(res: tether.Resource[object]) -> None:
                got.append(await s.get(res))

            async with anyio.create_task_group() as tg:
                for res in (conn, users, orders, conn, users, orders, conn):
                    tg.start_soon(ask, res)
                tg.start_soon(ask, report)
        assert len(opened) == 1
        assert got.count(opened[0]) == 7
        assert (opened[0], opened[0]) in got
        stats = lc.stats().resources["conn"]
        assert (stats.opened, stats.closed) == (1, 1)

    async def test_one_value_per_unit_of_work(self) -> None:
        """Each unit of work gets its own value of a request resource."""
        lc = tether.Lifecycle()

        @lc.resource
        def conn() -> object:
            return object()

        async with lc.scope() as s1, lc.scope() as s2:
            assert await s1.get(conn) is await s1.get(conn)
            assert await s1.get(conn) is not await s2.get(conn)

    async def test_failed_open_leaves_nothing_to_close(self) -> None:
        """A resource whose open fails is not closed; its dependencies opened are closed."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            events.append("open conn")
            try:
                yield "conn"
            finally:
                events.append("close conn")

        @lc.resource
        async def tx(conn: str) -> AsyncIterator[str]:
            events.append("begin tx")
            raise ConnectionResetError("gone")
            yield "tx"  # pragma: no cover

        with pytest.raises(ConnectionResetError, match=r"^gone$"):
            async with lc.scope() as s:
                await s.get(tx)
        assert events == ["open conn", "begin tx", "close conn"]
        stats = lc.stats().resources
        assert (stats["tx"].opened, stats["tx"].closed, stats["tx"].open_errors) == (0, 0, 1)

    async def test_generator_that_does_not_yield(self) -> None:
        """A generator that returns without yielding fails its open with a clear error."""
        lc = tether.Lifecycle()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            if False:  # pragma: no cover
                yield "never"

        expected = re.escape(
            "Resource 'conn': its generator returned without yielding a value. A generator "
            "resource yields its value once (`yield value`) and cleans up after the yield: "
            "check the path that returned before it (an early `return`, an `if` around the "
            "`yield`)."
        )
        with pytest.raises(RuntimeError, match=rf"^{expected}$"):
            async with lc.scope() as s:
                await s.get(conn)

    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_context_manager_that_does_not_yield(self, kind: str) -> None:
        """An ``@asynccontextmanager`` or ``@contextmanager`` factory whose generator returns
        without yielding is named, as a generator resource is (before: contextlib's bare
        "generator didn't yield", naming no resource); another RuntimeError of its own
        passes through as it was raised."""
        lc = tether.Lifecycle()
        fail = [False]

        if kind == "async":

            @lc.resource
            @contextlib.asynccontextmanager
            async def conn() -> AsyncIterator[str]:
                if fail[0]:
                    raise RuntimeError("the server said no")
                if False:  # pragma: no cover
                    yield "never"

        else:

            @lc.resource(thread=False)
            @contextlib.contextmanager
            def conn() -> Iterator[str]:
                if fail[0]:
                    raise RuntimeError("the server said no")
                if False:  # pragma: no cover
                    yield "never"

        expected = re.escape(
            "Resource 'conn': its context manager's generator (contextlib) returned without "
            "yielding a value. A generator resource yields its value once (`yield value`) and "
            "cleans up after the yield: check the path that returned before it (an early "
            "`return`, an `if` around the `yield`)."
        )
        with pytest.raises(RuntimeError, match=rf"^{expected}$"):
            async with lc.scope() as s:
                await s.get(conn)
        fail[0] = True
        with pytest.raises(RuntimeError, match=r"^the server said no$"):
            async with lc.scope() as s:
                await s.get(conn)

    async def test_generator_that_yields_twice(self) -> None:
        """A generator that yields a second time fails its cleanup with a clear error."""
        lc = tether.Lifecycle()
        closed: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "one"
                yield "two"
            finally:
                closed.append("conn")

        expected = re.escape(
            "Resource 'conn': its generator yielded more than once. A generator resource "
            "yields its value once (`yield value`), then cleans up: look for a second `yield` "
            "(in a loop, or in a `finally` or an `except` after the first one). tether closed the "
            "generator."
        )
        with pytest.raises(RuntimeError, match=rf"^{expected}$"):
            async with lc.scope() as s:
                await s.get(conn)
        assert closed == ["conn"]


class TestClosing:
    async def test_close_in_reverse_order_of_opening(self) -> None:
        """Values close in the exact reverse of the order they were opened in."""
        lc = tether.Lifecycle()
        opened: list[str] = []
        closed: list[str] = []

        def make(name: str) -> tether.Resource[str]:
            async def factory() -> AsyncIterator[str]:
                opened.append(name)
                yield name
                closed.append(name)

            return lc.resource(factory, name=name)

        a, b, c, d = (make(n) for n in "abcd")
        async with lc.scope() as s:
            for res in (c, a, d, b):
                await s.get(res)
        assert opened == ["c", "a", "d", "b"]
        assert closed == ["b", "d", "a", "c"]

    async def test_success_commits(self) -> None:
        """A scope that ends normally lets each generator continue after `yield` (commit)."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def tx() -> AsyncIterator[str]:
            try:
                yield "tx"
            except Exception as exc:
                events.append(f"rollback: {exc!r}")
                raise
            else:
                events.append("commit")

        async with lc.scope() as s:
            await s.get(tx)
        assert events == ["commit"]

    async def test_exception_reaches_each_generator_at_yield(self) -> None:
        """The exception ending the scope is thrown into each generator (rollback), then raised."""
        lc = tether.Lifecycle()
        events: list[str] = []
        seen: list[BaseException] = []
        error = ValueError("endpoint failed")

        def make(name: str) -> tether.Resource[str]:
            async def factory() -> AsyncIterator[str]:
                try:
                    yield name
                except Exception as exc:
                    seen.append(exc)
                    events.append(f"rollback {name}")
                    raise
                else:
                    events.append(f"commit {name}")

            return lc.resource(factory, name=name)

        conn, tx = make("conn"), make("tx")
        with pytest.raises(ValueError, match=r"^endpoint failed$") as info:
            async with lc.scope() as s:
                await s.get(conn)
                await s.get(tx)
                raise error
        assert info.value is error
        assert events == ["rollback tx", "rollback conn"]
        assert seen == [error, error]

    @pytest.mark.parametrize("kind", ["sync_gen", "async_cm", "sync_cm"])
    async def test_exception_reaches_other_kinds(self, kind: str) -> None:
        """Sync generators and context managers see the scope's exception too."""
        from contextlib import asynccontextmanager, contextmanager

        lc = tether.Lifecycle()
        seen: list[BaseException | None] = []

        def sgen() -> Iterator[int]:
            try:
                yield 1
            except Exception as exc:
                seen.append(exc)
                raise

        async def agen() -> AsyncIterator[int]:
            try:
                yield 1
            except Exception as exc:
                seen.append(exc)
                raise

        factory = {
            "sync_gen": sgen,
            "async_cm": asynccontextmanager(agen),
            "sync_cm": contextmanager(sgen),
        }[kind]
        res = lc.resource(factory, name="res")
        error = LookupError("nope")
        with pytest.raises(LookupError, match=r"^nope$"):
            async with lc.scope() as s:
                await s.get(res)
                raise error
        assert seen == [error]

    async def test_cleanup_failure_replaces_exception_and_is_raised(self) -> None:
        """A failing cleanup is what earlier-opened resources see, and what the scope raises."""
        lc = tether.Lifecycle()
        seen: list[str] = []
        commit_failed = RuntimeError("commit failed")

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "conn"
            except Exception as exc:
                seen.append(f"conn saw {exc!r}")
                raise
            else:
                seen.append("conn clean")  # pragma: no cover

        @lc.resource
        async def tx(conn: str) -> AsyncIterator[str]:
            yield "tx"
            raise commit_failed

        with pytest.raises(RuntimeError, match=r"^commit failed$") as info:
            async with lc.scope() as s:
                await s.get(tx)
        assert info.value is commit_failed
        assert seen == ["conn saw RuntimeError('commit failed')"]
        stats = lc.stats().resources["tx"]
        assert (stats.closed, stats.close_errors, stats.errors) == (1, 1, 1)

    async def test_cleanup_failure_replaces_body_exception(self) -> None:
        """As with ExitStack, a cleanup failure after a body error is raised, chained to it."""
        lc = tether.Lifecycle()
        seen: list[BaseException] = []
        body_error = ValueError("body")
        rollback_failed = RuntimeError("rollback failed")

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "conn"
            except Exception as exc:
                seen.append(exc)
                raise

        @lc.resource
        async def tx(conn: str) -> AsyncIterator[str]:
            try:
                yield "tx"
            except Exception as exc:
                seen.append(exc)
                raise rollback_failed from None

        with pytest.raises(RuntimeError, match=r"^rollback failed$") as info:
            async with lc.scope() as s:
                await s.get(tx)
                raise body_error
        assert info.value is rollback_failed
        assert info.value.__context__ is body_error
        assert seen == [body_error, rollback_failed]

    async def test_chain_of_cleanup_failures_is_kept(self) -> None:
        """Each cleanup failure chains to the one before it, back to the body's exception."""
        lc = tether.Lifecycle()
        body_error = ValueError("body")
        tx_failed = RuntimeError("rollback failed")
        conn_failed = OSError("connection reset")

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "conn"
            except Exception:
                raise conn_failed  # noqa: B904

        @lc.resource
        async def tx(conn: str) -> AsyncIterator[str]:
            try:
                yield "tx"
            except Exception:
                raise tx_failed  # noqa: B904

        with pytest.raises(OSError, match=r"^connection reset$") as info:
            async with lc.scope() as s:
                await s.get(tx)
                raise body_error
        assert info.value is conn_failed
        assert conn_failed.__context__ is tx_failed
        assert tx_failed.__context__ is body_error

    async def test_cleanup_failure_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A failing request cleanup is logged with the resource's name."""
        lc = tether.Lifecycle()

        @lc.resource
        async def tx() -> AsyncIterator[str]:
            yield "tx"
            raise RuntimeError("commit failed")

        with pytest.raises(RuntimeError, match=r"^commit failed$"):
            async with lc.scope() as s:
                await s.get(tx)
        messages = [r.getMessage() for r in caplog.records if r.name == "tether"]
        assert messages == ["tether: closing resource 'tx' failed: RuntimeError: commit failed"]


class TestShieldedCleanup:
    async def test_cleanup_that_awaits_runs_when_scope_is_cancelled(self) -> None:
        """A scope exiting in a cancelled cancel scope still runs an awaiting cleanup to its end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "conn"
            except BaseException as exc:
                events.append(f"saw {type(exc).__name__}")
                await anyio.sleep(0.05)
                events.append("rolled back")
                raise

        with anyio.CancelScope() as cs:
            async with lc.scope() as s:
                await s.get(conn)
                cs.cancel()
                await anyio.sleep(1)
                pytest.fail("not cancelled")  # pragma: no cover
        assert cs.cancelled_caught
        cancelled = anyio.get_cancelled_exc_class().__name__
        assert events == [f"saw {cancelled}", "rolled back"]

    @pytest.mark.parametrize("when", ["during the commit", "before the cleanup"])
    async def test_cancel_scope_cancellation_stays_inside_the_scope(self, when: str) -> None:
        """A cancel scope cancelled while (or before) a cleanup waits: the cleanup runs to
        its end, and no cancellation fires after the scope (anyio delivers its own inside
        it; one re-requested by tether would land on the caller's next await)."""
        import asyncio

        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "conn"
            except BaseException:
                await anyio.sleep(0.05)  # a rollback on the wire
                events.append("rolled back")
                raise
            await anyio.sleep(0.05)  # a commit on the wire
            events.append("committed")

        with anyio.CancelScope() as cs:
            async with lc.scope() as s:
                await s.get(conn)
                if when == "during the commit":
                    asyncio.get_running_loop().call_later(0.01, cs.cancel)
                else:
                    cs.cancel()
                    await anyio.sleep(1)
        await asyncio.sleep(0)  # raises CancelledError if one was left pending
        await asyncio.sleep(0.01)
        assert events == (["committed"] if when == "during the commit" else ["rolled back"])
        assert cs.cancelled_caught == (when == "before the cleanup")

    async def test_cleanup_that_awaits_runs_when_task_group_is_cancelled(self) -> None:
        """Cancelling the task that holds a scope still closes every value, in reverse order."""
        lc = tether.Lifecycle()
        events: list[str] = []
        holding = anyio.Event()

        def make(name: str) -> tether.Resource[str]:
            async def factory() -> AsyncIterator[str]:
                try:
                    yield name
                finally:
                    await anyio.sleep(0.01)
                    events.append(f"close {name}")

            return lc.resource(factory, name=name)

        a, b = make("a"), make("b")

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(a)
                await s.get(b)
                holding.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(job)
            await holding.wait()
            tg.cancel_scope.cancel()
        assert events == ["close b", "close a"]

    async def test_cleanup_bounded_by_close_timeout(self) -> None:
        """A hanging cleanup is abandoned after close_timeout (TimeoutError); the rest close."""
        lc = tether.Lifecycle(close_timeout=0.1)
        events: list[str] = []

        @lc.resource
        async def first() -> AsyncIterator[str]:
            try:
                yield "first"
            except Exception as exc:
                events.append(f"first saw {type(exc).__name__}")
                raise

        @lc.resource
        async def stuck(first: str) -> AsyncIterator[str]:
            yield "stuck"
            events.append("stuck closing")
            await anyio.sleep_forever()

        @lc.resource
        async def last(stuck: str) -> AsyncIterator[str]:
            yield "last"
            events.append("last closed")

        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match=close_timeout("stuck", "0.1")):
            async with lc.scope() as s:
                await s.get(last)
        assert 0.09 < time.perf_counter() - t0 < 1
        assert events == ["last closed", "stuck closing", "first saw TimeoutError"]
        stats = lc.stats().resources
        assert (stats["stuck"].timeouts, stats["stuck"].closed) == (1, 1)
        assert (stats["first"].closed, stats["last"].closed) == (1, 1)

    async def test_sync_cleanup_bounded_by_close_timeout(self) -> None:
        """A sync cleanup blocking its thread is abandoned after close_timeout with TimeoutError."""
        lc = tether.Lifecycle(close_timeout=0.1)
        release = threading.Event()
        finished = threading.Event()

        @lc.resource
        def stuck() -> Iterator[str]:
            yield "stuck"
            release.wait(5)
            finished.set()

        t0 = time.perf_counter()
        try:
            with pytest.raises(TimeoutError, match=close_timeout("stuck", "0.1")):
                async with lc.scope() as s:
                    await s.get(stuck)
            assert time.perf_counter() - t0 < 1
            assert not finished.is_set()
        finally:
            release.set()
        await anyio.to_thread.run_sync(finished.wait, 5)


class TestAppDependencies:
    async def test_request_resource_gets_app_value(self) -> None:
        """A request resource depending on an app resource receives the app's one value."""
        lc = tether.Lifecycle()
        pools: list[object] = []

        @lc.resource(scope="app")
        async def pool() -> AsyncIterator[object]:
            pools.append(object())
            yield pools[-1]

        @lc.resource
        async def conn(pool: object) -> AsyncIterator[tuple[str, object]]:
            yield ("conn", pool)

        async with lc.run():
            async with lc.scope() as s1, lc.scope() as s2:
                assert await s1.get(conn) == ("conn", pools[0])
                assert await s2.get(conn) == ("conn", pools[0])
                assert await s1.get(pool) is pools[0]
        assert len(pools) == 1

    @pytest.mark.parametrize("state", ["created", "closed"])
    async def test_app_resource_without_running_app_scope(self, state: str) -> None:
        """Using an app resource when the app scope is not running raises ScopeError."""
        lc = tether.Lifecycle()
        opened: list[str] = []

        @lc.resource(scope="app")
        def pool() -> str:
            return "pool"

        @lc.resource
        async def conn(pool: str) -> AsyncIterator[str]:
            opened.append("conn")  # pragma: no cover
            yield pool  # pragma: no cover

        if state == "closed":
            async with lc.run():
                pass
        expected = re.escape(
            "App resource 'pool' is not open: the app scope has not started. Start it with "
            "`FastAPI(lifespan=lc.lifespan)` (and `with TestClient(app):` in tests) or "
            "`async with lc.run():`."
            if state != "closed"
            else "App resource 'pool' is not open: the app scope is closed, its lifespan "
            "ended (an earlier test ran the app, or it shut down). In tests, run the lifespan "
            "around each test: enter the client (`with TestClient(app) as client:`), or, with "
            "httpx's `ASGITransport`, which never runs a lifespan, wrap the client in `async "
            "with lc.lifespan(app):`; elsewhere, `async with lc.run():`."
        )
        async with lc.scope() as s:
            with pytest.raises(tether.ScopeError, match=rf"^{expected}$"):
                await s.get(conn)
        assert opened == []

    async def test_resource_of_another_lifecycle(self) -> None:
        """Asking a scope for a resource of another Lifecycle raises ScopeError."""
        lc, other = tether.Lifecycle(), tether.Lifecycle()

        @other.resource
        def conn() -> int:
            return 1

        expected = re.escape(
            "Resource 'conn' belongs to another Lifecycle than this scope's. "
            "Use the Lifecycle the resource was registered on."
        )
        async with lc.scope() as s:
            with pytest.raises(tether.ScopeError, match=rf"^{expected}$"):
                await s.get(conn)


class TestClosedUnit:
    async def test_get_after_scope_closed_raises(self) -> None:
        """`s.get()` on a unit that has ended raises ResourceClosedError, opening nothing."""
        lc = tether.Lifecycle()
        opened: list[str] = []

        @lc.resource
        def conn() -> str:
            opened.append("conn")  # pragma: no cover
            return "conn"  # pragma: no cover

        async with lc.scope("job 42") as s:
            pass
        with pytest.raises(tether.ResourceClosedError, match=unit_ended("conn", "job 42")) as info:
            await s.get(conn)
        assert info.value.resource == "conn"
        assert opened == []

    async def test_get_of_already_opened_value_after_close_raises(self) -> None:
        """`s.get()` after the scope ended raises even for a value it had opened (and closed)."""
        lc = tether.Lifecycle()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"

        async with lc.scope() as s:
            assert await s.get(conn) == "conn"
        with pytest.raises(tether.ResourceClosedError, match=unit_ended("conn", "scope")):
            await s.get(conn)

    async def test_unit_repr(self) -> None:
        """A unit's repr shows its label and how many values it holds."""
        lc = tether.Lifecycle()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"

        async with lc.scope("job") as s:
            await s.get(conn)
            assert repr(s) == "<tether.Unit 'job' (1 open)>"
        assert repr(s) == "<tether.Unit 'job' (closed)>"


class TestNativeShield:
    async def test_cleanup_survives_a_native_task_cancel(self) -> None:
        """`task.cancel()` during a waiting cleanup does not cut it short; the cancel comes after."""
        import asyncio

        lc = tether.Lifecycle()
        events: list[str] = []
        release = asyncio.Event()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            events.append("closing")
            await release.wait()  # a pool release waiting on the network, say
            events.append("closed")

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(conn)
            events.append("after scope")  # pragma: no cover - cancelled as the scope ends
            await asyncio.sleep(10)
            events.append("never")

        task = asyncio.get_running_loop().create_task(job())
        await asyncio.sleep(0.01)
        assert events == ["closing"]
        task.cancel()
        await asyncio.sleep(0.01)
        assert events == ["closing"]  # still waiting, not cancelled
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert events == ["closing", "closed"]  # raised as the scope ends, not later
        assert lc.stats().resources["conn"].closed == 1

    async def test_cleanup_gets_the_failure_of_what_it_waits_on(self) -> None:
        """A cleanup awaiting something that fails gets that failure, and may handle it."""
        import asyncio

        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            loop = asyncio.get_running_loop()
            reply = loop.create_future()
            loop.call_later(0.01, reply.set_exception, ConnectionResetError("peer reset"))
            try:
                await reply
            except ConnectionResetError as exc:
                events.append(f"handled {exc}")

        async with lc.scope() as s:
            await s.get(conn)
        assert events == ["handled peer reset"]
        assert lc.stats().resources["conn"].close_errors == 0

    async def test_cleanup_failing_after_a_wait_reports_its_own_failure(self) -> None:
        """The failure a waiting cleanup ends with is what the scope raises, and is counted."""
        import asyncio

        lc = tether.Lifecycle()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            loop = asyncio.get_running_loop()
            reply = loop.create_future()
            loop.call_later(0.01, reply.set_exception, ConnectionResetError("peer reset"))
            await reply

        with pytest.raises(ConnectionResetError, match="peer reset"):
            async with lc.scope() as s:
                await s.get(conn)
        stats = lc.stats().resources["conn"]
        assert (stats.closed, stats.close_errors, stats.in_use) == (1, 1, 0)

    async def test_several_cancels_during_a_cleanup_cancel_the_task_once_after(self) -> None:
        """Three `task.cancel()` while a cleanup waits: it finishes, then the task is cancelled."""
        import asyncio

        lc = tether.Lifecycle()
        events: list[str] = []
        release = asyncio.Event()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            await release.wait()
            await asyncio.sleep(0)  # a second wait in the same cleanup
            events.append("closed")

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(conn)
            events.append("after scope")
            await asyncio.sleep(10)
            events.append("never")  # pragma: no cover

        task = asyncio.get_running_loop().create_task(job())
        await asyncio.sleep(0.01)
        for _ in range(3):
            task.cancel()
            await asyncio.sleep(0)
        assert events == []
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        assert events == ["closed"]  # raised as the scope ends
        assert lc.stats().resources["conn"].closed == 1

    @pytest.mark.parametrize("kind", ["generator", "context manager"])
    @pytest.mark.parametrize("where", ["at once", "after a first wait", "wait_for"])
    async def test_cleanup_with_its_own_asyncio_timeout(self, kind: str, where: str) -> None:
        """A cleanup's own `asyncio.timeout` (or `wait_for`) fires in it, as it would anywhere:
        the shield holds back cancellations from outside, not the cleanup's own (a pool's
        release bounded by a timeout, on a connection that stopped answering)."""
        import asyncio
        import contextlib

        lc = tether.Lifecycle(close_timeout=30)
        events: list[str] = []

        async def bounded_close() -> None:
            if where == "after a first wait":
                await asyncio.sleep(0.01)
            try:
                if where == "wait_for":
                    await asyncio.wait_for(asyncio.sleep(30), 0.05)
                else:
                    async with asyncio.timeout(0.05):
                        await asyncio.sleep(30)  # a reply that never comes
            except TimeoutError:
                events.append("gave up")

        if kind == "generator":

            @lc.resource(name="conn")
            async def conn() -> AsyncIterator[str]:
                yield "conn"
                await bounded_close()

        else:

            @lc.resource(name="conn")
            @contextlib.asynccontextmanager
            async def conn() -> AsyncIterator[str]:
                yield "conn"
                await bounded_close()

        started = time.monotonic()
        async with lc.scope() as s:
            await s.get(conn)
        assert time.monotonic() - started < 10
        assert events == ["gave up"]
        stats = lc.stats().resources["conn"]
        assert (stats.closed, stats.close_errors, stats.timeouts) == (1, 0, 0)

    async def test_outer_asyncio_timeout_waits_for_a_cleanup_with_its_own(self) -> None:
        """An `asyncio.timeout` around the unit of work that expires during its cleanup is held
        back until the cleanup is over (the cleanup's own timeout, still running, is not
        what fires), then raised where it was entered."""
        import asyncio

        lc = tether.Lifecycle(close_timeout=30)
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            async with asyncio.timeout(5):
                await asyncio.sleep(0.2)  # outlives the outer timeout, not its own
            events.append("closed")

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                async with lc.scope() as s:
                    await s.get(conn)
                events.append("after scope")  # pragma: no cover - raised as the scope ends
                await asyncio.sleep(10)
        assert events == ["closed"]
        stats = lc.stats().resources["conn"]
        assert (stats.closed, stats.close_errors, stats.timeouts) == (1, 0, 0)

    @pytest.mark.parametrize("kind", ["generator", "context manager"])
    async def test_a_timeout_ending_a_unit_with_a_sync_resource_does_not_escape_it(
        self, kind: str
    ) -> None:
        """An `asyncio.timeout` that ends a unit of work holding a sync resource (its cleanup
        in a thread, where the unit's CancelledError is thrown into it and comes back as the
        thread's result) is raised as TimeoutError where it was entered, and nothing more.
        Before, that CancelledError, the thread's result, was taken for a cancellation of
        the task held back during the cleanup and delivered again: the task's next await
        after the `async with asyncio.timeout()` block was cancelled."""
        import asyncio

        lc = tether.Lifecycle()
        events: list[str] = []

        if kind == "generator":

            @lc.resource
            def res() -> Iterator[str]:
                yield "v"
                events.append("closed")  # pragma: no cover - thrown the CancelledError

        else:

            @contextlib.contextmanager
            def cm() -> Iterator[str]:
                try:
                    yield "v"
                finally:
                    events.append("closed")

            @lc.resource(name="res")
            def res() -> contextlib.AbstractContextManager[str]:
                return cm()

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                async with lc.scope("job") as unit:
                    await unit.get(res)
                    await asyncio.sleep(5)
        await asyncio.sleep(0)  # was cancelled
        await asyncio.sleep(0.01)
        stats = lc.stats().resources["res"]
        assert (stats.closed, stats.in_use) == (1, 0)

    async def test_cleanup_with_its_own_cancel_scope(self) -> None:
        """A cleanup that enters an anyio cancel scope before it first waits closes cleanly."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def client() -> AsyncIterator[str]:
            yield "client"
            with anyio.move_on_after(1):
                await anyio.sleep(0.01)
            events.append("closed")

        async with lc.scope() as s:
            await s.get(client)
        assert events == ["closed"]


def test_native_shield_on_uvloop() -> None:
    """The shield holds on uvloop too (uvicorn's default loop): a cancel during a waiting
    cleanup is delivered after it, and a close past close_timeout is reported."""
    import asyncio

    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[str]:
        lc = tether.Lifecycle(close_timeout=0.2)
        events: list[str] = []
        release = asyncio.Event()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "conn"
            await release.wait()
            events.append("conn closed")

        @lc.resource
        async def stuck() -> AsyncIterator[str]:
            yield "stuck"
            await asyncio.sleep(10)

        async def job() -> None:
            async with lc.scope() as s:
                await s.get(conn)
            events.append("after scope")
            await asyncio.sleep(10)

        task = asyncio.get_running_loop().create_task(job())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        try:
            await task
        except asyncio.CancelledError:
            events.append("job cancelled")
        try:
            async with lc.scope() as s:
                await s.get(stuck)
        except TimeoutError as exc:
            events.append(str(exc).split(" took")[0])
        return events

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        events = runner.run(scenario())
    assert events == ["conn closed", "job cancelled", "Closing resource 'stuck'"]


def test_anyio_cancellations_are_told_apart_on_every_supported_anyio() -> None:
    """anyio marks its cancel scopes' cancellations "Cancelled via cancel scope <id>" since
    4.11 and "Cancelled by cancel scope <id>" before (and still at some checkpoints): both
    are anyio's (delivered again by anyio inside the scope), a bare task.cancel() is not."""
    from tether._scope import _by_anyio_scope

    assert _by_anyio_scope("Cancelled via cancel scope 7f3a2b")
    assert _by_anyio_scope("Cancelled by cancel scope 7f3a2b")
    assert not _by_anyio_scope(None)
    assert not _by_anyio_scope("shutting down")


def test_the_http_unit_sets_every_field_of_a_unit() -> None:
    """`HttpUnit.__init__` sets `Unit`'s fields itself (one call per request, not two):
    a field added to `Unit` must be set there too, with the same starting value."""
    from tether._scope import Unit
    from tether.fastapi import HttpUnit

    lc = tether.Lifecycle()
    plain, http = Unit(lc, "GET /x"), HttpUnit(lc, "GET /x")
    for name in Unit.__slots__:
        if name in ("__weakref__", "started"):
            continue
        assert getattr(http, name) == getattr(plain, name), name
    assert http.started >= plain.started


async def test_a_value_that_finishes_opening_after_its_unit_ended_is_closed_at_once() -> None:
    """A task of a unit of work (a job's `lc.scope()`, a request's `create_task`) asks for
    a value; the unit ends while it opens: the value is closed at once, as a failure (it
    rolls back), and the task gets `ResourceClosedError`. Before, it was handed out and
    never closed (counted in use for ever, its cleanup left to the garbage collector)."""
    import asyncio

    import httpx
    from fastapi import Depends, FastAPI

    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource
    async def audit() -> AsyncIterator[str]:
        await anyio.sleep(0.2)  # a first query on open
        try:
            yield "audit"
            events.append("audit commit")
        except BaseException as exc:
            events.append(f"audit rollback ({type(exc).__name__})")
            raise

    async def later(get: Any) -> None:
        try:
            await get()
            events.append("task got the value")
        except tether.ResourceClosedError as exc:
            events.append(str(exc))

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)
    tasks: list[asyncio.Task[None]] = []

    @app.get("/work")
    async def work(c: str = Depends(conn)) -> str:
        tasks.append(asyncio.create_task(later(audit)))
        await anyio.sleep(0.01)
        return "ok"

    async with lc.lifespan(app):
        async with lc.scope("nightly job") as s:
            tasks.append(asyncio.create_task(later(lambda: s.get(audit))))
            await anyio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/work")).json() == "ok"
        await asyncio.gather(*tasks)
    ended = "ended while it opened. Open a new `async with lc.scope()` for work that outlives it."
    assert events == [
        "audit rollback (ResourceClosedError)",
        f"Cannot open resource 'audit': nightly job {ended}",
        "audit rollback (ResourceClosedError)",
        f"Cannot open resource 'audit': GET /work {ended}",
    ]
    stats = lc.stats().resources["audit"]
    assert (stats.opened, stats.closed, stats.in_use) == (2, 2, 0)
