"""A request holding a resource past `leak_threshold`: the report says where it waits now.

A request records no stack when it opens a value (it would cost every request), so its
report names the route, and where the request's task waits at the time of the report. (A
`StreamingResponse` on uvicorn streams its body from a task of its own, while the request's
task waits for the client to leave: its report names the route only.)
"""

import asyncio
import importlib.util
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.inprocess import client_of

HERE = __file__


def _app() -> tuple[tether.Lifecycle, FastAPI, anyio.Event]:
    lc = tether.Lifecycle(leak_threshold=0.1, sweep_interval=0.02)
    release = anyio.Event()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    async def slow_upstream() -> None:
        await release.wait()

    @app.get("/hold")
    async def hold(c: Annotated[str, Depends(conn)]) -> str:
        await slow_upstream()
        return c

    return lc, app, release


def _leaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " held for " in r.getMessage()]


def test_a_request_holding_a_value_is_reported_with_where_it_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    route, resource, waits_in = "/hold", "conn", "slow_upstream"
    lc, app, release = _app()

    async def main() -> None:
        async with lc.lifespan(app), client_of(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, route)
            with anyio.fail_after(5):
                while not _leaks(caplog):
                    await anyio.sleep(0.02)
            release.set()

    with caplog.at_level(logging.WARNING, logger="tether"):
        anyio.run(main)
    (message,) = _leaks(caplog)
    first, _, stack = message.partition("\n")
    assert first.startswith(f"tether: resource {resource!r} held for ")
    assert first.endswith(f" s (leak_threshold=0.1 s) by GET {route}; the request is now at:")
    assert stack.rstrip().endswith(f"in {waits_in}")
    assert f'File "{HERE}"' in stack
    assert "/tether/" not in stack.replace(HERE, "")  # tether's own frames are left out
    assert lc.stats().resources[resource].leaks == 1


def test_a_request_that_gives_back_a_reported_value_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the leak report, the request's end is logged too, naming its route."""
    lc, app, release = _app()

    async def main() -> None:
        async with lc.lifespan(app), client_of(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            with anyio.fail_after(5):
                while not _leaks(caplog):
                    await anyio.sleep(0.02)
            release.set()

    with caplog.at_level(logging.INFO, logger="tether"):
        anyio.run(main)
    assert len(_leaks(caplog)) == 1
    back = [r.getMessage() for r in caplog.records if " was given back after " in r.getMessage()]
    assert len(back) == 1
    assert back[0].startswith(
        "tether: resource 'conn', reported as held too long by GET /hold, was given back after "
    )


class _NoCoroTask(asyncio.Task):  # type: ignore[type-arg]
    """granian's ``--task-impl rust`` tasks: an ``asyncio.Task`` whose ``get_coro()`` crashed
    the worker process (a segfault) when tether's sweep read where a request waits."""

    def get_coro(self) -> Any:
        raise RuntimeError("get_coro() of a task that cannot give it")


def test_a_request_whose_task_cannot_give_its_coroutine_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc, app, release = _app()

    async def main() -> None:
        async with lc.lifespan(app), client_of(app) as client:
            task = _NoCoroTask(client.get("/hold"), loop=asyncio.get_running_loop())
            with anyio.fail_after(5):
                while not _leaks(caplog) and not task.done():
                    await anyio.sleep(0.02)
            release.set()
            assert (await task).status_code == 200

    with caplog.at_level(logging.WARNING, logger="tether"):
        anyio.run(main)
    (message,) = _leaks(caplog)
    assert message.startswith("tether: resource 'conn' held for ")


SYNC_APP = """
import time

from fastapi import Depends, FastAPI

import tether

lc = tether.Lifecycle(leak_threshold=0.1, sweep_interval=0.02)


@lc.resource
async def conn():
    yield "conn"


app = FastAPI(lifespan=lc.lifespan)


def slow_report(c):
    time.sleep(0.5)


@app.get("/sync")
def sync_endpoint(c: str = Depends(conn)) -> str:
    slow_report(c)
    return c
"""


def _sync_app(folder: Path) -> Any:
    """`SYNC_APP` imported from a file in *folder*: a `def` endpoint holding its value 0.5 s."""
    folder.mkdir(parents=True)
    path = folder / "sync_app.py"
    path.write_text(SYNC_APP, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"sync_app_{abs(hash(folder))}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("folder", ["café€", "build\\x64", "dir\\u00e9x"])
def test_a_def_endpoint_under_a_non_ascii_directory_is_reported_where_its_thread_is(
    folder: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A project under `/home/josé/`: the report still says where the endpoint's worker thread
    is, the path as the file system has it (before: none, as faulthandler writes `caf\\xe9`);
    and one whose name holds a backslash, which faulthandler writes as it is (`build\\x64`,
    a Windows-like name), is not mistaken for one of its escapes."""
    module = _sync_app(tmp_path / folder)
    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(module.app) as client:
        assert client.get("/sync").json() == "conn"
    (message,) = _leaks(caplog)
    first, _, stack = message.partition("\n")
    assert first.endswith(" s (leak_threshold=0.1 s) by GET /sync; the request is now at:")
    assert f'File "{tmp_path}/{folder}/sync_app.py", line ' in stack
    assert stack.rstrip().endswith("in slow_report")


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "no-memfd"])
def test_without_a_temporary_directory_leaks_are_still_reported(
    memfd: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A container with a read-only root filesystem has no temporary directory: the app
    starts under TestClient, and the leak is reported, where the endpoint's thread is
    (read into memory) or, without memfd, without it (before: TestClient's start failed,
    "No usable temporary directory found", and the sweep failed without a report)."""
    module = _sync_app(tmp_path / "app")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    if not memfd:
        monkeypatch.delattr(os, "memfd_create", raising=False)
    with pytest.raises(FileNotFoundError):
        tempfile.TemporaryFile()
    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(module.app) as client:
        assert client.get("/sync").json() == "conn"
    (message,) = _leaks(caplog)
    if memfd:
        assert message.rstrip().endswith("in slow_report"), message
    else:
        assert message.endswith(" s (leak_threshold=0.1 s) by GET /sync"), message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert module.lc.stats().resources["conn"].leaks == 1


def test_a_routes_repeated_leaks_are_counted_after_the_first_report(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow backend made every request a leak report, several lines each (trial 14). The
    first of a route is reported in full, the next ones counted for a window (60 s; here
    0.6 s), then said in one line; the leaks counter counts each."""
    import re
    import time

    import tether._lifecycle

    monkeypatch.setattr(tether._lifecycle, "LEAK_WINDOW", 0.6)
    lc = tether.Lifecycle(leak_threshold=0.05, sweep_interval=0.02)

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/slow")
    async def slow(c: Annotated[str, Depends(conn)]) -> str:
        await anyio.sleep(0.15)
        return c

    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        for _ in range(3):
            assert client.get("/slow").status_code == 200
        time.sleep(0.8)  # the window ends
        client.get("/health-nothing")  # (a request: the loop turns)
        assert lc.stats().resources["conn"].leaks == 3
    said = [m for m in caplog.messages if "'conn'" in m and "held" in m]
    assert len(said) == 2, said
    assert said[0].startswith("tether: resource 'conn' held for 0.")
    assert re.fullmatch(
        r"tether: GET /slow held 'conn' past the leak threshold 2 more times in the last "
        r"\d+ s \(the longest for 0\.\d s\), as reported above; counted in leaks",
        said[1],
    ), said
