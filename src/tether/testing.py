"""Test helpers: the app scope in a fixture of any test runner, and what a test left behind
in a :class:`~tether.Lifecycle`, as assertions.

tether's pytest plugin (:mod:`tether.pytest_plugin`, loaded by pytest on its own) runs the
assertions after every test; call them yourself under another runner, or in the middle of a test.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from ._lifecycle import DrainedUnit, _entry_site, check_lifecycle

if TYPE_CHECKING:
    from ._lifecycle import CancelledUnit, Lifecycle, Override
    from ._resource import Resource
    from ._scope import Entry, Unit

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
    routes, for httpx's ``ASGITransport``, the user's lifespan of ``lc.lifespan(wrap=...)``
    included), held by a task of its own.

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
    check_lifecycle(lc, "tether.testing.running()", "running(lc)")
    scope = lc.lifespan(app) if app is not None else lc.run()
    site = _entry_site()  # the fixture's line: the task holding the scope has no frame of it
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
    lc._app_site = site or lc._app_site
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
    check_lifecycle(lc, "tether.testing.in_flight()", "in_flight(lc)")
    now = time.perf_counter()
    return [_describe(unit, now) for unit in _units_in_flight(lc, ignore)]


def assert_released(lc: Lifecycle, *, wait: float = 1.0, ignore: Collection[Unit] = ()) -> None:
    """Assert that no unit of work of *lc* is in flight (but those in *ignore*), giving
    units that are ending up to *wait* seconds to finish; the error names each unit,
    what it holds, and where it acquired it, with its age when the call was made.

    A unit can only finish while its event loop runs: running in another thread (TestClient's,
    a server's), it gets the time; not running and open (pytest-asyncio's between tests), it is
    run for that time, when no loop runs in this thread; run by this very thread (a call from a
    coroutine) or closed, nothing can end, and there is no wait."""
    check_lifecycle(lc, "tether.testing.assert_released()", "assert_released(lc)")
    _assert_released(lc, wait=wait, ignore=ignore, since=time.perf_counter())


def _assert_released(lc: Lifecycle, *, wait: float, ignore: Collection[Unit], since: float) -> None:
    """`assert_released`, ages and grace counted from *since* (``time.perf_counter()``)."""
    units = _settled(
        lambda: _units_in_flight(lc, ignore),
        since + wait,
        lambda found: {_loop_of(lc, unit) for unit in found},
    )
    if units:
        count = f"{len(units)} unit{'s' if len(units) > 1 else ''} of work"
        listed = "".join(f"\n  - {_describe(unit, since)}" for unit in units)
        msg = f"tether: {count} of {lc!r} still in flight:{listed}\n{_HINT}"
        raise AssertionError(msg)


def _units_in_flight(lc: Lifecycle, ignore: Collection[Unit]) -> list[Unit]:
    return [unit for unit in lc._in_flight() if unit not in ignore]


def _assert_not_cancelled(
    lc: Lifecycle, *, keep: Collection[CancelledUnit], ignore: Collection[Unit]
) -> None:
    """Assert that no shutdown of *lc* had to cancel a unit of work past its
    ``drain_timeout`` (but those in *keep*, and units in *ignore*): such a unit was still in
    flight when the app scope closed, as under a function-scoped ``with TestClient(app)``
    fixture, before the check after the test could see it."""
    cancelled = [c for c in list(lc._cancelled) if c not in keep and c.unit not in ignore]
    if cancelled:
        n = len(cancelled)
        count = f"{n} unit{'s' if n > 1 else ''} of work"
        listed = "".join(
            f"\n  - {_describe(c.unit, c.at, c.entries)}" + (_ABANDONED if c.abandoned else "")
            for c in cancelled
        )
        timeouts = sorted({c.drain_timeout for c in cancelled})
        drain = ", ".join(f"drain_timeout={t:g} s" for t in timeouts)
        if not any(c.abandoned for c in cancelled):
            ended = f"cancelled after {drain}"
        elif all(c.abandoned for c in cancelled):
            ended = "with nothing running in it"  # (closed past the drain, rolled back)
        else:
            ended = f"past {drain}"
        msg = (
            f"tether: {count} of {lc!r} still in flight when its app scope shut down, "
            f"{ended}:{listed}\n{_HINT}"
        )
        raise AssertionError(msg)


#: For a unit of work entered by hand and never exited, which no drain could cancel (its task
#: had ended, or was the one shutting the app down, or an app resource's).
_ABANDONED = (
    ", entered by hand and never exited (an `lc.scope()`: `__aenter__` with no `__aexit__`), "
    "so closed by the shutdown, rolled back"
)


def _assert_not_drained(
    lc: Lifecycle,
    *,
    keep: Collection[DrainedUnit],
    ignore: Collection[Unit],
    since: float,
    wait: float,
) -> None:
    """Assert that no shutdown of *lc* waited on a unit of work (but those in *keep*, and
    units in *ignore*) that was still in flight *wait* seconds after *since* (the end of the
    test): one the shutdown of a function-scoped app waited for, before the check after the
    test could see it. The same for a unit the end of a ``rolled_back()`` block (a fixture's)
    waited on, holding the block's connection."""
    late = [
        d
        for d in list(lc._drained_units)
        if d not in keep
        and d.unit not in ignore
        # (a block that rolled back under a unit: whenever it gave up)
        and (d.ended - since > wait or (isinstance(d, _BlockWaited) and d.gave_up))
    ]
    messages = []
    drained = [d for d in late if not isinstance(d, _BlockWaited)]
    if drained:
        n = len(drained)
        count = f"{n} unit{'s' if n > 1 else ''} of work"
        listed = "".join(
            f"\n  - {_describe(d.unit, since, d.entries)}, ended {d.ended - since:.2f} s "
            f"after the test"
            for d in drained
        )
        messages.append(
            f"tether: {count} of {lc!r} still in flight when its app scope shut down, "
            f"which waited for {'them' if n > 1 else 'it'} to end:{listed}\n{_HINT}"
        )
    blocks: dict[str, list[_BlockWaited]] = {}
    for d in late:
        if isinstance(d, _BlockWaited):
            blocks.setdefault(d.block, []).append(d)
    for block, waited in blocks.items():
        n = len(waited)
        count = f"{n} unit{'s' if n > 1 else ''} of work"
        listed = "".join(
            f"\n  - {_describe(d.unit, since, d.entries)}, "
            + (
                f"still held it {d.ended - since:.2f} s after the test, when the block gave "
                f"up waiting and rolled back under it"
                if d.gave_up
                else f"gave it back {d.ended - since:.2f} s after the test"
            )
            for d in waited
        )
        messages.append(
            f"tether: {count} of {lc!r} still held {block!r} when rolled_back({block}) ended "
            f"after the test (a fixture's teardown), and the block waited for "
            f"{'them' if n > 1 else 'it'} to give it back before rolling back:{listed}\n{_HINT}"
        )
    if messages:
        raise AssertionError("\n".join(messages))


def _describe(unit: Unit, now: float, entries: Collection[Entry] | None = None) -> str:
    held = [
        f"{e.res.name!r}" + (f" (acquired at {_frame(e.stack[-1])})" if e.stack else "")
        for e in list(unit.entries if entries is None else entries)
    ]
    holds = f"holds {', '.join(held)}" if held else "holds nothing yet"
    age = max(0.0, now - unit.started)
    return f"{unit.label!r} (in flight {age:.2f} s) {holds}"


def _loop_of(lc: Lifecycle, unit: Unit) -> asyncio.AbstractEventLoop | None:
    """The event loop *unit* runs on: its request's task's, else the app scope's (where
    every `lc.scope()` runs while it is open); None when unknown (no app scope: any loop,
    in any thread)."""
    task = getattr(unit, "task", None)
    if isinstance(task, asyncio.Future):
        return task.get_loop()
    return _app_loop(lc)


def _app_loop(lc: Lifecycle) -> asyncio.AbstractEventLoop | None:
    """The loop of *lc*'s app scope, where its pools give connections back; None when it
    is not open (or runs outside asyncio)."""
    loop = lc._loop
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def assert_pools_returned(
    lc: Lifecycle, before: Mapping[str, int | None], *, wait: float = 1.0
) -> None:
    """Assert that no driver pool of *lc* (``lc.stats().pools``) has more connections in
    use than *before* said (in use by pool name, as :func:`pools_in_use` returns), giving
    connections being given back up to *wait* seconds (on the app scope's loop, as
    :func:`assert_released` waits). Run it when no unit of work of the test is in flight:
    what is still in use then was taken straight from the pool."""
    check_lifecycle(
        lc, "tether.testing.assert_pools_returned()", "assert_pools_returned(lc, before)"
    )
    _assert_pools_returned(lc, before, wait=wait, since=time.perf_counter())


def _assert_pools_returned(
    lc: Lifecycle, before: Mapping[str, int | None], *, wait: float, since: float
) -> None:
    grown = _settled(lambda: _grown(lc, before), since + wait, lambda _: {_app_loop(lc)})
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
    check_lifecycle(lc, "tether.testing.pools_in_use()", "pools_in_use(lc)")
    return {name: p.in_use for name, p in lc._pool_stats().items()}


def _grown(lc: Lifecycle, before: Mapping[str, int | None]) -> list[tuple[str, int, int]]:
    grown = []
    for name, now in pools_in_use(lc).items():
        was = before.get(name)
        if now is not None and was is not None and now > was:
            grown.append((name, now, was))
    return grown


def undo_overrides(lc: Lifecycle, *, keep: Collection[Override] = ()) -> list[str]:
    """Undo every override of *lc* still in place (but those in *keep*, and those of the
    integrations' ``rolled_back()`` blocks open, which their block undoes), newest first;
    return one line for each, naming the resource and where the override was made."""
    check_lifecycle(lc, "tether.testing.undo_overrides()", "undo_overrides(lc)")
    undone = []
    for ov in reversed(list(lc._override_stack)):
        if ov in keep or ov.block:
            continue  # (a `rolled_back()` block's own: the block undoes it)
        ov.undo()
        where = f" made at {_frame(ov.made_at[-1])}" if ov.made_at else ""
        undone.append(f"lc.override({ov.target.name}, ...){where}")
    undone.reverse()
    return undone


def _settled(
    read: Callable[[], list[T]],
    deadline: float,
    loops: Callable[[list[T]], Collection[asyncio.AbstractEventLoop | None]],
) -> list[T]:
    """*read*'s result once it is empty, or at *deadline* (``time.perf_counter()``): what is
    ending gets the time to end, as long as the event loops it runs on (*loops* of what is
    found) can run."""
    while (found := read()) and (left := deadline - time.perf_counter()) > 0:
        if not _let_run(loops(found), min(_STEP, left)):
            break  # nothing found can progress: waiting changes nothing
    return found


_STEP = 0.01


def _let_run(loops: Collection[asyncio.AbstractEventLoop | None], step: float) -> bool:
    """Let *loops* run for *step* seconds: run those that are idle (open, not running) here,
    wait for those running in another thread. False if none can run: each is closed, or is
    this thread's running loop, blocked by this very call."""
    here = asyncio._get_running_loop()
    idle: list[asyncio.AbstractEventLoop] = []
    elsewhere = False
    for loop in loops:
        if loop is None:  # unknown: maybe running in another thread
            elsewhere = True
        elif loop is here or loop.is_closed():
            continue
        elif loop.is_running():
            elsewhere = True
        elif here is None:
            idle.append(loop)
    if not idle:
        if elsewhere:
            time.sleep(step)
        return elsewhere
    for loop in idle:
        pause = asyncio.sleep(step / len(idle))
        try:
            loop.run_until_complete(pause)
        except RuntimeError:  # started in another thread, or closed, meanwhile
            pause.close()
            time.sleep(step / len(idle))
    return True


def _frame(frame: tuple[str, int, str]) -> str:
    filename, line, name = frame
    return f"{filename}:{line} in {name}"


# --------------------------------------------------------------------------- rolled_back

#: The integrations' ``rolled_back()``: what a unit of work's commit runs before its savepoint
#: is released. ``RELEASE SAVEPOINT`` checks no ``DEFERRABLE INITIALLY DEFERRED`` constraint,
#: where production's ``COMMIT`` does: ``SET CONSTRAINTS ALL IMMEDIATE`` checks them now, in a
#: savepoint rolled back at once, so the next unit of work starts with them deferred again.
_CHECK_DEFERRED = (
    "SAVEPOINT tether_check",
    "SET CONSTRAINTS ALL IMMEDIATE",
    "ROLLBACK TO SAVEPOINT tether_check",
    "RELEASE SAVEPOINT tether_check",
)


def _nested(name: str) -> str:
    return (
        f"rolled_back(): a unit of work asked for {name!r} while this task already holds it "
        f"in the block (an `lc.scope()` opened inside a request or scope that has it). In "
        f"production it gets another connection of the pool; in rolled_back() every unit of "
        f"work shares the block's one connection, so it would wait for itself. Pass the "
        f"connection (or session) the outer unit of work has to the inner code, or test it "
        f"without rolled_back()."
    )


def _waited(name: str, timeout: float) -> str:
    return (
        f"rolled_back(): a unit of work waited {timeout:g}s (the pool's acquire timeout) for "
        f"{name!r} while another unit of work of the block held it, and no other got a turn "
        f"meanwhile. In production it gets another connection of the pool; in rolled_back() "
        f"the units of work share the block's one connection and take turns, so one the holder "
        f"waits for (a job in its own `lc.scope()` that an endpoint awaits, with asyncio.gather "
        f"or a task) never gets it, and one behind a holder slower than that fails. Pass the "
        f"endpoint's connection (or session) to the job, or test it without rolled_back()."
    )


def _aborted(name: str, savepoint: str) -> str:
    """The error for a unit of work of ``rolled_back(name)`` that finds the block's
    transaction aborted: a statement on the block's connection, outside every unit, failed."""
    return (
        f"rolled_back({name}): the block's transaction is aborted, so no unit of work can run "
        f"in it: a statement run on the block's connection (the one `async with "
        f"rolled_back({name}) as conn:` yields), outside any unit of work, failed (one the "
        f"test expects to fail, in `pytest.raises`?), and PostgreSQL ignores every later "
        f"command of the transaction until it is rolled back. Run a statement that may fail "
        f"on the block's connection in a savepoint ({savepoint}): its failure then rolls back "
        f"to the savepoint only, and the block carries on."
    )


class _BlockWaited(DrainedUnit):
    """A unit of work the end of a ``rolled_back()`` block waited on, holding the block's
    connection: what it held, and when it gave the connection back (the pytest plugin reports
    one that did so past its grace, as one a shutdown's drain waited on)."""

    __slots__ = ("block", "gave_up")

    def __init__(
        self, unit: Unit, entries: list[Entry], ended: float, block: str, gave_up: bool = False
    ) -> None:
        super().__init__(unit, entries, ended)
        self.block = block
        self.gave_up = gave_up  # it held it still: the block rolled back under it


def _holds(unit: Unit, name: str) -> list[Entry] | None:
    """What *unit* holds, if it holds the value of the resource named *name*."""
    entries = list(unit.entries)
    return entries if any(e.res.name == name for e in entries) else None


@asynccontextmanager
async def _watching(resource: Resource[Any]) -> AsyncIterator[dict[Unit, list[Entry]]]:
    """While ``rolled_back(resource)``'s end waits for its connection: the units of work in
    flight that hold *resource*'s value, or wait their turn for it, as they began the wait,
    each with what it held (looked at again every 50 ms: one waiting gets its turn)."""
    from ._resource import OPENING

    name = resource.name
    holders: dict[Unit, list[Entry]] = {}
    for unit in resource.lifecycle._in_flight():
        held = _holds(unit, name)
        if held is not None or unit.values.get(resource) is OPENING:
            holders[unit] = held or list(unit.entries)

    async def look() -> None:
        while True:
            await anyio.sleep(0.05)
            for unit in list(holders):
                held = _holds(unit, name)
                if held is not None:
                    holders[unit] = held

    async with anyio.create_task_group() as tg:
        tg.start_soon(look)
        try:
            yield holders
        finally:
            tg.cancel_scope.cancel()


def _note_waited(
    resource: Resource[Any], holders: Mapping[Unit, list[Entry]], gave_up: bool = False
) -> None:
    """Note that the end of ``rolled_back(resource)`` waited on *holders* until now (and,
    *gave_up*, rolled back under them: not noted before, the worst case was not reported)."""
    now = time.perf_counter()
    drained = resource.lifecycle._drained_units
    for unit, entries in holders.items():
        drained.append(_BlockWaited(unit, entries, now, resource.name, gave_up))


def outside_the_block(resource: str, pool: str) -> None:
    """Warn that a unit of work took a connection of *pool* through another resource while
    ``rolled_back(resource)`` is open: it is not in the block (it does not see the block's
    writes, and its own commit)."""
    warnings.warn(
        f"rolled_back({resource!r}) is open, and a unit of work took a connection of pool "
        f"{pool!r} through another resource: it is outside the block, so it does not see what "
        f"the block wrote, and what it writes is committed and stays after the test. Give "
        f"rolled_back() the resource the code under test uses, or open one block per resource.",
        RuntimeWarning,
        stacklevel=3,
    )


class _Turns:
    """The integrations' ``rolled_back()``: the units of work of one block take turns on its
    one connection. One that asks for it while its own task holds it (a nested
    ``lc.scope()``) fails at once; one that waits longer than *timeout* (the pool's acquire
    timeout) fails: a unit of work the holder awaits would otherwise wait forever. Sync
    sessions (:meth:`sync_turn`) only wait, bounded: worker threads serve one unit of work
    after another, so a thread tells nothing of which one asks."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        # Not a Lock: a unit of work may end in another task than the one that began it
        # (a release="response" value, closed after the response's last body message).
        self.lock = anyio.Semaphore(1)
        self._holder: object = None
        self._sync_lock = threading.Lock()  # taken in an opening thread, given back in another
        # Turns taken so far: a wait counts *timeout* from the last one, so units queued
        # behind others that come and go wait their turn; one stuck behind a holder fails.
        self.taken = 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        me = anyio.get_current_task().id
        if self._holder == me:
            raise RuntimeError(_nested(self.name))
        while True:
            seen = self.taken
            acquired = False
            with anyio.move_on_after(self.timeout):
                await self.lock.acquire()
                acquired = True
            if acquired:
                break
            if self.taken == seen:  # nobody got a turn in all that time
                raise RuntimeError(_waited(self.name, self.timeout))
        self.taken += 1
        self._holder = me
        try:
            yield
        finally:
            self._holder = None
            self.lock.release()

    @contextmanager
    def sync_turn(self) -> Iterator[None]:
        # No "same task" check: a worker thread serves one unit of work, then another.
        while True:
            seen = self.taken
            if self._sync_lock.acquire(True, self.timeout):
                break
            if self.taken == seen:
                raise RuntimeError(_waited(self.name, self.timeout))
        self.taken += 1
        try:
            yield
        finally:
            self._sync_lock.release()

    async def settle(self, resource: Resource[Any], within: float) -> bool:
        """The block's end: take the connection, waiting up to *within* seconds for the unit
        of work still holding it (and those waiting their turn) to give it back; true once
        taken (then held, until ``lock.release()``). A unit waited on is noted, with what it
        held and when it gave the connection back, for the pytest plugin: the test left it in
        flight."""
        try:
            self.lock.acquire_nowait()
        except anyio.WouldBlock:
            pass
        else:
            return True
        held = False
        async with _watching(resource) as holders:
            with anyio.move_on_after(within):
                await self.lock.acquire()
                held = True
        _note_waited(resource, holders, gave_up=not held)
        return held

    async def sync_settled(self, resource: Resource[Any], within: float) -> bool:
        """:meth:`settle` for sync sessions (then held until :meth:`sync_release`)."""
        if self._sync_lock.acquire(False):
            return True
        async with _watching(resource) as holders:
            held = await anyio.to_thread.run_sync(self.sync_settle, within)
        _note_waited(resource, holders, gave_up=not held)
        return held

    def sync_settle(self, within: float) -> bool:
        """Wait for the unit of work still holding the connection: true once it is free (then
        held, until :meth:`sync_release`)."""
        return self._sync_lock.acquire(True, within)

    def sync_release(self) -> None:
        self._sync_lock.release()
