"""A unit cancelled from outside tether while its ``def`` endpoint runs in a worker thread
(review sync, defect 1; review shutdown, defect 2): an ``asyncio.wait_for`` or
``asyncio.timeout`` middleware (the usual request timeout), uvicorn's
``--timeout-graceful-shutdown``. The cancel closed the unit's values at once, under the
thread still running the endpoint: its connection went back to the pool, and another request
got it and committed what the cancelled one wrote after. They now close once the thread
returns, with the cancel as their failure (rolled back), as they do for a client that left."""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio.to_thread
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.inprocess import client_of, timeout_middleware

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("endpoint", ["def endpoint", "def dependency"])
async def test_a_timeout_waits_for_the_thread_before_the_values_close(endpoint: str) -> None:
    lc = tether.Lifecycle()
    events: list[str] = []
    lock = threading.Lock()

    def note(event: str) -> None:
        with lock:
            events.append(event)

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
        except BaseException as exc:
            note(f"rolled back ({type(exc).__name__})")
            raise
        note("committed")

    Conn = Annotated[str, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)

    def slow_write(c: str) -> str:
        time.sleep(0.6)  # a slow statement, past the middleware's 0.2 s
        note("thread wrote")
        return c

    if endpoint == "def endpoint":

        @app.get("/write")
        def write(c: Conn) -> str:
            return slow_write(c)

    else:

        def writing(c: Conn) -> str:
            return slow_write(c)

        @app.get("/write")
        async def write_async(c: Annotated[str, Depends(writing)]) -> str:
            return c

    async with lc.lifespan(app), client_of(timeout_middleware(app, 0.2)) as client:
        started = time.monotonic()
        r = await client.get("/write")
        took = time.monotonic() - started
        stats = lc.stats()["conn"]
    assert r.status_code == 504
    # Closed once the thread returned: "rolled back" came first, under the thread.
    assert events == ["thread wrote", "rolled back (CancelledError)"]
    assert took > 0.5  # the answer waits for the thread (a bound: the thread's 0.6 s)
    assert (stats.opened, stats.closed, stats.in_use) == (1, 1, 0)


async def test_an_async_endpoint_is_cancelled_at_once() -> None:
    """No thread: the values close at the cancel, as before."""
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
        except BaseException as exc:
            events.append(f"rolled back ({type(exc).__name__})")
            raise

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/write")
    async def write(c: Annotated[str, Depends(conn)]) -> str:
        await asyncio.sleep(5)
        return c  # pragma: no cover

    async with lc.lifespan(app), client_of(timeout_middleware(app, 0.2)) as client:
        started = time.monotonic()
        r = await client.get("/write")
        took = time.monotonic() - started
    assert r.status_code == 504
    assert events == ["rolled back (CancelledError)"]
    assert took < 3  # not the endpoint's 5 s


async def test_a_thread_the_endpoint_did_not_wait_for_does_not_hold_its_values() -> None:
    """A background job the endpoint started in a worker thread and did not wait for runs in
    a copy of the request's context too, but holds none of its values: the timeout closes
    them at once, not when that job ends (diff15 review, F0: the 504 came after the job's
    5 s, the connection checked out all along)."""
    lc = tether.Lifecycle()
    events: list[str] = []
    job_done = threading.Event()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
        finally:
            events.append("closed")

    app = FastAPI(lifespan=lc.lifespan)
    jobs: set[asyncio.Task[None]] = set()

    def report() -> None:
        job_done.wait(10)
        events.append("job done")

    @app.get("/write")
    async def write(c: Annotated[str, Depends(conn)]) -> str:
        jobs.add(asyncio.create_task(anyio.to_thread.run_sync(report)))
        await asyncio.sleep(10)  # a slow upstream call: timed out
        return c  # pragma: no cover

    async with lc.lifespan(app), client_of(timeout_middleware(app, 0.2)) as client:
        r = await client.get("/write")
        assert events == ["closed"]  # was []: waiting for the job
        job_done.set()
        await asyncio.gather(*jobs)
    assert r.status_code == 504
    assert events == ["closed", "job done"]


class Recorded:
    """A request resource that records how it closed, and what the app's threads did, in
    one list, in order."""

    def __init__(self, lc: tether.Lifecycle) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            try:
                yield "conn"
            except BaseException as exc:
                self.note(f"rolled back ({type(exc).__name__})")
                raise
            self.note("committed")

        self.conn = conn

    def note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)


async def serving(lc: tether.Lifecycle, app: FastAPI, stop: asyncio.Event) -> None:
    """The app's lifespan in a task of its own, as a server runs it: *stop* is the SIGTERM."""
    async with lc.lifespan(app):
        await stop.wait()


async def timed_out_while_stopping(
    lc: tether.Lifecycle,
    app: FastAPI,
    release: Callable[[], None],
    *,
    cancel_to_stop: float,
    stop_to_release: float,
) -> tuple[list[float], int]:
    """A request to /write timed out at 0.2 s; the app begins to stop *cancel_to_stop* s
    after; *stop_to_release* s after that, *release* is called. Returns when the stop ended
    (s after it began) and the answer's status."""
    stop = asyncio.Event()
    async with client_of(timeout_middleware(app, 0.2)) as client:
        stopping = asyncio.ensure_future(serving(lc, app, stop))
        await asyncio.sleep(0.1)
        answer = asyncio.ensure_future(client.get("/write"))
        await asyncio.sleep(0.2 + cancel_to_stop)
        started = time.monotonic()
        stop.set()
        ended: list[float] = []
        stopping.add_done_callback(lambda _: ended.append(time.monotonic() - started))
        await asyncio.sleep(stop_to_release)
        release()
        return ended, (await asyncio.wait_for(answer, 10)).status_code


async def test_a_stop_long_after_the_cancel_still_waits_close_timeout_for_the_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bound on that wait counts from when the app begins to stop, not from the cancel:
    a request timed out 2.3 s before a SIGTERM has its values closed once its thread returns
    within ``close_timeout`` of the stop, not under the thread the moment the stop begins
    (note33: the deadline started at the cancel, so it had passed already)."""
    lc = tether.Lifecycle(close_timeout=2.0)
    rec = Recorded(lc)
    release = threading.Event()
    app = FastAPI(lifespan=lc.lifespan)
    seen: list[list[str]] = []

    @app.get("/write")
    def write(c: Annotated[str, Depends(rec.conn)]) -> str:
        release.wait(10)  # a slow statement, past the middleware's 0.2 s
        rec.note("thread wrote")
        return c

    def check_then_release() -> None:
        seen.append(list(rec.events))
        release.set()

    _, status = await timed_out_while_stopping(
        lc, app, check_then_release, cancel_to_stop=2.3, stop_to_release=0.3
    )
    assert seen == [[]]  # was [["rolled back (CancelledError)"]]: closed under the thread
    assert status == 504
    assert rec.events == ["thread wrote", "rolled back (CancelledError)"]
    assert "still runs close_timeout" not in caplog.text


async def test_a_thread_past_close_timeout_after_the_stop_has_its_values_closed_under_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once the app has been stopping for ``close_timeout``, the wait ends: a thread that
    never returns does not hold the shutdown (one WARNING says so)."""
    lc = tether.Lifecycle(close_timeout=0.5)
    rec = Recorded(lc)
    release = threading.Event()
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/write")
    def write(c: Annotated[str, Depends(rec.conn)]) -> str:
        release.wait(10)
        return c

    seen: list[list[str]] = []

    def check_then_release() -> None:
        seen.append(list(rec.events))
        release.set()

    try:
        ended, status = await timed_out_while_stopping(
            lc, app, check_then_release, cancel_to_stop=0.3, stop_to_release=2
        )
    finally:
        release.set()
    # Closed 0.5 s into the stop, before the thread returned; the stop ended then too.
    assert seen == [["rolled back (CancelledError)"]]
    assert ended
    assert ended[0] < 2
    assert status == 504
    assert (
        "GET /write: its worker thread still runs close_timeout=0.5 s after the app began to "
        "stop; its values close under it"
    ) in caplog.text


async def test_the_wait_reads_no_frame_of_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which thread runs the unit's code is found from the cancel's own frames and the call's
    context, not by walking the worker threads' frames (`sys._current_frames()`, then
    `f_back`), which can crash CPython 3.11 while those threads run (note34)."""

    def refused() -> None:
        raise AssertionError("another thread's frames were read")

    monkeypatch.setattr("sys._current_frames", refused)
    lc = tether.Lifecycle()
    rec = Recorded(lc)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/write")
    def write(c: Annotated[str, Depends(rec.conn)]) -> str:
        time.sleep(0.6)
        rec.note("thread wrote")
        return c

    async with lc.lifespan(app), client_of(timeout_middleware(app, 0.2)) as client:
        r = await client.get("/write")
    assert r.status_code == 504
    assert rec.events == ["thread wrote", "rolled back (CancelledError)"]


async def test_an_async_endpoint_awaiting_asyncio_to_thread_waits_for_it() -> None:
    """`await asyncio.to_thread(write, conn)` in an `async def` endpoint: the thread runs on
    after the timeout's cancel, as a `def` endpoint's does, and the values wait for it (they
    closed under it)."""
    lc = tether.Lifecycle()
    rec = Recorded(lc)
    app = FastAPI(lifespan=lc.lifespan)

    def slow_write(c: str) -> str:
        time.sleep(0.6)
        rec.note("thread wrote")
        return c

    @app.get("/write")
    async def write(c: Annotated[str, Depends(rec.conn)]) -> str:
        return await asyncio.to_thread(slow_write, c)

    async with lc.lifespan(app), client_of(timeout_middleware(app, 0.2)) as client:
        r = await client.get("/write")
    assert r.status_code == 504
    assert rec.events == ["thread wrote", "rolled back (CancelledError)"]
