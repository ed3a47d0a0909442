"""tether's pytest plugin, run on test files the way a user's suite would run it."""

from __future__ import annotations

import textwrap

import pytest

APP = '''
import threading

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from typing import Annotated

import tether

lc = tether.Lifecycle(drain_timeout=0.2)  # the jobs left running hold up no shutdown


@lc.resource
async def conn():
    yield "real"


app = FastAPI(lifespan=lc.lifespan)


@app.get("/")
async def root(c: Annotated[str, Depends(conn)]) -> str:
    return c


def value() -> str:
    async def get() -> str:
        async with lc.scope() as s:
            return await s.get(conn)

    return anyio.run(get)


async def take(s):
    return await s.get(conn)


def forget_a_job(label):
    """Start a job in the background that takes `conn` and runs on after the test."""
    started = threading.Event()

    async def job():
        async with lc.scope(label) as s:
            await take(s)
            started.set()
            await anyio.sleep_forever()

    threading.Thread(target=anyio.run, args=(job,), daemon=True).start()
    assert started.wait(5)
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(app=APP)
    pytester.makeini("[pytest]\naddopts = -p no:asyncio\nfilterwarnings = error\n")
    return pytester


def test_an_override_left_in_place_is_undone_and_reported(suite: pytest.Pytester) -> None:
    """The test that forgets an override errors, naming it and where it was made; the next
    test sees the real resource."""
    suite.makepyfile(
        test_overrides=textwrap.dedent(
            """
            from app import conn, lc, value

            def test_forgets() -> None:
                lc.override(conn, "fake")
                assert value() == "fake"

            def test_next_sees_the_real_one() -> None:
                assert value() == "real"

            def test_undoes() -> None:
                with lc.override(conn, "fake"):
                    assert value() == "fake"
                ov = lc.override(conn, "fake")
                ov.undo()
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgets*",
            "tether: the test left 1 override of <tether.Lifecycle resources=1 state='created'> "
            "in place, now undone so later tests see the real resource:",
            "  - lc.override(conn, ...) made at */test_overrides.py:4 in test_forgets",
            "Use `with lc.override(...):`, or call `.undo()` on what lc.override returns.",
        ]
    )


def test_a_unit_left_in_flight_is_reported_with_what_it_holds(suite: pytest.Pytester) -> None:
    """A scope never exited makes its test error, naming the unit, what it holds and where it
    took it; later tests are not blamed for it, and requests through TestClient pass."""
    suite.makepyfile(
        test_units=textwrap.dedent(
            """
            import pytest
            from fastapi.testclient import TestClient

            from app import app, forget_a_job

            def test_forgets_a_job() -> None:
                forget_a_job("nightly export")

            @pytest.mark.tether_unchecked
            def test_allowed() -> None:
                forget_a_job("allowed")

            def test_requests() -> None:
                with TestClient(app) as client:
                    assert client.get("/").json() == "real"
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgets_a_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=1 state='created'> still in "
            "flight:",
            "  - 'nightly export' (in flight *.** s) holds 'conn' (acquired at */app.py:* in take)",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
        ]
    )
    assert "test_requests" not in "\n".join(line for line in result.outlines if "ERROR" in line)


def test_the_checks_can_be_turned_off(suite: pytest.Pytester) -> None:
    """`tether_check = false` in the ini file, or `-p no:tether`, turns them off."""
    suite.makepyfile(
        test_off=textwrap.dedent(
            """
            from app import conn, forget_a_job, lc

            def test_leaves_both() -> None:
                lc.override(conn, "fake")
                forget_a_job("job")
            """
        )
    )
    suite.makeini(
        "[pytest]\naddopts = -p no:asyncio\nfilterwarnings = error\ntether_check = false\n"
    )
    suite.runpytest_subprocess().assert_outcomes(passed=1)
    suite.makeini("[pytest]\naddopts = -p no:asyncio\nfilterwarnings = error\n")
    suite.runpytest_subprocess("-p", "no:tether").assert_outcomes(passed=1)
    suite.runpytest_subprocess().assert_outcomes(passed=1, errors=1)


def test_a_connection_taken_straight_from_a_pool_is_reported(suite: pytest.Pytester) -> None:
    """A connection taken from a driver pool outside any unit of work and kept past the test
    makes it error, naming the pool; one taken and given back does not, nor do connections
    that were in use before the test."""
    suite.makepyfile(
        pools=textwrap.dedent(
            """
            import tether

            lc = tether.Lifecycle()


            class Pool:
                in_use = 0

                def acquire(self):
                    self.in_use += 1

                def release(self):
                    self.in_use -= 1


            @lc.resource(scope="app")
            def pg():
                return Pool()


            pg.pool_stats = lambda p: tether.PoolStats(
                name="pg", max=5, open=p.in_use, in_use=p.in_use, idle=0, waiting=0
            )
            """
        ),
        conftest=textwrap.dedent(
            """
            import pytest
            from anyio.from_thread import start_blocking_portal

            from pools import lc


            @pytest.fixture(scope="session", autouse=True)
            def app_scope():
                with start_blocking_portal() as portal:
                    with portal.wrap_async_context_manager(lc.run()):
                        lc.get(lc.resources["pg"]).acquire()  # held for the whole session
                        yield
            """
        ),
        test_pools=textwrap.dedent(
            """
            from pools import lc


            def test_gives_it_back():
                pool = lc.get(lc.resources["pg"])
                pool.acquire()
                pool.release()


            def test_keeps_one():
                lc.get(lc.resources["pg"]).acquire()


            def test_after():
                pass
            """
        ),
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_keeps_one*",
            "tether: a driver pool of <tether.Lifecycle resources=1 state='running'> has more "
            "connections in use than before the test, and no unit of work holds them:",
            "  - 'pg': 2 in use, 1 before the test",
            "Something took a connection straight from the pool (`pool.acquire()`, "
            "`engine.connect()`, ...) and did not give it back: use `async with` on it, or take "
            "it with `lc.scope()`.",
        ]
    )
