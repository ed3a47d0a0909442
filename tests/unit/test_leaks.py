"""Leak detection: a resource held past `leak_threshold` is reported once, with its stack."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import tether
from tether._scope import code_of

pytestmark = pytest.mark.anyio


def _lifecycle(**options: float | None) -> tuple[tether.Lifecycle, tether.Resource[str]]:
    lc = tether.Lifecycle(**options)  # type: ignore[arg-type]

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    return lc, conn


def _leak_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "tether" and r.levelno == logging.WARNING and " held for " in r.getMessage()
    ]


def _given_back(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "tether" and " was given back after " in r.getMessage()
    ]


class TestLeaks:
    async def test_held_too_long_is_reported_once_with_stack(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A value held 0.4 s past a 0.1 s threshold is logged once, with where it was acquired."""
        lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run():
                async with lc.scope("nightly job") as s:
                    await s.get(conn)
                    await anyio.sleep(0.4)
        records = _leak_warnings(caplog)
        assert len(records) == 1
        message = records[0].getMessage()
        first, _, stack = message.partition("\n")
        assert first.startswith("tether: resource 'conn' held for ")
        assert first.endswith(" s (leak_threshold=0.1 s) by nightly job; acquired at:")
        assert os.path.basename(__file__) in stack
        assert f'File "{__file__}"' in stack
        assert stack.rstrip().endswith("in test_held_too_long_is_reported_once_with_stack")
        assert records[0].tether_resource == "conn"  # type: ignore[attr-defined]
        assert lc.stats().resources["conn"].leaks == 1

    async def test_a_reported_leak_given_back_is_logged_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The report of a leak is followed by its end: one INFO record naming the resource,
        the unit that held it and for how long, when the value is finally given back."""
        lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)
        with caplog.at_level(logging.INFO, logger="tether"):
            async with lc.run():
                async with lc.scope("nightly job") as s:
                    await s.get(conn)
                    with anyio.fail_after(5):
                        while not _leak_warnings(caplog):
                            await anyio.sleep(0.02)
                    await anyio.sleep(0.2)
                    assert _given_back(caplog) == []  # still held: nothing to say yet
        (record,) = _given_back(caplog)
        assert record.levelno == logging.INFO
        message = record.getMessage()
        prefix = "tether: resource 'conn', reported as held too long by nightly job, was given back after "
        assert message.startswith(prefix)
        assert message.endswith(" s")
        assert float(message[len(prefix) : -2]) >= 0.3  # held across the report and the sleep
        assert record.tether_resource == "conn"  # type: ignore[attr-defined]
        assert lc.stats().resources["conn"].leaks == 1

    async def test_values_never_reported_are_not_said_to_be_given_back(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        lc, conn = _lifecycle(leak_threshold=0.5, sweep_interval=0.02)
        with caplog.at_level(logging.INFO, logger="tether"):
            async with lc.run():
                for _ in range(3):
                    async with lc.scope() as s:
                        await s.get(conn)
                        await anyio.sleep(0.03)
        assert _given_back(caplog) == []

    async def test_short_holds_are_not_reported(self, caplog: pytest.LogCaptureFixture) -> None:
        """Values released within the threshold are never reported."""
        lc, conn = _lifecycle(leak_threshold=0.2, sweep_interval=0.02)
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run():
                for _ in range(5):
                    async with lc.scope() as s:
                        await s.get(conn)
                        await anyio.sleep(0.03)
        assert _leak_warnings(caplog) == []
        assert lc.stats().resources["conn"].leaks == 0

    async def test_leak_detection_off(self, caplog: pytest.LogCaptureFixture) -> None:
        """With `leak_threshold=None` nothing is reported however long a value is held."""
        lc, conn = _lifecycle(leak_threshold=None, sweep_interval=0.02)
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run():
                async with lc.scope() as s:
                    await s.get(conn)
                    await anyio.sleep(0.1)
        assert _leak_warnings(caplog) == []

    async def test_a_long_job_gives_itself_a_threshold_of_its_own(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A nightly job may hold its connection for an hour: `lc.scope(...,
        leak_threshold=...)` sets its own (None: never reported), while the Lifecycle's
        still applies to every other unit of work."""
        lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)

        async def job(label: str, **threshold: float | None) -> None:
            async with lc.scope(label, **threshold) as s:
                await s.get(conn)
                await anyio.sleep(0.4)

        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run(), anyio.create_task_group() as tg:
                tg.start_soon(lambda: job("nightly", leak_threshold=None))
                tg.start_soon(lambda: job("weekly", leak_threshold=3600))
                tg.start_soon(lambda: job("stuck request", leak_threshold=0.2))
                tg.start_soon(lambda: job("other"))
        reported = sorted(
            r.getMessage().split(" by ")[1].split(";")[0] for r in _leak_warnings(caplog)
        )
        assert reported == ["other", "stuck request"]
        assert "(leak_threshold=0.2 s) by stuck request" in caplog.text

    async def test_a_scopes_threshold_is_checked(self) -> None:
        lc, _ = _lifecycle()
        with pytest.raises(TypeError) as info:
            async with lc.scope("nightly", leak_threshold="3600"):  # type: ignore[arg-type]
                pass
        assert str(info.value) == (
            "lc.scope('nightly'): leak_threshold='3600' is a str, not a number of seconds. "
            "Pass a positive number of seconds (or None), e.g. leak_threshold=3600, or None for "
            "no leak reports of this unit of work (a setting read from the environment is a "
            "string: convert it with float())."
        )

    async def test_each_leaking_value_reported(self, caplog: pytest.LogCaptureFixture) -> None:
        """Two units each holding a value too long give one report each."""
        lc, conn = _lifecycle(leak_threshold=0.05, sweep_interval=0.01)

        async def job(label: str) -> None:
            async with lc.scope(label) as s:
                await s.get(conn)
                await anyio.sleep(0.2)

        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(job, "job a")
                    tg.start_soon(job, "job b")
        labels = sorted(
            r.getMessage().split(" by ")[1].split(";")[0] for r in _leak_warnings(caplog)
        )
        assert labels == ["job a", "job b"]
        assert lc.stats().resources["conn"].leaks == 2

    @pytest.mark.parametrize(
        "filename",
        [
            "/home/runner/work/tether/tether/app/jobs.py",
            "/home/runner/work/fastapi/asyncio/starlette/click/app/jobs.py",
        ],
        ids=["tether", "frameworks"],
    )
    async def test_user_code_in_directories_named_like_tether_or_a_framework_is_in_the_stack(
        self, caplog: pytest.LogCaptureFixture, filename: str
    ) -> None:
        """The acquirer's frames are kept even when the project lives in a `tether/`
        directory, or under `fastapi/` or `asyncio/`: frames are left out by where tether and
        the frameworks are installed, not by a directory's name anywhere in the path (a
        project checked out under `fastapi/` lost every frame of its own)."""
        lc, conn = _lifecycle(leak_threshold=0.05, sweep_interval=0.01)
        namespace: dict[str, Any] = {"anyio": anyio}
        source = (
            "async def nightly(lc, conn):\n"
            "    async with lc.scope('nightly') as s:\n"
            "        await s.get(conn)\n"
            "        await anyio.sleep(0.2)\n"
        )
        exec(compile(source, filename, "exec"), namespace)
        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run():
                await namespace["nightly"](lc, conn)
        (record,) = _leak_warnings(caplog)
        assert record.getMessage().endswith(f'File "{filename}", line 3, in nightly')

    async def test_server_and_command_line_frames_are_left_out(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A job started under `python -m uvicorn` (runpy, click, uvicorn around it) is
        reported with the user's frames only: before, ten frames of those came before the
        one that took the value."""
        lc, conn = _lifecycle(leak_threshold=0.05, sweep_interval=0.01)
        (click,) = code_of("click")  # where they are installed: frames of their files
        (uvicorn,) = code_of("uvicorn")
        (multiprocessing,) = code_of("multiprocessing")
        namespace: dict[str, Any] = {"anyio": anyio}
        chain = [
            ("<frozen runpy>", "_run_module_as_main"),
            (f"{click}core.py", "invoke"),
            (f"{uvicorn}server.py", "serve"),
        ]
        # A worker process `uvicorn --workers N` spawned: multiprocessing's frames under
        # `python -c`'s `<string>` (granian's and daphne's are left out the same way).
        chain = [
            ("<string>", "spawned"),
            (f"{multiprocessing}process.py", "_bootstrap"),
            (f"{multiprocessing}spawn.py", "_main"),
            (f"{multiprocessing}context.py", "run"),
            *chain,
        ]
        for filename, name in chain:
            source = f"async def {name}(step):\n    await step()\n"
            exec(compile(source, filename, "exec"), namespace)
        source = (
            "async def nightly(lc, conn):\n"
            "    async with lc.scope('nightly') as s:\n"
            "        await s.get(conn)\n"
            "        await anyio.sleep(0.2)\n"
        )
        exec(compile(source, "/srv/app/jobs.py", "exec"), namespace)

        async def job() -> None:
            await namespace["nightly"](lc, conn)

        async def serve() -> None:
            await namespace["serve"](job)

        async def invoke() -> None:
            await namespace["invoke"](serve)

        async def outer() -> None:  # each frame of the chain awaits the next one's
            step = invoke
            for _, name in reversed(chain[:4]):
                step = functools.partial(namespace[name], step)
            await namespace["_run_module_as_main"](step)

        with caplog.at_level(logging.WARNING, logger="tether"):
            async with lc.run():
                await outer()
        (record,) = _leak_warnings(caplog)
        stack = record.getMessage().partition("\n")[2]
        assert stack.endswith('File "/srv/app/jobs.py", line 3, in nightly')
        for filename, _ in chain:
            assert filename not in stack


def test_a_scope_entered_through_a_portal_names_the_test_that_took_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through TestClient's portal, the event loop's thread holds no frame of the caller: the
    stack is the main thread's, waiting on the portal at the caller's line (before, the report
    said "acquired at threading.py in run")."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)
    app = FastAPI(lifespan=lc.lifespan)
    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        with client.portal.wrap_async_context_manager(lc.scope("portal job")) as s:
            client.portal.call(s.get, conn)
            client.portal.call(anyio.sleep, 0.4)
    (record,) = _leak_warnings(caplog)
    stack = record.getMessage().partition("\n")[2]
    assert "threading.py" not in stack
    assert f'File "{__file__}"' in stack
    assert "in test_a_scope_entered_through_a_portal_names_the_test_that_took_it" in stack


def test_a_def_endpoint_holding_a_value_is_reported_where_its_thread_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A `def` endpoint runs in a worker thread; its request's task only waits for it. The
    report says where the thread is (before, it said nothing of where: every frame of the
    task's await chain is the frameworks')."""
    import time

    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)
    app = FastAPI(lifespan=lc.lifespan)

    def slow_report(c: str) -> None:
        time.sleep(0.5)

    @app.get("/sync")
    def sync_endpoint(c: str = Depends(conn)) -> str:
        slow_report(c)
        return c

    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        assert client.get("/sync").json() == "conn"
    (record,) = _leak_warnings(caplog)
    first, _, stack = record.getMessage().partition("\n")
    assert first.endswith("by GET /sync; the request is now at:")
    assert f'File "{__file__}"' in stack
    assert "in sync_endpoint" in stack
    assert stack.rstrip().endswith("in slow_report")


async def test_a_scope_labelled_empty_is_reported_once_and_given_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`lc.scope("")`: one report and its end, as any label (before: a report at every sweep,
    each counted, and no end)."""
    lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)
    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            async with lc.scope("") as s:
                await s.get(conn)
                await anyio.sleep(0.4)  # many sweeps past the threshold
    assert len(_leak_warnings(caplog)) == 1
    assert len(_given_back(caplog)) == 1
    assert lc.stats().resources["conn"].leaks == 1


async def test_a_scope_blocking_the_loop_past_its_own_threshold_is_reported_at_its_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job's own threshold, lower than the Lifecycle's, passed while the event loop is
    blocked (no sweep can run): reported at the close, with where it was acquired (before:
    never). One with a higher threshold of its own, held as long: not reported."""
    import time

    lc, conn = _lifecycle(leak_threshold=10, sweep_interval=0.02)
    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            async with lc.scope("patient job", leak_threshold=60) as s:
                await s.get(conn)
                time.sleep(0.3)
            assert _leak_warnings(caplog) == []
            async with lc.scope("nightly job", leak_threshold=0.1) as s:
                await s.get(conn)
                time.sleep(0.3)  # a sync call: the event loop is blocked
    (record,) = _leak_warnings(caplog)
    first, _, stack = record.getMessage().partition("\n")
    assert first.startswith("tether: resource 'conn' held for 0.")
    assert first.endswith(
        " s (leak_threshold=0.1 s) by nightly job, seen at its close (the event loop was "
        "blocked, or no leak sweep had run since it went past the threshold); acquired at:"
    )
    assert f'File "{__file__}"' in stack
    assert lc.stats().resources["conn"].leaks == 1
    assert _given_back(caplog) == []


async def test_a_reported_value_whose_cleanup_fails_is_not_said_to_be_given_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After its leak report, a cleanup that raises: the end of the report says so (before:
    "was given back", then the error)."""
    lc = tether.Lifecycle(leak_threshold=0.1, sweep_interval=0.02)

    @lc.resource
    async def failing() -> AsyncIterator[str]:
        yield "conn"
        raise ConnectionResetError("rollback failed: server closed the connection")

    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            with pytest.raises(ConnectionResetError):
                async with lc.scope("nightly job") as s:
                    await s.get(failing)
                    await anyio.sleep(0.3)
    assert len(_leak_warnings(caplog)) == 1
    assert _given_back(caplog) == []
    (end,) = [r.getMessage() for r in caplog.records if "was not given back" in r.getMessage()]
    assert end.startswith(
        "tether: resource 'failing', reported as held too long by nightly job, was not given "
        "back after 0."
    )
    assert end.endswith(" s: its cleanup failed (see the error logged for it)")


async def test_values_that_depend_on_each_other_are_one_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transaction and the connection it depends on, held by one unit: one report naming
    both (before: one per value, with the same stack), each counted in its resource's
    `leaks`."""
    lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)

    @lc.resource
    async def tx(conn: str) -> AsyncIterator[str]:
        yield f"tx on {conn}"

    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            async with lc.scope("nightly job") as s:
                await s.get(tx)
                await anyio.sleep(0.3)
    (record,) = _leak_warnings(caplog)
    first = record.getMessage().partition("\n")[0]
    assert first.startswith("tether: resources 'conn', 'tx' held for 0.")
    assert first.endswith(" s (leak_threshold=0.1 s) by nightly job; acquired at:")
    assert record.tether_resources == ["conn", "tx"]  # type: ignore[attr-defined]
    assert lc.stats().resources["conn"].leaks == 1
    assert lc.stats().resources["tx"].leaks == 1


def test_trio_frames_are_left_out_of_the_stack(caplog: pytest.LogCaptureFixture) -> None:
    """Under trio, its runner's frames (`trio/_core/_run.py`) are not the user's."""
    pytest.importorskip("trio")
    (trio_dir,) = code_of("trio")
    lc, conn = _lifecycle(leak_threshold=0.1, sweep_interval=0.02)

    async def main() -> None:
        async with lc.run():
            async with lc.scope("trio job") as s:
                await s.get(conn)
                await anyio.sleep(0.3)

    with caplog.at_level(logging.WARNING, logger="tether"):
        anyio.run(main, backend="trio")
    (record,) = _leak_warnings(caplog)
    stack = record.getMessage().partition("\n")[2]
    assert stack.rstrip().endswith("in main")
    assert trio_dir not in stack


def test_mock_patch_object_of_leak_threshold_puts_it_back() -> None:
    """`leak_threshold` became a property: `mock.patch.object(lc, "leak_threshold", x)`
    raised AttributeError on its exit (no deleter) and left the patched value (diff15, F1)."""
    from unittest import mock

    lc = tether.Lifecycle(leak_threshold=30)
    with mock.patch.object(lc, "leak_threshold", 0.1):
        assert lc.leak_threshold == 0.1
        assert lc._leak_floor == 0.1
    assert lc.leak_threshold == 30
    assert lc._leak_floor == 30


async def test_a_value_whose_close_takes_long_is_reported_while_it_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A close that waits past the threshold (a COMMIT waiting for a lock) is reported by the
    sweep while it runs; before, the sweep did not see values in their close, and the report
    came when the close ended, blaming a blocked event loop (trial 8)."""
    lc = tether.Lifecycle(leak_threshold=0.2, sweep_interval=0.02)
    seen_during: list[int] = []

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"
        await anyio.sleep(0.6)  # the COMMIT, waiting
        seen_during.append(len(_leak_warnings(caplog)))

    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            await anyio.sleep(0.05)  # the sweeper runs
            async with lc.scope("slow commit") as s:
                await s.get(conn)
    assert seen_during == [1]  # reported before the close ended
    (record,) = _leak_warnings(caplog)
    first = record.getMessage().partition("\n")[0]
    assert first.startswith("tether: resource 'conn' held for 0.")
    assert first.endswith(
        " s (leak_threshold=0.2 s) by slow commit, in its close, which is still running (a "
        "COMMIT waiting for a lock, say); acquired at:"
    )
    assert len(_given_back(caplog)) == 1  # and its end, when the close ended
    assert lc.stats().resources["conn"].leaks == 1
