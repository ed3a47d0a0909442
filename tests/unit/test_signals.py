"""Signals a server registers through the running loop (`loop.add_signal_handler`, as
hypercorn does), in front of which tether puts its own: SIGTERM during startup stops the
start, and `drain_delay` holds SIGTERM back while readiness fails."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio


@pytest.fixture
async def server_handler() -> AsyncIterator[list[float]]:
    """A SIGTERM handler registered through the running loop, as hypercorn registers its
    own: the times it was called."""
    loop = asyncio.get_running_loop()
    calls: list[float] = []

    def on_sigterm() -> None:
        calls.append(time.perf_counter())

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        yield calls
        handle = loop._signal_handlers.get(signal.SIGTERM)  # type: ignore[attr-defined]
        assert handle is not None
        assert handle._callback is on_sigterm
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_sigterm_during_startup_retries_stops_the_start(
    server_handler: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERM while an app resource retries stops the retries and closes what opened at
    once; the server's handler is called too. The startup then completes with nothing open
    and every unit of work refused, so that the server, which stops on the signal, shuts
    down as on any SIGTERM (before: a `StartupError`, on which uvicorn exits with 3, which
    gunicorn takes for a worker that cannot boot: its master halted, with the other
    workers' requests in flight)."""
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource(scope="app")
    async def settings() -> AsyncIterator[str]:
        events.append("settings open")
        yield "settings"
        events.append("settings close")

    @lc.resource(scope="app", retries=20, backoff=0.2)
    async def backend(settings: str) -> str:
        events.append("backend attempt")
        raise ConnectionRefusedError("the database is not up yet")

    asyncio.get_running_loop().call_later(0.5, signal.raise_signal, signal.SIGTERM)
    started = time.perf_counter()
    async with lc.lifespan(None):
        assert time.perf_counter() - started < 3  # 20 retries take over a minute
        assert events[0] == "settings open"
        assert events[-1] == "settings close"  # nothing is open
        assert len(server_handler) == 1  # the server learnt of it, and stops
        assert lc.stats().state == "draining"
        with pytest.raises(tether.ResourceUnavailable, match="shutting down"):
            async with lc.scope("late"):
                pass
    assert lc.state is tether.State.CLOSED
    assert caplog.messages[-1] == (
        "tether: The start was interrupted by SIGTERM while app resource 'backend' was still "
        "opening: the opens were stopped (no more retries) and the app resources already "
        "open were closed, in reverse order; nothing was served. If the start was slow "
        "because a backend is not up yet, give the app longer to start (the orchestrator's "
        "startup grace), or those resources fewer retries= or a shorter timeout=. The "
        "server stops as on any SIGTERM."
    )


async def test_only_a_servers_own_handler_counts_as_a_server_that_stops(
    server_handler: list[float],
) -> None:
    """Python's default handlers (a test, a script: nothing stops after the startup) keep
    the `StartupError`; a handler a server set, through the loop or `signal.signal`, is
    one that stops the server after its startup."""
    from tether._lifecycle import _server_handles

    loop = asyncio.get_running_loop()
    assert _server_handles(loop, signal.SIGTERM)  # the fixture's, through the loop
    previous = signal.getsignal(signal.SIGINT)
    try:
        for python_s in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(signal.SIGINT, python_s)
            assert not _server_handles(loop, signal.SIGINT)
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # as uvicorn sets it
        assert _server_handles(loop, signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


async def test_drain_delay_holds_back_a_sigterm_handler_of_the_loop(
    server_handler: list[float],
) -> None:
    """With `drain_delay`, the server's SIGTERM handler registered through the loop is called
    only after the delay, readiness failing meanwhile (before: at once, so the delay did
    nothing under hypercorn); a second SIGTERM hands it over at once."""
    # 3 s: the 0.3 s sleep below may overshoot on a loaded machine (by a second or two), and
    # must end in it.
    lc = tether.Lifecycle(drain_delay=3.0)

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    async with lc.lifespan(None):
        sent = time.perf_counter()
        signal.raise_signal(signal.SIGTERM)
        await anyio.sleep(0.3)
        assert server_handler == []  # the server has not been told: it goes on serving
        assert lc._stopping  # /health/ready answers 503
        assert lc.stats().state == "stopping"  # as readiness says (before: "running")
        with anyio.fail_after(10):
            while not server_handler:
                await anyio.sleep(0.02)
        assert server_handler[0] - sent >= 2.95
        second = time.perf_counter()
        signal.raise_signal(signal.SIGTERM)  # the server gets a second one at once
        with anyio.fail_after(5):
            while len(server_handler) < 2:
                await anyio.sleep(0.01)
        # Not after another drain_delay: that would be 3 s or more after it was sent (a sleep
        # never ends early); 2 s leaves room for a loaded machine.
        assert server_handler[1] - second < 2.0
        assert len(server_handler) == 2


async def test_the_same_sigterm_sent_twice_at_once_is_one(
    server_handler: list[float],
) -> None:
    """A supervisor that signals the whole process group (systemd's default stop, ``kill
    -TERM -PGID``) reaches each worker of ``uvicorn --workers N`` twice: directly, and as its
    parent passes it on. The second was taken for a second SIGTERM and handed over at once:
    the listener closed after 0.5 s of a ``drain_delay=3``. A second one within a second of
    the first is the same stop; a later one still hands over at once."""
    lc = tether.Lifecycle(drain_delay=6.0)

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    async with lc.lifespan(None):
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # relayed by the server's parent
        await anyio.sleep(1.5)
        assert server_handler == []  # still serving, readiness failing
        assert lc.stats().state == "stopping"
        second = time.perf_counter()
        signal.raise_signal(signal.SIGTERM)  # an operator's second SIGTERM
        with anyio.fail_after(5):
            while not server_handler:
                await anyio.sleep(0.01)
        # At once, not at the end of the 6 s delay (4.5 s on from here).
        assert server_handler[0] - second < 2.5


def test_an_infinite_drain_delay_is_refused() -> None:
    """SIGTERM would never stop the server: only a second one, or SIGKILL."""
    with pytest.raises(ValueError) as info:
        tether.Lifecycle(drain_delay=float("inf"))
    assert str(info.value) == (
        "Lifecycle(drain_delay=inf): drain_delay is how long, in seconds, readiness fails "
        "after SIGTERM before the server shuts down: an infinite one would never let SIGTERM "
        "stop the server (only a second SIGTERM, or the orchestrator's SIGKILL). Pass a "
        "finite number, e.g. drain_delay=5."
    )


def test_overlapping_startups_leave_signals_as_they_were() -> None:
    """Two apps starting at once in one process (two services in one test) chain their
    handlers; one is left installed behind the other's. Once their loop is closed, it only
    passes the signal on: Ctrl-C is a KeyboardInterrupt and SIGTERM ends the process
    (before, both raised "Event loop is closed", and the process lived on)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import asyncio, os, signal, time
        from fastapi import FastAPI
        import tether

        def make(delay):
            lc = tether.Lifecycle(drain_delay=1)

            @lc.resource(scope="app")
            async def slow():
                await asyncio.sleep(delay)
                yield 1

            return lc, FastAPI(lifespan=lc.lifespan)

        async def hold(delay):
            lc, app = make(delay)
            async with lc.lifespan(app):
                await asyncio.sleep(delay)

        async def main():
            await asyncio.gather(hold(0.1), hold(0.3))

        asyncio.run(main())
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            print("no KeyboardInterrupt", flush=True)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        print("alive after SIGTERM", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
        # A worker of pytest-xdist ignores SIGINT, and a Python started so never raises
        # KeyboardInterrupt: give the child ^C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert done.stdout.splitlines() == ["KeyboardInterrupt"], done.stdout + done.stderr
    assert done.returncode == -signal.SIGTERM, done.stderr


def test_drain_delay_under_a_uvloop_handler_warns_instead_of_claiming_a_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvloop's loop (granian's default `--loop auto`, hypercorn `-k uvloop`) calls a
    SIGTERM handler registered with it itself, whatever `signal.signal` says: the server
    stopped at once while tether logged that readiness failed for `drain_delay` "while the
    app serves". tether now says at startup that the delay cannot work there, and how to
    run it, and claims nothing on SIGTERM."""
    uvloop = pytest.importorskip("uvloop")
    calls: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: calls.append(time.perf_counter()))
        try:
            lc = tether.Lifecycle(drain_delay=5)
            async with lc.lifespan(None):
                signal.raise_signal(signal.SIGTERM)
                with anyio.fail_after(2):
                    while not calls:
                        await anyio.sleep(0.01)
                assert not lc._stopping
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    with caplog.at_level(logging.WARNING, logger="tether"):
        uvloop.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "tether"]
    assert messages == [
        "tether: drain_delay=5 s cannot delay this server's shutdown: its SIGTERM handler is "
        "registered with uvloop's loop (granian's default --loop auto, hypercorn -k uvloop), "
        "which calls it itself, so /health/ready fails only once the shutdown begins. Run the "
        "server on asyncio's loop (granian --loop asyncio, hypercorn -k asyncio), or delay in "
        "the orchestrator (a preStop hook that sleeps)."
    ]
