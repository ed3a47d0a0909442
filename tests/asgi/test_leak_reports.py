"""A request holding a resource past `leak_threshold`: the report says where it waits now.

A request records no stack when it opens a value (it would cost every request), so its
report names the route, and where the request's task waits at the time of the report. (A
`StreamingResponse` on uvicorn streams its body from a task of its own, while the request's
task waits for the client to leave: its report names the route only.)
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI

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
