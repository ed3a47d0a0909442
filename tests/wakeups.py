"""Cancelling a task at each of its wake-ups: the moment what it awaited is done and it has
not run yet, so a one-shot cancellation arrives together with the reply, the connection or the
thread's result. Code that catches it there sees its result ready and may return it instead
(Python 3.11's ``asyncio.wait_for`` does): the sweeps in the tests check that tether and the
integrations never lose one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import anyio

__all__ = ["cancelled_at_turn", "cancelled_at_wake_up", "woken"]


def woken(task: asyncio.Future[Any]) -> bool:
    """Whether *task* was woken and has not run yet: what it awaits is done."""
    waiting_on = task._fut_waiter  # type: ignore[attr-defined]
    return waiting_on is not None and bool(waiting_on.done())


async def cancelled_at_wake_up(
    k: int | None, work: Coroutine[Any, Any, Any], *, keeps_message: bool = False
) -> tuple[bool, int]:
    """Run *work* in a task and ``task.cancel()`` it at its *k*-th wake-up: what it awaited
    is done and it has not run yet, the cancellation arriving together with a reply or a
    connection (a one-shot cancellation that code catching it at the wrong moment loses).
    Check that it was not swallowed (and, *keeps_message*, that it kept its message).
    Return whether it fired, and the wake-ups seen."""
    task = asyncio.ensure_future(work)
    wake_ups, fired = 0, False
    deadline = time.monotonic() + 15
    while not task.done():
        if woken(task):
            wake_ups += 1
            if wake_ups == k:
                fired = task.cancel(f"wake-up {k}")
                break
        assert time.monotonic() < deadline, f"wake-up {k}: the work did not end"
        await asyncio.sleep(0)
    with anyio.fail_after(15):
        await asyncio.wait({task})
    if not fired:
        assert task.exception() is None
        return fired, wake_ups
    assert task.cancelled(), f"task.cancel at wake-up {k}: the cancellation was swallowed"
    if keeps_message:
        # It carries its message (anyio knows its own cancellations by it), in the error
        # that ended the task or one it was raised from. (An anyio task group on the way
        # turns it into its own.)
        try:
            task.result()
        except asyncio.CancelledError as exc:
            chain: BaseException | None = exc
            messages = []
            while isinstance(chain, asyncio.CancelledError):
                messages.append(chain.args[0] if chain.args else None)
                chain = chain.__context__
            assert f"wake-up {k}" in messages, f"wake-up {k}: message lost: {messages}"
    return fired, wake_ups


async def cancelled_at_turn(k: int, work: Coroutine[Any, Any, Any], *, how: str) -> bool:
    """Run *work* in a task, inside an anyio cancel scope, and cancel it at the *k*-th turn
    of the event loop after it starts, whatever it is doing then (waiting, woken, running):
    ``task.cancel()`` (*how* ``"task.cancel"``) or the scope's ``cancel()`` (``"cancel
    scope"``). A cancellation that lands while the task waits on a future another task is
    about to complete (``asyncio.wait_for``'s on Python 3.11) is the case the wake-up sweep
    does not reach. Check that it was delivered: the task ends cancelled, or the scope caught
    it and nothing escaped it. Return whether it fired (False: the work ended before)."""
    scopes: list[anyio.CancelScope] = []

    async def scoped() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await work

    task = asyncio.ensure_future(scoped())
    for _ in range(k):
        await asyncio.sleep(0)
        if task.done():
            assert task.exception() is None, f"turn {k}: {task.exception()!r}"
            return False
    assert scopes, f"turn {k}: the task never ran"
    if how == "task.cancel":
        task.cancel(f"turn {k}")
    else:
        scopes[0].cancel()
    with anyio.fail_after(15):
        await asyncio.wait({task})
    if how == "task.cancel":
        assert task.cancelled(), f"task.cancel at turn {k}: the cancellation was swallowed"
    else:
        assert not task.cancelled(), f"cancel scope at turn {k}: the cancellation escaped"
        assert task.exception() is None, f"cancel scope at turn {k}: {task.exception()!r}"
    return True
