"""Where a leak report says a request is: the user's frames, whatever runs below them.

A request awaiting a library with a deep await chain (an HTTP client), a `def` endpoint behind
an ASGI middleware of the user's, a blocking `def` dependency, and an `async def` endpoint
that blocks the event loop past the threshold (no sweep can run: it is seen at its close).
"""

import logging
import os
import sysconfig
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI

import tether
import tether.fastapi
from tests.inprocess import Exchange, client_of, http_scope

HERE = __file__
# A library installed in site-packages, its frames made from code compiled under its path:
# sixteen levels of calls down to where it waits (an HTTP client down to its socket read).
LIBRARY = os.path.join(sysconfig.get_paths()["purelib"], "deepclient", "_client.py")
_DEPTH = 16


def _library() -> dict[str, Any]:
    source = "async def level0(wait):\n    await wait()\n\ndef sync0(wait):\n    wait()\n"
    for i in range(1, _DEPTH):
        source += f"\nasync def level{i}(wait):\n    await level{i - 1}(wait)\n"
        source += f"\ndef sync{i}(wait):\n    sync{i - 1}(wait)\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, LIBRARY, "exec"), namespace)
    return namespace


_LIB = _library()
library_get: Callable[..., Any] = _LIB[f"level{_DEPTH - 1}"]
library_get_sync: Callable[..., Any] = _LIB[f"sync{_DEPTH - 1}"]


def _leaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " held for " in r.getMessage()]


def _lifecycle() -> tuple[tether.Lifecycle, Any]:
    lc = tether.Lifecycle(leak_threshold=0.1, sweep_interval=0.02)

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    return lc, conn


def _report(
    caplog: pytest.LogCaptureFixture,
    app: FastAPI,
    lc: tether.Lifecycle,
    path: str,
    release: Callable[[], None],
    *,
    raw: bool = False,
) -> str:
    """Serve one request to *path* in-process (*raw*: called as a server calls the app, no
    client's frames around it), *release* it once its leak is reported, and return the
    report's stack."""

    async def main() -> None:
        async with lc.lifespan(app), anyio.create_task_group() as tg:
            if raw:
                exchange = Exchange()
                tg.start_soon(app, http_scope("GET", path), exchange.receive, exchange.send)
            else:
                tg.start_soon(_get, app, path)
            with anyio.fail_after(5):
                while not _leaks(caplog):
                    await anyio.sleep(0.02)
            release()

    with caplog.at_level(logging.WARNING, logger="tether"):
        anyio.run(main)
    (message,) = _leaks(caplog)
    first, _, stack = message.partition("\n")
    assert first.endswith(f"by GET {path}; the request is now at:")
    return stack


async def _get(app: FastAPI, path: str) -> None:
    async with client_of(app) as client:
        assert (await client.get(path)).status_code == 200


def _frames(stack: str) -> list[str]:
    return [line for line in stack.splitlines() if line.startswith("  File ")]


def test_a_request_awaiting_a_deep_library_is_reported_at_the_endpoints_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The endpoint's `await` and its callers are kept, with the library's frames below it
    cut: before, the twelve innermost frames were all the library's (httpx, httpcore)."""
    lc, conn = _lifecycle()
    release = anyio.Event()
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pay")
    async def pay(c: Annotated[str, Depends(conn)]) -> str:
        await library_get(release.wait)
        return c

    stack = _report(caplog, app, lc, "/pay", release.set)
    assert f'File "{HERE}"' in stack
    assert "in pay" in stack
    assert len(_frames(stack)) <= 12
    assert stack.rstrip().endswith("in level0")  # where the library waits: still given
    assert f'File "{LIBRARY}", line 2, in level0' in stack


def test_a_def_endpoint_in_a_deep_library_is_reported_at_the_endpoints_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same in a worker thread (a `def` endpoint calling a sync client), without the
    frames of threading's machinery (before: `threading.py ... wait` innermost, and the
    endpoint's line cut)."""
    lc, conn = _lifecycle()
    release = threading.Event()
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/pay")
    def sync_pay(c: Annotated[str, Depends(conn)]) -> str:
        library_get_sync(release.wait)
        return c

    stack = _report(caplog, app, lc, "/pay", release.set, raw=True)
    assert "in sync_pay" in stack
    assert stack.rstrip().endswith("in sync0")
    assert "threading.py" not in stack
    assert len(_frames(stack)) <= 12


class TimingMiddleware:
    """A pure ASGI middleware of the user's: its frame is in the request's await chain."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def blocking_report(release: threading.Event) -> None:
    release.wait()


def test_a_def_endpoint_behind_a_middleware_is_reported_in_its_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The thread running the endpoint is read although the await chain has a frame of
    the user's, the middleware's (before: the report gave only `await self.app(...)`)."""
    lc, conn = _lifecycle()
    release = threading.Event()
    app = FastAPI(lifespan=lc.lifespan)
    app.add_middleware(TimingMiddleware)

    @app.get("/sync")
    def sync_endpoint(c: Annotated[str, Depends(conn)]) -> str:
        blocking_report(release)
        return c

    stack = _report(caplog, app, lc, "/sync", release.set, raw=True)
    assert "in __call__" in stack  # the middleware, outermost
    assert "in sync_endpoint" in stack
    assert stack.rstrip().endswith("in blocking_report")
    assert "threading.py" not in stack


def test_a_blocking_def_dependency_is_reported_in_its_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync dependency blocking in the threadpool while the request holds `conn`: its
    thread's frames (before: no location at all, only the endpoint's own code was looked
    for in the threads)."""
    lc, conn = _lifecycle()
    release = threading.Event()
    app = FastAPI(lifespan=lc.lifespan)

    def slow_auth(c: Annotated[str, Depends(conn)]) -> str:
        blocking_report(release)
        return c

    @app.get("/dep")
    async def with_dep(user: Annotated[str, Depends(slow_auth)]) -> str:
        return user

    stack = _report(caplog, app, lc, "/dep", release.set, raw=True)
    assert f'File "{HERE}"' in stack
    assert "in slow_auth" in stack
    assert stack.rstrip().endswith("in blocking_report")
    assert "threading.py" not in stack


def _blocking_app(mark: Callable[[Any], Any] = lambda fn: fn) -> tuple[tether.Lifecycle, FastAPI]:
    lc, conn = _lifecycle()
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/block")
    @mark
    async def block(c: Annotated[str, Depends(conn)]) -> str:
        time.sleep(0.35)  # a sync call in an `async def`: the event loop is blocked
        return c

    return lc, app


def test_a_value_held_past_the_threshold_while_the_loop_is_blocked_is_reported_at_its_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No sweep runs while the loop is blocked, and the value closes as soon as it unblocks:
    it is reported (and counted) at its close (before: never, `leaks` stayed 0)."""
    lc, app = _blocking_app()

    async def main() -> None:
        async with lc.lifespan(app), client_of(app) as client:
            assert (await client.get("/block")).status_code == 200

    with caplog.at_level(logging.INFO, logger="tether"):
        anyio.run(main)
    (message,) = _leaks(caplog)
    assert message.startswith("tether: resource 'conn' held for 0.")
    assert message.endswith(
        " s (leak_threshold=0.1 s) by GET /block, seen at its close (the event loop was "
        "blocked, or no leak sweep had run since it went past the threshold)"
    )
    assert lc.stats().resources["conn"].leaks == 1
    # Not said to be given back besides: the report is made as it is.
    assert not [r for r in caplog.records if " was given back " in r.getMessage()]


def test_a_route_with_no_leak_threshold_is_not_reported_at_its_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc, app = _blocking_app(tether.fastapi.leak_threshold(None))

    async def main() -> None:
        async with lc.lifespan(app), client_of(app) as client:
            assert (await client.get("/block")).status_code == 200

    with caplog.at_level(logging.WARNING, logger="tether"):
        anyio.run(main)
    assert _leaks(caplog) == []
    assert lc.stats().resources["conn"].leaks == 0
