"""What a review of tether's core found (trial 24), each pinned by the case that showed it."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

import tether
import tether._scope
from tether.fastapi import idempotent

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("sweeper_first", [True, False])
async def test_a_close_cut_short_is_given_up_whether_or_not_the_sweeper_ran_first(
    sweeper_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleanup that waits past `close_timeout`, then waits again in its salvage (a rollback
    on a network gone silent), is given up after the salvage. One whose close began before
    the app scope's sweeper first ran (a job right after `async with lc.run():`) was never
    given up: its first expiry came from a timer, and armed no second one."""
    monkeypatch.setattr(tether._scope, "SALVAGE", 0.3)
    lc = tether.Lifecycle(close_timeout=0.3)

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "c"
        finally:
            try:
                await asyncio.sleep(60)  # a COMMIT waiting for a lock
            except asyncio.CancelledError:
                await asyncio.sleep(60)  # its rollback, on a network gone silent

    async with lc.run():
        if sweeper_first:
            await asyncio.sleep(0)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="took longer than close_timeout=0.3 s"):
            async with asyncio.timeout(20):  # for ever before (the test's own bound)
                async with lc.scope("job") as s:
                    await s.get(conn)
        assert time.monotonic() - started < 10


async def test_an_undone_override_of_an_app_resource_is_forgotten() -> None:
    """A session-wide app, an override per test: each stand-in was kept until the app
    stopped (1000 overrides of a 100 KB value kept 100 MB)."""
    import gc
    import weakref

    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def settings() -> object:
        return object()

    class Big:
        pass

    alive: list[weakref.ref[Big]] = []
    async with lc.run():
        for _ in range(20):
            big = Big()
            alive.append(weakref.ref(big))
            with lc.override(settings, big):
                async with lc.scope() as unit:
                    assert await unit.get(settings) is big
            del big
        gc.collect()
        assert [ref for ref in alive if ref() is not None] == []
        async with lc.scope() as unit:
            assert not isinstance(await unit.get(settings), Big)


def test_an_idempotent_route_that_streamed_its_body_is_not_run_again() -> None:
    """Its body cannot be read again: the lost connection is a 503, as without
    `@idempotent` (a run again failed with "Stream consumed", a 500). A body read whole is
    read again from what Starlette kept, and the route runs again."""
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[int]:
        yield 1

    app = FastAPI(lifespan=lc.lifespan)
    runs: list[int] = []

    @app.post("/upload")
    @idempotent
    async def upload(request: Request, c: Annotated[int, Depends(conn)]) -> int:
        body = b""
        async for chunk in request.stream():
            body += chunk
        runs.append(len(body))
        raise tether.ResourceUnavailable("connection lost", resource="conn", lost=True)

    @app.post("/whole")
    @idempotent
    async def whole(request: Request, c: Annotated[int, Depends(conn)]) -> int:
        body = await request.body()
        runs.append(len(body))
        if len(runs) == 1:
            raise tether.ResourceUnavailable("connection lost", resource="conn", lost=True)
        return len(body)

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/upload", content=b"x" * 1000)
        assert (answer.status_code, runs) == (503, [1000])
        assert answer.headers["Retry-After"] == "1"
        runs.clear()
        answer = client.post("/whole", content=b"x" * 1000)
        assert (answer.status_code, answer.json(), runs) == (200, 1000, [1000, 1000])


def test_two_overrides_forming_a_cycle_are_refused_as_the_second_is_made() -> None:
    """Each alone is fine; together `a -> b -> a`. `lc.scope()` refused them, and a request
    waited for ever on a value its own task was opening."""
    lc = tether.Lifecycle()

    @lc.resource
    def a() -> str:
        return "a"

    @lc.resource
    def b() -> str:
        return "b"

    def fake_a(b: str) -> str:
        return f"fake a({b})"

    def fake_b(a: str) -> str:
        return f"fake b({a})"

    with lc.override(a, fake_a):
        with pytest.raises(tether.DependencyCycleError, match="a -> b -> a|b -> a -> b"):
            lc.override(b, fake_b)
        assert [ov.target for ov in lc._override_stack] == [a]  # the first one stays


def test_an_overridden_dependency_of_a_late_resource_stays_open_for_the_stream() -> None:
    """`cursor` (release="response") streams from `conn`; overridden in a test, `conn`'s
    stand-in was closed at the handler, under the stream (an empty 200), and before
    `cursor`."""
    from fastapi.responses import StreamingResponse

    events: list[str] = []
    lc = tether.Lifecycle()

    class Conn:
        def __init__(self, name: str) -> None:
            self.name, self.closed = name, False

        def row(self) -> bytes:
            assert not self.closed, f"{self.name}: used after its close"
            return b"row\n"

    @lc.resource
    async def conn() -> AsyncIterator[Conn]:
        c = Conn("real")
        yield c
        c.closed = True
        events.append("real conn closed")

    @lc.resource(release="response")
    async def cursor(conn: Conn) -> AsyncIterator[Conn]:
        yield conn
        events.append("cursor closed")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/rows")
    async def rows(cur: Annotated[Conn, Depends(cursor)]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield cur.row()

        return StreamingResponse(body())

    async def fake_conn() -> AsyncIterator[Conn]:
        c = Conn("fake")
        yield c
        c.closed = True
        events.append("fake conn closed")

    with TestClient(app) as client:
        assert client.get("/rows").content == b"row\n" * 3
        assert events == ["cursor closed", "real conn closed"]
        events.clear()
        with lc.override(conn, fake_conn):
            assert client.get("/rows").content == b"row\n" * 3
        assert events == ["cursor closed", "fake conn closed"]


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()])
async def test_sys_exit_and_ctrl_c_in_the_app_scope_come_out_as_they_are(
    raised: BaseException,
) -> None:
    """A CLI job's `sys.exit(3)` inside `async with lc.run():` came out as a
    `BaseExceptionGroup`: exit status 1, and `except KeyboardInterrupt` missed ^C."""
    lc = tether.Lifecycle()
    closed: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        closed.append("pool")

    with pytest.raises(type(raised)) as caught:
        async with lc.run():
            raise raised
    assert caught.value is raised
    assert closed == ["pool"]


async def test_tasks_waiting_for_an_open_that_fails_get_its_error_at_once() -> None:
    """Five tasks of one unit ask at once for a resource whose open fails after its
    timeout: one attempt, and each task gets its error (each opened it again in turn: five
    times the timeout, five timeouts counted)."""
    lc = tether.Lifecycle()
    attempts: list[int] = []

    @lc.resource(timeout=0.3)
    async def backend() -> AsyncIterator[str]:
        attempts.append(1)
        await asyncio.sleep(10)  # a backend that does not answer
        yield "never"

    async with lc.run(), lc.scope("fan-out") as unit:
        started = time.monotonic()
        results = await asyncio.gather(
            *(unit.get(backend) for _ in range(5)), return_exceptions=True
        )
        took = time.monotonic() - started
    assert [type(r).__name__ for r in results] == ["ResourceUnavailable"] * 5
    assert len(attempts) == 1
    assert took < 1.2  # one timeout (0.3 s), not five
    assert lc.stats().resources["backend"].open_errors == 1


async def test_a_timeout_that_expires_during_the_close_is_raised_by_its_block() -> None:
    """`asyncio.timeout()` around a job whose deadline passes during the unit's close (a
    slow commit): the close runs to its end, shielded, then the block raises
    `TimeoutError`. The cancellation fired at the next await after the block instead (a
    `CancelledError` there, on 3.11 and 3.12), or was forgotten (3.13)."""
    lc = tether.Lifecycle()
    closed: list[str] = []

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "c"
        await asyncio.sleep(0.3)  # the commit, slower than what is left of the deadline
        closed.append("conn")

    async def job() -> str:
        try:
            async with asyncio.timeout(0.1), lc.scope("job") as s:
                await s.get(conn)
        except TimeoutError:
            await asyncio.sleep(0.01)  # the task goes on, no cancellation pending
            return "timed out"
        return "no timeout"

    async with lc.run():
        await asyncio.sleep(0)
        assert await asyncio.create_task(job()) == "timed out"
    assert closed == ["conn"]


async def test_a_generators_own_shield_holds_off_its_timeout() -> None:
    """A factory's own anyio shield (a connect it must not leave half-made) holds off the
    deadline of its `timeout=`: the shielded step finishes (and with it here the open). An
    asyncio timeout for the deadline cancelled inside the shield (trial 28)."""
    import anyio

    lc = tether.Lifecycle()
    finished: list[str] = []

    @lc.resource(timeout=0.2)
    async def careful() -> AsyncIterator[str]:
        with anyio.CancelScope(shield=True):
            await asyncio.sleep(0.5)
            finished.append("shielded step")
        yield "value"

    async with lc.run(), lc.scope() as s:
        assert await s.get(careful) == "value"
    assert finished == ["shielded step"]


async def test_an_app_resource_with_a_task_group_across_its_yield_opens() -> None:
    """A refresher in the resource's own task group, across its `yield` (documented to work
    on asyncio, without `timeout=`)."""
    import anyio

    lc = tether.Lifecycle()
    refreshed = asyncio.Event()

    @lc.resource(scope="app")
    async def token() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:

            async def refresh() -> None:
                refreshed.set()
                await anyio.sleep(60)

            tg.start_soon(refresh)
            yield "token"
            tg.cancel_scope.cancel()

    async with lc.run():
        assert lc.get(token) == "token"
        await asyncio.wait_for(refreshed.wait(), 5)


async def test_a_generator_past_its_timeout_is_still_a_503() -> None:
    """The deadline of a generator's open (asyncio's timeout now): a `ResourceUnavailable`
    naming the timeout, as before."""
    lc = tether.Lifecycle()

    @lc.resource(timeout=0.2)
    async def slow() -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "never"

    async with lc.run():
        with pytest.raises(tether.ResourceUnavailable, match="did not open within 0.2 s"):
            async with lc.scope() as s:
                await s.get(slow)


async def test_an_override_by_an_open_app_resource_or_a_request_one_of_an_app_resource() -> None:
    """While the app runs, an app resource overridden by another, open, gets its value (it
    was refused as "needs opening"); an app resource overridden by a request resource is
    refused, saying so (the message named a factory "the value of 'per_request'()")."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def settings() -> str:
        return "settings"

    @lc.resource(scope="app")
    def other_settings() -> str:
        return "other settings"

    @lc.resource
    def per_request() -> str:
        return "per request"

    with pytest.raises(tether.ScopeError) as caught:
        lc.override(settings, per_request)
    assert str(caught.value) == (
        "lc.override(settings, per_request): 'settings' is an app resource, which lives for "
        "the whole application, and 'per_request' a request resource, whose value lives for "
        "one unit of work: an app resource cannot take it. Override with another app "
        "resource, a value, or a factory."
    )
    async with lc.run():
        with lc.override(settings, other_settings):
            assert lc.get(settings) == "other settings"
        assert lc.get(settings) == "settings"
