"""A sync (`def`) app resource whose connect hangs in its thread: a failed startup, a
shutdown and the process's exit are bounded by `close_timeout` (before: held until the
connect returned), and what the thread opens later is closed there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


@pytest.fixture
def connect() -> Iterator[threading.Event]:
    """What the hanging connect waits for (30 s at most): set at the end of the test."""
    answered = threading.Event()
    yield answered
    answered.set()


@BACKENDS
async def test_a_failed_startup_does_not_wait_for_a_hanging_sync_open(
    connect: threading.Event,
) -> None:
    """Another resource fails at once: `StartupError` comes after `close_timeout`, not when
    the hanging connect returns; the thread closes what it opens then."""
    lc = tether.Lifecycle(close_timeout=0.5)
    events: list[str] = []
    closed = threading.Event()

    @lc.resource(scope="app")
    def engine() -> Iterator[str]:
        events.append("engine connecting")
        connect.wait(30)
        events.append("engine open")
        yield "engine"
        events.append("engine close")
        closed.set()

    @lc.resource(scope="app")
    async def cache() -> AsyncIterator[str]:
        raise ConnectionRefusedError("the cache is down")
        yield "cache"

    started = time.perf_counter()
    with pytest.raises(tether.StartupError) as info:
        async with lc.run():
            pytest.fail("the app started")
    assert time.perf_counter() - started < 5  # before: until the connect returned (30 s)
    assert info.value.resource == "cache"
    assert events == ["engine connecting"]
    connect.set()  # the connect returns after all: its thread closes the engine
    assert closed.wait(5)
    assert events == ["engine connecting", "engine open", "engine close"]


@BACKENDS
async def test_shutdown_does_not_wait_for_a_hanging_background_retry(
    connect: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """A `required=False` resource down at boot, its background retry hanging in its
    thread: the shutdown ends after `close_timeout`, saying which one it left."""
    lc = tether.Lifecycle(close_timeout=0.5)
    attempts: list[int] = []

    @lc.resource(scope="app", required=False, backoff=0.05)
    def engine() -> Iterator[str]:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            raise ConnectionRefusedError("the database is down")
        connect.wait(30)
        yield "engine"

    async with lc.run():
        deadline = time.perf_counter() + 5
        while len(attempts) < 2 and time.perf_counter() < deadline:
            await anyio.sleep(0.02)
        assert len(attempts) == 2  # the background retry hangs now
        stopping = time.perf_counter()
    assert time.perf_counter() - stopping < 5  # before: until the connect returned (30 s)
    assert (
        "tether: app resource 'engine' was still opening in its thread close_timeout=0.5 s "
        "after the app stopped it; the app goes on without waiting for it, and its thread "
        "closes what it opens"
    ) in caplog.text


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from collections.abc import AsyncIterator, Iterator
    import anyio
    import tether

    lc = tether.Lifecycle(close_timeout=0.5)
    options = {"timeout": 1} if sys.argv[1] == "timeout" else {}

    @lc.resource(scope="app", **options)
    def engine() -> Iterator[str]:
        print("EVENT engine connecting", flush=True)
        time.sleep(30)  # a connect that hangs
        yield "engine"

    if sys.argv[1] == "beside":
        @lc.resource(scope="app")
        async def cache() -> AsyncIterator[str]:
            time.sleep(0.2)
            raise ConnectionRefusedError("the cache is down")
            yield "cache"

    async def main() -> None:
        try:
            async with lc.run():
                pass
        except tether.StartupError as exc:
            print(f"StartupError {exc.resource}", flush=True)

    anyio.run(main)
    """
)


@pytest.mark.parametrize("mode", ["timeout", "beside"])
def test_the_process_exits_without_waiting_for_the_hanging_thread(mode: str) -> None:
    """With `timeout=1` on the hanging one, or another resource failing beside it: the
    process exits within seconds of the `StartupError` (before: 30 s later, its thread
    waited for at the interpreter's exit)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the process still ran 15 s after it started:\n{out}")
    assert time.monotonic() - started < 12
    assert f"StartupError {'engine' if mode == 'timeout' else 'cache'}" in out, out


async def test_tasks_an_app_resource_starts_open_sync_resources_as_usual() -> None:
    """A task started by an app resource's factory (a job, a pool's housekeeping) inherits
    the open's context; once that open is over, its sync opens run in tether's worker threads
    as any unit of work's do, not in a daemon thread each, as an app resource's open does."""
    lc = tether.Lifecycle()
    threads: list[str] = []

    @lc.resource
    def conn() -> Iterator[str]:
        threads.append(threading.current_thread().name)
        yield "conn"

    async def job() -> None:
        await anyio.sleep(0.05)  # after the open is over
        async with lc.scope("job") as s:
            await s.get(conn)

    @lc.resource(scope="app")
    async def jobs() -> AsyncIterator[str]:
        import asyncio

        task = asyncio.get_running_loop().create_task(job())
        yield "jobs"
        await task

    @lc.resource(scope="app")
    def settings() -> Iterator[str]:
        threads.append(threading.current_thread().name)
        yield "settings"

    async with lc.run():
        await anyio.sleep(0.3)
    assert threads[0] == "tether: opening settings"  # an app resource's own open
    assert threads[1] != "tether: opening jobs"
    assert not threads[1].startswith("tether: opening")
