"""Test helpers: the app scope in a fixture of any test runner, and what a test left behind
in a :class:`~tether.Lifecycle`, as assertions.

tether's pytest plugin (:mod:`tether.pytest_plugin`, loaded by pytest on its own) runs the
assertions after every test; call them yourself under another runner, or in the middle of a test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle, Override
    from ._scope import Unit

T = TypeVar("T")

__all__ = [
    "assert_pools_returned",
    "assert_released",
    "in_flight",
    "pools_in_use",
    "running",
    "undo_overrides",
]


@asynccontextmanager
async def running(lc: Lifecycle, app: Any = None) -> AsyncIterator[Lifecycle]:
    """The app scope of *lc* (with *app*: its lifespan, which also takes over *app*'s
    routes, for httpx's ``ASGITransport``), held by a task of its own.

    ``async with lc.run():`` holds a task group open across its block, which only works
    when the block is entered and left by one task. pytest-asyncio sets up and tears down an
    async fixture in different tasks, so there ``lc.run()`` fails at teardown with anyio's
    "Attempted to exit cancel scope in a different task than it was entered in". Use::

        @pytest_asyncio.fixture(scope="session", loop_scope="session")
        async def app_scope():
            async with tether.testing.running(lc):
                yield lc

    A failure to start (``StartupError``) is raised on entering; one at shutdown
    (``ShutdownError``) on leaving. Outside asyncio (trio) it is ``lc.run()`` itself.
    """
    scope = lc.lifespan(app) if app is not None else lc.run()
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: no task to hand the scope to, and no need
        async with scope:
            yield lc
        return
    started = asyncio.Event()
    stop = asyncio.Event()

    async def hold() -> None:
        async with scope:
            started.set()
            await stop.wait()

    task = asyncio.create_task(hold(), name=f"tether.testing.running({lc!r})")
    waiting = asyncio.create_task(started.wait())
    try:
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled while starting: the app scope closes what it opened
        task.cancel()
        raise
    finally:
        waiting.cancel()
    if task.done():
        task.result()  # the StartupError
    try:
        yield lc
    finally:
        stop.set()
        await asyncio.shield(task)


_HINT = (
    "Exit every `lc.scope()`, read every streamed response to its end, and stop background "
    "work before the test ends (to allow it in one test, mark it @pytest.mark.tether_unchecked)."
)


def in_flight(lc: Lifecycle, *, ignore: Collection[Unit] = ()) -> list[str]:
    """One line per unit of work of *lc* in flight (but those in *ignore*): its label, its
    age, and what it holds, with where each value was acquired when that is known."""
    now = time.perf_counter()
    lines = []
    for unit in lc._in_flight():
        if unit in ignore:
            continue
        held = [
            f"{e.res.name!r}" + (f" (acquired at {_frame(e.stack[-1])})" if e.stack else "")
            for e in list(unit.entries)
        ]
        holds = f"holds {', '.join(held)}" if held else "holds nothing yet"
        lines.append(f"{unit.label!r} (in flight {now - unit.started:.2f} s) {holds}")
    return lines


def assert_released(lc: Lifecycle, *, wait: float = 1.0, ignore: Collection[Unit] = ()) -> None:
    """Assert that no unit of work of *lc* is in flight (but those in *ignore*), giving
    units that are ending up to *wait* seconds to finish; the error names each unit,
    what it holds, and where it acquired it."""
    lines = _settled(lambda: in_flight(lc, ignore=ignore), wait)
    if lines:
        count = f"{len(lines)} unit{'s' if len(lines) > 1 else ''} of work"
        listed = "".join(f"\n  - {line}" for line in lines)
        msg = f"tether: {count} of {lc!r} still in flight:{listed}\n{_HINT}"
        raise AssertionError(msg)


def assert_pools_returned(
    lc: Lifecycle, before: Mapping[str, int | None], *, wait: float = 1.0
) -> None:
    """Assert that no driver pool of *lc* (``lc.stats().pools``) has more connections in
    use than *before* said (in use by pool name, as :func:`pools_in_use` returns), giving
    connections being given back up to *wait* seconds. Run it when no unit of work of the
    test is in flight: what is still in use then was taken straight from the pool."""
    grown = _settled(lambda: _grown(lc, before), wait)
    if grown:
        listed = "".join(
            f"\n  - {name!r}: {now} in use, {was} before the test" for name, now, was in grown
        )
        msg = (
            f"tether: a driver pool of {lc!r} has more connections in use than before the "
            f"test, and no unit of work holds them:{listed}\nSomething took a connection "
            f"straight from the pool (`pool.acquire()`, `engine.connect()`, ...) and did not "
            f"give it back: use `async with` on it, or take it with `lc.scope()`."
        )
        raise AssertionError(msg)


def pools_in_use(lc: Lifecycle) -> dict[str, int | None]:
    """Connections in use now, by driver pool (what :func:`assert_pools_returned` compares)."""
    return {name: p.in_use for name, p in lc._pool_stats().items()}


def _grown(lc: Lifecycle, before: Mapping[str, int | None]) -> list[tuple[str, int, int]]:
    grown = []
    for name, now in pools_in_use(lc).items():
        was = before.get(name)
        if now is not None and was is not None and now > was:
            grown.append((name, now, was))
    return grown


def undo_overrides(lc: Lifecycle, *, keep: Collection[Override] = ()) -> list[str]:
    """Undo every override of *lc* still in place (but those in *keep*), newest first;
    return one line for each, naming the resource and where the override was made."""
    undone = []
    for ov in reversed(list(lc._override_stack)):
        if ov in keep:
            continue
        ov.undo()
        where = f" made at {_frame(ov.made_at[-1])}" if ov.made_at else ""
        undone.append(f"lc.override({ov.target.name}, ...){where}")
    undone.reverse()
    return undone


def _settled(read: Callable[[], list[T]], wait: float) -> list[T]:
    """*read*'s result once it is empty, or after *wait* seconds: what is ending gets the
    time to end."""
    deadline = time.monotonic() + wait
    while (found := read()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def _frame(frame: tuple[str, int, str]) -> str:
    filename, line, name = frame
    return f"{filename}:{line} in {name}"
