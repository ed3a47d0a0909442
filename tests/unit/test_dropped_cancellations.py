"""A cancellation that Python 3.11's ``asyncio.wait_for`` drops (CPython gh-86296) is raised
again by the integrations that wait with it (psycopg's pool, redis-py's send) with a message
its canceller knows: an anyio cancel scope's own, so the scope catches it and it goes no
further; else the task's.

The moment, made on purpose here: the task waits in ``wait_for`` and is cancelled in the
same turn of the loop in which what it waits for completes. asyncio cancels ``wait_for``'s
waiter, with the message; ``wait_for`` sees its result ready, returns it, and the message is
gone with the waiter. The task's own ``_cancel_message`` is then unset (or left over from an
earlier cancellation).
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from tether.integrations._common import dropped_cancellation

pytestmark = pytest.mark.anyio


async def waits_as_the_integrations_do(gate: asyncio.Future[str]) -> str:
    """``asyncio.wait_for`` on work of another task, with tether's check around it."""
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()

    async def other() -> str:
        return await gate

    result = await asyncio.wait_for(other(), 5)
    if task.cancelling() > before:
        raise dropped_cancellation(task)
    return result


async def cancel_as_it_completes(how: str) -> asyncio.Task[Any]:
    """Run the wait in a task in a cancel scope; once it waits, complete what it waits for
    and cancel it in the same turn."""
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    scopes: list[anyio.CancelScope] = []
    ran: list[str] = []

    async def work() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            ran.append(await waits_as_the_integrations_do(gate))
            await asyncio.sleep(0)  # the next await (a query): anyio delivers there at last
            ran.append("went on")

    task = asyncio.ensure_future(work())
    for _ in range(5):
        await asyncio.sleep(0)
    assert scopes
    gate.set_result("value")  # what it waits for completes this turn ...
    if how == "task.cancel":  # ... and it is cancelled in the same turn
        task.cancel("from outside")
    else:
        scopes[0].cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()
    assert "went on" not in ran, "the cancellation was lost: the task went on"
    return task


async def test_an_anyio_scope_catches_its_cancellation_dropped_by_wait_for() -> None:
    task = await cancel_as_it_completes("cancel scope")
    assert not task.cancelled(), "the cancellation escaped its scope"
    assert task.exception() is None


async def test_a_task_cancel_dropped_by_wait_for_still_ends_the_task() -> None:
    """Its message went with ``wait_for``'s waiter: the cancellation is delivered without
    it (as asyncio itself would deliver one that cancelled a future it awaited)."""
    task = await cancel_as_it_completes("task.cancel")
    assert task.cancelled()
