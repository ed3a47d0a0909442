"""`unit.run_sync(fn, *args)`: sync code on a sync resource's value, in a worker thread,
waited for to its end even when the unit of work is cancelled, so the unit's values close
after it, never under it. (`await asyncio.to_thread(...)` returns at the cancel, and the
unit closed the value while the thread still used it.)"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="")


def make(events: list[str]) -> tuple[tether.Lifecycle, tether.Resource[dict[str, bool]]]:
    lc = tether.Lifecycle()

    @lc.resource
    def session() -> Iterator[dict[str, bool]]:
        s = {"open": True}
        try:
            yield s
        finally:
            s["open"] = False
            events.append("closed")

    return lc, session


def work(s: dict[str, bool], events: list[str], seconds: float) -> str:
    events.append("started")
    time.sleep(seconds)
    events.append(f"done, open={s['open']}")
    return f"{where.get()} in {threading.current_thread().name}"


async def test_it_runs_in_a_worker_thread_with_the_callers_context() -> None:
    events: list[str] = []
    lc, session = make(events)
    where.set("job")
    async with lc.scope("job") as unit:
        said = await unit.run_sync(work, await unit.get(session), events, 0)
    assert said.startswith("job in ")
    assert said != f"job in {threading.current_thread().name}"
    assert events == ["started", "done, open=True", "closed"]


async def test_its_exception_is_raised_and_the_unit_fails_with_it() -> None:
    events: list[str] = []
    lc, session = make(events)

    def fails(s: dict[str, bool]) -> None:
        raise LookupError("no such row")

    with pytest.raises(LookupError, match="no such row"):
        async with lc.scope("job") as unit:
            await unit.run_sync(fails, await unit.get(session))
    assert events == ["closed"]


@pytest.mark.parametrize(
    ("anyio_backend", "how"),
    [
        ("asyncio", "asyncio.timeout"),
        ("asyncio", "move_on_after"),
        ("asyncio", "task.cancel"),
        ("trio", "move_on_after"),
    ],
)
async def test_a_cancelled_unit_waits_for_the_thread_before_it_closes(how: str) -> None:
    """The thread's 0.3 s run ends before the value closes, with the value still open
    under it; the cancellation is raised after."""
    events: list[str] = []
    lc, session = make(events)

    async def job() -> None:
        async with lc.scope("job") as unit:
            await unit.run_sync(work, await unit.get(session), events, 0.3)

    started = time.monotonic()
    if how == "asyncio.timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await job()
        await asyncio.sleep(0)  # no cancellation escapes the block
    elif how == "move_on_after":
        with anyio.move_on_after(0.05) as scope:
            await job()
        assert scope.cancelled_caught
    else:
        task = asyncio.ensure_future(job())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.monotonic() - started >= 0.25  # waited for the thread
    assert events == ["started", "done, open=True", "closed"]
