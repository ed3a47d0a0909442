"""User-facing messages of the core that no test pinned before: each is triggered the way a
user meets it, and its text (the thing it names, the cause, the fix) is asserted."""

import asyncio
import importlib
import logging
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient

import tether
import tether.fastapi
import tether.testing
from tests.routes import WrappingRoute

from ._messages import exactly

pytestmark = pytest.mark.anyio


def logged(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    """tether's log messages holding *fragment*."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("tether") and fragment in r.getMessage()
    ]


# ------------------------------------------------------------------ lc.lifespan(wrap=...)


def test_lifespan_wrap_that_is_not_a_lifespan_is_refused() -> None:
    """`wrap=` given something that is neither a lifespan function nor a context manager
    (a setting, a module attribute that is not the function) is refused where it is passed."""
    lc = tether.Lifecycle()
    with pytest.raises(
        TypeError,
        match=exactly(
            "lc.lifespan(wrap=...) was given 42, which is not a lifespan. Pass a function of "
            "the app that returns an async context manager (an @asynccontextmanager function, "
            "or an async generator function), e.g. lc.lifespan(wrap=my_lifespan)."
        ),
    ):
        lc.lifespan(wrap=42)  # type: ignore[arg-type]


# ------------------------------------------------------------ startup rolled back, cleanup fails


async def test_a_cleanup_failing_while_startup_rolls_back_is_logged_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A resource fails to open; closing one already open fails too: the StartupError names
    the first, and the log names the second and its failure (nothing is lost)."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def settings() -> AsyncIterator[str]:
        yield "settings"
        raise RuntimeError("flush of the settings cache failed")

    @lc.resource(scope="app")
    async def pool(settings: str) -> AsyncIterator[str]:
        raise ConnectionRefusedError("the database is not up")
        yield  # pragma: no cover

    with caplog.at_level(logging.ERROR, logger="tether"):
        with pytest.raises(tether.StartupError, match=r"^App resource 'pool' failed to open"):
            async with lc.run():
                pass  # pragma: no cover
    assert logged(caplog, "while rolling back startup") == [
        "tether: while rolling back startup, 'settings': "
        "RuntimeError: flush of the settings cache failed"
    ]


# --------------------------------------------------- an app resource cancelled by its own scope


async def test_an_app_resource_whose_own_cancel_scope_fires_while_the_app_runs_says_what(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A generator that enters a deadline around its `yield` (`anyio.move_on_after`), which
    cancels it while the app runs: the log names the resource and says what cancelled it,
    and what the app does next."""
    lc = tether.Lifecycle(close_timeout=2)
    closed = anyio.Event()

    @lc.resource(scope="app")
    async def token() -> AsyncIterator[str]:
        try:
            with anyio.move_on_after(0.05):
                yield "token"
        finally:
            closed.set()

    with caplog.at_level(logging.ERROR, logger="tether"):
        async with lc.run():
            with anyio.fail_after(5):
                await closed.wait()
            await anyio.sleep(0.05)
    assert logged(caplog, "failed while the app ran") == [
        "tether: app resource 'token' failed while the app ran: RuntimeError: what it "
        "entered around its yield (a task group, a cancel scope, an asyncio.timeout()) "
        "cancelled it while the app ran; it is closed, and the app goes on without it: what "
        "needs it answers 503, /health/ready and /health/live fail, so that the process is "
        "restarted"
    ]


# ----------------------------------------------- a sync open in a thread outlasting its timeout


async def test_a_sync_open_failing_after_its_timeout_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync resource's open runs in a thread, which cannot be interrupted: past its
    timeout the unit of work gets ResourceUnavailable, and when the thread fails later, the
    failure (which nobody is left to raise to) is logged, naming the resource and why it was
    abandoned."""
    lc = tether.Lifecycle()
    release = threading.Event()
    finished = threading.Event()

    @lc.resource(timeout=0.05)
    def report() -> Iterator[str]:
        try:
            release.wait(5)
            raise OSError("the share is not mounted")
        finally:
            finished.set()
        yield "never"  # pragma: no cover

    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            async with lc.scope() as s:
                with pytest.raises(tether.ResourceUnavailable):
                    await s.get(report)
            release.set()
            assert await anyio.to_thread.run_sync(finished.wait, 5)
            await _until(lambda: logged(caplog, "failed to open after"))
    assert logged(caplog, "failed to open after") == [
        "tether: resource 'report' failed to open after its timeout=0.05 s: "
        "OSError: the share is not mounted"
    ]


async def test_a_sync_open_succeeding_after_its_timeout_whose_close_fails_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past its timeout, a value the thread opens after all is closed in that thread; a
    failure of that close is logged, naming the resource."""
    lc = tether.Lifecycle()
    release = threading.Event()
    finished = threading.Event()

    @lc.resource(timeout=0.05)
    def report() -> Iterator[str]:
        release.wait(5)
        try:
            yield "report"
        finally:
            finished.set()
            raise OSError("the temporary file is gone")

    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            async with lc.scope() as s:
                with pytest.raises(tether.ResourceUnavailable):
                    await s.get(report)
            release.set()
            assert await anyio.to_thread.run_sync(finished.wait, 5)
            await _until(lambda: logged(caplog, "closing it failed"))
    assert logged(caplog, "closing it failed") == [
        "tether: resource 'report' opened after its timeout=0.05 s; closing it failed: "
        "OSError: the temporary file is gone"
    ]


async def _until(found: Any, timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not found():
            await anyio.sleep(0.01)


# ------------------------------------------------------------------ SIGTERM during startup


@pytest.fixture
async def server_handler() -> AsyncIterator[list[float]]:
    """A SIGTERM handler registered through the running loop, as a server registers its
    own (without one, the signal would stop the test run): the times it was called."""
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: calls.append(time.perf_counter()))
    try:
        yield calls
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_sigterm_during_startup_is_logged_as_it_arrives(
    server_handler: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """The log says at once that the signal stopped the start (the summary comes once what
    opened is closed)."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app", retries=20, backoff=0.2)
    async def backend() -> str:
        raise ConnectionRefusedError("the database is not up yet")

    asyncio.get_running_loop().call_later(0.3, signal.raise_signal, signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.lifespan(None):
            pass
    assert len(server_handler) == 1
    assert logged(caplog, "during startup") == [
        "tether: SIGTERM during startup: the start is stopped"
    ]


async def test_sigterm_with_drain_delay_says_how_long_readiness_fails(
    server_handler: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """With `drain_delay`, a SIGTERM is logged with the delay and what happens meanwhile
    (readiness fails, the app serves) and after (the server shuts down)."""
    lc = tether.Lifecycle(drain_delay=0.2)

    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.lifespan(None):
            signal.raise_signal(signal.SIGTERM)
            await _until(lambda: server_handler)
    assert logged(caplog, "SIGTERM") == [
        "tether: SIGTERM: /health/ready fails for drain_delay=0.2 s while the app serves, "
        "then the server shuts down"
    ]


# ------------------------------------------------------------------ FastAPI glue


def test_a_resource_asked_for_by_an_app_without_tethers_lifespan_says_how_to_run_it() -> None:
    """`FastAPI()` without `lifespan=lc.lifespan` (nor `install`): the first request that
    asks for a resource is refused naming the resource, the path, why, and the fix."""
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"  # pragma: no cover

    app = FastAPI()  # the lifespan forgotten

    @app.get("/notes")
    async def notes(c: Annotated[str, Depends(conn)]) -> str:
        return c  # pragma: no cover

    with TestClient(app) as client:
        with pytest.raises(
            tether.ScopeError,
            match=exactly(
                "Resource 'conn' was asked for on '/notes' before this Lifecycle started: the "
                "app's lifespan has not run, or it is not `lc.lifespan`. Use "
                "`FastAPI(lifespan=lc.lifespan)`; in tests, enter the client (`with "
                "TestClient(app) as client:`), or, with httpx's `ASGITransport`, which never "
                "runs a lifespan, wrap the client in `async with lc.lifespan(app):`."
            ),
        ):
            client.get("/notes")


def test_an_idempotent_route_tether_cannot_run_again_says_it_is_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A route class that builds its ASGI app its own way is served through that app, where
    tether cannot run the handler again: `@idempotent` on it is said to have no effect
    (the route still serves)."""
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    router = APIRouter(route_class=WrappingRoute)

    @router.get("/notes")
    @tether.fastapi.idempotent
    async def notes(c: Annotated[str, Depends(conn)]) -> str:
        return c

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(router)
    with caplog.at_level(logging.WARNING, logger="tether"):
        with TestClient(app) as client:
            assert client.get("/notes").json() == "conn"
    assert logged(caplog, "@idempotent") == [
        "tether: GET /notes is marked @idempotent, but tether serves it through its ASGI app "
        "(not a FastAPI request handler), where it cannot run it again: it is not retried. "
        "Its route class builds the route's app another way than FastAPI's APIRoute (it wraps "
        "or replaces `self.app`): to have it retried, do that work in a middleware or a "
        "dependency and keep APIRoute's app, or drop @idempotent"
    ]


# ------------------------------------------------------------ tether.testing.assert_released


async def test_assert_released_names_a_unit_that_holds_nothing_yet() -> None:
    """A unit of work left open that has not opened a resource yet is still named, with
    what it holds (nothing yet) and the fix."""
    lc = tether.Lifecycle()
    async with lc.run():
        async with lc.scope("nightly export"):
            with pytest.raises(AssertionError) as info:
                tether.testing.assert_released(lc, wait=0)
    assert re.fullmatch(
        re.escape(
            "tether: 1 unit of work of <tether.Lifecycle resources=0 state='running'> still "
            "in flight:\n  - 'nightly export' "
        )
        + r"\(in flight \d+\.\d\d s\) holds nothing yet\n"
        + re.escape(
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked)."
        ),
        str(info.value),
    ), str(info.value)


def test_a_connection_kept_from_a_pool_past_the_apps_shutdown_is_reported(
    pytester: pytest.Pytester,
) -> None:
    """A test that runs its own app scope and takes a connection straight from a driver
    pool, never given back before the app shut down: the test errors, naming the pool, what
    was in use, and the fix."""
    pytester.makeini("[pytest]\naddopts = -p no:asyncio\nfilterwarnings = error\n")
    pytester.makepyfile(
        pools=textwrap.dedent(
            """
            import tether

            lc = tether.Lifecycle()


            class Pool:
                in_use = 0

                def acquire(self):
                    self.in_use += 1


            @lc.resource(scope="app")
            def pg():
                return Pool()


            pg.pool_stats = lambda p: tether.PoolStats(
                name="pg", max=5, open=p.in_use, in_use=p.in_use, idle=0, waiting=0
            )
            """
        ),
        test_pools=textwrap.dedent(
            """
            import anyio

            from pools import lc, pg


            def test_keeps_one_past_the_shutdown():
                async def main():
                    async with lc.run():
                        lc.get(pg).acquire()

                anyio.run(main)
            """
        ),
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_keeps_one_past_the_shutdown*",
            "tether: a driver pool of <tether.Lifecycle resources=1 state='closed'> had more "
            "connections in use when the app shut down than before the test, and no unit of "
            "work held them:",
            "  - 'pg': 1 in use, 0 before the test",
            "Something took a connection straight from the pool (`pool.acquire()`, "
            "`engine.connect()`, ...) and did not give it back: use `async with` on it, or take "
            "it with `lc.scope()`.",
        ]
    )


# ------------------------------------------------------------------ metrics without their extra


@pytest.mark.parametrize(
    ("module", "needs", "message"),
    [
        (
            "tether.metrics.prometheus",
            "prometheus_client",
            "tether.metrics.prometheus needs prometheus-client: pip install 'tether[prometheus]'",
        ),
        (
            "tether.metrics.opentelemetry",
            "opentelemetry",
            "tether.metrics.opentelemetry needs opentelemetry-api: "
            "pip install 'tether[opentelemetry]'",
        ),
    ],
    ids=["prometheus", "opentelemetry"],
)
def test_a_metrics_module_without_its_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch, module: str, needs: str, message: str
) -> None:
    """Importing a metrics module whose library is not installed names the package and the
    pip command (the library's ImportError is chained)."""
    for name in list(sys.modules):
        if name == needs or name.startswith(f"{needs}."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, needs, None)  # what Python does for a missing package
    if module in sys.modules:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=exactly(message)) as info:
        importlib.import_module(module)
    assert isinstance(info.value.__cause__, ImportError)


# ------------------------------------------------- FastAPI helpers given the wrong thing


def _fastapi_misuses() -> list[tuple[str, Callable[[], object], str]]:
    import tether.fastapi as tf

    lc = tether.Lifecycle()
    not_lc = (
        "{where}: {given}, not a tether.Lifecycle: pass the Lifecycle the app's resources are "
        "registered on, e.g. {example}."
    )
    no_app = (
        "tether.fastapi.install(): {given} with no routes, not a FastAPI or Starlette app (or "
        "router): pass the app whose routes use the Lifecycle's resources, e.g. install(app, "
        "lc); for an app wrapped in a middleware, the app inside it."
    )
    return [
        (
            "health_router(None)",
            lambda: tf.health_router(None),  # type: ignore[arg-type]
            not_lc.format(where="health_router()", given="lc is None", example="health_router(lc)"),
        ),
        (
            'dashboard_router("lc")',
            lambda: tf.dashboard_router("lc"),  # type: ignore[arg-type]
            not_lc.format(
                where="dashboard_router()", given="lc='lc' is a str", example="dashboard_router(lc)"
            ),
        ),
        (
            "install(app, None)",
            lambda: tf.install(FastAPI(), None),  # type: ignore[arg-type]
            not_lc.format(
                where="tether.fastapi.install()", given="lc is None", example="install(app, lc)"
            ),
        ),
        ("install(None, lc)", lambda: tf.install(None, lc), no_app.format(given="app is None")),
        ("install(42, lc)", lambda: tf.install(42, lc), no_app.format(given="app=42 is an int")),
        (
            'idempotent("x")',
            lambda: tf.idempotent("x"),  # type: ignore[call-overload]
            "@tether.fastapi.idempotent was given 'x', which is not callable: put it under the "
            "route decorator, bare (@idempotent) or with its retries (@idempotent(retries=2)).",
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_a_fastapi_helper_given_the_wrong_thing_says_so(case: int) -> None:
    """Before: accepted, then an AttributeError on the first probe (`health_router(None)`),
    nothing installed without a word (`install(None, lc)`), or an AttributeError at once."""
    _, call, message = _fastapi_misuses()[case]
    with pytest.raises(TypeError) as caught:
        call()
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("name", "call", "example"),
    [
        ("in_flight", lambda: tether.testing.in_flight(None), "in_flight(lc)"),  # type: ignore[arg-type]
        ("assert_released", lambda: tether.testing.assert_released(None), "assert_released(lc)"),  # type: ignore[arg-type]
        (
            "assert_pools_returned",
            lambda: tether.testing.assert_pools_returned(None, {}),  # type: ignore[arg-type]
            "assert_pools_returned(lc, before)",
        ),
        ("pools_in_use", lambda: tether.testing.pools_in_use(None), "pools_in_use(lc)"),  # type: ignore[arg-type]
        ("undo_overrides", lambda: tether.testing.undo_overrides(None), "undo_overrides(lc)"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_a_testing_helper_given_no_lifecycle_says_so(
    name: str, call: Callable[[], object], example: str
) -> None:
    """Before: an AttributeError from inside tether (`'NoneType' object has no attribute
    '_units'`)."""
    with pytest.raises(TypeError) as caught:
        call()
    assert str(caught.value) == (
        f"tether.testing.{name}(): lc is None, not a tether.Lifecycle: pass the Lifecycle the "
        f"app's resources are registered on, e.g. {example}."
    )


async def test_running_given_no_lifecycle_says_so() -> None:
    with pytest.raises(TypeError) as caught:
        async with tether.testing.running(None):  # type: ignore[arg-type]
            pass  # pragma: no cover
    assert str(caught.value) == (
        "tether.testing.running(): lc is None, not a tether.Lifecycle: pass the Lifecycle the "
        "app's resources are registered on, e.g. running(lc)."
    )


@pytest.mark.parametrize(
    ("waiting", "words"),
    [(1, "1 unit of work already waits"), (2, "2 units of work already wait")],
)
def test_a_queue_full_503_counts_its_waiters_in_good_english(waiting: int, words: str) -> None:
    """Before: "1 units of work already wait for one (max_waiting=1)"."""
    from tether.integrations._common import queue_full

    refused = queue_full("pool", waiting=waiting, max_waiting=waiting, size=1, in_use=1)
    assert str(refused) == (
        f"Pool 'pool' (size 1, in use 1, waiting {waiting}) could not give a connection: no "
        f"connection is free (each is in use or still being made) and {words} for one "
        f"(max_waiting={waiting}); refused at once rather than queued. Retry shortly; if it "
        f"persists, check the database and the pool size."
    )


def test_a_server_that_never_answers_says_the_connect_timeout_ran_out() -> None:
    """A bare "TimeoutError" said nothing of what ran out (trial 35); a role that is not a
    superuser, refused for want of a slot, gets the advice for a full server."""
    from tether.integrations._common import unreachable

    said = str(unreachable("pool", "postgresql://u:pw@db/app", TimeoutError()))
    assert said == (
        "'pool' cannot reach postgresql://u:***@db/app: TimeoutError (no answer within the "
        "connect timeout). Check that the server runs and is reachable from here, and the "
        "address and credentials in its DSN."
    )
    full = OSError(
        "connection failed: FATAL:  remaining connection slots are reserved for "
        "non-replication superuser connections"
    )
    assert "The server has no connection slot left" in str(unreachable("pool", "db", full))


def test_a_cleanup_error_with_a_status_code_that_is_no_http_exception_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An SDK's error carrying its upstream's `status_code` (429), raised by a cleanup: the
    client gets a 500, and tether logs the failure at ERROR. It was logged at INFO, with no
    traceback, as "answered 429" (trial 38)."""

    class APIStatusError(Exception):
        status_code = 429

    lc = tether.Lifecycle()

    @lc.resource
    async def res() -> AsyncIterator[int]:
        yield 1
        raise APIStatusError("upstream said 429")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(v: Annotated[int, Depends(res)]) -> int:
        return v

    with (
        caplog.at_level(logging.INFO, logger="tether"),
        TestClient(app, raise_server_exceptions=False) as client,
    ):
        assert client.get("/").status_code == 500
    said = [
        (r.levelno, r.getMessage()) for r in caplog.records if "closing resource" in r.getMessage()
    ]
    assert said == [
        (logging.ERROR, "tether: closing resource 'res' failed: APIStatusError: upstream said 429")
    ]
