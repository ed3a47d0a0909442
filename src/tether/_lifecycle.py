"""Lifecycle: the registry of resources and the runtime that opens and closes them."""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
    suppress,
)
from typing import IO, TYPE_CHECKING, Any, Never, Protocol, TypeVar, overload

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from . import _graph
from ._errors import (
    DuplicateResourceError,
    ResourceUnavailable,
    ScopeError,
    ShutdownError,
    StartupError,
    UnknownResourceError,
    _a_type,
    check_bool,
    check_number,
    describe,
    for_good,
    is_seconds,
    marked_for_good,
    not_options,
    refused_for_good,
    unstopped,
)
from ._health import HealthReport, run_checks
from ._resource import Check, Kind, Release, Resource, Scope, current_unit
from ._scope import (
    _TETHER_DIRS,
    OPEN_STOP,
    Entry,
    OpenStop,
    Unit,
    bounded,
    capture_stack,
    close_entry,
    code_of,
    open_value,
    outside,
    task_stack,
    thread_frames,
    thread_stack,
    user_frames,
)
from ._stats import ByName, PoolStats, ResourceStats, Stats, snapshot

if TYPE_CHECKING:
    from contextlib import _AsyncGeneratorContextManager, _GeneratorContextManager

T = TypeVar("T")
#: A file a plain function returns: handed out as it is (a file is also an iterator).
_File = TypeVar("_File", bound=IO[Any])
log = logging.getLogger("tether")

_SCOPES = ("app", "request")
_RELEASES = ("handler", "response")


#: `lc.scope()`'s leak_threshold when none is given: the Lifecycle's.
_LIFECYCLES: Any = object()


class State(enum.Enum):
    """Where a lifecycle is in its life: ``lc.state``. Each value is the member's name in
    lower case, as ``lc.stats().state`` and the health report give it (which also say
    ``"stopping"`` while a SIGTERM's ``drain_delay`` runs: no member)."""

    CREATED = "created"  # resources may be registered; nothing is open
    STARTING = "starting"  # app resources are opening
    RUNNING = "running"  # app resources open; units of work admitted
    DRAINING = "draining"  # shutting down: new units refused, in-flight ones finishing
    CLOSED = "closed"  # app resources closed


#: What `lc.lifespan(wrap=...)` takes: a function of the app giving an async context manager
#: (an ``@asynccontextmanager`` function), or an async generator function (as Starlette).
Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]] | Callable[[Any], AsyncIterator[Any]]
#: ... made a function of the app giving an async context manager (`_user_lifespan`).
_AppLifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


class ResourceDecorator(Protocol):
    """What ``@lc.resource(...)`` with arguments returns: it types like ``@lc.resource``."""

    @overload
    def __call__(self, factory: Callable[..., _File], /) -> Resource[_File]: ...

    @overload
    def __call__(self, factory: type[AbstractAsyncContextManager[T]], /) -> Resource[T]: ...

    @overload
    def __call__(self, factory: type[AbstractContextManager[T]], /) -> Resource[T]: ...

    @overload
    def __call__(
        self, factory: Callable[..., _AsyncGeneratorContextManager[T]], /
    ) -> Resource[T]: ...

    @overload
    def __call__(self, factory: Callable[..., _GeneratorContextManager[T]], /) -> Resource[T]: ...

    @overload
    def __call__(self, factory: Callable[..., AsyncIterator[T]], /) -> Resource[T]: ...

    @overload
    def __call__(self, factory: Callable[..., Iterator[T]], /) -> Resource[T]: ...

    @overload
    def __call__(self, factory: Callable[..., Awaitable[T]], /) -> Resource[T]: ...

    @overload
    def __call__(self, factory: Callable[..., T], /) -> Resource[T]: ...


class Override:
    """An override of a resource, as ``lc.override()`` returns it; undo it with :meth:`undo`
    or by leaving its ``with``. *target* is the resource replaced."""

    def __init__(self, lc: Lifecycle, target: Resource[Any], replacement: Resource[Any]) -> None:
        self._lc = lc
        self.target = target
        self.replacement = replacement
        self._active = True
        # Where the override was made, for the pytest plugin's report of one left in place.
        self.made_at = capture_stack(1)
        # An integration's `rolled_back()` block's own: undone by the block, never by
        # `tether.testing.undo_overrides` (the test's writes then escaped the block: trial 26).
        self.block = False

    def undo(self) -> None:
        """Restore the resource exactly as it was before this override."""
        if self._active:
            self._active = False
            self._lc._undo_override(self)

    def __enter__(self) -> Override:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (not trio's)."""
    return asyncio._get_running_loop() is not None


def _one(exc: BaseException) -> BaseException:
    """The one failure inside *exc*, a task group's group of one (what failed, named)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def broken(lc: Lifecycle) -> list[str]:
    """The app resources of *lc* that failed while the app ran (`_AppSlot.broke`)."""
    return [r.name for r, slot in list(lc._slot_of.items()) if slot.broke is not None]


def _log_close_failure(name: str, error: BaseException) -> None:
    log.error(
        "tether: closing app resource %r failed: %s",
        name,
        describe(error),
        exc_info=error,
        extra={"tether_resource": name},
    )


#: Seconds between the background attempts of a ``required=False`` resource whose server
#: refused the credentials or the database.
_REFUSED_RETRY = 60.0
#: The least delay between the background attempts of a required=False app resource.
_BACKGROUND_FLOOR = 1.0


class _AppSlot:
    """One app resource held open by its own task (so it closes in the task that opened it)."""

    __slots__ = (
        "broke",
        "closed",
        "dependents",
        "done",
        "down",
        "entry",
        "error",
        "late",
        "opened",
        "opening",
        "release",
        "res",
        "settled",
        "stop",
        "up",
        "value",
        "waits_for",
    )

    def __init__(self, res: Resource[Any]) -> None:
        self.res = res
        self.opening = anyio.CancelScope()  # cancelled when another resource fails to open
        self.opened = anyio.Event()  # set once settled for startup: open, failed, stopped, down
        self.up = anyio.Event()  # set once open (late, for one that was down)
        self.settled = anyio.Event()  # set once it stopped trying: open, failed or stopped
        # Fired when the app scope stops waiting for an open still running in a thread.
        self.stop = OpenStop(res)
        self.release = anyio.Event()
        self.closed = anyio.Event()
        # The slots whose resources use this one, and set once this one no longer uses its
        # own: closed, or never opened. A slot closes after its dependents are done.
        self.dependents: list[_AppSlot] = []
        self.done = anyio.Event()
        self.value: Any = None
        self.entry: Entry | None = None
        self.error: BaseException | None = None
        # Down (the app runs without it, retrying): why, and which dependency it waits for.
        self.down: BaseException | None = None
        self.waits_for: str | None = None
        self.late = False  # opening after it was down: not ready yet
        # Failed while open: a cancel scope its generator entered around its yield was
        # cancelled (a task of its own failed); closed then, and down for good.
        self.broke: BaseException | None = None


_NOT_OPEN: Any = object()
_NO_APP: Any = object()  # `lc.lifespan()` called with no app


class CancelledUnit:
    """A unit of work still in flight when a shutdown's ``drain_timeout`` passed, and so
    cancelled: what it held then, and when."""

    __slots__ = ("abandoned", "at", "drain_timeout", "entries", "unit")

    def __init__(
        self,
        unit: Unit,
        entries: list[Entry],
        at: float,
        drain_timeout: float,
        abandoned: bool = False,
    ) -> None:
        self.unit = unit
        self.entries = entries
        self.at = at  # time.perf_counter() when it was cancelled
        self.drain_timeout = drain_timeout
        # Not cancelled: the task that entered it had ended without leaving it (`_abandoned`).
        self.abandoned = abandoned


class DrainedUnit:
    """A unit of work a shutdown's drain waited on, which then ended on its own: what it
    held when the drain began, and when it was seen to end (to within 0.05 s)."""

    __slots__ = ("ended", "entries", "unit")

    def __init__(self, unit: Unit, entries: list[Entry], ended: float) -> None:
        self.unit = unit
        self.entries = entries
        self.ended = ended  # time.perf_counter()


# Every Lifecycle alive, for the pytest plugin's checks after each test (tether.pytest_plugin).
LIFECYCLES: weakref.WeakSet[Lifecycle] = weakref.WeakSet()


def _check_name(name: object) -> None:
    """Refuse a resource's *name* that no parameter can ask for it by: a TypeError or a
    ValueError naming it, the cause and the fix."""
    if not isinstance(name, str):
        msg = (
            f"Resource name={name!r} is {_a_type(name)}, not a string. A parameter asks for "
            f"a resource by its name: pass one, e.g. name='db'."
        )
        raise TypeError(msg)
    if not name.isidentifier():
        fixed = re.sub(r"\W", "_", name)
        if not fixed.strip("_"):
            fixed = "db"
        elif fixed[0].isdigit():
            fixed = f"r_{fixed}"
        msg = (
            f"Resource name={name!r} is not a valid parameter name, and a parameter asks for "
            f"a resource by its name: use letters, digits and underscores, not starting with a "
            f"digit, e.g. name={fixed!r}."
        )
        raise ValueError(msg)


def _left_open(units: set[Unit], by: str = "a task that has ended") -> str:
    """The drain warning's tail for the units of work left open by a task that has ended
    (`Lifecycle._abandoned`), or *by* another that cannot end them (the one shutting the app
    down: `Lifecycle._own_units`), "" if none."""
    if not units:
        return ""
    return (
        f"; left open by {by}: "
        f"{', '.join(sorted(u.label for u in units)[:10])} (an `lc.scope()` entered by hand, "
        f"its `__aenter__` with no `__aexit__` yet): no task of it to cancel"
    )


_HOLDER = "an app resource's own code, which runs until the app resources close"


def _abandoned_error(unit: Unit) -> ScopeError:
    """What a unit of work still open at the end of a shutdown's drain is closed with (its
    values, and a later exit of it): an error, so that they roll back (its work was never
    finished)."""
    return ScopeError(
        f"Unit of work {unit.label!r} was still open when the shutdown's drain_timeout="
        f"{unit.lc.drain_timeout:g} s passed, and nothing had exited it (an `lc.scope()` "
        f"entered by hand, its `__aenter__` with no `__aexit__` in time, or a task that went "
        f"on after the drain cancelled it): closed by the shutdown, rolled back."
    )


#: For a resource name two integrations' functions both take by default: the usual pair, and
#: how to tell them apart (`DuplicateResourceError`).
_SAME_DEFAULT_NAME = {
    "engine": (
        "tsa.sync_engine(lc, url, name='sync_engine') beside tsa.engine(), both named "
        "'engine' by default"
    ),
    "session": (
        "tsa.sync_session(lc, sync_engine, name='sync_session') beside tsa.session(), both "
        "named 'session' by default"
    ),
    "pool": (
        "tpg.pool(lc, replica_dsn, name='replica') beside another pool(), every pool() "
        "named 'pool' by default"
    ),
    "conn": (
        "tpg.connection(lc, replica, name='replica_conn') beside another connection(), "
        "asyncpg's and psycopg's named 'conn' by default"
    ),
}


class Lifecycle:
    """The registry of resources of one application, and the runtime that opens them.

    Args:
        close_timeout: seconds a single cleanup may take before it is abandoned.
        drain_timeout: seconds shutdown waits for in-flight units of work.
        leak_threshold: a request resource held longer than this is reported once,
            with where it was acquired (``None`` turns leak detection off).
        sync_threads: threads for opening each sync resource that sets no ``concurrency``.
        check_timeout: default seconds a health check may take.
        track_stacks: capture the acquirer's stack for values opened with ``scope().get``.
        drain_delay: seconds, after the server is sent SIGTERM, that readiness fails while
            the app goes on serving, before the server's own shutdown starts: time for the
            load balancers to take the instance out of rotation. Served through
            ``lc.lifespan`` in the main thread only (uvicorn, hypercorn); 0 (the default)
            leaves SIGTERM to the server. A second SIGTERM stops the server at once.
        sweep_interval: seconds between the sweeps for leaks and overdue cleanups.
        expose_errors: ``True`` (the default): a 503's body and ``/health/ready``'s report
            carry tether's whole message (which resource, why, the server's address with
            its password hidden, the driver's error), for whoever can reach them.
            ``False``: they name the resource only, and the message goes to the log (the
            dashboard, which is guarded, keeps it): for a service whose clients are the
            public.

    Every number is checked here: a ``TypeError`` for one that is not a number (a string
    read from the environment, a bool), a ``ValueError`` for one out of range; and every
    on/off option: a ``TypeError`` for one that is not a bool (``"false"`` is true to ``if``).
    """

    def __init__(
        self,
        *,
        close_timeout: float = 10.0,
        drain_timeout: float = 30.0,
        leak_threshold: float | None = 60.0,
        sync_threads: int = 10,
        check_timeout: float = 5.0,
        track_stacks: bool = True,
        sweep_interval: float = 0.25,
        drain_delay: float = 0.0,
        expose_errors: bool = True,
        **unknown: Never,  # a misspelt option: refused naming the one meant (type checkers too)
    ) -> None:
        if unknown:
            raise not_options("Lifecycle()", unknown, Lifecycle.__init__)
        if drain_delay == math.inf:
            msg = (
                f"Lifecycle(drain_delay={drain_delay!r}): drain_delay is how long, in seconds, "
                f"readiness fails after SIGTERM before the server shuts down: an infinite one "
                f"would never let SIGTERM stop the server (only a second SIGTERM, or the "
                f"orchestrator's SIGKILL). Pass a finite number, e.g. drain_delay=5."
            )
            raise ValueError(msg)
        if not is_seconds(drain_delay, zero=True):
            msg = (
                f"Lifecycle(drain_delay={drain_delay!r}): drain_delay is how long, in seconds, "
                f"readiness fails after SIGTERM before the server shuts down, and must be a "
                f"number >= 0; e.g. drain_delay=5, or 0 to leave SIGTERM to the server."
            )
            given: object = drain_delay  # checked as what a caller may pass
            number = isinstance(given, int | float) and not isinstance(given, bool)
            raise ValueError(msg) if number else TypeError(msg)
        where = "Lifecycle()"
        check_number(close_timeout, "close_timeout", where, above=True, example="10")
        check_number(drain_timeout, "drain_timeout", where, example="30")
        _check_leak_threshold(leak_threshold, where)
        check_number(sync_threads, "sync_threads", where, integer=True, least=1, example="10")
        check_number(check_timeout, "check_timeout", where, above=True, example="5")
        check_number(sweep_interval, "sweep_interval", where, above=True, example="0.25")
        check_bool(track_stacks, "track_stacks", where)
        check_bool(expose_errors, "expose_errors", where)
        self.drain_delay = drain_delay
        self._stopping = False  # SIGTERM came, drain_delay runs: readiness fails
        self.close_timeout = close_timeout
        self.drain_timeout = drain_timeout
        # The lowest leak threshold of any unit of work (inf: none): a value that closes
        # held longer is checked against its unit's (`_leak_at_close`), one comparison.
        self._leak_floor = math.inf
        self._leak_threshold: float | None = None
        self._leak_unset = False  # deleted (`del lc.leak_threshold`) and not set again
        # The units of work given a leak_threshold of their own (`lc.scope(...)`).
        self._leak_thresholds = _Thresholds(self)
        self.leak_threshold = leak_threshold
        self.sync_threads = sync_threads
        self.check_timeout = check_timeout
        self.track_stacks = track_stacks
        self.sweep_interval = sweep_interval
        self.expose_errors = expose_errors
        self.state = State.CREATED
        self._resources: dict[str, Resource[Any]] = {}
        self._overrides: dict[Resource[Any], Resource[Any]] = {}
        self._override_stack: list[Override] = []
        self._validated = False
        self._app_values: dict[Resource[Any], Any] = {}
        # The overrides' values `_app_value` made while the app ran (a value, a plain function).
        self._made_for_overrides: set[Resource[Any]] = set()
        self._app_slots: list[_AppSlot] = []
        self._slot_of: dict[Resource[Any], _AppSlot] = {}
        self._units: set[Unit] = set()
        # The task of each unit of work of `scope()` (an HTTP unit keeps its own).
        # The tasks holding the app resources open (`_hold`): the drain never cancels one
        # for a unit of work its resource's code entered by hand (trial 34).
        self._holding: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._unit_tasks: weakref.WeakKeyDictionary[Unit, asyncio.Task[Any] | None] = (
            weakref.WeakKeyDictionary()
        )
        self._units_total = 0
        self._units_refused = 0
        # Units of work a shutdown cancelled past drain_timeout, the latest ones (for the
        # pytest plugin, which reports those its test started).
        self._cancelled: deque[CancelledUnit] = deque(maxlen=100)
        # The units of work a shutdown closed, still open past its drain (`_close_left_open`),
        # with what they were closed with: a later exit of one raises it.
        self._shut: weakref.WeakKeyDictionary[Unit, ScopeError] = weakref.WeakKeyDictionary()
        # ... and units a shutdown's drain waited on until they ended.
        self._drained_units: deque[DrainedUnit] = deque(maxlen=100)
        self._drained: anyio.Event | None = None
        self._open_limiter: Any = None
        self._close_limiter: Any = None
        self._thread_runner: Any = None
        self._loop: Any = None
        # The thread the app scope's event loop runs in (`threading.get_ident()`), while it runs.
        self._loop_thread: int | None = None
        self._pid = os.getpid()  # of the process whose app scope runs
        self._sweepers: list[Callable[[float], None]] = []
        self._failed_sweepers: set[Any] = set()  # hooks whose failure was logged
        # The signal that interrupted the start (`_interruptible_start`), and the event
        # that stops it.
        self._interrupted: str | None = None
        self._runs = 0  # app scopes started: its driver pools are new in each (the exporters)
        self._broken_any = False  # an app resource failed while the app ran (`_broke`)
        # How an integration's sync resources wait for a thread (`_scope.set_token_wait`).
        self._token_waits: dict[Resource[Any], Any] = {}
        self._start_stop: anyio.Event | None = None
        self._sweeping = False  # the sweeper runs: it enforces close deadlines
        self._slow_closes: set[Any] = set()  # cleanups that suspended, with a deadline
        # Leak reports after the first of a route and its values, counted for a window
        # (`LEAK_WINDOW`): (label, names) -> [window start, reports not logged, longest held].
        self._leak_windows: dict[tuple[str, str], list[float]] = {}
        # The apps whose routes it serves (`install`), for the pytest plugin's check of
        # their `dependency_overrides`: each with the tether resources those replaced when
        # it was first served.
        self._installed_apps: weakref.WeakKeyDictionary[Any, frozenset[Any]] = (
            weakref.WeakKeyDictionary()
        )
        # The connections in use in each driver pool when it closed, at each shutdown: after
        # the drain and after its dependents closed (the pytest plugin's check of an app run
        # per test: one still in use then was kept by something that never gave it back).
        self._in_use_at_shutdown: deque[dict[str, int | None]] = deque(maxlen=100)
        self._app_site = ""  # where the app scope that runs was entered, "FILE:LINE in NAME"
        # The task that entered the app scope (asyncio), and the one whose end without a
        # shutdown was logged (`_stopped_from_outside`).
        self._app_task: asyncio.Task[Any] | None = None
        self._forced_logged: asyncio.Task[Any] | None = None
        LIFECYCLES.add(self)

    def __repr__(self) -> str:
        return f"<tether.Lifecycle resources={len(self._resources)} state={self.state.value!r}>"

    # ------------------------------------------------------------------ registration

    # The overloads give `Resource[T]` the value's type, by the rules `kind_of` applies at
    # runtime: what a context-manager class, or an `@(async)contextmanager` function, enters
    # into; what a generator yields; what a coroutine returns; else what a function returns
    # (a plain `def` returning a lock, a semaphore or a file hands that out, not entered).
    # A plain `def` whose return type is an iterator (not a file) types as a generator
    # function, which it cannot be told from.
    @overload
    def resource(self, factory: Callable[..., _File], /) -> Resource[_File]: ...

    @overload
    def resource(self, factory: type[AbstractAsyncContextManager[T]], /) -> Resource[T]: ...

    @overload
    def resource(self, factory: type[AbstractContextManager[T]], /) -> Resource[T]: ...

    @overload
    def resource(
        self, factory: Callable[..., _AsyncGeneratorContextManager[T]], /
    ) -> Resource[T]: ...

    @overload
    def resource(self, factory: Callable[..., _GeneratorContextManager[T]], /) -> Resource[T]: ...

    @overload
    def resource(self, factory: Callable[..., AsyncIterator[T]], /) -> Resource[T]: ...

    @overload
    def resource(self, factory: Callable[..., Iterator[T]], /) -> Resource[T]: ...

    @overload
    def resource(self, factory: Callable[..., Awaitable[T]], /) -> Resource[T]: ...

    @overload
    def resource(self, factory: Callable[..., T], /) -> Resource[T]: ...

    @overload
    def resource(
        self,
        factory: None = None,
        /,
        *,
        scope: Scope = "request",
        name: str | None = None,
        check: Check | None = None,
        timeout: float | None = None,
        release: Release = "handler",
        retries: int = 0,
        backoff: float = 0.1,
        concurrency: int | None = None,
        thread: bool | None = None,
        check_timeout: float | None = None,
        retry_after: float = 1.0,
        guard: bool = False,
        error_status: Callable[[int], bool] | None = None,
        required: bool = True,
        **unknown: Never,
    ) -> ResourceDecorator: ...

    def resource(
        self,
        factory: Callable[..., Any] | None = None,
        /,
        *,
        scope: Scope = "request",
        name: str | None = None,
        check: Check | None = None,
        timeout: float | None = None,
        release: Release = "handler",
        retries: int = 0,
        backoff: float = 0.1,
        concurrency: int | None = None,
        thread: bool | None = None,
        check_timeout: float | None = None,
        retry_after: float = 1.0,
        guard: bool = False,
        error_status: Callable[[int], bool] | None = None,
        required: bool = True,
        **unknown: Never,  # a misspelt option: refused naming the one meant (type checkers too)
    ) -> Resource[Any] | ResourceDecorator:
        """Register a resource: ``@lc.resource`` or ``@lc.resource(scope="app", ...)``.

        Args:
            scope: ``"request"`` (default): opened on first use in a unit of work and
                closed at its end; ``"app"``: opened at startup, closed at shutdown.
            name: the name dependents use as a parameter (default: the function's name).
            check: a health probe, given the value (sync or async; raising = failing).
            timeout: seconds to open; past it :class:`ResourceUnavailable`.
            release: for request resources, ``"handler"`` (default) closes them after the
                endpoint, before the response starts; ``"response"`` after its last byte.
            retries, backoff: app resources retry opening *retries* times, waiting
                *backoff* seconds, doubled after each failure (capped at 10 s).
            concurrency: most threads opening this sync resource at once (size of its pool).
            thread: run a sync factory in a thread (default: generators and context
                managers yes, plain functions no).
            guard: hand out a proxy that raises :class:`ResourceClosedError` when the
                value is used after its scope closed.
            error_status: for request resources, which response statuses take the failure
                path (the cleanup sees :class:`FailedResponse`, or the ``HTTPException``
                raised): given the status, true for a failure. Default: every status of
                400 or more; ``lambda status: status >= 500`` commits on a 4xx.
            required: for app resources. ``False``: if it cannot open at startup (after its
                *retries*), the app starts without it, and it is retried in the background
                (every *backoff* seconds but at least 1 s, doubled after each failure, capped
                at 10 s) until it opens. Meanwhile it is *down*: what needs it (a request
                resource, a dependent app resource, ``lc.get``) gets
                :class:`ResourceUnavailable` (503 with ``Retry-After``), and the health report
                lists it as failing. App resources that depend on it wait for it the same way.
        """

        if unknown:
            raise not_options("lc.resource()", unknown, Lifecycle.resource)

        def register(fn: Callable[..., Any]) -> Resource[Any]:
            return self._register(
                fn,
                scope=scope,
                name=name,
                check=check,
                timeout=timeout,
                release=release,
                retries=retries,
                backoff=backoff,
                concurrency=concurrency,
                thread=thread,
                check_timeout=check_timeout,
                retry_after=retry_after,
                guard=guard,
                error_status=error_status,
                required=required,
            )

        if factory is not None:
            return register(factory)
        return register

    def _register(self, fn: Any, **options: Any) -> Resource[Any]:
        if not callable(fn):
            msg = (
                f"@lc.resource was given {fn!r}, which is not callable. Decorate a function "
                f"(or pass a class or context-manager factory) that makes the value."
            )
            raise TypeError(msg)
        res = self._make(fn, **options)
        if res.name in self._resources:
            example = _SAME_DEFAULT_NAME.get(res.name, _SAME_DEFAULT_NAME["engine"])
            msg = (
                f"A resource named {res.name!r} is already registered on this Lifecycle. "
                f"Give one of them another name: @lc.resource(name=...), or name= of the "
                f"integration that declared it (e.g. {example})."
            )
            raise DuplicateResourceError(msg)
        if self.state is not State.CREATED and res.scope == "app":
            msg = (
                f"Cannot register app resource {res.name!r}: the app scope is already "
                f"{self.state.value}. Register app resources before the application starts."
            )
            raise ScopeError(msg)
        self._resources[res.name] = res
        self._validated = False
        return res

    def _make(
        self,
        fn: Callable[..., Any],
        *,
        scope: Scope,
        name: str | None,
        check: Check | None,
        timeout: float | None,
        release: Release,
        retries: int,
        backoff: float,
        concurrency: int | None,
        thread: bool | None,
        check_timeout: float | None,
        retry_after: float,
        guard: bool,
        error_status: Callable[[int], bool] | None = None,
        required: bool = True,
    ) -> Resource[Any]:
        if isinstance(fn, Resource):
            owner = "this Lifecycle" if fn.lifecycle is self else "another Lifecycle"
            msg = (
                f"lc.resource() was given {fn!r}, which is a resource already (of {owner}). "
                f"Register its factory function instead, or, to use it, name it as a "
                f"parameter of another resource or pass it to Depends()."
            )
            raise TypeError(msg)
        if name is not None:
            _check_name(name)
        rname = name or getattr(fn, "__name__", None)
        if not rname or not str(rname).isidentifier():
            msg = (
                f"Cannot tell the name of resource {fn!r}. Give it one that is a valid "
                f"parameter name: @lc.resource(name=...)."
            )
            raise ValueError(msg)
        if scope not in _SCOPES:
            msg = f"Resource {rname!r}: scope={scope!r} is not one of 'app', 'request'."
            raise ValueError(msg)
        if release not in _RELEASES:
            msg = f"Resource {rname!r}: release={release!r} is not one of 'handler', 'response'."
            raise ValueError(msg)
        where = f"Resource {rname!r}"
        if timeout is not None:
            check_number(timeout, "timeout", where, above=True)
        check_number(retries, "retries", where, integer=True, example="3")
        check_number(backoff, "backoff", where, example="0.5")
        if concurrency is not None:
            check_number(concurrency, "concurrency", where, integer=True, least=1, example="4")
        if check_timeout is not None:
            check_number(check_timeout, "check_timeout", where, above=True, example="2")
        given_after: object = retry_after  # checked as what a caller may pass
        if isinstance(given_after, float) and not math.isfinite(given_after):
            msg = (
                f"{where}: retry_after={retry_after!r} is not a finite number: retry_after is "
                f"the seconds sent in the Retry-After header of its 503 answers, as a whole "
                f"number, which {retry_after!r} cannot be made (every such answer would fail "
                f"as a 500). Pass a finite number of seconds, e.g. retry_after=1."
            )
            raise ValueError(msg)
        check_number(retry_after, "retry_after", where, example="1")
        check_bool(thread, "thread", where, none=True)
        check_bool(guard, "guard", where)
        check_bool(required, "required", where)
        probe: object = check  # checked as what a caller may pass
        if probe is not None and not callable(probe):
            msg = (
                f"Resource {rname!r}: check={check!r} is not callable. Pass a function of "
                f"the value that raises when it is unhealthy (sync or async), e.g. "
                f'check=lambda pool: pool.fetchval("SELECT 1").'
            )
            raise TypeError(msg)
        if release == "response" and scope == "app":
            msg = (
                f"Resource {rname!r}: release='response' is for request resources (it closes "
                f"them after the response's last byte); an app resource closes at shutdown. "
                f"Drop release= or use scope='request'."
            )
            raise ValueError(msg)
        if error_status is not None:
            given: object = error_status  # checked as what a caller may pass
            if not callable(given):
                msg = (
                    f"Resource {rname!r}: error_status={error_status!r} is not callable. "
                    f"Pass a function of the response status that is true for a failure, "
                    f"e.g. error_status=lambda status: status >= 500."
                )
                raise TypeError(msg)
            if scope == "app":
                msg = (
                    f"Resource {rname!r}: error_status= is for request resources; an app "
                    f"resource never sees a response."
                )
                raise ValueError(msg)
        res: Resource[Any] = Resource(
            self,
            fn,
            name=str(rname),
            scope=scope,
            check=check,
            timeout=timeout,
            release=release,
            retries=retries,
            backoff=backoff,
            concurrency=concurrency,
            thread=thread,
            check_timeout=check_timeout or self.check_timeout,
            retry_after=retry_after,
            guard=guard,
        )
        if not required and scope != "app":
            msg = (
                f"Resource {rname!r}: required=False is for app resources (the app starts "
                f"without one that cannot open); a request resource opens when asked for."
            )
            raise ValueError(msg)
        if scope != "app" and (retries or backoff != 0.1):
            msg = (
                f"Resource {rname!r}: retries= and backoff= are for app resources (retried "
                f"while they come up at startup); a request resource's open is not retried: a "
                f"request that cannot open it is answered 503 with Retry-After, for the "
                f"client to retry. Drop them, or use scope='app'."
            )
            raise ValueError(msg)
        res.error_status = error_status
        res.required = required
        return res

    @property
    def resources(self) -> Mapping[str, Resource[Any]]:
        """The registered resources by name, in registration order."""
        return dict(self._resources)

    def validate(self) -> None:
        """Check the graph now: names, scopes and cycles (startup does it too)."""
        if not self._validated:
            _graph.resolve(self._resources, list(self._overrides.values()))
            self._validated = True

    # ------------------------------------------------------------------ overrides

    def override(self, resource: Resource[T], value_or_factory: Any) -> Override:
        """Replace *resource* (and so what everything depending on it gets), for tests.

        A function (plain, async, generator, or context-manager factory) or a class is
        used as a factory, resolved by parameter name like any resource; anything else
        is used as the value. Works as a context manager, or as a plain call whose
        result has ``undo()``. Override app resources before the app starts, so app
        resources that depend on them are built from the override; request resources
        see an override at once.
        """
        self._check_owned(resource)
        called = _called_factory(value_or_factory)
        if called is not None:
            what, fn = called
            msg = (
                f"lc.override() of resource {resource.name!r} was given {what} of {fn}(): "
                f"the factory was called, and its value would be that object. Pass the "
                f"factory itself: lc.override({resource.name}, {fn}), not "
                f"lc.override({resource.name}, {fn}())."
            )
            raise TypeError(msg)
        alias = isinstance(value_or_factory, Resource)
        if alias and value_or_factory is resource:
            msg = f"lc.override({resource.name}, {resource.name}): a resource overridden by itself."
            raise TypeError(msg)
        if alias and self._open_app_value(value_or_factory) is not _NOT_OPEN:
            # An app resource open now (the app runs): its value, as a value would be.
            value = self._open_app_value(value_or_factory)

            def factory() -> Any:
                return value

        elif alias:
            factory = self._alias(resource, value_or_factory)
        elif _is_factory(value_or_factory):
            factory = value_or_factory
        else:
            value = value_or_factory

            def factory() -> Any:
                return value

        replacement = self._make(
            factory,
            scope=resource.scope,
            name=resource.name,
            check=None if value_or_factory is None else resource.check,
            timeout=None,
            release=resource.release,
            retries=0,
            backoff=0.1,
            concurrency=resource.concurrency,
            thread=None,
            check_timeout=resource.check_timeout,
            retry_after=resource.retry_after,
            guard=resource.guard,
            error_status=resource.error_status,
        )
        replacement.counters = resource.counters
        for param in replacement.params:
            if param not in self._resources:
                msg = _graph.unknown_override_message(resource, factory, param, self._resources)
                raise UnknownResourceError(msg, name=param)
        # Checked with the overrides in place: two that form a cycle together (each alone
        # fine) made a request wait for ever on a value its own task was opening (trial 24).
        others = [r for target, r in self._overrides.items() if target is not resource]
        _graph.resolve(self._resources, [*others, replacement])
        running = self.state in (State.RUNNING, State.DRAINING)
        if (
            resource.scope == "app"
            and running
            and (replacement.deps or replacement.kind is not Kind.SYNC_FUNC)
        ):
            # It would need opening, which only the app's start does: accepted, every use
            # failed after (trial 26). Said now, where the override is made.
            what = getattr(value_or_factory, "__qualname__", None) or repr(value_or_factory)
            msg = (
                f"lc.override() of app resource {resource.name!r} while the app runs: "
                f"{what} needs opening (an async function, a generator, a context manager, "
                f"or a factory of other resources), which only the app's start does. "
                f"Override it before the app starts (before `with TestClient(app)`, or the "
                f"fixture that runs the app), or give a value, or a plain function of no "
                f"resources."
            )
            raise ScopeError(msg)
        if resource.scope == "app" and running:
            self._warn_built_from(resource)
        ov = Override(self, resource, replacement)
        self._override_stack.append(ov)
        self._overrides[resource] = replacement
        self._validated = False
        return ov

    def _alias(self, resource: Resource[Any], other: Resource[Any]) -> Callable[..., Any]:
        """The factory of an override of *resource* by another resource, *other*: its value
        (``lc.override(replica_session, session)``: the replica's routes get the primary's
        session). The resource itself was the value before, and the route failed at its
        first use (``'Resource' object has no attribute 'scalar'``: trial 21)."""
        if other.lifecycle is not self:
            msg = (
                f"lc.override({resource.name}, {other.name}): {other.name!r} is a resource of "
                f"another Lifecycle. Override with a resource of this one, or with a factory."
            )
            raise TypeError(msg)
        if resource.scope == "app" and other.scope == "request":
            msg = (
                f"lc.override({resource.name}, {other.name}): {resource.name!r} is an app "
                f"resource, which lives for the whole application, and {other.name!r} a "
                f"request resource, whose value lives for one unit of work: an app resource "
                f"cannot take it. Override with another app resource, a value, or a factory."
            )
            raise ScopeError(msg)

        def alias(value: Any) -> Any:
            return value

        try:
            param = inspect.Parameter(other.name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        except ValueError:  # a name no parameter can have
            msg = (
                f"lc.override({resource.name!r}, ...): the resource {other.name!r} cannot be "
                f"named by a parameter. Override with a factory that takes it: declare it "
                f"under a name that is an identifier."
            )
            raise TypeError(msg) from None
        alias.__signature__ = inspect.Signature([param])  # type: ignore[attr-defined]
        alias.__qualname__ = alias.__name__ = f"the value of {other.name!r}"
        return alias

    def _open_app_value(self, res: Resource[Any]) -> Any:
        """The value of app resource *res* if it is open now (through its override, if
        any), else `_NOT_OPEN`."""
        if res.scope != "app" or res.lifecycle is not self:
            return _NOT_OPEN
        return self._app_values.get(self._overrides.get(res, res), _NOT_OPEN)

    def _warn_built_from(self, resource: Resource[Any]) -> None:
        """An app resource overridden while the app runs: the app resources built from it
        at startup keep the value they were built with. Say which, and the fix."""
        built: list[str] = []
        todo = [resource]
        while todo:
            current = todo.pop()
            for other in self._resources.values():
                if other.scope == "app" and current in other.deps and other.name not in built:
                    built.append(other.name)
                    todo.append(other)
        if built:
            log.warning(
                "tether: app resource %r overridden while the app runs: %s, opened at startup "
                "from its value, keep%s that value (the override reaches request resources "
                "and what asks for %r itself). Override app resources before the app starts.",
                resource.name,
                ", ".join(repr(name) for name in sorted(built)),
                "s" if len(built) == 1 else "",
                resource.name,
            )

    def _undo_override(self, ov: Override) -> None:
        # A value made for it while the app ran: kept until the app stopped before, a
        # stand-in per test of a session-wide app (trial 24: 1000 overrides, 100 MB).
        if ov.replacement in self._made_for_overrides:
            self._made_for_overrides.discard(ov.replacement)
            self._app_values.pop(ov.replacement, None)
        self._override_stack.remove(ov)
        self._overrides.pop(ov.target, None)
        for other in self._override_stack:  # an older override of the same resource
            if other.target is ov.target:
                self._overrides[other.target] = other.replacement
        self._validated = False

    def _check_owned(self, resource: Any) -> None:
        if not isinstance(resource, Resource) or resource.lifecycle is not self:
            msg = (
                f"{resource!r} is not a resource of this Lifecycle. Pass the object "
                f"returned by @lc.resource on this Lifecycle."
            )
            raise TypeError(msg)

    # ------------------------------------------------------------------ app scope

    def _app_value(self, res: Resource[T]) -> T:
        if self._broken_any:  # an app resource failed while the app ran: it, or one on it?
            down = self._down(res)
            if down is not None:
                raise down
        original = res
        override = self._overrides.get(res) if self._overrides else None
        if override is not None:
            res = override
            if res in self._app_values:
                return self._app_values[res]  # type: ignore[no-any-return]
            # A value, or a plain function: made here. (An async function's value is a
            # coroutine until it is opened, as the rest are.)
            if self.state is State.RUNNING and not res.deps and res.kind is Kind.SYNC_FUNC:
                value = res.call()
                self._app_values[res] = value
                self._made_for_overrides.add(res)  # forgotten as the override is undone
                return value  # type: ignore[no-any-return]
        try:
            return self._app_values[res]  # type: ignore[no-any-return]
        except KeyError:
            pass
        down = self._down(original)
        if down is not None:
            raise down
        if self.state is State.RUNNING and override is not None:
            msg = (
                f"App resource {res.name!r} is overridden while the app runs with a factory "
                f"that needs opening. Override app resources before the app starts."
            )
        elif self.state is State.RUNNING:
            msg = (
                f"App resource {res.name!r} was not opened when the app scope started (an "
                f"override stood in for it then, undone since): it opens when the app scope "
                f"next starts. Undo an override of an app resource after the app stops."
            )
        elif self.state is State.CLOSED:
            # In a server, no request comes after the lifespan ended: a test client used
            # after an earlier test's lifespan, or a job after shutdown.
            msg = (
                f"App resource {res.name!r} is not open: the app scope is closed, its "
                f"lifespan ended (an earlier test ran the app, or it shut down). In tests, "
                f"run the lifespan around each test: enter the client (`with "
                f"TestClient(app) as client:`), or, with httpx's `ASGITransport`, which never "
                f"runs a lifespan, wrap the client in `async with lc.lifespan(app):`; "
                f"elsewhere, `async with lc.run():`."
            )
        elif self.state is State.STARTING:
            # Code an app resource runs as it opens (a consumer's loop, started before its
            # `yield`) asked for one opening beside it: it said to start the app scope, which
            # was starting (trial 31, the docs' own consumer).
            stop = OPEN_STOP.get()
            asker = stop.res if stop is not None else None
            if asker is not None and (asker is res or asker in self._graph_closure(res)):
                # ... or for itself, or for one that depends on it: no dependency mends it.
                msg = (
                    f"App resource {res.name!r} is not open yet: "
                    + (
                        "it is the resource whose code asks for it, which has not yielded "
                        "its value yet."
                        if asker is res
                        else f"it depends on {asker.name!r}, whose code asks for it as "
                        f"{asker.name!r} opens, so it opens after."
                    )
                    + " Use it only once the app has started (after the lifespan's startup), "
                    "or pass the value it needs to the code that asks for it."
                )
                # No retry mends it: the same order comes again (trial 34).
                raise for_good(ScopeError(msg))
            msg = (
                f"App resource {res.name!r} is not open yet: the app scope is starting, "
                f"and app resources that do not depend on each other open at the same "
                f"time. An app resource whose code uses {res.name!r} as it opens (a task "
                f"it starts before its `yield`: a consumer's loop), directly or through a "
                f"request resource made from it, must depend on it: take it as a "
                f"parameter of its factory (`{res.name}: ...`), so that it opens first, "
                f"and closes after."
            )
        else:
            how = (
                "has not started"  # (it read "is created": trial 35)
                if self.state is State.CREATED
                else f"is {self.state.value}"
            )
            msg = (
                f"App resource {res.name!r} is not open: the app scope {how}. Start it with "
                f"`FastAPI(lifespan=lc.lifespan)` (and `with TestClient(app):` in tests) or "
                f"`async with lc.run():`."
            )
        raise ScopeError(msg)

    def _graph_closure(self, res: Resource[Any]) -> set[Resource[Any]]:
        """Every resource *res* depends on, directly or not (overrides followed)."""
        found: set[Resource[Any]] = set()
        stack = list(self._overrides.get(res, res).deps)
        while stack:
            dep = stack.pop()
            if dep not in found:
                found.add(dep)
                stack.extend(self._overrides.get(dep, dep).deps)
        return found

    def get(self, resource: Resource[T]) -> T:
        """The value of an open app resource (for code outside a unit of work)."""
        self._check_owned(resource)
        if resource.scope != "app":
            msg = (
                f"Request resource {resource.name!r} needs a unit of work: use "
                f"`async with lc.scope() as s: await s.get({resource.name})`."
            )
            raise ScopeError(msg)
        return self._app_value(resource)

    def run(self) -> AbstractAsyncContextManager[Lifecycle]:
        """Open the app scope outside a server (scripts, workers, tests):
        ``async with lc.run():``."""
        return AsyncOnly(self._run(), "lc.run()", _RUN_FROM_SYNC)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Lifecycle]:
        if self.state in (State.STARTING, State.RUNNING, State.DRAINING):
            site = self._app_site
            held = (
                f" (entered at {site}: a session- or module-scoped fixture still holds it?)"
                if site
                else ""
            )
            msg = (
                f"The app scope of this Lifecycle is already {self.state.value}{held}. "
                f"One Lifecycle runs one app scope at a time: use the one that runs (in a "
                f"test, take the fixture that holds it), or a new Lifecycle. To serve a "
                f"second app (an admin app) from this Lifecycle's resources, give it no "
                f"lifespan of its own and call `tether.fastapi.install(admin, lc)` after "
                f"adding its routes."
            )
            raise ScopeError(msg)
        self._app_site = _entry_site()
        self._runs += 1
        self._broken_any = False
        self.validate()
        self.state = State.STARTING
        self._app_values = {}
        self._made_for_overrides = set()
        self._app_slots = []
        self._make_limiters()
        self._loop = _current_loop()
        self._loop_thread = threading.get_ident()
        self._pid = os.getpid()
        started = time.perf_counter()
        # A failure (StartupError, ShutdownError, or the body's own exception) is carried
        # out of the task group and raised after it, so it is not wrapped in a group.
        error: BaseException | None = None
        entered_in = asyncio.current_task() if _on_asyncio() else None
        self._app_task = entered_in
        try:
            async with _left_in(entered_in), anyio.create_task_group() as tg:
                try:
                    await self._open_app(tg)
                    down = [r.name for r, slot in self._slot_of.items() if slot.entry is None]
                    log.info(
                        "tether: %d app resources open in %.3f s%s",
                        len(self._app_slots),
                        time.perf_counter() - started,
                        f"; down, retried in the background: {', '.join(down)}" if down else "",
                    )
                    self.state = State.RUNNING
                    tg.start_soon(self._sweep_forever)
                    try:
                        yield self
                    finally:
                        with anyio.CancelScope(shield=True):
                            await self._shutdown()
                # And `sys.exit(3)` or ^C in the body: a group around them lost the exit
                # status (1, not 3) and `except KeyboardInterrupt` (trial 24).
                except (Exception, KeyboardInterrupt, SystemExit) as exc:
                    error = exc
                finally:
                    tg.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            # A startup cancelled from outside (the server gave up, ^C) closed the values
            # in their own tasks, without a shutdown: say what failed, forget the values.
            for slot in self._app_slots:
                if slot.error is not None:
                    _log_close_failure(slot.res.name, slot.error)
            self._app_slots = []
            self._slot_of = {}
            self._app_values = {}
            self._made_for_overrides = set()
            self.state = State.CLOSED
            self._loop = None
            self._loop_thread = None
            self._app_task = None
            self._forced_logged = None

    def _make_limiters(self) -> None:
        # tether's own thread limiters (never anyio's default one, which endpoints use),
        # made in the running event loop: by `run()`, or by the first `scope()` without it.
        self._open_limiter = anyio.CapacityLimiter(self.sync_threads)
        # As many cleanups in threads at once as a resource may have values open (its
        # `concurrency`): a burst of slow commits does not queue behind each other.
        most = max((r.concurrency or 0 for r in self._resources.values()), default=0)
        self._close_limiter = anyio.CapacityLimiter(max(self.sync_threads, 4, most))
        # Runs an open whose caller already holds a token of one of the limiters above.
        self._thread_runner = anyio.CapacityLimiter(math.inf)
        # A limiter per resource, `sync_threads` tokens without `concurrency=`: opens of one
        # resource waiting for its pool never hold the tokens another resource needs (the
        # holders of that pool's connections, opening their next sync resource).
        for res in self._resources.values():
            res.limiter = anyio.CapacityLimiter(res.concurrency or self.sync_threads)

    async def _open_app(self, tg: TaskGroup) -> None:
        order = _graph.app_order(self._resources, self._overrides)
        slots = {res: _AppSlot(res) for res in order}
        for res in order:
            for dep in self._overrides.get(res, res).deps:
                slots[dep].dependents.append(slots[res])
        self._slot_of = slots
        failed = anyio.Event()  # set when one fails to open, or a signal stops the start
        self._start_stop = failed
        started = time.monotonic()
        if self._interrupted is not None:
            failed.set()
        for res in order:
            tg.start_soon(self._hold, res, slots, failed, name=f"tether:{res.name}")
        for res in order:
            slot = slots[res]
            with anyio.CancelScope() as wait:
                async with anyio.create_task_group() as race:

                    async def on_fail(scope: anyio.CancelScope = wait) -> None:
                        await failed.wait()
                        scope.cancel()

                    race.start_soon(on_fail)
                    race.start_soon(_say_still_opening, slot.res, started)
                    await slot.opened.wait()
                    race.cancel_scope.cancel()
            if slot.error is not None or wait.cancelled_caught:
                break
        self._start_stop = None
        failure = next((s for s in slots.values() if s.error is not None), None)
        interrupted = self._interrupted
        if failure is None and interrupted is None:
            return
        opening = [s.res.name for s in slots.values() if s.entry is None and s.error is None]
        # Stop what is still opening and wait until every slot has settled (an open
        # running in a thread: up to close_timeout); then close what opened, in reverse order.
        await self._stop_opening()
        errors = await self._close_app_slots()
        tg.cancel_scope.cancel()
        for name, err in errors:
            log.error("tether: while rolling back startup, %r: %s", name, describe(err))
        self.state = State.CLOSED
        if failure is None:
            assert interrupted is not None
            still = ", ".join(repr(name) for name in opening)
            msg = (
                f"The start was interrupted by {interrupted}"
                + (
                    f" while app resource{'s' if len(opening) > 1 else ''} {still} "
                    f"{'were' if len(opening) > 1 else 'was'} still opening"
                    if opening
                    else ""
                )
                + ": the opens were stopped (no more retries) and the app resources already "
                "open were closed, in reverse order; nothing was served. If the start was slow "
                "because a backend is not up yet, give the app longer to start (the "
                "orchestrator's startup grace), or those resources fewer retries= or a "
                "shorter timeout=."
            )
            stopped = StartupError(msg, resource=opening[0] if opening else "lifecycle")
            stopped.interrupted_by = interrupted
            raise stopped
        assert failure.error is not None
        cause = unstopped(describe(failure.error))
        refused = refused_for_good(failure.error)
        if refused is not None and f"(SQLSTATE {refused})" in cause:
            msg = (  # the cause says what was refused, and what to fix
                f"App resource {failure.res.name!r} failed to open: {cause}. "
                f"The resources already open were closed. No retry mends a refusal, so none "
                f"was made."
            )
        elif refused is not None:
            msg = (
                f"App resource {failure.res.name!r} failed to open: {cause}. "
                f"The resources already open were closed. The server refused the "
                f"credentials or the database (SQLSTATE {refused}), which no retry mends, "
                f"so none was made: fix the user, password or database name it connects with."
            )
        elif _misconfigured(failure.error):
            tried = (
                f" It was not retried (retries={failure.res.retries})."
                if failure.res.retries and not marked_for_good(_one(failure.error))
                else ""
            )
            msg = (
                f"App resource {failure.res.name!r} failed to open: {cause}. "
                f"The resources already open were closed.{tried} Fix the cause above: a "
                f"mistake in the configuration or the code, which no retry mends."
            )
        elif failure.res.retries:
            tries = failure.res.retries + 1
            msg = (
                f"App resource {failure.res.name!r} failed to open: {cause}. "
                f"The resources already open were closed. It was tried {tries} times "
                f"(retries={failure.res.retries}, backoff={failure.res.backoff:g} s): fix the "
                f"cause above, or give {failure.res.name!r} more retries= or a longer "
                f"{_open_timeout(failure.res)} if it is slow to come up."
            )
        else:
            msg = (
                f"App resource {failure.res.name!r} failed to open: {cause}. "
                f"The resources already open were closed. Fix the cause above, or give "
                f"{failure.res.name!r} retries= or a longer {_open_timeout(failure.res)} if it "
                f"is slow to come up."
            )
        raise StartupError(msg, resource=failure.res.name) from failure.error

    async def _stop_opening(self) -> None:
        """Stop every app resource still opening (or down, retrying), and wait until each
        has settled: an open running in a thread may finish first, for up to
        ``close_timeout``; then the wait for it is abandoned, and its thread (a daemon)
        closes what it opens."""
        slots = list(self._slot_of.values())
        for slot in slots:
            if slot.entry is None:
                slot.opening.cancel()
        with anyio.move_on_after(self.close_timeout):
            for slot in slots:
                await slot.settled.wait()
        stuck = [slot for slot in slots if not slot.settled.is_set()]
        for slot in stuck:
            log.warning(
                "tether: app resource %r was still opening in its thread close_timeout=%g s "
                "after the app stopped it; the app goes on without waiting for it, and its "
                "thread closes what it opens",
                slot.res.name,
                self.close_timeout,
                extra={"tether_resource": slot.res.name},
            )
            slot.stop.fire()
        with anyio.move_on_after(self.close_timeout):
            for slot in stuck:
                await slot.settled.wait()

    async def _hold(
        self,
        res: Resource[Any],
        slots: dict[Resource[Any], _AppSlot],
        failed: anyio.Event,
    ) -> None:
        """Open one app resource, keep it until released, close it in this same task."""
        if _on_asyncio():
            task = asyncio.current_task()
            if task is not None:
                self._holding.add(task)
        slot = slots[res]
        target = self._overrides.get(res, res)
        opened: tuple[Any, Any] | None = None
        # The scope spans the whole hold, not the open only: a generator may enter a cancel
        # scope around its yield (a task group of its own), which must exit before this
        # one, when it closes; and the close is shielded by it, not by a scope of its own.
        with slot.opening:
            token = OPEN_STOP.set(slot.stop)  # the app scope may stop waiting for a thread
            try:
                try:
                    opened = await self._open_slot(slot, target, slots)
                except Exception as exc:
                    # A task group's group of one (a task the factory started before its
                    # `yield` failed): what failed, named ("ExceptionGroup: unhandled errors in
                    # a TaskGroup (1 sub-exception)" said nothing: trial 33).
                    one = _one(exc)
                    slot.error = one if isinstance(one, Exception) else exc
                    res.counters.open_errors += 1
                    failed.set()
            finally:
                OPEN_STOP.reset(token)
                slot.stop.over = True
                slot.settled.set()
                if opened is None:
                    slot.done.set()  # its open is over, cleanup included: it uses nothing now
            if opened is not None:
                await self._keep(slot, res, target, opened)
        if opened is None:
            slot.opened.set()

    async def _keep(
        self, slot: _AppSlot, res: Resource[Any], target: Resource[Any], opened: tuple[Any, Any]
    ) -> None:
        """Hold *slot*'s value until it is released, then close it (in `_hold`'s scope)."""
        value, handle = opened
        entry = Entry(target, handle, value, None, time.perf_counter())
        slot.value = value
        slot.entry = entry
        self._app_values[target] = value
        self._app_slots.append(slot)  # open order
        c = res.counters
        c.opened += 1
        c.in_use += 1
        c.max_in_use = max(c.max_in_use, c.in_use)
        if slot.down is not None or slot.waits_for is not None:
            log.info("tether: app resource %r is open now; it was down", res.name)
        slot.down = None
        slot.waits_for = None
        slot.late = False
        slot.opened.set()
        slot.up.set()
        try:
            await slot.release.wait()
        except anyio.get_cancelled_exc_class():
            if not slot.release.is_set() and not slot.opening.cancel_called:
                # No cancel scope cancelled anywhere: asyncio's own cancel, which only the
                # generator can have asked for (its `asyncio.TaskGroup`, a task of which
                # failed, or an `asyncio.timeout` around its yield).
                native = anyio.current_effective_deadline() != -math.inf
                if native and self._stopped_from_outside():
                    # Every task cancelled at once (the event loop's end: a forced exit,
                    # uvicorn's second Ctrl-C), the app scope's too: no failure of its own.
                    # It closes as at a shutdown: when the app scope's shutdown releases it
                    # (after the units of work, and after what uses it), or once the app
                    # scope's task group is cancelled, after what uses it (in `finally`).
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()  # taken here: the close below is not cut short
                    await slot.release.wait()
                    return
                slot.opening.shield = True  # a cancel from outside now waits for the close
                if native or anyio.current_effective_deadline() == -math.inf:
                    # ...or a scope inside this one, which only the generator can have
                    # entered around its yield: its task group, a task of which failed.
                    # (From outside, the app scope's caller cancelled: closed below.)
                    task = asyncio.current_task() if native else None
                    if task is not None:
                        task.uncancel()  # taken here: the task goes on (the group does not)
                    await self._broke(slot, res, entry)
                    return
            raise
        finally:
            if slot.broke is not None:
                pass  # closed by `_broke`
            elif slot.opening.cancel_called:
                # The start was stopped while this opened (in a thread, which finished):
                # its scope cancels every await in it, so the close gets a shield of its
                # own (a cancel scope the generator entered around its yield, if any,
                # cannot be exited in it: not for such a value).
                with anyio.CancelScope(shield=True):
                    await self._close_slot(slot, entry)
            else:
                slot.opening.shield = True  # the close is not interrupted from outside
                await self._close_slot(slot, entry)

    def _stopped_from_outside(self) -> bool:
        """Whether a native cancel of a holder task came from outside: the task that runs
        the app scope is cancelled (or over) too, as when `asyncio.run` cancels every task
        at the event loop's end, and not the generator's own task group. Logs that once."""
        app = self._app_task
        if app is None or not (app.done() or app.cancelling()):
            return False
        if self._forced_logged is not app:
            self._forced_logged = app
            log.warning(
                "tether: the app scope was cancelled from outside, every task at once (a "
                "forced exit: the server stopped without its lifespan shutdown, a second "
                "Ctrl-C); the app resources are closed as at a shutdown, each after what "
                "uses it"
            )
        return True

    async def _broke(self, slot: _AppSlot, res: Resource[Any], entry: Entry) -> None:
        """*slot*'s value failed while open (a task its generator started around its yield
        failed, and the generator's task group cancelled itself): close it at once, in this
        task, so the generator leaves its scope and says what failed; then it is down for
        good. The app goes on without it: what needs it answers 503, and both health
        probes fail (liveness too: only a restart opens it again)."""
        slot.broke = RuntimeError(
            "what it entered around its yield (a task group, a cancel scope, an "
            "asyncio.timeout()) cancelled it while the app ran"
        )
        try:
            await close_entry(self, entry, None)
        except BaseException as exc:
            slot.broke = exc
        self._app_values.pop(entry.res, None)
        slot.entry = None
        slot.value = None
        slot.closed.set()
        slot.done.set()
        if self.state is State.STARTING:
            slot.error = _one(slot.broke)  # the start fails, naming it and what failed
            if self._start_stop is not None:
                self._start_stop.set()  # and stops what is still opening
            return
        self._broken_any = True
        log.error(
            "tether: app resource %r failed while the app ran: %s; it is closed, and the app "
            "goes on without it: what needs it answers 503, /health/ready and /health/live "
            "fail, so that the process is restarted",
            res.name,
            describe(_one(slot.broke)),
            exc_info=slot.broke,
            extra={"tether_resource": res.name},
        )

    async def _close_slot(self, slot: _AppSlot, entry: Entry) -> None:
        # After what uses it. A shutdown releases the slots in reverse order, but a
        # startup cancelled from outside cancels every slot at once: one still
        # opening on this pool (giving its connection back) finishes first.
        # And after every one opened after it (reverse open order, as a shutdown
        # closes them), those that do not use it too.
        held = self._app_slots
        opened_after = held[held.index(slot) + 1 :] if slot in held else []
        # Shielded: a cancel scope the generator entered around its yield (its task group)
        # may be cancelled by now, from inside (an app scope cancelled from outside ends its
        # tasks), and would end this wait at once, and the close with it.
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            for dependent in (*slot.dependents, *reversed(opened_after)):
                await dependent.done.wait()
        try:
            await close_entry(self, entry, None)
        except anyio.get_cancelled_exc_class():
            # The cancel of an app scope cancelled from outside, out of a task group the
            # generator kept around its yield as it closed: it did close; no cleanup failed.
            pass
        except BaseException as exc:
            slot.error = exc
        finally:
            slot.closed.set()
            slot.done.set()

    async def _open_slot(
        self, slot: _AppSlot, target: Resource[Any], slots: dict[Resource[Any], _AppSlot]
    ) -> tuple[Any, Any] | None:
        """Open *slot*'s value once its dependencies are; None if one failed or stopped.

        A resource that is down (``required=False`` and failing, or waiting for one that
        is down) settles for startup (``slot.opened``) and keeps trying until it opens.
        """
        for dep in target.deps:
            dep_slot = slots[dep]
            await dep_slot.opened.wait()
            if dep_slot.entry is None:
                if dep_slot.error is not None or dep_slot.settled.is_set():
                    return None  # a dependency failed or was stopped: this one cannot open
                slot.waits_for = dep.name  # it is down: wait for it
                slot.opened.set()  # the app starts without it
                await dep_slot.up.wait()
        args = [self._app_values[self._overrides.get(d, d)] for d in target.deps]
        res = slot.res
        waited = slot.waits_for is not None
        if res.required and not waited:
            return await self._open_with_retries(target, args)
        if waited:
            slot.waits_for = None
            slot.late = True
        try:
            return await self._open_with_retries(target, args)
        except Exception as exc:
            res.counters.open_errors += 1
            slot.down = exc
            slot.late = False
            log.warning(
                "tether: app resource %r failed to open: %s; the app starts without it "
                "(required=False) and tries again in the background",
                res.name,
                unstopped(describe(exc)),
            )
            slot.opened.set()
        # At least 1 s between background attempts: backoff=0 means "retry at once" for the
        # startup retries, and doubled it would stay 0 here, a busy loop of connects (and
        # log records) against a server that is down.
        delay = max(res.backoff, _BACKGROUND_FLOOR)
        refused = False
        while True:
            if not refused and (state := refused_for_good(slot.down)) is not None:
                # The server refused the credentials or the database: that mends only when
                # someone changes them, and every attempt is a failed login (which may count
                # towards a lockout). Tried once a minute, not every 10 s.
                refused = True
                log.warning(
                    "tether: app resource %r: the server refused the credentials or the "
                    "database (SQLSTATE %s); tried again once a minute, until they are fixed",
                    res.name,
                    state,
                )
            if not refused and marked_for_good(slot.down):
                refused = True  # a refusal of the server's (Redis's) or of tether's own
                log.warning(
                    "tether: app resource %r: %s; no retry mends that: tried again once a "
                    "minute, until it is fixed",
                    res.name,
                    unstopped(describe(slot.down)),
                )
            await anyio.sleep(_REFUSED_RETRY if refused else delay)
            delay = min(delay * 2, 10.0)
            try:
                return await open_value(self, target, args)
            except Exception as exc:
                res.counters.open_errors += 1
                _count_timeout(res, exc)
                slot.down = exc
                log.info("tether: app resource %r is still down: %s", res.name, describe(exc))

    def _down(self, res: Resource[Any]) -> ResourceUnavailable | None:
        """The error for an app resource that is down, or None."""
        slot = self._slot_of.get(res)
        if slot is None:
            return None
        if slot.entry is not None:
            under = self._broken_under(res) if self._broken_any else None
            if under is None:
                return None
            msg = (
                f"App resource {res.name!r} depends on {under!r}, which failed while the app "
                f"ran: {under!r} is closed, and opens again only when the process restarts "
                f"(/health/live fails for that)."
            )
            return ResourceUnavailable(msg, resource=res.name, retry_after=res.retry_after)
        if slot.broke is not None:
            msg = (
                f"App resource {res.name!r} failed while the app ran "
                f"({describe(_one(slot.broke)).rstrip('.')}): it is closed, and opens again "
                f"only when the process restarts (/health/live fails for that)."
            )
            return ResourceUnavailable(msg, resource=res.name, retry_after=res.retry_after)
        if slot.down is not None:
            why = f"it failed to open ({describe(slot.down).rstrip('.')})"
        elif slot.waits_for is not None:
            why = f"it waits for {slot.waits_for!r}, which is down"
        elif slot.late:
            why = "it is still opening (what it depends on was down)"
        else:
            return None
        msg = (
            f"App resource {res.name!r} is down: {why}, and the app runs without it "
            f"(required=False) while it is retried in the background. Retry shortly."
        )
        return ResourceUnavailable(msg, resource=res.name, retry_after=res.retry_after)

    def _broken_under(self, res: Resource[Any]) -> str | None:
        """The name of an app resource *res* depends on (through others too) that failed
        while the app ran, if one did."""
        stack = list(self._overrides.get(res, res).deps)
        seen: set[Resource[Any]] = set()
        while stack:
            dep = stack.pop()
            if dep in seen:
                continue
            seen.add(dep)
            slot = self._slot_of.get(dep)
            if slot is not None and slot.broke is not None:
                return dep.name
            stack.extend(self._overrides.get(dep, dep).deps)
        return None

    async def _open_with_retries(self, res: Resource[Any], args: list[Any]) -> tuple[Any, Any]:
        delay = res.backoff
        for attempt in range(res.retries + 1):
            t0 = time.perf_counter()
            try:
                out = await open_value(self, res, args)
            except Exception as exc:
                _count_timeout(res, exc)  # each attempt that ran out of time
                if attempt == res.retries:
                    raise
                if refused_for_good(exc) is not None:
                    raise  # a wrong password stays wrong: retrying it only risks a lockout
                if _misconfigured(exc):
                    # tether's refusal of what a function gave (a SecretStr DSN), or a
                    # mistake in the configuration or the code (an unset environment
                    # variable, a typo): retried, it only delays the failure by the backoff.
                    raise
                res.counters.open_errors += 1  # each failed attempt (the last one: by the caller)
                if anyio.current_effective_deadline() == -math.inf:
                    # The start was stopped (a signal, another resource failed) while this
                    # attempt ran in its thread: no retry follows; the checkpoint raises the cancel.
                    await anyio.lowlevel.checkpoint()
                log.warning(
                    "tether: app resource %r failed to open (attempt %d of %d): %s; "
                    "retrying in %.2f s",
                    res.name,
                    attempt + 1,
                    res.retries + 1,
                    describe(_one(exc)),
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                c = res.counters
                waited = time.perf_counter() - t0
                c.wait_time += waited
                c.max_wait_time = max(c.max_wait_time, waited)
                return out
        raise AssertionError("unreachable")  # pragma: no cover

    async def _close_app_slots(self, *, note: bool = False) -> list[tuple[str, BaseException]]:
        """Close the app values in reverse order; return ``(resource name, failure)`` pairs.
        *note*: note each driver pool's connections in use when it closes (a shutdown)."""
        errors: list[tuple[str, BaseException]] = []
        in_use: dict[str, int | None] = {}
        for slot in reversed(self._app_slots):
            # Database pools only: a client's (httpx, Redis: those that count their own
            # waits) are used directly by design, and httpcore counts a cancelled request's
            # connection busy until its next use.
            figures = self._figures_of(slot.res) if note and not slot.res.counts_waits else None
            if figures is not None:  # its dependents closed: what is in use now was kept
                in_use[slot.res.name] = figures.in_use
            slot.release.set()
            await slot.closed.wait()
            if slot.error is not None and slot.broke is None:  # (one that broke: told then)
                _log_close_failure(slot.res.name, slot.error)
                errors.append((slot.res.name, slot.error))
        self._app_slots = []
        self._slot_of = {}
        self._app_values = {}
        self._made_for_overrides = set()
        if note:
            self._in_use_at_shutdown.append(in_use)
        return errors

    async def _shutdown(self) -> None:
        self.state = State.DRAINING
        if self._units:
            self._drained = anyio.Event()
            waited = {unit: list(unit.entries) for unit in self._in_flight()}
            ended = self._abandoned() | self._own_units()
            if ended:
                # Waited for all the same: another task may still exit it (one it was handed
                # to; asyncio.wait_for on Python 3.11 enters it in a task of its own). Said
                # now, so that the wait is understood (trials 34, 35).
                log.warning(
                    "tether: waiting up to drain_timeout=%g s for %d unit%s of work entered "
                    "by hand (`lc.scope()`) by a task that has ended, or by the one shutting "
                    "the app down: %s; if nothing exits %s by then, what %s holds is closed, "
                    "rolled back",
                    self.drain_timeout,
                    len(ended),
                    "s" if len(ended) > 1 else "",
                    ", ".join(sorted(u.label for u in ended)[:10]),
                    "them" if len(ended) > 1 else "it",
                    "each" if len(ended) > 1 else "it",
                )
            with anyio.move_on_after(self.drain_timeout):
                while self._units:
                    with anyio.move_on_after(0.05):
                        await self._drained.wait()
                    self._note_drained(waited)
            self._note_drained(waited)
            if self._units:
                # Cancelled, so that they roll back and give their connections back while
                # the pools are still open (closing the pools under them would leave their
                # values to close after what they use).
                now = time.perf_counter()
                abandoned = self._abandoned()
                own = self._own_units()
                held = self._held_units()
                by_hand = abandoned | own | held  # nothing runs in them to cancel
                self._cancelled.extend(
                    CancelledUnit(u, list(u.entries), now, self.drain_timeout, u in by_hand)
                    for u in self._in_flight()
                )
                cancelled = self._cancel_units()
                left = [u for u in self._units if u not in cancelled and u not in by_hand]
                n = len(self._units)
                log.warning(
                    "tether: %d unit%s of work still in flight after drain_timeout=%g s, "
                    "cancelled: %s%s%s%s%s",
                    n,
                    "s" if n > 1 else "",
                    self.drain_timeout,
                    ", ".join(sorted(u.label for u in cancelled)[:10]) or "none",
                    self._not_cancelled(left),
                    _left_open(abandoned),
                    _left_open(own, by="the task shutting the app down"),
                    _left_open(held, by=_HOLDER),
                )
                # Up to close_timeout for the units cancelled above, those with no task to
                # cancel (trio), and those closing already: a worker's exit of a unit handed
                # to it, its COMMIT still running (the pools closed under it, and it
                # committed after the log said "rolled back": trial 36).
                await self._wait_for_ends(own | held)
                # What is still open is closed here, rolled back, while the pools are open:
                # left open by a task that has ended, or by one cancelled above that did not
                # leave it (an `lc.scope()` entered by hand), or one with no task to cancel
                # (trio). At the loop's end, its generator's and theirs were closed at once
                # by asyncio, "athrow(): asynchronous generator is already running" (trials
                # 30, 34). All at once: each is bounded by its own close.
                still = [u for u in self._in_flight() if u in self._units]
                if still:
                    # Said as it is done: a unit exited meanwhile was not (trial 37).
                    log.warning(
                        "tether: %d unit%s of work still open at the end of the drain, closed "
                        "now, rolled back: %s; exit every `lc.scope()` (`async with "
                        "lc.scope() as s:`)",
                        len(still),
                        "s" if len(still) > 1 else "",
                        ", ".join(sorted(u.label for u in still)[:10]),
                    )
                    with anyio.CancelScope(shield=True):
                        async with anyio.create_task_group() as tg:
                            for unit in still:
                                tg.start_soon(self._close_left_open, unit)
                        # ... and the closes a worker began meanwhile (not the shutdown's).
                        await self._wait_for_ends(own | held, closing_only=True)
        _end_leak_windows(self, time.perf_counter(), every=True)
        await self._stop_opening()
        closing = [slot.res.name for slot in reversed(self._app_slots) if slot.entry is not None]
        started = time.perf_counter()
        errors = await self._close_app_slots(note=True)
        if closing:
            log.info(
                "tether: %d app resources closed in %.3f s, in this order: %s",
                len(closing),
                time.perf_counter() - started,
                ", ".join(closing),
            )
        if errors:
            self.state = State.CLOSED
            excs = [e if isinstance(e, Exception) else RuntimeError(repr(e)) for _, e in errors]
            failed = ", ".join(repr(name) for name, _ in errors)
            msg = (
                f"{len(excs)} cleanup(s) failed at shutdown ({failed}); every cleanup still "
                f"ran, and each failure is logged with its traceback."
            )
            raise ShutdownError(msg, excs)

    # ------------------------------------------------------------------ lifespan

    def lifespan(self, app: Any = _NO_APP, /, *, wrap: Lifespan | None = None) -> Any:
        """The ASGI lifespan: ``FastAPI(lifespan=lc.lifespan)``.

        ``FastAPI(lifespan=lc.lifespan(wrap=my_lifespan))`` runs *my_lifespan* (an
        ``@asynccontextmanager`` function of the app, or an async generator function)
        inside the app scope (so it may use app resources) and keeps the state it yields.
        ``lc.lifespan()``, called with no app, is the same lifespan as ``lc.lifespan``.
        """
        if app is _NO_APP and wrap is None:
            return _CalledLifespan(self)
        if app is _NO_APP:
            app = None
        elif callable(app) and inspect.isasyncgenfunction(inspect.unwrap(app)):
            name = getattr(app, "__name__", "my_lifespan")
            msg = (
                f"lc.lifespan({name}): lc.lifespan takes the app (`async with "
                f"lc.lifespan(app):` in a test), and {name} is a lifespan function, not an "
                f"app. To run it inside tether's lifespan, pass it as wrap=: "
                f"FastAPI(lifespan=lc.lifespan(wrap={name}))."
            )
            raise TypeError(msg)
        if wrap is not None:
            user = _user_lifespan(wrap)

            def lifespan(app: Any) -> AbstractAsyncContextManager[Any]:
                return self._lifespan(app, user)

            lifespan.__dict__[_WRAPS] = (self, user)
            return lifespan
        # `lc.lifespan(app)` in a test, of an app made with `lc.lifespan(wrap=...)`: the
        # app's own lifespan, its wrapped one included.
        router = getattr(app, "router", None)
        made = getattr(getattr(router, "lifespan_context", None), "__dict__", {}).get(_WRAPS)
        if made is not None and made[0] is self:
            return self._lifespan(app, made[1])
        return self._lifespan(app, None)

    @asynccontextmanager
    async def _lifespan(self, app: Any, user: _AppLifespan | None) -> AsyncIterator[Any]:
        starlette = app is not None and _is_starlette(app)
        if starlette:
            from .fastapi import install

            install(app, self)
        async with AsyncExitStack() as stack:
            stopped: StartupError | None = None
            try:
                with _interruptible_start(self) as start:
                    await stack.enter_async_context(self.run())
            except StartupError as exc:
                if exc.interrupted_by is None or not start.server_stops:
                    raise
                stopped = exc
            if stopped is not None:
                # The server was handed the signal too, and stops once its startup is
                # over: reported as a failure, the server exits as one (uvicorn with 3,
                # which gunicorn takes for a worker that cannot boot, and halts with every
                # other worker's requests in flight). So the startup completes, nothing
                # open and every request refused (503), and the server shuts down as on
                # any signal.
                log.warning("tether: %s The server stops as on any %s.", stopped,
                            stopped.interrupted_by)  # fmt: skip
                self.state = State.DRAINING
                try:
                    yield None
                finally:
                    self.state = State.CLOSED
                return
            with _delayed_exit(self):
                if user is None:
                    yield None
                else:
                    async with user(app) as state:
                        if starlette:
                            install(app, self)  # the routes the user's startup added
                        yield state

    # ------------------------------------------------------------------ units of work

    def scope(
        self,
        label: str = "scope",
        *,
        leak_threshold: float | None = _LIFECYCLES,
        **unknown: Never,  # a misspelt option: refused naming the one meant
    ) -> AbstractAsyncContextManager[Unit]:
        """A request scope outside a request: ``async with lc.scope() as s: await s.get(r)``.

        Values open on first ``get`` and close in reverse order when the block ends;
        the exception that ended the block (if any) is thrown into each generator.
        *leak_threshold*: this unit's, in place of the Lifecycle's (a long job: a number of
        seconds it may hold its values, or None for no leak reports of it).
        ``@lc.scope("label")`` (with parentheses) runs each call of an async function in a
        unit of work of its own.
        """
        if callable(label):  # `@lc.scope`, bare: it took the function for a label
            what = getattr(label, "__name__", "the function")
            msg = (
                f"lc.scope({what}): lc.scope takes a label, not a function. To run {what} in "
                f"a unit of work of its own at each call, decorate it with parentheses: "
                f"@lc.scope() or @lc.scope({what!r})."
            )
            raise TypeError(msg)
        return AsyncOnly(
            self._scope(label, leak_threshold, unknown), "lc.scope()", _SCOPE_FROM_SYNC
        )

    @asynccontextmanager
    async def _scope(
        self, label: str, leak_threshold: float | None, unknown: dict[str, Any]
    ) -> AsyncIterator[Unit]:
        if unknown:
            raise not_options("lc.scope()", unknown, Lifecycle.scope)
        if leak_threshold is not _LIFECYCLES:
            check_number(
                leak_threshold,
                "leak_threshold",
                f"lc.scope({label!r})",
                above=True,
                none=True,
                example="3600, or None for no leak reports of this unit of work",
            )
        self.validate()
        if self._loop is not None and self._loop is not _current_loop():
            raise self._elsewhere(label)
        if self._open_limiter is None:
            self._make_limiters()
        unit = Unit(self, label, track_stacks=self.track_stacks)
        stop = OPEN_STOP.get()
        if stop is not None and self.state is State.CLOSED:
            raise self._shut_down(unit)  # a task an app resource started, left running
        # Admitted while the app scope drains if its owner stops it (`_parked`).
        parked = (
            self.state is State.DRAINING and stop is not None and await self._parked(unit, stop)
        )
        self._admit(unit, parked=parked)
        if leak_threshold is not _LIFECYCLES:
            self._leak_thresholds[unit] = leak_threshold
        if _on_asyncio():
            self._unit_tasks[unit] = asyncio.current_task()  # cancelled past drain_timeout
        failure: BaseException | None = None
        # The unit of work the block's code runs in, and the tasks it starts: the innermost
        # one, in a request or in another `lc.scope()` (what an integration notes per unit,
        # a forgotten httpx stream, went to the outer one: a WebSocket's, or a consumer's,
        # until its end: trial 24). Not during the closes, as for a request's.
        token = current_unit.set(weakref.ref(unit))
        try:
            try:
                yield unit
            finally:
                with suppress(ValueError):  # exited in another context (GC)
                    current_unit.reset(token)
        except BaseException as exc:
            if isinstance(exc, GeneratorExit) and not unit.closed:
                # Never exited: its context manager was dropped with the block open, and
                # Python's finalizer closes it now. What it did is rolled back: said, where
                # the client of a request that did this got its 200 in silence (trial 34).
                log.warning(
                    "tether: unit of work %r was never exited: its `lc.scope()` context "
                    "manager was garbage-collected with the block open (entered by hand, its "
                    "`__aenter__` with no `__aexit__`), so what it holds is rolled back now. "
                    "Exit every `lc.scope()` (`async with lc.scope() as s:`)",
                    unit.label,
                )
            with anyio.CancelScope(shield=True):
                errors = await unit.aclose(exc)
            shut = self._shut.get(unit)
            if shut is not None and isinstance(exc, Exception):
                # (Its values closed under it: "released back to the pool", "given back".)
                exc.add_note(f"tether: {shut}")
            if not errors or not isinstance(exc, Exception):
                raise  # a cancellation or an interrupt is never replaced
            failure = errors[-1]
        else:
            with anyio.CancelScope(shield=True):
                errors = await unit.aclose(None)
            if errors:
                failure = errors[-1]
            shut = self._shut.get(unit)
            if shut is not None:
                # Exited after the shutdown closed it: what the block did was rolled back,
                # and must not pass for committed (trial 34).
                failure = ScopeError(str(shut))
            await _held_back_cancel()
        finally:
            self._retire(unit)
        if failure is not None:
            # As with ExitStack, a failed cleanup is what the block ends with. Raising it
            # here would set its __context__ to the block's exception: keep its own chain.
            context = failure.__context__
            try:
                raise failure
            except BaseException:
                failure.__context__ = context
                raise

    def _elsewhere(self, label: str) -> ScopeError:
        """The error for a unit of work on another loop than the app scope's, or in a
        process forked after it opened."""
        if os.getpid() != self._pid:
            return ScopeError(
                f"lc.scope({label!r}) was entered in process {os.getpid()}, a fork of "
                f"process {self._pid}, whose app scope opened this Lifecycle's resources: "
                f"their connections' sockets belong to the parent, and sharing them "
                f"corrupts both. Open them in each process, after the fork: in the "
                f"lifespan of each worker (tether opens nothing at import, so `gunicorn "
                f"--preload` is fine), or with a Lifecycle of the child's own."
            )
        return ScopeError(
            f"lc.scope({label!r}) was entered on another event loop than the one this "
            f"Lifecycle's app scope runs on (the loop of `lc.run()` or of the app's "
            f"lifespan), and its app resources (pools, clients) belong to that loop. Run "
            f"the unit of work there: in pytest-asyncio, give the test the loop of the "
            f'fixture that starts the app (`@pytest.mark.asyncio(loop_scope="session")` '
            f"for a session fixture, or `asyncio_default_test_loop_scope = session` in the "
            f"ini file for every test); from another thread, use `anyio.from_thread.run` "
            f"(with TestClient, `client.portal.call`, or "
            f"`client.portal.wrap_async_context_manager(...)` for a context manager)."
        )

    def _in_flight(self) -> list[Unit]:
        """The units of work in flight, oldest first (the dashboard's and the test helpers')."""
        return sorted((u for u in list(self._units) if not u.closed), key=lambda u: u.started)

    def _note_drained(self, waited: dict[Unit, list[Entry]]) -> None:
        """Note the units of *waited* that are no longer in flight, with the time."""
        now = time.perf_counter()
        for unit in [unit for unit in waited if unit not in self._units]:
            self._drained_units.append(DrainedUnit(unit, waited.pop(unit), now))

    async def _parked(self, unit: Unit, stop: OpenStop) -> bool:
        """While the app scope drains, a unit of work that a task an app resource started
        asks for (its open, or a task it spawned: a queue consumer's loop) waits for that
        resource's cleanup to begin, instead of being refused: refused, the consumer's task
        would die of it, and the cleanup that stops it (a cancel, or a flag it sets, then an
        await of the task) fail the shutdown. A cleanup that cancels the task stops it here;
        one that sets a flag has the unit admitted (True), its app resources still open, so
        the loop ends after it. Refused (False) for a task of another Lifecycle's resource,
        and once the app scope has closed."""
        slot = next((s for s in self._app_slots if s.stop is stop), None)
        if slot is None:
            return False
        while not slot.release.is_set() and self.state is State.DRAINING:
            with anyio.move_on_after(0.05):
                await slot.release.wait()
        if self.state is State.DRAINING:  # its cleanup began: the app resources are open
            return True
        raise self._shut_down(unit)

    def _shut_down(self, unit: Unit) -> ResourceUnavailable:
        """The refusal of a unit of work a task an app resource started asks for once the
        app scope has closed: the task outlived the resource's cleanup."""
        self._units_refused += 1
        msg = (
            f"Cannot start {unit.label}: the application has shut down, and its app "
            f"resources are closed. Stop the task that starts it in the cleanup of the app "
            f"resource that started it (after its `yield`)."
        )
        return ResourceUnavailable(msg, resource="lifecycle", retry_after=5.0)

    def _admit(self, unit: Unit, *, parked: bool = False) -> None:
        # Refused while the app scope drains only (but one `_parked` let in): once it closed
        # (an earlier test ran the app), a unit of work that needs no app resource (a job's
        # unit test, overrides) runs, and one that does is told the app scope is not open.
        if self.state is State.DRAINING and not parked:
            self._units_refused += 1
            msg = (
                f"Cannot start {unit.label}: the application is shutting down "
                f"({self.state.value}). Retry against another instance."
            )
            raise ResourceUnavailable(msg, resource="lifecycle", retry_after=5.0)
        self._units.add(unit)
        self._units_total += 1

    def _own_units(self) -> set[Unit]:
        """The units of work in flight entered by the task running the shutdown (an
        ``lc.scope()`` entered by hand in the block of ``lc.run()``, or in a test's body
        beside its fixture's app scope): it cannot leave them while it shuts down, nor be
        cancelled for them."""
        try:
            current = asyncio.current_task()
        except RuntimeError:  # not on asyncio (trio): no task known
            return set()
        return {
            unit
            for unit in list(self._units)
            if (getattr(unit, "task", None) or self._unit_tasks.get(unit)) is current
        }

    def _held_units(self) -> set[Unit]:
        """The units of work in flight entered by an app resource's own code, in the task
        that holds it open (an `lc.scope()` entered by hand before its `yield`, a warm-up):
        that task runs until the app resources close, after the drain."""
        return {
            unit
            for unit in list(self._units)
            if (getattr(unit, "task", None) or self._unit_tasks.get(unit)) in self._holding
        }

    def _cancel_units(self) -> list[Unit]:
        """Cancel the task of every unit of work still in flight (past ``drain_timeout``);
        return the units cancelled."""
        try:
            current = asyncio.current_task()
        except RuntimeError:  # not on asyncio (trio): units there are not cancelled
            return []
        cancelled = []
        for unit in list(self._units):
            task = getattr(unit, "task", None) or self._unit_tasks.get(unit)
            if task in self._holding:
                continue  # an app resource's own: cancelled, it would break (`_held_units`)
            if task is not None and task is not current and not task.done():
                task.cancel(f"tether: drain_timeout={self.drain_timeout:g} s passed at shutdown")
                cancelled.append(unit)
        return cancelled

    async def _wait_for_ends(self, stuck: set[Unit], *, closing_only: bool = False) -> None:
        """Wait, up to ``close_timeout``, while a unit of work in flight is closing, or (but
        with *closing_only*) may still end on its own: not in *stuck* (entered by the task
        shutting the app down, or an app resource's), nor left by a task that has ended."""

        def may_end(unit: Unit) -> bool:
            if unit.closed:
                return True  # its close runs (a worker's exit, a cancelled request's)
            return not closing_only and unit not in stuck and unit not in self._abandoned()

        drained = self._drained
        assert drained is not None  # (the drain made it)
        with anyio.move_on_after(self.close_timeout):
            while any(may_end(unit) for unit in list(self._units)):
                with anyio.move_on_after(0.05):
                    await drained.wait()

    async def _close_left_open(self, unit: Unit) -> None:
        """Close *unit*, still open at the end of a shutdown's drain, rolled back; its
        ``__aexit__``, if anything calls it later, raises what it was closed with. Not one
        whose own close began meanwhile (a worker's exit: trial 36)."""
        if unit.closed:
            return
        error = _abandoned_error(unit)
        self._shut[unit] = error
        try:
            await unit.aclose(error)
        finally:
            self._retire(unit)

    def _abandoned(self) -> set[Unit]:
        """The units of work in flight whose task, on asyncio, has ended without leaving
        them: an ``lc.scope()`` entered by hand (``__aenter__`` without ``__aexit__``).
        Nothing runs in them to cancel, or to end them."""
        try:
            asyncio.current_task()
        except RuntimeError:  # not on asyncio (trio): no task known
            return set()
        found = set()
        for unit in list(self._units):
            task = getattr(unit, "task", None) or self._unit_tasks.get(unit)
            if task is not None and task.done():
                found.add(unit)
        return found

    def _not_cancelled(self, units: list[Unit]) -> str:
        """The drain warning's tail for the units past ``drain_timeout`` it could not cancel
        (no asyncio task known: on trio), "" if none."""
        if not units:
            return ""
        return (
            f"; not cancelled (no asyncio task to cancel, as on trio): "
            f"{', '.join(sorted(u.label for u in units)[:10])}: they get up to "
            f"close_timeout={self.close_timeout:g} s to end before the app resources close "
            f"under them; end them from the server's shutdown (its graceful timeout)"
        )

    def _retire(self, unit: Unit) -> None:
        self._units.discard(unit)
        if self._drained is not None and not self._units:
            self._drained.set()

    async def _unit_for_connection(self, connection: Any, name: str | None = None) -> Unit:
        from .fastapi import unit_for_connection

        return await unit_for_connection(self, connection, name)

    # ------------------------------------------------------------------ observing

    async def health(self) -> HealthReport:
        """Run every ``check`` concurrently, each bounded by its timeout."""
        return await run_checks(self)

    def stats(self) -> Stats:
        """A snapshot of every resource's counters, the units of work, and the figures of
        the driver pools that are open."""
        # SIGTERM came and drain_delay runs: "stopping", as readiness says.
        running = self.state is State.RUNNING
        state = "stopping" if self._stopping and running else self.state.value
        resources = ByName[ResourceStats](
            (name, snapshot(name, res.scope, res.counters, self._down_reason(res)))
            for name, res in self._resources.items()
        )
        resources._where = "lc.stats().resources"
        pools = self._pool_stats()
        pools._where = "lc.stats().pools"
        pools._resources = tuple(resources)
        pools._state = state
        return Stats(
            state=state,
            units_in_flight=len(self._units),
            units_total=self._units_total,
            units_refused=self._units_refused,
            resources=resources,
            pools=pools,
        )

    def _down_reason(self, res: Resource[Any]) -> str | None:
        down = self._down(res)
        return None if down is None else str(down)

    def _pool_stats(self) -> ByName[PoolStats]:
        pools = ByName[PoolStats]()
        for name, res in self._resources.items():
            figures = self._figures_of(res)
            if figures is not None:
                pools[name] = figures
        return pools

    def _figures_of(self, res: Resource[Any]) -> PoolStats | None:
        """The figures of *res*'s driver pool, if it is one and open (not overridden)."""
        if res.pool_stats is None or res in self._overrides:
            return None  # not a pool, or replaced (by a fake, in tests)
        value = self._app_values.get(res, _NOT_OPEN)
        if value is _NOT_OPEN:
            return None
        try:
            return res.pool_stats(value)
        except Exception as exc:  # a figure is never worth failing a scrape
            log.debug("tether: cannot read the figures of pool %r: %s", res.name, exc)
            return None

    async def _sweep_forever(self) -> None:
        self._sweeping = True
        try:
            # The hooks once at once, not only after the first `sweep_interval`: one may set up
            # what ends with this task (Prometheus's multiprocess mode writes a worker's last
            # figures then), and an app stopped before its first sweep skipped that (a worker
            # left reporting `tether_lifecycle_running` 1 for good).
            self._run_sweepers(time.perf_counter())
            await self._sweep_loop()
        finally:
            self._sweeping = False
            for hook in self._sweepers:  # what a hook keeps for its next sweep, said now
                at_end = getattr(hook, "at_end", None)
                if at_end is not None:
                    try:
                        at_end()
                    except Exception as exc:  # never the end of the app scope's task group
                        self._sweeper_failed(hook, exc)
            # Hand the deadlines of cleanups still running to timers.
            loop = _current_loop()
            now = time.perf_counter()
            for close in list(self._slow_closes):
                if loop is not None:
                    loop.call_later(max(0.0, close.deadline - now), close.expire)

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self.sweep_interval)
            now = time.perf_counter()
            for close in list(self._slow_closes):
                if now > close.deadline:
                    close.expire()
            try:
                self._sweep_leaks(now)
            except Exception as exc:  # never the end of the app scope's task group
                self._sweeper_failed("the leak sweep", exc)
            self._run_sweepers(now)

    def _run_sweepers(self, now: float) -> None:
        for hook in self._sweepers:
            try:
                hook(now)
            except Exception as exc:  # never the end of the app scope's task group
                self._sweeper_failed(hook, exc)

    def _sweeper_failed(self, hook: Any, exc: Exception) -> None:
        """Log a sweeper hook's failure, once per hook; the sweep goes on."""
        try:
            if hook in self._failed_sweepers:
                return
            self._failed_sweepers.add(hook)
        except TypeError:  # pragma: no cover - an unhashable hook: logged every time
            pass
        if hook == "the leak sweep":
            log.error(
                "tether: the leak sweep failed: %s (leak_threshold=%r); the app runs on, "
                "without leak reports, and its later failures are not logged",
                describe(exc),
                self.leak_threshold,
                exc_info=exc,
            )
            return
        log.error(
            "tether: a sweeper hook (%r) failed: %s; the sweep goes on (leak reports, close "
            "deadlines), and this hook's later failures are not logged",
            hook,
            describe(exc),
            exc_info=exc,
        )

    @property
    def leak_threshold(self) -> float | None:
        """A request resource held longer than this many seconds is reported once (None:
        no reports)."""
        if self._leak_unset:
            raise AttributeError("'Lifecycle' object has no attribute 'leak_threshold'")
        return self._leak_threshold

    @leak_threshold.setter
    def leak_threshold(self, value: float | None) -> None:
        # Checked as `Lifecycle()` checks it: a string set here ("60" from the environment)
        # would make every leak sweep fail.
        _check_leak_threshold(value, "lc.leak_threshold")
        self._leak_threshold = value
        self._leak_floor = min(_as_threshold(value), self._leak_thresholds.floor)
        self._leak_unset = False

    @leak_threshold.deleter
    def leak_threshold(self) -> None:
        # What `mock.patch.object(lc, "leak_threshold", x)` does on its exit before it sets
        # the value back: unset (no reports) until it is set again.
        self.leak_threshold = None
        self._leak_unset = True

    def _leak_threshold_of(self, unit: Unit) -> float | None:
        """*unit*'s leak threshold: its own (`lc.scope(label, leak_threshold=...)`), or the
        Lifecycle's."""
        own = self._leak_thresholds
        return own.get(unit, self._leak_threshold) if own else self._leak_threshold

    def _sweep_leaks(self, now: float) -> None:
        if self._leak_windows:
            _end_leak_windows(self, now)
        if self._leak_threshold is None and not self._leak_thresholds:
            return
        for unit in list(self._units):
            threshold = self._leak_threshold_of(unit)
            if threshold is None:
                continue
            found: list[Entry] | None = None
            for entry in unit.entries:
                if now - entry.opened_at > threshold and entry.leak_reported is None:
                    if found is None:
                        found = [entry]
                    else:
                        found.append(entry)
            if found is not None:
                self._report_leak(unit, found, now - found[0].opened_at, threshold)
        # Values whose close is taking long (a COMMIT waiting for a lock): out of their
        # unit's entries, and seen here instead of only once the close ends.
        for close in list(self._slow_closes):
            closing: Entry | None = close.entry
            owner = closing.unit if closing is not None else None
            if closing is None or owner is None or closing.leak_reported is not None:
                continue
            limit = self._leak_threshold_of(owner)
            if limit is not None and now - closing.opened_at > limit:
                held = now - closing.opened_at
                self._report_leak(owner, closing, held, limit, closing=True)

    def _report_leak(
        self,
        unit: Unit,
        found: Entry | list[Entry],
        held: float,
        threshold: float,
        *,
        at_close: bool = False,
        closing: bool = False,
    ) -> None:
        """Report what *unit* holds past its *threshold* in one warning (*found*, held for
        *held* s at most; with them, the unit's other values not reported yet and held as
        long: a transaction and the connection it depends on are one leak to look for),
        each counted in its resource's ``leaks``. *at_close*: *found* is closing (the
        sweep did not see it: the event loop was blocked, or no sweep had run yet).
        *closing*: *found* is in a close that is taking long, seen by the sweep."""
        entries = [found] if isinstance(found, Entry) else found
        if at_close:  # the unit's other values past the threshold, still open
            now = time.perf_counter()
            entries += [
                e
                for e in unit.entries
                if e.leak_reported is None and e not in entries and now - e.opened_at > threshold
            ]
            held = max([held, *(now - e.opened_at for e in entries[1:])])
        for entry in entries:
            entry.leak_reported = unit.label
            _leak_owner(entry.res).counters.leaks += 1
            if entry.res.guard:  # one leak: not counted again if used after close
                object.__setattr__(entry.value, "_tether_counted", True)
        first = entries[0]
        where = _format_stack(first.stack, "acquired at")
        if at_close:
            seen = (
                ", seen at its close (the event loop was blocked, or no leak sweep had run "
                "since it went past the threshold)"
            )
        elif closing:
            seen = ", in its close, which is still running (a COMMIT waiting for a lock, say)"
        else:
            seen = ""
            # A request's (an `HttpUnit`), or a WebSocket's or a scope's task.
            task = getattr(unit, "task", None) or self._unit_tasks.get(unit)
            if not where and task is not None and not task.done():
                try:
                    where = _where_now(unit, task, first.value)
                except Exception:  # a diagnostic: the report is made without it
                    log.debug("tether: where %s is now", unit.label, exc_info=True)
        names = ", ".join(_leak_name(entry.res) for entry in entries)
        # The first of a route's (and values') reports in full, then a count: a slow
        # backend makes every request a leak report, a traceback each (trial 14).
        window = self._leak_windows.get((unit.label, names))
        if window is not None:
            window[1] += 1
            window[2] = max(window[2], held)
            return
        self._leak_windows[unit.label, names] = [time.perf_counter(), 0, 0.0]
        log.warning(
            "tether: %s %s held for %.1f s (leak_threshold=%g s) by %s%s%s",
            "resources" if len(entries) > 1 else "resource",
            names,
            held,
            threshold,
            unit.label,
            seen,
            where,
            extra={
                "tether_resource": _leak_owner(first.res).name,
                "tether_resources": [_leak_owner(entry.res).name for entry in entries],
            },
        )


#: Seconds after a leak report during which the next reports of the same route and values
#: are counted, then said in one line.
LEAK_WINDOW = 60.0


def _end_leak_windows(lc: Lifecycle, now: float, *, every: bool = False) -> None:
    """Say what each leak window that ended (*every*: each, at shutdown) counted
    (`Lifecycle._report_leak`), and end it."""
    for key, (start, count, longest) in list(lc._leak_windows.items()):
        if now - start < LEAK_WINDOW and not every:
            continue
        del lc._leak_windows[key]
        if count:
            label, names = key
            log.warning(
                "tether: %s held %s past the leak threshold %d more time%s in the last "
                "%.0f s (the longest for %.1f s), as reported above; counted in leaks",
                label,
                names,
                int(count),
                "s" if count > 1 else "",
                now - start,
                longest,
            )


def _leak_owner(res: Resource[Any]) -> Resource[Any]:
    """The resource a leak of *res* is counted on: the app resource whose per-unit
    collection it is (`per_unit`), else itself."""
    return res.leak_of[0] if res.leak_of is not None else res


def _leak_name(res: Resource[Any]) -> str:
    """*res* as a leak report names it: ``'redis' (a dedicated connection: ...)`` for an
    integration's per-unit collection, its own name otherwise."""
    if res.leak_of is None:
        return repr(res.name)
    owner, what = res.leak_of
    return f"{owner.name!r} ({what})"


class _Thresholds(weakref.WeakKeyDictionary[Unit, float | None]):
    """The units of work given a leak threshold of their own, and the lowest ever given
    (`floor`), kept in their Lifecycle's ``_leak_floor``."""

    def __init__(self, lc: Lifecycle) -> None:
        super().__init__()
        self.floor = math.inf
        self._lc = weakref.ref(lc)  # not a cycle: a Lifecycle is freed as soon as dropped

    def __setitem__(self, unit: Unit, threshold: float | None) -> None:
        super().__setitem__(unit, threshold)
        value = _as_threshold(threshold)
        if value < self.floor:
            self.floor = value
            lc = self._lc()
            if lc is not None:
                lc._leak_floor = min(lc._leak_floor, value)


def _check_leak_threshold(value: object, where: str) -> None:
    check_number(
        value,
        "leak_threshold",
        where,
        above=True,
        none=True,
        example="60, or None to turn leak detection off",
    )


def _as_threshold(value: Any) -> float:
    """A leak threshold as a number (inf: none; a value set past its check, not a
    number: left to the sweep, which logs its failure)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return float(value)
    return math.inf


def _where_now(unit: Unit, task: Any, value: Any) -> str:
    """Where a unit of work that recorded no stack when it opened *value* is now (a request
    records none: it would cost every request): where its task waits and, when it waits
    for a worker thread (a ``def`` endpoint or dependency), where that thread is, innermost
    last. The thread is read whenever the task waits for one, not only when the await chain
    has no frame of the user's (an ASGI middleware of the user's around a ``def`` endpoint
    was given as where the request was)."""
    frames, in_thread = task_stack(task)
    thread = thread_stack(in_thread, value) if in_thread is not None else []
    if not thread and (in_thread is not None or not frames):
        # Its thread not told apart by what it runs (a wrapper shared by several routes),
        # or no await chain to read: the thread running the endpoint's own code.
        request = getattr(unit, "request", None)
        scope = getattr(request, "scope", None) or {}
        thread = thread_stack(scope.get("endpoint"), value)
    return _format_stack(bounded(frames + thread), "the request is now at")


# Frames that are not where a user entered the app scope: tether's, the frameworks', and
# the machinery that runs a fixture or a portal between them.
_NOT_THE_USER = (
    *_TETHER_DIRS,
    *code_of("threading", "concurrent", "_pytest", "pluggy", "pytest_asyncio"),
)


def _entry_site() -> str:
    """Where the app scope is being entered: the innermost frame outside tether, the
    frameworks and the test runner, "FILE:LINE in NAME" ("" if none). Under a portal
    (TestClient's), the event loop's thread has no such frame: it is the main thread's,
    which waits for the startup. Once per app scope, never per request."""
    frames = user_frames(sys._getframe(1), _NOT_THE_USER)
    main = threading.main_thread()
    if not frames and threading.current_thread() is not main and main.ident is not None:
        frames = outside(thread_frames().get(main.ident, []), _NOT_THE_USER)
    if not frames:
        return ""
    filename, line, name = frames[-1]
    return f"{filename}:{line} in {name}"


class AsyncOnly(AbstractAsyncContextManager[T]):
    """An async context manager that, entered with a plain ``with``, says how to enter it
    (*advice*), instead of Python's "'_AsyncGeneratorContextManager' object does not support
    the context manager protocol"."""

    __slots__ = ("_advice", "_cm", "_what")

    def __init__(self, cm: AbstractAsyncContextManager[T], what: str, advice: str) -> None:
        self._cm = cm
        self._what = what
        self._advice = advice

    async def __aenter__(self) -> T:
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._cm.__aexit__(*exc_info)

    def __call__(self, fn: Any) -> Any:
        """As a decorator (``@lc.scope()``, ``@lc.run()``): *fn* run in a new one at each
        call, as contextlib's own async context managers do."""
        decorate: Any = self._cm
        return decorate(fn)

    if not TYPE_CHECKING:  # (to type checkers, `with` on it stays an error)

        def __enter__(self) -> Any:
            raise TypeError(f"{self._what} is an async context manager: {self._advice}")

        def __exit__(self, *exc_info: Any) -> None:  # pragma: no cover - never entered
            return None


_SCOPE_FROM_SYNC = (
    "`async with lc.scope() as s:` in an async function (a script runs that function with "
    "`asyncio.run()`). In a sync test beside TestClient, inside `with TestClient(app) as "
    "client:`: `with client.portal.wrap_async_context_manager(lc.scope()) as s:`."
)
_RUN_FROM_SYNC = (
    "`async with lc.run():` in an async function (a script runs that function with "
    "`asyncio.run()`). In a sync test, `with TestClient(app):` runs the app scope."
)


@asynccontextmanager
async def _left_in(task: asyncio.Task[Any] | None) -> AsyncIterator[None]:
    """Turn anyio's error for a task group left in another task than the one that entered
    it (the app scope held across a pytest-asyncio fixture) into one that says what to do."""
    try:
        yield
    except RuntimeError as exc:
        if task is None or asyncio.current_task() is task:
            raise
        msg = (
            "The app scope of this Lifecycle (`async with lc.run():`, or `lc.lifespan(app)`) "
            "was entered in one task and left in another, and the task group it holds open "
            "can only be left by the task that entered it: pytest-asyncio sets up and tears "
            "down an async fixture in two different tasks. Use `async with "
            "tether.testing.running(lc):` in the fixture (`running(lc, app)` for the app's "
            "lifespan), which holds the app scope in a task of its own (docs/testing.md)."
        )
        raise ScopeError(msg) from exc


def _chain_signal(
    loop: asyncio.AbstractEventLoop,
    signum: int,
    handler: Callable[[Callable[[], None]], None],
) -> Callable[[], None]:
    """Put *handler* in front of the handler *signum* has (main thread only), and return
    what restores that one. *handler* is given what calls the one it stands in front of.

    A server sets its handler with ``signal.signal`` (uvicorn) or with the running loop's
    ``add_signal_handler`` (hypercorn). The loop's is woken through the loop's wakeup fd,
    whatever ``signal.signal`` says since: it is wrapped through the loop. *handler* may run
    in a signal handler (``signal.signal``), so it only schedules its work on the loop.
    """
    handles = getattr(loop, "_signal_handlers", None)  # asyncio's loops (not uvloop's)
    handle = handles.get(signum) if isinstance(handles, dict) else None
    callback = getattr(handle, "_callback", None)
    args = getattr(handle, "_args", None)
    if handle is not None and callable(callback) and isinstance(args, tuple):

        def on_loop() -> None:
            handler(lambda: callback(*args))

        loop.add_signal_handler(signum, on_loop)

        def restore_loop() -> None:
            now = handles.get(signum) if isinstance(handles, dict) else None
            if now is not None and getattr(now, "_callback", None) is on_loop:
                loop.add_signal_handler(signum, callback, *args)

        return restore_loop

    previous = signal.getsignal(signum)

    def pass_on(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def on_signal(signum: int, frame: Any) -> None:
        handler(lambda: pass_on(signum, frame))

    signal.signal(signum, on_signal)

    def restore() -> None:
        if signal.getsignal(signum) is on_signal:
            signal.signal(signum, previous)

    return restore


class _Start:
    """What `_interruptible_start` learnt: whether the signal that stopped the start was
    also handed to a server that stops on it."""

    server_stops = False


def _server_handles(loop: asyncio.AbstractEventLoop, signum: int) -> bool:
    """Whether a server set a handler of *signum* (with ``signal.signal`` or the loop's
    ``add_signal_handler``), rather than Python's defaults."""
    handles = getattr(loop, "_signal_handlers", None)
    if isinstance(handles, dict) and signum in handles:
        return True
    handler = signal.getsignal(signum)
    return callable(handler) and handler is not signal.default_int_handler


@contextmanager
def _interruptible_start(lc: Lifecycle) -> Iterator[_Start]:
    """While the lifespan opens the app resources: SIGTERM or SIGINT stops the start (no
    more retries; what opened is closed; `StartupError`), and is passed on to the server's
    own handler, so it exits after. A server never cancels a lifespan's startup: uvicorn
    waited for every retry. Main thread only (where signal handlers can be set)."""
    start = _Start()
    loop = asyncio._get_running_loop()
    if loop is None or threading.current_thread() is not threading.main_thread():
        yield start
        return
    lc._interrupted = None
    active = True
    # Whether a server has its own handler of each signal, which stops it once its startup
    # is over (not Python's default ones: no server runs the app).
    servers = {sig.name: _server_handles(loop, sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def interrupt(name: str) -> None:
        if active and lc._interrupted is None:
            lc._interrupted = name
            start.server_stops = servers[name]
            log.warning("tether: %s during startup: the start is stopped", name)
            if lc._start_stop is not None:
                lc._start_stop.set()

    restores: list[Callable[[], None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):

        def on_signal(pass_on: Callable[[], None], name: str = sig.name) -> None:
            # Left installed behind another's (two startups at once), once this start is
            # over it only passes the signal on.
            if active:
                with suppress(RuntimeError):  # (its loop closed)
                    loop.call_soon_threadsafe(interrupt, name)
            pass_on()

        restores.append(_chain_signal(loop, sig, on_signal))
    try:
        yield start
    finally:
        active = False
        for restore in reversed(restores):
            restore()
        lc._interrupted = None
        lc._start_stop = None


def _held_by_loop(loop: asyncio.AbstractEventLoop, signum: int) -> bool:
    """Whether *signum*'s handler was registered with a loop that keeps it where tether
    cannot wrap it (uvloop's ``add_signal_handler``: its wakeup fd calls the server's
    callback whatever ``signal.signal`` says since)."""
    handles = getattr(loop, "_signal_handlers", None)
    if isinstance(handles, dict):  # asyncio's loops: wrapped through the loop
        return False
    handler = signal.getsignal(signum)
    return getattr(handler, "__self__", None) is loop


#: Seconds within which a second SIGTERM is the first one relayed (`_delayed_exit`).
_RELAYED = 1.0


@contextmanager
def _delayed_exit(lc: Lifecycle) -> Iterator[None]:
    """While the app serves: SIGTERM makes readiness fail for ``drain_delay`` seconds, then
    is handed to the server's own handler (which starts its shutdown), whether the server
    set it with ``signal.signal`` (uvicorn) or the loop's ``add_signal_handler``
    (hypercorn). Nothing is done without a delay, or off the main thread (where signal
    handlers cannot be set)."""
    delay = lc.drain_delay
    loop = asyncio._get_running_loop()
    if not delay or loop is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    if _held_by_loop(loop, signal.SIGTERM):
        log.warning(
            "tether: drain_delay=%g s cannot delay this server's shutdown: its SIGTERM "
            "handler is registered with uvloop's loop (granian's default --loop auto, "
            "hypercorn -k uvloop), which calls it itself, so /health/ready fails only once "
            "the shutdown begins. Run the server on asyncio's loop (granian --loop asyncio, "
            "hypercorn -k asyncio), or delay in the orchestrator (a preStop hook that sleeps).",
            delay,
        )
        yield
        return

    serving = True
    first = 0.0  # when the first SIGTERM came

    def on_sigterm(hand_over: Callable[[], None]) -> None:
        nonlocal first
        if lc._stopping and serving and time.monotonic() - first < _RELAYED:
            # The same stop, sent twice: a supervisor signalled the whole process group
            # (systemd's default, `kill -TERM -PGID`), and the server's parent (uvicorn
            # --workers, gunicorn) passed it on to this worker too. Not a second SIGTERM.
            return
        if lc._stopping or not serving or loop.is_closed():
            # A second SIGTERM: the server stops now. Or this app is over, and this handler
            # was left behind another's (two apps at once): it only passes the signal on.
            hand_over()
            return
        first = time.monotonic()
        lc._stopping = True
        log.warning(
            "tether: SIGTERM: /health/ready fails for drain_delay=%g s while the app serves, "
            "then the server shuts down",
            delay,
        )
        loop.call_soon_threadsafe(loop.call_later, delay, hand_over)

    restore = _chain_signal(loop, signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        serving = False
        restore()
        lc._stopping = False


#: The option that bounds the open of an integration's app resource, by its factory's
#: module (they take no ``timeout=``, except httpx's client).
_OPEN_TIMEOUTS = {
    "tether.integrations.asyncpg": "connect_timeout=",
    "tether.integrations.psycopg": "open_timeout=",
    "tether.integrations.sqlalchemy": "connect_timeout=",
    "tether.integrations.redis": "socket_connect_timeout=",
}


#: Seconds into the start after which an app resource still opening is said, then every
#: `STILL_OPENING_EVERY` seconds.
STILL_OPENING = 10.0
STILL_OPENING_EVERY = 30.0


async def _say_still_opening(res: Resource[Any], started: float) -> None:
    """Log that *res* is still opening, `STILL_OPENING` seconds into the start and then every
    `STILL_OPENING_EVERY`: a start that waits on a backend says which (an app resource
    without ``timeout=`` waits for it without end, and said nothing)."""
    await anyio.sleep(max(0.0, started + STILL_OPENING - time.monotonic()))
    while True:
        if res.timeout is None and _open_timeout(res) == "timeout=":
            bound = (
                "It has no timeout=, so the start waits for it without end: give it one "
                '(@lc.resource(scope="app", timeout=10)), or see what its open waits on.'
            )
        else:
            bound = f"Its {_open_timeout(res)} and retries= bound how long."
        log.warning(
            "tether: app resource %r is still opening, %.1f s into the start; the app "
            "serves nothing until it opens. %s",
            res.name,
            time.monotonic() - started,
            bound,
        )
        await anyio.sleep(STILL_OPENING_EVERY)


def _open_timeout(res: Resource[Any]) -> str:
    """The option a startup failure's advice names to give *res* more time to open."""
    return _OPEN_TIMEOUTS.get(getattr(res.factory, "__module__", ""), "timeout=")


def _format_stack(stack: list[tuple[str, int, str]] | None, what: str) -> str:
    if not stack:
        return ""
    lines = "".join(f'\n  File "{f}", line {n}, in {name}' for f, n, name in stack)
    return f"; {what}:{lines}"


#: Set on the lifespan `lc.lifespan(wrap=...)` makes: its Lifecycle and the wrapped one.
_WRAPS = "__tether_wraps__"


def lifecycle_of_app(app: Any) -> Lifecycle | None:
    """The Lifecycle whose lifespan *app* runs (``FastAPI(lifespan=lc.lifespan)``, with
    ``wrap=``, or ``lc.lifespan()``), or None: for the CLI, named the app."""
    # An app that includes a router has FastAPI's merge of its lifespan with the router's
    # (``_merge_lifespan_context``): the app's own is in the merge's closure, first.
    todo = [getattr(getattr(app, "router", None), "lifespan_context", None)]
    for _ in range(32):
        if not todo:
            break
        lifespan = todo.pop(0)
        owner = getattr(lifespan, "__self__", None)
        if isinstance(owner, Lifecycle):
            return owner
        if isinstance(lifespan, _CalledLifespan):
            return lifespan._lc
        made = getattr(lifespan, "__dict__", {}).get(_WRAPS)
        if made is not None and isinstance(made[0], Lifecycle):
            return made[0]
        inner = getattr(lifespan, "__wrapped__", lifespan)
        for cell in getattr(inner, "__closure__", None) or ():
            with suppress(ValueError):  # (a cell not filled yet)
                todo.append(cell.cell_contents)
    return None


class _CalledLifespan:
    """``lc.lifespan()`` with no app: the lifespan still, both as the function of the app
    that ``FastAPI(lifespan=...)`` calls and as an async context manager of no app."""

    def __init__(self, lc: Lifecycle) -> None:
        self._lc = lc
        self._cm: AbstractAsyncContextManager[Any] | None = None

    def __call__(self, app: Any) -> AbstractAsyncContextManager[Any]:
        return self._lc._lifespan(app, None)

    async def __aenter__(self) -> Any:
        self._cm = self._lc._lifespan(None, None)
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(*exc)


def _user_lifespan(wrap: Any) -> _AppLifespan:
    """*wrap* as a function of the app giving an async context manager: an async generator
    function (a lifespan form Starlette accepts) is made one, as Starlette does."""
    if inspect.isasyncgenfunction(wrap):
        return asynccontextmanager(wrap)
    if hasattr(wrap, "__aenter__") and not inspect.isclass(wrap):
        fn = getattr(getattr(wrap, "func", None), "__name__", "my_lifespan")
        msg = (
            f"lc.lifespan(wrap=...) was given the context manager of a lifespan already "
            f"called ({fn}(...)). Pass the function itself, which tether calls with the app: "
            f"lc.lifespan(wrap={fn}), not lc.lifespan(wrap={fn}(app))."
        )
        raise TypeError(msg)
    if callable(wrap):
        return wrap  # type: ignore[no-any-return]
    msg = (
        f"lc.lifespan(wrap=...) was given {wrap!r}, which is not a lifespan. Pass a function "
        f"of the app that returns an async context manager (an @asynccontextmanager "
        f"function, or an async generator function), e.g. lc.lifespan(wrap=my_lifespan)."
    )
    raise TypeError(msg)


#: Errors of the configuration or the code (a bad setting, a missing module or key, a
#: wrong argument), which no retry mends: a StartupError for one gives no retry advice.
_MISCONFIGURED = (ValueError, TypeError, KeyError, ImportError, AttributeError, NameError)
#: ... but for the ValueErrors that report what a server answered (json.JSONDecodeError, for
#: an upstream's HTML error page while it starts; UnicodeDecodeError), which a retry can mend.
_ANSWERED = (json.JSONDecodeError, UnicodeError)


#: SQLite's errors that no retry mends, by their primary result code (``sqlite_errorname``,
#: Python 3.11+): a read-only file written to, a file that is not a database. Not
#: SQLITE_CANTOPEN: a volume mounted late may mend it.
_SQLITE_FOR_GOOD = ("SQLITE_READONLY", "SQLITE_NOTADB")
#: ... but for these, which SQLite documents as passing: another connection recovering the
#: WAL file, or setting up its shared memory (trial 34).
_SQLITE_PASSING = ("SQLITE_READONLY_RECOVERY", "SQLITE_READONLY_CANTINIT")


def _misconfigured(exc: BaseException) -> bool:
    exc = _one(exc)  # (what a task group of the resource's raised)
    if marked_for_good(exc):  # tether's own refusal of what it was given to open
        return True
    for error in (exc, getattr(exc, "orig", None)):  # (SQLAlchemy's wraps the driver's)
        code = getattr(error, "sqlite_errorname", None)
        if (
            isinstance(code, str)
            and code.startswith(_SQLITE_FOR_GOOD)
            and code not in _SQLITE_PASSING
        ):
            return True  # it advised retries= or a longer timeout= (trial 30)
    return isinstance(exc, _MISCONFIGURED) and not isinstance(exc, _ANSWERED)


def _called_factory(obj: Any) -> tuple[str, str] | None:
    """(what, function name) if *obj* is a factory already called (a generator, an async
    generator, a coroutine), closed so that a coroutine is not reported never awaited."""
    if inspect.isgenerator(obj):
        what = "a generator object"
    elif inspect.isasyncgen(obj):
        what = "an async generator object"
    elif inspect.iscoroutine(obj):
        what = "a coroutine object"
    else:
        return None
    name = str(getattr(obj, "__name__", "factory"))
    if not inspect.isasyncgen(obj):  # an async generator never started needs no closing
        obj.close()
    return what, name


def _count_timeout(res: Resource[Any], exc: BaseException) -> None:
    """Count in *res*'s ``timeouts`` an open of an app resource that ran out of time."""
    if isinstance(exc, ResourceUnavailable) and exc.timed_out:
        res.counters.timeouts += 1


async def _held_back_cancel() -> None:
    """Deliver, in the block, a one-shot cancellation the closes held back: an
    ``asyncio.timeout()`` around the block whose deadline passed during a close. The closes
    deliver it again at the task's next await; with none left in the block (the close its
    last step, the shape of a job), it fired at the next await after the timeout's block, a
    ``CancelledError`` there (Python 3.11, 3.12), or the timeout forgot it (3.13; trial 24).
    One step of the loop, only for a task with a cancellation requested."""
    if asyncio._get_running_loop() is None:
        return  # trio: its cancellations are scopes'
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        await asyncio.sleep(0)


def _is_factory(obj: Any) -> bool:
    return (
        inspect.isfunction(obj)
        or inspect.ismethod(obj)
        or inspect.isclass(obj)
        or inspect.isbuiltin(obj)
        or isinstance(obj, functools.partial)  # a factory given its options, as lc.resource takes
    )


def _is_starlette(app: Any) -> bool:
    try:
        from starlette.applications import Starlette
    except ImportError:  # pragma: no cover - tether without starlette
        return False
    return isinstance(app, Starlette)


def _current_loop() -> Any:
    try:
        import asyncio

        return asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - trio
        return None


__all__ = ["Lifecycle", "Override", "ResourceDecorator", "State"]


def check_lifecycle(lc: object, where: str, example: str) -> None:
    """Refuse *lc* that is not a Lifecycle, naming *where* and the fix (*example*)."""
    if not isinstance(lc, Lifecycle):
        given = "lc is None" if lc is None else f"lc={lc!r} is {_a_type(lc)}"
        msg = (
            f"{where}: {given}, not a tether.Lifecycle: pass the Lifecycle the app's "
            f"resources are registered on, e.g. {example}."
        )
        raise TypeError(msg)
