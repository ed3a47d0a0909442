"""tether's pytest plugin, run on test files the way a user's suite would run it."""

from __future__ import annotations

import re
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


def _in_flight(result: pytest.RunResult, label: str) -> list[float]:
    """The in-flight times the report gave *label*'s unit of work, in seconds, each once (on a
    wide terminal pytest's short summary repeats the report's lines)."""
    found = re.findall(rf"- '{label}' \(in flight (\d+\.\d+) s\)", result.stdout.str())
    return [float(x) for x in dict.fromkeys(found)]


def _ended_after(result: pytest.RunResult, label: str) -> list[float]:
    """How long after its test the report says *label*'s unit of work ended, in seconds, each
    once."""
    found = re.findall(
        rf"- '{label}' \(in flight .*, ended (\d+\.\d+) s after the test", result.stdout.str()
    )
    return [float(x) for x in dict.fromkeys(found)]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(app=APP)
    pytester.makeini("[pytest]\naddopts = -p no:asyncio\nfilterwarnings = error\n")
    return pytester


def test_a_fastapi_override_left_on_a_shared_app_is_removed_and_reported(
    suite: pytest.Pytester,
) -> None:
    """`app.dependency_overrides[resource]` set in a test and left on an app other tests use:
    the test errors, the override is removed, and the next test sees the real resource (and
    its own `lc.override`, which the leftover shadowed). One cleared in a fixture is fine."""
    suite.makepyfile(
        test_fastapi_overrides=textwrap.dedent(
            """
            import pytest
            from fastapi.testclient import TestClient
            from app import app, conn, lc

            @pytest.fixture
            def client():
                with TestClient(app) as c:
                    yield c

            @pytest.fixture
            def faked():
                app.dependency_overrides[conn] = lambda: "cleared"
                yield
                app.dependency_overrides.pop(conn)

            def test_starts_the_app(client) -> None:
                assert client.get("/").json() == "real"

            def test_leaves_one(client) -> None:
                app.dependency_overrides[conn] = lambda: "leaked"
                assert client.get("/").json() == "leaked"

            def test_next_sees_its_own_override(client) -> None:
                with lc.override(conn, "mine"):
                    assert client.get("/").json() == "mine"

            def test_cleared_in_a_fixture(client, faked) -> None:
                assert client.get("/").json() == "cleared"
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_one*",
            "tether: the test left app.dependency_overrides of 'conn' in place on an app that "
            "other tests use, now removed so later tests see the real resource (and "
            "`lc.override`). Remove it when the test ends (`app.dependency_overrides.pop(...)` "
            "in a `finally`, or a fixture that clears it after `yield`), or use `with "
            "lc.override(...):`.",
        ]
    )


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


def test_an_override_left_by_an_unchecked_test_is_undone_all_the_same(
    suite: pytest.Pytester,
) -> None:
    """`@pytest.mark.tether_unchecked` turns off the reports, not the cleanup: an override
    the test leaves is undone, silently, and the next test sees the real resource (it went
    on replacing it in every later test: trial 26)."""
    suite.makepyfile(
        test_unchecked=textwrap.dedent(
            """
            import pytest
            from app import conn, lc, value

            @pytest.mark.tether_unchecked
            def test_forgets() -> None:
                lc.override(conn, "stale")
                assert value() == "stale"

            def test_next_sees_the_real_one() -> None:
                assert value() == "real"
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=2)


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


def test_a_connection_taken_beside_a_unit_left_in_flight_is_reported_too(
    suite: pytest.Pytester,
) -> None:
    """A test that leaves a unit in flight and also keeps a connection it took straight from
    the pool: both are reported. The pools were not checked once a unit was reported, so
    the connection was hidden (trial 9); a unit's own connection is not reported twice."""
    suite.makepyfile(
        pools=textwrap.dedent(
            """
            import anyio
            import tether

            lc = tether.Lifecycle(drain_timeout=0.5)


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


            @lc.resource
            def conn(pg):
                pg.acquire()
                yield "conn"
                pg.release()


            async def hold(label):
                async with lc.scope(label) as unit:
                    await unit.get(conn)
                    await anyio.sleep(30)
            """
        ),
        conftest=textwrap.dedent(
            """
            import pytest
            from anyio.from_thread import start_blocking_portal

            from pools import lc


            @pytest.fixture(scope="session")
            def portal():
                with start_blocking_portal() as portal:
                    with portal.wrap_async_context_manager(lc.run()):
                        yield portal
            """
        ),
        test_pools=textwrap.dedent(
            """
            import time

            from pools import hold, lc


            def started(portal, label):
                portal.start_task_soon(hold, label)
                while lc.get(lc.resources["pg"]).in_use < 1:
                    time.sleep(0.01)


            def test_unit_only(portal):
                started(portal, "unit only")


            def test_unit_and_raw(portal):
                before = lc.get(lc.resources["pg"]).in_use
                portal.start_task_soon(hold, "unit and raw")
                while lc.get(lc.resources["pg"]).in_use < before + 1:
                    time.sleep(0.01)
                lc.get(lc.resources["pg"]).acquire()
            """
        ),
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=2, errors=2)
    out = "\n".join(result.outlines)
    unit_only = out.split("ERROR at teardown of test_unit_only")[1].split("ERROR at teardown")[0]
    assert "has more connections" not in unit_only, out  # the unit's own connection: once
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_unit_and_raw*",
            "*'unit and raw' (in flight *",
            "tether: a driver pool of <tether.Lifecycle resources=2 state='running'> has more "
            "connections in use than before the test and than the units of work above hold:",
            "  - 'pg': 3 in use, 1 before the test, 1 held by the units of work above",
        ]
    )


def test_units_on_an_idle_session_loop_get_the_grace(pytester: pytest.Pytester) -> None:
    """Under pytest-asyncio the session loop does not run between tests: the check runs it
    for the grace, so a job ending 50 ms after its test is not blamed, and a job that runs on
    is reported with its age when the test ended. Called from a coroutine, the check cannot
    wait on its own loop: it answers at once."""
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(
        textwrap.dedent(
            """
            import pytest_asyncio

            import tether
            import tether.testing

            lc = tether.Lifecycle()


            @lc.resource
            async def conn():
                yield "conn"


            @pytest_asyncio.fixture(scope="session", loop_scope="session")
            async def app_scope():
                async with tether.testing.running(lc):
                    yield lc
            """
        )
    )
    pytester.makepyfile(
        test_session_loop=textwrap.dedent(
            """
            import asyncio
            import time

            import pytest

            import tether.testing
            from conftest import conn, lc

            pytestmark = pytest.mark.asyncio(loop_scope="session")
            jobs = []
            release = asyncio.Event()


            async def job(label, until, started=None):
                async with lc.scope(label) as s:
                    await s.get(conn)
                    if started is not None:
                        started.set()
                    await until()


            async def start(label, until):
                started = asyncio.Event()
                jobs.append(asyncio.create_task(job(label, until, started)))
                await started.wait()  # its unit of work is in flight


            async def test_starts_a_short_job(app_scope):
                await start("short job", lambda: asyncio.sleep(0.05))


            async def test_the_short_job_ended_in_the_grace(app_scope):
                assert jobs.pop().done()


            async def test_forgets_a_job(app_scope):
                await start("forgotten job", release.wait)
                await asyncio.sleep(0.3)


            async def test_the_check_inside_the_loop_answers_at_once(app_scope):
                release.set()
                await jobs.pop()
                release.clear()
                jobs.append(asyncio.create_task(job("job", release.wait)))
                await asyncio.sleep(0.2)
                t0 = time.perf_counter()
                with pytest.raises(AssertionError) as caught:
                    tether.testing.assert_released(lc, wait=30)
                assert time.perf_counter() - t0 < 10  # not its 30 s wait
                release.set()
                await jobs.pop()
                print(caught.value)
            """
        )
    )
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*.Etether: 1 unit of work of <tether.Lifecycle resources=1 state='running'> still in "
            "flight:",
            "  - 'job' (in flight *.?? s) holds 'conn' (acquired at */test_session_loop.py:16 "
            "in job)",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
            "*ERROR at teardown of test_forgets_a_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=1 state='running'> still in "
            "flight:",
            "  - 'forgotten job' (in flight *.?? s) holds 'conn' (acquired at "
            "*/test_session_loop.py:16 in job)",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
        ]
    )
    # Times measured, not made up: at least the sleeps the units were in flight for.
    assert min(_in_flight(result, "job")) >= 0.2
    assert min(_in_flight(result, "forgotten job")) >= 0.3
    errors = [line.split(" - ")[0] for line in result.outlines if line.startswith("ERROR")]
    assert errors == ["ERROR test_session_loop.py::test_forgets_a_job"]


def test_units_on_a_running_loop_in_another_thread_get_the_grace(suite: pytest.Pytester) -> None:
    """On TestClient's loop, running in its own thread, a job ending 50 ms after its test
    ends in the grace; one that runs on is reported with its age when the test ended."""
    suite.makepyfile(
        test_client=textwrap.dedent(
            """
            import time

            import anyio
            import pytest
            from fastapi.testclient import TestClient

            from app import app, lc, take

            import threading

            jobs = []


            @pytest.fixture(scope="module")
            def client():
                with TestClient(app) as client:
                    yield client


            async def job(label, seconds, started):
                async with lc.scope(label) as s:
                    await take(s)
                    started.set()
                    await anyio.sleep(seconds)


            def start(client, label, seconds):
                started = threading.Event()
                jobs.append(client.portal.start_task_soon(job, label, seconds, started))
                assert started.wait(10)  # its unit of work is in flight


            def test_starts_a_short_job(client):
                start(client, "short job", 0.05)


            def test_the_short_job_ended_in_the_grace(client):
                assert jobs.pop().done()


            def test_forgets_a_job(client):
                start(client, "forgotten job", 60)
                time.sleep(0.3)


            def test_after(client):
                jobs.pop().cancel()
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgets_a_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=1 state='running'> still in "
            "flight:",
            "  - 'forgotten job' (in flight *.?? s) holds 'conn' (acquired at */app.py:* in take)",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
        ]
    )
    assert min(_in_flight(result, "forgotten job")) >= 0.3


def test_units_a_function_scoped_app_cancelled_at_shutdown_are_reported(
    suite: pytest.Pytester,
) -> None:
    """With the app per test (a function-scoped `with TestClient(app)` fixture), its shutdown
    cancels what the test left in flight past drain_timeout, before the check runs: the
    test errors all the same, naming the unit, its age when cancelled, and what it held."""
    suite.makepyfile(
        test_per_test=textwrap.dedent(
            """
            import threading

            import anyio
            import pytest
            from fastapi.testclient import TestClient

            from app import app, lc, take


            @pytest.fixture
            def client():
                with TestClient(app) as client:
                    yield client


            async def job(started):
                async with lc.scope("forgotten job") as s:
                    await take(s)
                    started.set()
                    await anyio.sleep_forever()


            def test_forgets_a_job(client):
                started = threading.Event()
                client.portal.start_task_soon(job, started)
                assert started.wait(10)


            @pytest.mark.tether_unchecked
            def test_allowed(client):
                started = threading.Event()
                client.portal.start_task_soon(job, started)
                assert started.wait(10)


            def test_after(client):
                assert client.get("/").json() == "real"
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_forgets_a_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=1 state='closed'> still in "
            "flight when its app scope shut down, cancelled after drain_timeout=0.2 s:",
            "  - 'forgotten job' (in flight *.** s) holds 'conn' (acquired at */app.py:* in take)",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
        ]
    )
    errors = "\n".join(line for line in result.outlines if "ERROR" in line)
    assert "test_allowed" not in errors
    assert "test_after" not in errors


def test_a_scope_entered_by_hand_and_never_left_is_reported_as_such(
    suite: pytest.Pytester,
) -> None:
    """A test enters an `lc.scope()` by hand in a task that then ends: at the function-scoped
    app's shutdown nothing can cancel it. The report says so, where it said "cancelled after
    drain_timeout" (while the log said it was not cancelled) and then blamed the pool's
    connection on code that took it "straight from the pool", not on the unit."""
    suite.makepyfile(
        test_by_hand=textwrap.dedent(
            """
            import pytest
            from fastapi.testclient import TestClient

            from app import app, lc, take

            kept = []


            @pytest.fixture
            def client():
                with TestClient(app) as client:
                    yield client


            def test_leaves_a_scope_open(client):
                async def enter():
                    scope = lc.scope("by hand")
                    kept.append(scope)
                    await take(await scope.__aenter__())

                client.portal.call(enter)


            def test_leaves_a_scope_open_in_its_own_client():
                # The app shut down in the test's body: such a unit was kept out of the
                # report, and its connection blamed on code that took it "straight from the
                # pool" (trial 30).
                with TestClient(app) as client:
                    async def enter():
                        scope = lc.scope("by hand too")
                        kept.append(scope)
                        await take(await scope.__aenter__())

                    client.portal.call(enter)
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=2, errors=2)
    for test, label in [
        ("test_leaves_a_scope_open", "by hand"),
        ("test_leaves_a_scope_open_in_its_own_client", "by hand too"),
    ]:
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of {test} *",
                "tether: 1 unit of work of <tether.Lifecycle resources=1 state='closed'> still "
                "in flight when its app scope shut down, with nothing running in it:",
                f"  - '{label}' (in flight *.** s) holds 'conn' (acquired at */app.py:* in "
                "take), entered by hand and never exited (an `lc.scope()`: `__aenter__` with no "
                "`__aexit__`), so closed by the shutdown, rolled back",
            ]
        )
    assert "straight from the pool" not in result.stdout.str()


def test_a_scope_left_open_in_the_tests_own_app_scope_is_reported(
    suite: pytest.Pytester,
) -> None:
    """A test enters an `lc.scope()` by hand in the block of its own `lc.run()`, and leaves
    the block: the unit is closed by the shutdown, rolled back, and the test fails, as the
    plugin said before the shutdown closed such units (then it passed, with WARNINGs only:
    trial 36)."""
    suite.makepyfile(
        test_own_run=textwrap.dedent(
            """
            import anyio

            from app import lc, take


            def test_leaves_a_scope_open_in_its_run():
                kept = []

                async def main():
                    async with lc.run():
                        scope = lc.scope("in the block")
                        kept.append(scope)
                        await take(await scope.__aenter__())

                anyio.run(main)
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_scope_open_in_its_run *",
            "tether: 1 unit of work of <tether.Lifecycle resources=1 state='closed'> still "
            "in flight when its app scope shut down, with nothing running in it:",
            "  - 'in the block' (in flight *.** s) holds 'conn' (acquired at */app.py:* in "
            "take), entered by hand and never exited (an `lc.scope()`: `__aenter__` with no "
            "`__aexit__`), so closed by the shutdown, rolled back",
        ]
    )


def test_units_a_function_scoped_app_waited_on_at_shutdown_are_reported(
    suite: pytest.Pytester,
) -> None:
    """With the app per test and a long drain_timeout, its shutdown waits for what the test
    left in flight, and the unit ends on its own: a unit that ended more than the plugin's
    one-second grace after the test makes it error all the same (before, it passed after a
    teardown as long as the job); one that ends within the grace does not."""
    suite.makepyfile(
        slowapp=textwrap.dedent(
            """
            import anyio
            from fastapi import FastAPI

            import tether

            lc = tether.Lifecycle(drain_timeout=30)


            @lc.resource
            async def conn():
                yield "real"


            app = FastAPI(lifespan=lc.lifespan)


            async def job(label, seconds, started):
                async with lc.scope(label) as s:
                    await s.get(conn)
                    started.set()
                    await anyio.sleep(seconds)
            """
        ),
        test_drained=textwrap.dedent(
            """
            import threading

            import pytest
            from fastapi.testclient import TestClient

            from slowapp import app, job


            @pytest.fixture
            def client():
                with TestClient(app) as client:
                    yield client


            def start(client, label, seconds):
                started = threading.Event()
                client.portal.start_task_soon(job, label, seconds, started)
                assert started.wait(10)


            def test_leaves_a_slow_job(client):
                start(client, "slow job", 3)


            def test_leaves_a_short_job(client):
                start(client, "short job", 0.1)


            @pytest.mark.tether_unchecked
            def test_allowed(client):
                start(client, "allowed job", 1.6)
            """
        ),
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_slow_job*",
            "tether: 1 unit of work of <tether.Lifecycle resources=1 state='closed'> still in "
            "flight when its app scope shut down, which waited for it to end:",
            "  - 'slow job' (in flight *.?? s) holds 'conn' (acquired at */slowapp.py:* in job), "
            "ended *.?? s after the test",
            "Exit every `lc.scope()`, read every streamed response to its end, and stop "
            "background work before the test ends (to allow it in one test, mark it "
            "@pytest.mark.tether_unchecked).",
        ]
    )
    # Its age when the test ended (not when it ended, 3 s or more), and when it ended: past
    # the grace, at least its 3 s after it started (bounds a loaded machine keeps).
    [age], [ended] = _in_flight(result, "slow job"), _ended_after(result, "slow job")
    assert age < 2, result.stdout.str()
    assert ended > 1, result.stdout.str()
    assert age + ended >= 2.98, result.stdout.str()
    errors = "\n".join(line for line in result.outlines if "ERROR" in line)
    assert "test_leaves_a_short_job" not in errors
    assert "test_allowed" not in errors


def test_the_plugin_keeps_no_lifecycle_of_an_earlier_test_alive(suite: pytest.Pytester) -> None:
    """A Lifecycle a fixture made goes when its test ends: the plugin keeps nothing of it
    (before, what it noted at each teardown kept every one alive to the end of the session,
    and every later test checked them all)."""
    suite.makepyfile(
        test_alive=textwrap.dedent(
            """
            import gc, weakref
            import pytest
            import tether

            refs = []

            @pytest.fixture
            def lc():
                lc = tether.Lifecycle()
                refs.append(weakref.ref(lc))
                yield lc

            def test_one(lc) -> None:
                pass

            def test_two(lc) -> None:
                pass

            def test_they_are_gone() -> None:
                gc.collect()
                assert [r() for r in refs] == [None, None]
            """
        )
    )
    suite.runpytest_subprocess().assert_outcomes(passed=3)


def test_a_fastapi_override_left_on_an_app_first_served_in_the_test_is_reported(
    suite: pytest.Pytester,
) -> None:
    """The module-level app's first test (the first to start it) leaves an override: the
    test errors and the override is removed, so the next test sees the real resource. An
    app the test made for itself dies with it: nothing to report."""
    suite.makepyfile(
        test_first_served=textwrap.dedent(
            """
            from fastapi import FastAPI
            from fastapi.testclient import TestClient
            from app import app, conn, lc

            def test_first_leaves_one() -> None:
                with TestClient(app) as client:
                    app.dependency_overrides[conn] = lambda: "leaked"
                    assert client.get("/").json() == "leaked"

            def test_next_sees_the_real_one() -> None:
                with TestClient(app) as client:
                    assert client.get("/").json() == "real"

            def test_own_app() -> None:
                own = FastAPI(lifespan=lc.lifespan)
                own.dependency_overrides[conn] = lambda: "mine"
                with TestClient(own):
                    pass
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_first_leaves_one*",
            "tether: the test left app.dependency_overrides of 'conn' in place on an app that "
            "other tests use, now removed so later tests see the real resource (and "
            "`lc.override`). Remove it when the test ends (`app.dependency_overrides.pop(...)` "
            "in a `finally`, or a fixture that clears it after `yield`), or use `with "
            "lc.override(...):`.",
        ]
    )


def test_a_connection_kept_by_an_app_run_per_test_is_reported(suite: pytest.Pytester) -> None:
    """An app started and stopped in each test (a function-scoped `TestClient` fixture, or
    one in the test): a connection the test took from a pool and kept is found at the app's
    shutdown, before the pool closes, and the test errors; one given back is fine."""
    suite.makepyfile(
        leaky=textwrap.dedent(
            """
            from typing import Annotated

            from fastapi import Depends, FastAPI

            import tether

            lc = tether.Lifecycle()


            class Pool:
                def __init__(self):
                    self.in_use = 0

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
            app = FastAPI(lifespan=lc.lifespan)


            @app.post("/leak")
            async def leak(pool: Annotated[Pool, Depends(pg)], give_back: bool = False) -> None:
                pool.acquire()
                if give_back:
                    pool.release()
            """
        ),
        test_leaky=textwrap.dedent(
            """
            import pytest
            from fastapi.testclient import TestClient

            from leaky import app


            @pytest.fixture
            def client():
                with TestClient(app) as c:
                    yield c


            def test_gives_it_back(client):
                assert client.post("/leak?give_back=true").status_code == 200


            def test_keeps_one(client):
                assert client.post("/leak").status_code == 200


            def test_keeps_one_app_in_the_test():
                with TestClient(app) as c:
                    assert c.post("/leak").status_code == 200


            def test_after(client):
                pass
            """
        ),
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=4, errors=2)
    message = [
        "tether: a driver pool of <tether.Lifecycle resources=1 state='closed'> had more "
        "connections in use when the app shut down than before the test, and no unit of "
        "work held them:",
        "  - 'pg': 1 in use, 0 before the test",
        "Something took a connection straight from the pool (`pool.acquire()`, "
        "`engine.connect()`, ...) and did not give it back: use `async with` on it, or take "
        "it with `lc.scope()`.",
    ]
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_keeps_one *", *message])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_keeps_one_app_in_the_test*", *message])


def test_a_job_started_as_the_test_ends_is_that_tests(suite: pytest.Pytester) -> None:
    """A test's last line starts a job on TestClient's loop and returns: the job entered its
    `lc.scope()` only after the test's check (which found nothing), and was reported against
    the next test, whose own leak then went unreported (trial 9: 3 runs in 12). The check now
    lets the app's loop take two turns first: the job is the test's, every time."""
    suite.makepyfile(
        test_late_job=textwrap.dedent(
            """
            import anyio
            import pytest
            from fastapi.testclient import TestClient

            from app import app, lc, take


            @pytest.fixture(scope="module")
            def client():
                with TestClient(app) as client:
                    yield client


            async def job():
                async with lc.scope("late job") as s:
                    await take(s)
                    await anyio.sleep(3)


            @pytest.mark.parametrize("run", range(6))
            def test_starts_a_job_last(client, run):
                client.portal.start_task_soon(job)


            def test_next(client):
                assert client.get("/").json() == "real"
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=7, errors=6)
    errors = re.findall(r"_ ERROR at teardown of (\S+) _", result.stdout.str())
    assert errors == [f"test_starts_a_job_last[{run}]" for run in range(6)]
