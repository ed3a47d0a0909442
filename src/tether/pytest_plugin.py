"""tether's pytest plugin: after every test, what the test left behind in a Lifecycle.

pytest loads it on its own (entry point ``pytest11``, name ``tether``). After each test,
for every :class:`~tether.Lifecycle` alive:

* an ``lc.override`` made during the test and still in place is undone, so later tests see
  the real resource, and the test errors, naming the resource and where the override was made;
  the same for a FastAPI ``app.dependency_overrides`` entry of a tether resource that the test
  added to an app that tests share (one served before it, or one a module holds: compared with
  its overrides when the test started);
* a unit of work that started during the test and is still in flight a second after it
  (a ``lc.scope()`` never exited, a streamed response never read to its end, a job still
  running) makes the test error, naming the unit, its age when the test ended, what it
  holds and where it acquired it. During that second the unit's event loop runs: in its
  own thread (TestClient's), or, if it is open and idle (pytest-asyncio's session or module
  loop between tests), here; on a closed loop nothing can end, and there is no wait. A unit
  of the test that the app's shutdown cancelled past ``drain_timeout`` at the teardown of its
  fixtures (the app run by a function-scoped fixture), or waited on until it ended more than
  a second after the test, makes the test error too; the same for one the end of a
  ``rolled_back()`` block (a fixture's) waited on, holding the block's connection;
* a driver pool (``lc.stats().pools``) with more connections in use than before the test,
  when no unit of work holds them, makes the test error: something took a connection
  straight from the pool and kept it.

``@pytest.mark.tether_unchecked`` skips the checks for one test; ``tether_check = false``
in the ini file, for all; ``-p no:tether`` unloads the plugin.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ._lifecycle import LIFECYCLES, Lifecycle
from ._resource import Resource
from .testing import (
    _assert_not_cancelled,
    _assert_not_drained,
    _assert_pools_returned,
    _assert_released,
    pools_in_use,
    undo_overrides,
)

MARKER = "tether_unchecked"
GRACE = 1.0  # seconds after the test for units of work and pool connections to end


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "tether_check",
        type="bool",
        default=True,
        help="tether: after each test, undo overrides left in place, and fail on units of "
        "work still in flight and on pool connections not given back (default: true)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: tether does not check this test for overrides left in place, units of "
        "work still in flight, or pool connections kept",
    )


# The units each Lifecycle's shutdowns had cancelled, or waited on, when the test's teardown
# began: one in the test's body was the test's own doing (a test of the drain); one at a
# fixture's teardown was left in flight by the test. Kept by id: pytest keeps every item
# (and its stash) to the end of the session, and the objects would keep their Lifecycles.
_HELD_UP_BY_THE_BODY = pytest.StashKey[set[int]]()
_TEST_ENDED = pytest.StashKey[float]()  # time.perf_counter() when the test's body ended


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    item.stash[_TEST_ENDED] = time.perf_counter()
    item.stash[_HELD_UP_BY_THE_BODY] = {
        id(held) for lc in list(LIFECYCLES) for held in (*lc._cancelled, *lc._drained_units)
    }


@pytest.fixture(autouse=True)
def _tether_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set up before the test's own fixtures, so torn down after them: it sees what they
    left behind too."""
    if not request.config.getini("tether_check"):
        yield
        return
    if request.node.get_closest_marker(MARKER):
        # No reports for this test, but the overrides it leaves are undone all the same:
        # one left by it went on replacing the resource in every later test (trial 26).
        stacks = {lc: list(lc._override_stack) for lc in list(LIFECYCLES)}
        yield
        for lc in list(LIFECYCLES):
            undo_overrides(lc, keep=stacks.get(lc, ()))
        return
    before = {
        lc: (list(lc._override_stack), set(lc._units), pools_in_use(lc), set(lc._cancelled))
        for lc in list(LIFECYCLES)
    }
    # What the apps' shutdowns during the test found in use in the pools, before closing them
    # (an app run by a function-scoped fixture, or in the test: its pools are gone after).
    shutdowns = {lc: len(lc._in_use_at_shutdown) for lc in before}
    # FastAPI's `dependency_overrides` of tether resources on the apps already served (an
    # app made in the test dies with it): one the test adds and leaves shadows the real
    # resource, and `lc.override`, in every later test.
    fastapi_overrides = {
        app: set(_resource_overrides(app))
        for lc in list(LIFECYCLES)
        for app in list(lc._installed_apps.keys())
    }
    # ... and on the apps modules hold, not served yet, which later tests serve too: one the
    # test adds and then serves (`app.dependency_overrides[res] = ...`, then `with
    # TestClient(app)`) is already there when the app is first served.
    for app in _module_apps():
        fastapi_overrides.setdefault(app, set(_resource_overrides(app)))
    yield
    # ... and an app first served during the test that no module held when it started (its
    # module imported by the test), as it was then (not one the test made for itself).
    for lc in list(LIFECYCLES):
        for app, at_install in list(lc._installed_apps.items()):
            added = any(r not in at_install for r in _resource_overrides(app))
            if app not in fastapi_overrides and added and _module_level(app):
                fastapi_overrides[app] = set(at_install)
    ended = time.perf_counter()  # ages are told, and the grace counted, from here
    problems: list[str] = []
    for lc in list(LIFECYCLES):
        _let_started_work_begin(lc)
    for lc in list(LIFECYCLES):
        overrides, units, pools, cancelled = before.get(lc, ((), set(), {}, set()))
        undone = undo_overrides(lc, keep=overrides)
        if undone:
            listed = "".join(f"\n  - {line}" for line in undone)
            problems.append(
                f"tether: the test left {len(undone)} override{'s' if len(undone) > 1 else ''} "
                f"of {lc!r} in place, now undone so later tests see the real "
                f"resource:{listed}\nUse `with lc.override(...):`, or call `.undo()` on "
                f"what lc.override returns."
            )
        ids = request.node.stash.get(_HELD_UP_BY_THE_BODY, set())
        # A unit left open by a task that has ended is a mistake wherever the app shut down
        # (in the body too: it was reported as a connection taken straight from a pool, or
        # not at all, trial 30).
        body = {c for c in lc._cancelled if id(c) in ids and not c.abandoned}
        held_at_shutdown = False  # units past the drain held the pools' connections
        try:  # units a shutdown at a fixture's teardown (a function-scoped app) cancelled
            _assert_not_cancelled(lc, keep=cancelled | body, ignore=units)
        except AssertionError as exc:
            problems.append(str(exc))
            held_at_shutdown = True
        try:  # ... or waited on past the grace
            _assert_not_drained(
                lc,
                keep={d for d in lc._drained_units if id(d) in ids},
                ignore=units,
                since=request.node.stash.get(_TEST_ENDED, ended),
                wait=GRACE,
            )
        except AssertionError as exc:
            problems.append(str(exc))
        try:
            _assert_released(lc, wait=GRACE, ignore=units, since=ended)
        except AssertionError as exc:
            problems.append(str(exc))
            # The units hold connections of the pools: only more than they hold is told (a
            # connection the test took straight from a pool was hidden behind a unit another
            # test left: trial 9).
            past = _grown_past_units(lc, pools, ignore=units)
            if past:
                problems.append(past)
            continue
        try:
            _assert_pools_returned(lc, pools, wait=GRACE, since=ended)
        except AssertionError as exc:
            problems.append(str(exc))
        found = list(lc._in_use_at_shutdown)[shutdowns.get(lc, 0) :]
        closed = _grown_at_shutdown(found, pools, pools_in_use(lc))
        if closed and not held_at_shutdown:  # (else those units held them: reported above)
            listed = "".join(
                f"\n  - {name!r}: {now} in use, {was} before the test" for name, now, was in closed
            )
            problems.append(
                f"tether: a driver pool of {lc!r} had more connections in use when the app "
                f"shut down than before the test, and no unit of work held them:{listed}\n"
                f"Something took a connection straight from the pool (`pool.acquire()`, "
                f"`engine.connect()`, ...) and did not give it back: use `async with` on it, "
                f"or take it with `lc.scope()`."
            )
    for app, kept in fastapi_overrides.items():
        left = [res for res in _resource_overrides(app) if res not in kept]
        for res in left:
            del app.dependency_overrides[res]
        if left:
            listed = ", ".join(repr(res.name) for res in left)
            problems.append(
                f"tether: the test left app.dependency_overrides of {listed} in place on an "
                f"app that other tests use, now removed so later tests see the real resource "
                f"(and `lc.override`). Remove it when the test ends (`app.dependency_overrides"
                f".pop(...)` in a `finally`, or a fixture that clears it after `yield`), or "
                f"use `with lc.override(...):`."
            )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _let_started_work_begin(lc: Any) -> None:
    """Let the loop of *lc*'s app scope, running in another thread (TestClient's), take two
    turns before the checks: a job the test started there last
    (``client.portal.start_task_soon(job)``) has entered its ``lc.scope()`` by then, and is
    this test's; before, it could enter it only after the check, and be reported against
    the next test, whose own leak then went unreported. Waits at most a second (a loop busy
    in a blocking call)."""
    loop = lc._loop
    if (
        not isinstance(loop, asyncio.AbstractEventLoop)
        or lc._loop_thread in (None, threading.get_ident())
        or not loop.is_running()
    ):
        return
    turned = threading.Event()
    try:
        # The job's task is made by a callback already queued; its first step, queued by
        # that callback, runs before the second turn.
        loop.call_soon_threadsafe(loop.call_soon, turned.set)
    except RuntimeError:  # closed meanwhile
        return
    turned.wait(1.0)


def _resource_overrides(app: Any) -> list[Resource[Any]]:
    """The tether resources *app*'s FastAPI ``dependency_overrides`` replace."""
    overrides = getattr(app, "dependency_overrides", None) or {}
    return [key for key in list(overrides) if isinstance(key, Resource)]


def _grown_at_shutdown(
    found: list[dict[str, int | None]],
    before: dict[str, int | None],
    now: dict[str, int | None],
) -> list[tuple[str, int, int]]:
    """Pools closed since (not open now) that had more connections in use at a shutdown than
    before the test (none, for a pool the test opened)."""
    grown: dict[str, tuple[str, int, int]] = {}
    for figures in found:
        for name, in_use in figures.items():
            was = before.get(name, 0) or 0
            if name not in now and in_use is not None and in_use > was:
                grown.setdefault(name, (name, in_use, was))
    return list(grown.values())


def _module_level(app: Any) -> bool:
    """Whether a module holds *app* (``app = FastAPI(...)`` in the app's module): one other
    tests use, not one the test made for itself (which dies with it). Looked up only for an
    app first served during the test and left with an override."""
    for module in list(sys.modules.values()):
        try:
            if any(value is app for value in list(vars(module).values())):
                return True
        except TypeError:  # pragma: no cover - a module object without a __dict__
            continue
    return False


# Per module (by name): the module object and its number of globals when last looked at, and
# the names of those that held a FastAPI app then (`_module_apps`, at each test's start).
_APPS_IN: dict[str, tuple[int, int, tuple[str, ...]]] = {}


def _module_apps() -> list[Any]:
    """The FastAPI apps modules hold (``app = FastAPI(...)``): those tests share. A module
    is looked through again only when its number of globals changed."""
    fastapi = sys.modules.get("fastapi")
    cls = getattr(fastapi, "FastAPI", None)
    if not isinstance(cls, type):
        return []
    apps: dict[int, Any] = {}
    for name, module in list(sys.modules.items()):
        try:
            found = vars(module)
        except TypeError:  # pragma: no cover - a module object without a __dict__
            continue
        size = len(found)
        known = _APPS_IN.get(name)
        if known is not None and known[0] == id(module) and known[1] == size:
            names = known[2]
        else:
            names = tuple(k for k, v in list(found.items()) if issubclass(type(v), cls))
            _APPS_IN[name] = (id(module), size, names)
        for key in names:
            value = found.get(key)
            if issubclass(type(value), cls):
                apps[id(value)] = value
    return list(apps.values())


def _grown_past_units(lc: Lifecycle, before: dict[str, int | None], *, ignore: Any) -> str:
    """The pools of *lc* with more connections in use than before the test and than the
    units of work still in flight hold (one per value of theirs made from the pool), as a
    report; "" if none."""
    held: dict[str, int] = {}
    for unit in lc._in_flight():
        if unit in ignore:
            continue
        for entry in list(unit.entries):
            for dep in entry.res.deps:
                if dep.scope == "app" and dep.pool_stats is not None:
                    held[dep.name] = held.get(dep.name, 0) + 1
    lines = []
    for name, now in pools_in_use(lc).items():
        was = before.get(name)
        if now is None or was is None:
            continue
        by_units = held.get(name, 0)
        if now > was + by_units:
            lines.append(
                f"\n  - {name!r}: {now} in use, {was} before the test, {by_units} held by "
                f"the units of work above"
            )
    if not lines:
        return ""
    return (
        f"tether: a driver pool of {lc!r} has more connections in use than before the test "
        f"and than the units of work above hold:{''.join(lines)}\nSomething took a "
        f"connection straight from the pool (`pool.acquire()`, `engine.connect()`, ...) and "
        f"did not give it back: use `async with` on it, or take it with `lc.scope()`."
    )
