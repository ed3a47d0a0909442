"""FastAPI and Starlette integration: the release point, 503s, disconnects, health routes.

A user writes ``FastAPI(lifespan=lc.lifespan)`` and ``Depends(res)``. When the lifespan
starts, tether takes over the unit of work of each route that uses its resources (and of
every plain Starlette route): it wraps FastAPI's request handler of an ``APIRoute``
(which returns the serialised response before anything is sent), else the route's
``handle`` and its ``send``. Either way:

* request resources opened by the call are closed before the response starts
  (``release="handler"``), or just before its last body message (``"response"``);
* the failure that ended the call (an exception, an ``HTTPException``, an error status,
  a client that went away) is thrown into each cleanup, so it rolls back;
* a cleanup that fails on the success path turns the response into a 500 (a 503 with
  ``Retry-After`` for :class:`~tether.ResourceUnavailable`) before any byte leaves, or is
  raised for the app's own handler (for its class, or its server-error handler) to answer;
* a client that disconnects cancels the call (uvicorn does not), so its queries stop.

Routes without tether resources are not touched: they cost nothing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import os
import random
import re
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Never, TypeVar, overload

import anyio

try:
    import starlette.routing  # noqa: F401 - the import guard
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.fastapi needs Starlette or FastAPI: pip install 'tether[fastapi]'"
    raise ImportError(msg) from exc

from starlette.middleware.errors import ServerErrorMiddleware

# FastAPI resolves the annotations of the routers' endpoints in this module's globals (for
# the request, and for OpenAPI's response models): these names must be importable here.
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

from ._errors import (
    LOST_NOTE,
    ClientDisconnected,
    FailedResponse,
    ResourceUnavailable,
    ScopeError,
    TetherError,
    _a_type,
    check_bool,
    check_number,
    closest,
    describe,
    is_seconds,
    not_options,
    transaction_conflict,
)
from ._lifecycle import _LIFECYCLES, Lifecycle, State, _one, broken, check_lifecycle
from ._resource import _MISSING, OPENING, Kind, Resource, current_unit
from ._scope import (
    Entry,
    Unit,
    _first,
    _now,
    close_all,
    coroutine_value,
    count_open_failure,
    in_anyio_scope,
    no_value,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from ._health import HealthReport

__all__ = [
    "dashboard_router",
    "health_router",
    "idempotent",
    "install",
    "leak_threshold",
    "release",
]

log = logging.getLogger("tether")

# Seconds a request runs before tether starts listening for its client going away.
# Watching costs a task; almost every request is over long before this.
WATCH_AFTER = 0.2


# The messages that carry a response's body: the last of them (``more_body`` false; a
# ``pathsend`` has none) is where ``release="response"`` values close.
_BODY_MESSAGES = frozenset({"http.response.body", "http.response.pathsend"})


class _Replaced(Exception):
    """Raised out of ``send`` once tether has answered in the app's stead."""


class _Aborted(Exception):
    """Raised out of the app when a cleanup failed after the response started: the
    response is aborted (its last body message is not sent), and a server or middleware
    must not complete it (Starlette's ``BaseHTTPMiddleware`` ends the body cleanly when
    the app returns). The failure itself was logged by tether: its traceback is not
    chained here, so that it is not logged twice. Not raised where the app has a
    server-error handler: the failure itself is raised then, for that handler to see
    (`_app_reports`)."""


# The context holds a weak reference to the unit, not the unit: callbacks scheduled
# during a request copy the context (uvicorn's keep-alive timer, asyncpg's idle-connection
# timer), and a strong reference would keep the request's objects (its send, receive and
# scope) alive for seconds or minutes after it ended, for the garbage collector to walk.
_CURRENT = current_unit
_ref = weakref.ref
_ASYNC_GEN = Kind.ASYNC_GEN
_ASYNC_FUNC = Kind.ASYNC_FUNC
_SYNC_GEN = Kind.SYNC_GEN

# asyncio.current_task() is written in Python before 3.12; its dict and the running loop
# are C: read them directly on the request path.
_PY311 = sys.version_info < (3, 12)
_tasks_by_loop: dict[Any, Any] = getattr(asyncio.tasks, "_current_tasks", {}) if _PY311 else {}
_running_loop = asyncio._get_running_loop


def _current_task() -> Any:
    """The running asyncio task (3.12+); None on another event loop (trio), where
    ``asyncio.current_task()`` raises."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- idempotent

E = TypeVar("E", bound=Callable[..., Any])


@overload
def idempotent(endpoint: E, /) -> E: ...


@overload
def idempotent(*, retries: int = 1) -> Callable[[E], E]: ...


def idempotent(endpoint: Any = None, /, *, retries: int = 1) -> Any:
    """Declare an endpoint safe to run again: tether then retries it when its connection
    is lost, or its transaction conflicts with a concurrent one.

    ``@idempotent`` (under the route decorator) or ``@idempotent(retries=2)``. When a
    request of this route fails because its database connection was lost under it (a
    server restart or failover between the pool's check and the first statement, a
    connection killed mid-request: what tether otherwise answers 503 with
    ``ResourceUnavailable.lost``), or because the server rolled its transaction back for a
    conflict with a concurrent one (SQLSTATE 40001, a serialization failure, in a statement
    or at ``COMMIT``; 40P01, a deadlock: otherwise a 500), tether closes that unit of work
    (rolling back) and runs the route again, with fresh resources, up to *retries* more
    times, before answering as it would have. Only routes declared so are retried: running
    a route again repeats all it does, not only its database work. A request with a form
    body is not retried.
    """
    if endpoint is not None and not callable(endpoint):
        msg = (
            f"@tether.fastapi.idempotent was given {endpoint!r}, which is not callable: put "
            f"it under the route decorator, bare (@idempotent) or with its retries "
            f"(@idempotent(retries=2))."
        )
        raise TypeError(msg)
    check_number(
        retries,
        "retries",
        "idempotent()",
        integer=True,
        least=None,
        example="2",
        need="a whole number, 1 or more",
    )
    if retries < 1:
        msg = f"idempotent(retries={retries!r}): retries must be 1 or more."
        raise ValueError(msg)

    def mark(fn: E) -> E:
        fn._tether_retries = retries  # type: ignore[attr-defined]
        return fn

    return mark if endpoint is None else mark(endpoint)


def release(point: str, /) -> Callable[[E], E]:
    """Keep every request resource of this route open until its response ends.

    ``@tether.fastapi.release("response")`` (under the route decorator) releases all the
    values the route uses after the response's last byte, as if each were declared
    ``release="response"``, whatever they were declared with. A resource shared by routes
    that stream from the database and routes that do not (a repository over the session)
    is then declared once, with the default, and only the streaming routes keep it longer.
    A commit then happens before the last body message: a failing one aborts the body.
    """
    if point != "response":
        msg = (
            f"tether.fastapi.release({point!r}): a route can only keep its resources until its "
            f'response ends: release("response"). Each resource\'s own release= (default '
            f'"handler") applies to routes without it.'
        )
        raise ValueError(msg)

    def mark(fn: E) -> E:
        fn._tether_release = point  # type: ignore[attr-defined]
        return fn

    return mark


def leak_threshold(seconds: float | None, /) -> Callable[[E], E]:
    """Give this route's units of work a leak threshold of their own.

    ``@tether.fastapi.leak_threshold(3600)`` (under the route decorator): a value this route
    holds is reported as a leak after *seconds*, in place of the Lifecycle's
    ``leak_threshold``; ``None``: never reported. For a WebSocket route whose connection is
    meant to hold its values while the socket is open, or a long stream
    (``release("response")``), where the Lifecycle's threshold would report every
    connection. Like ``lc.scope(label, leak_threshold=...)`` for a job.
    """
    check_number(
        seconds,
        "seconds",
        "tether.fastapi.leak_threshold()",
        above=True,
        none=True,
        example="3600, or None for no leak reports of this route",
    )

    def mark(fn: E) -> E:
        fn._tether_leak_threshold = seconds  # type: ignore[attr-defined]
        return fn

    return mark


def _threshold_of(endpoint: Any) -> Any:
    """The leak threshold *endpoint* is marked with (`leak_threshold`), or `_LIFECYCLES`:
    none of its own."""
    return getattr(endpoint, "_tether_leak_threshold", _LIFECYCLES)


def _keeps(endpoint: Any) -> bool:
    """Whether a route keeps its values until the response ends: its endpoint is marked
    ``@release("response")``, or is a generator (FastAPI 0.137+ streams what it yields, JSON
    Lines or server-sent events: its body runs while the response streams, after the
    handler has returned)."""
    if getattr(endpoint, "_tether_release", None) == "response":
        return True
    fn = inspect.unwrap(endpoint) if callable(endpoint) else None
    return inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)


class _Retry(Exception):
    """Raised out of a request handler's unit of work when it may run again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _why_run_again(exc: BaseException, errors: list[BaseException]) -> BaseException | None:
    """The failure that says the unit of work may run again, if one does: its connection was
    lost, or the server rolled its transaction back for a conflict with a concurrent one (a
    serialization failure, a deadlock)."""
    for error in (exc, *errors):
        if isinstance(error, ResourceUnavailable) and error.lost:
            return error
    if LOST_NOTE in getattr(exc, "__notes__", ()):
        return exc
    for error in (exc, *errors):
        if transaction_conflict(error) is not None:
            return error
    return None


def _why_again(error: BaseException) -> str:
    """What happened to a unit of work an ``idempotent`` route runs again (`_retrying`)."""
    conflict = transaction_conflict(error)
    if conflict is not None and type(conflict).__name__ == "WatchError":
        return f"had its Redis transaction not run: a key it watched changed ({describe(conflict)})"
    if conflict is not None:
        return (
            f"had its transaction rolled back by the server for a conflict with a concurrent "
            f"one ({describe(conflict)})"
        )
    return f"lost its connection ({describe(error)})"


def _retrying(handler: Any, retries: int, label: str) -> Any:
    """Run *handler* again (up to *retries* times) when its unit of work lost its
    connection; the last run answers as usual."""

    async def retried(request: Any) -> Any:
        for attempt in range(1, retries + 1):
            try:
                return await handler(request, again=True)
            except _Retry as retry:
                log.warning(
                    "tether: %s %s; running it again (idempotent, retry %d of %d)",
                    label,
                    _why_again(retry.error),
                    attempt,
                    retries,
                )
                if transaction_conflict(retry.error) is not None:
                    await anyio.sleep(_conflict_pause(attempt))
        try:
            return await handler(request)
        except Exception as exc:
            # The last run failed as the others did: said, or the client's 500 would be
            # all there is to it (trial 18).
            if _why_run_again(exc, []) is not None:
                log.warning(
                    "tether: %s %s again, after %d retr%s (idempotent): not run again; it "
                    "fails as it is",
                    label,
                    _why_again(exc),
                    retries,
                    "y" if retries == 1 else "ies",
                )
            raise

    return retried


#: Seconds before running a unit of work again after a conflict, at its first retry.
CONFLICT_PAUSE = 0.1


def _conflict_pause(attempt: int) -> float:
    """How long to wait before the *attempt*-th run again after a conflict (a deadlock, a
    serialization failure): the transaction that won it still has to finish. Run at once,
    on the connection just rolled back, the run again took the first row back before that
    transaction's backend woke up, and met it in a second deadlock (seen under CI's load).
    Doubled at each retry, with jitter, so that two losers do not meet again in step."""
    return float(CONFLICT_PAUSE * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


# --------------------------------------------------------------------------- install


def install(app: Any, lc: Lifecycle) -> None:
    """Let *lc* own the unit of work of every route of *app* that uses its resources.

    ``lc.lifespan`` calls this when the app starts. Call it yourself, after adding the
    routes, for an app that cannot hand tether its lifespan (and then run
    ``async with lc.run():`` in your own lifespan). Calling it again is harmless.
    """
    check_lifecycle(lc, "tether.fastapi.install()", "install(app, lc)")
    if getattr(app, "routes", None) is None:
        given = "app is None" if app is None else f"app={app!r} is {_a_type(app)}"
        msg = (
            f"tether.fastapi.install(): {given} with no routes, not a FastAPI or Starlette "
            f"app (or router): pass the app whose routes use the "
            f"Lifecycle's resources, e.g. install(app, lc); for an app wrapped in a "
            f"middleware, the app inside it."
        )
        raise TypeError(msg)
    try:
        if app not in lc._installed_apps:
            overrides = getattr(app, "dependency_overrides", None) or {}
            lc._installed_apps[app] = frozenset(k for k in overrides if isinstance(k, Resource))
    except TypeError:  # pragma: no cover - an app that cannot be weakly referenced
        pass
    routes = _routes_of(app)
    _forget_inclusions(routes)
    walked = [
        (route, included, extra, _label(route, prefix))
        for route, included, extra, prefix in _walk(routes, included=False, extra=())
        if getattr(route, "app", None) is not None or _is_frontend(route)
    ]
    # A dependency that `app.dependency_overrides` replaces (set before the app starts)
    # with one that uses a resource: the routes that depend on it use the resource too.
    hot = _overridden_by_users(app, [route for route, _, _, _ in walked], lc)
    # The warnings first, for each path a router is included at (installing a route
    # inlines its resource parameters, out of its dependant), once per Lifecycle.
    warned = _warned.setdefault(lc, set())
    for route, _, extra, said in walked:
        if said not in warned and (_uses(route, lc, hot) or _depends_use(extra, lc, hot)):
            warned.add(said)
            _warn_blocking(route, lc, said)
            _warn_async_in_def(route, lc, said)
            _warn_late_cleanup(route, lc, extra, said)
        elif said not in warned and _unguarded_dashboard(route, extra):
            warned.add(said)
            log.warning(
                "tether: the dashboard at %s is served to whoever reaches the app, with no "
                "dependencies: it shows the resources' errors, the routes' paths and the "
                "source files of the code that holds values. Guard it: "
                "dashboard_router(lc, dependencies=[Depends(require_admin)]) (or the app's or "
                "include_router's dependencies=); if a middleware or the network guards it "
                "already, pass dependencies=[] to say so",
                said,
            )
    for route, included, extra, said in walked:
        if _installed(route):
            continue
        if _uses(route, lc, hot) or _depends_use(extra, lc, hot):
            if _serve_by_handler(route, lc):
                continue
            if getattr(getattr(route, "endpoint", None), "_tether_retries", 0):
                log.warning(
                    "tether: %s is marked @idempotent, but tether serves it through its "
                    "ASGI app (not a FastAPI request handler), where it cannot run it again: "
                    "it is not retried. Its route class builds the route's app another way "
                    "than FastAPI's APIRoute (it wraps or replaces `self.app`): to have it "
                    "retried, do that work in a middleware or a dependency and keep APIRoute's "
                    "app, or drop @idempotent",
                    said,
                )
            # The route's `handle`, not its `app`: a router included by reference
            # (FastAPI 0.137+) builds an app of its own per inclusion, and calls the
            # original route's `handle` to serve it.
            inlined = _inline(route, lc)
            route.handle = _TetherRoute(
                route.handle,
                lc,
                _label(route),
                included=included,
                inlined=inlined,
                keep=_keeps(getattr(route, "endpoint", None)),
                threshold=_threshold_of(getattr(route, "endpoint", None)),
            )
            if included and getattr(route, "dependant", None) is None:
                # A plain Starlette route of an included router is served by a copy
                # made from its endpoint; an endpoint that is not a function is used
                # as the copy's ASGI app: this one's, wrapped.
                route.endpoint = _TetherRoute(
                    route.app,
                    lc,
                    _label(route),
                    threshold=_threshold_of(getattr(route, "endpoint", None)),
                )
            if included and hasattr(route, "get_route_handler"):
                _hook_handler(route, lc, wrap=False)
    if not any(isinstance(hook, _Sweeper) for hook in lc._sweepers):
        lc._sweepers.append(_Sweeper(lc))
        lc._sweepers.append(_refusals(lc))
    _install_after_router_lifespans(app, lc)
    _answer_the_shutdown(app)


def _install_after_router_lifespans(app: Any, lc: Lifecycle) -> None:
    """Take over the routes the lifespans of included routers add, too
    (``APIRouter(lifespan=...)``): FastAPI runs those inside the app's own lifespan
    (``lc.lifespan``), after it called `install`. Its merged lifespan enters the last
    router's last; tether wraps that one so that it installs again once it has entered,
    when every lifespan has started. At startup only: nothing on the request path."""
    merged = getattr(getattr(app, "router", None), "lifespan_context", None)
    fn: Any = getattr(merged, "__wrapped__", None)
    code = getattr(fn, "__code__", None)
    if code is None or code.co_name != "merged_lifespan" or fn.__closure__ is None:
        return  # no router lifespans (or a FastAPI that merges them another way)
    try:
        cell = fn.__closure__[code.co_freevars.index("nested_context")]
        nested = cell.cell_contents
    except (ValueError, IndexError):  # pragma: no cover - another FastAPI layout
        return
    if isinstance(nested, _InstallAfter):
        if lc not in nested.lcs:
            nested.lcs.append(lc)
        return
    cell.cell_contents = _InstallAfter(nested, lc)


class _InstallAfter:
    """A router's lifespan, after whose startup tether installs its Lifecycles again."""

    def __init__(self, lifespan: Any, lc: Lifecycle) -> None:
        self.lifespan = lifespan
        self.lcs = [lc]

    def __call__(self, app: Any) -> Any:
        return self._run(app)

    @contextlib.asynccontextmanager
    async def _run(self, app: Any) -> AsyncIterator[Any]:
        async with self.lifespan(app) as state:
            for lc in self.lcs:
                install(app, lc)  # the routes its startup added
            yield state


# The routes (by label) each Lifecycle has been warned about: `install` runs at every start.
_warned: weakref.WeakKeyDictionary[Lifecycle, set[str]] = weakref.WeakKeyDictionary()


def _unguarded_dashboard(route: Any, extra: tuple[Any, ...]) -> bool:
    """Whether *route* is the page of a ``dashboard_router()`` given no *dependencies*,
    served with none from the app or the routers it is included through."""
    endpoint = getattr(route, "endpoint", None)
    return bool(getattr(endpoint, "_tether_unguarded", False)) and not (
        getattr(route, "dependencies", None) or extra
    )


def _warn_blocking(route: Any, lc: Lifecycle, label: str) -> None:
    """Warn about an ``async def`` endpoint that takes a sync resource opened in a thread
    (a sync SQLAlchemy session, say): every call on it blocks the event loop, and with it
    every other request (pain.md T1.3). Once per route, when the app starts."""
    endpoint = getattr(route, "endpoint", None)
    dependant = getattr(route, "dependant", None)
    if dependant is None or not inspect.iscoroutinefunction(endpoint):
        return
    for d in getattr(dependant, "dependencies", ()):
        res = getattr(d, "call", None)
        if (
            isinstance(res, Resource)
            and res.lifecycle is lc
            and res.is_sync
            and res.thread
            # a plain function in a thread for its `timeout=` only: its value is made there
            and not (res.kind is Kind.SYNC_FUNC and res.timeout is not None)
        ):
            log.warning(
                "tether: %s is `async def` but takes %r, a sync resource opened in a thread: "
                "each call on it there blocks the event loop, and every other request with "
                "it. Declare the endpoint with `def` (FastAPI runs it in a thread), or use an "
                "async resource; a sync resource that does no I/O can say thread=False.",
                label,
                res.name,
            )


def _warn_async_in_def(route: Any, lc: Lifecycle, label: str) -> None:
    """Warn about a ``def`` endpoint that takes a resource whose value's API is async (an
    ``AsyncSession``, an asyncpg connection: `Resource.async_api`): FastAPI runs it in a
    thread, where each of the value's calls returns a coroutine nothing awaits, so nothing
    is queried or written, and what it returns may be a coroutine's repr with a 200. Once
    per route, when the app starts (the mirror of `_warn_blocking`)."""
    endpoint = getattr(route, "endpoint", None)
    dependant = getattr(route, "dependant", None)
    if dependant is None or endpoint is None or _is_websocket(route):
        return
    if inspect.iscoroutinefunction(endpoint) or _is_generator(endpoint):
        return
    if inspect.iscoroutinefunction(getattr(endpoint, "__call__", None)):  # noqa: B004
        return
    for d in getattr(dependant, "dependencies", ()):
        res = getattr(d, "call", None)
        if isinstance(res, Resource) and res.lifecycle is lc and res.async_api is not None:
            log.warning(
                "tether: %s is `def` but takes %r, %s: its calls are coroutines, which a "
                "`def` endpoint cannot await (each returns a coroutine that never runs: "
                "nothing is queried, flushed or deleted; what its sync methods do, such as "
                "a session's add(), still happens, and is committed without the rest). "
                "Declare the endpoint `async def`, or give it a sync resource.",
                label,
                res.name,
                res.async_api,
            )


def _warn_late_cleanup(route: Any, lc: Lifecycle, extra: tuple[Any, ...], label: str) -> None:
    """Warn about a default-scope ``yield`` dependency that depends on a request resource
    (``async def uow(s=Depends(session)): yield s; await s.commit()``): FastAPI 0.118+
    runs its cleanup after the response is sent, after tether closed the resource, so
    the cleanup finds it closed. Once per route, when the app starts; not on FastAPI
    0.106 to 0.117, where that cleanup runs before the response, and before tether's;
    not on a WebSocket route, whose cleanups run before its unit of work ends. *extra*:
    the dependencies an inclusion of the route's router adds (FastAPI 0.137+)."""
    dependant = getattr(route, "dependant", None)
    if dependant is None or not _cleanup_after_response() or _is_websocket(route):
        return
    stack = list(getattr(dependant, "dependencies", ()))
    if extra:
        from fastapi.dependencies.utils import get_dependant

        for d in extra:
            call = getattr(d, "dependency", None)
            if call is not None and not isinstance(call, Resource):
                added = get_dependant(path="", call=call)
                added.scope = getattr(d, "scope", None)
                stack.append(added)
    seen: set[int] = set()
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if call is None or isinstance(call, Resource) or id(call) in seen:
            continue
        seen.add(id(call))
        stack.extend(getattr(d, "dependencies", ()))
        if getattr(d, "scope", None) == "function" or not _is_generator(call):
            continue
        if not _cleans_up(call):  # `yield s` and nothing after it: no cleanup to find it closed
            continue
        res = _request_resource(d, lc)
        if res is None:
            continue
        name = getattr(call, "__name__", None) or type(call).__name__
        if _function_scope():
            fix = (
                f'Declare it Depends({name}, scope="function"), so that tether closes '
                f"{res.name!r} after its cleanup; or do that work in the resource itself."
            )
        else:  # FastAPI 0.118 to 0.120: no scope= yet
            fix = (
                f"Do that work in the resource itself (a generator resource's code after its "
                f"`yield`), or upgrade to FastAPI 0.121+ and declare it Depends({name}, "
                f'scope="function").'
            )
        log.warning(
            "tether: %s takes %r, a `yield` dependency on %r: FastAPI runs its cleanup after "
            "the response is sent, after tether closed %r, so the cleanup finds it closed. %s",
            label,
            name,
            res.name,
            res.name,
            fix,
        )


def _is_generator(call: Any) -> bool:
    for fn in (inspect.unwrap(call), getattr(call, "__call__", None)):  # noqa: B004
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            return True
    return False


def _cleans_up(call: Any) -> bool:
    """Whether the generator function *call* may run code after its ``yield`` (a cleanup):
    false only when its source shows one ``yield``, the body's last statement, outside any
    ``try`` or ``with`` (``async def uow(s=Depends(session)): yield s``). Read once per route,
    when the app starts; true when the source cannot be read."""
    import ast
    import textwrap

    fn = inspect.unwrap(call)
    if not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
        return True  # a class whose __call__ is the generator: not looked into
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return True
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return True
    yields = [n for n in ast.walk(node) if isinstance(n, ast.Yield | ast.YieldFrom)]
    last = node.body[-1]
    return not (
        len(yields) == 1 and isinstance(last, ast.Expr) and isinstance(last.value, ast.Yield)
    )


def _request_resource(dependant: Any, lc: Lifecycle) -> Resource[Any] | None:
    """A request resource of *lc* that *dependant* depends on (through other
    dependencies too), or None."""
    stack = list(getattr(dependant, "dependencies", ()))
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if isinstance(call, Resource):
            if call.lifecycle is lc and call.scope == "request":
                return call
            continue
        stack.extend(getattr(d, "dependencies", ()))
    return None


_after_response: bool | None = None


def _cleanup_after_response() -> bool:
    """Whether FastAPI runs the cleanup of default-scope ``yield`` dependencies after the
    response is sent (0.118+), after tether's release point."""
    global _after_response
    if _after_response is None:
        import fastapi

        try:
            major, minor = (int(part) for part in fastapi.__version__.split(".")[:2])
        except ValueError:  # pragma: no cover - a version tether cannot read
            major, minor = 1, 0
        _after_response = (major, minor) >= (0, 118)
    return _after_response


@functools.cache
def _function_scope() -> bool:
    """Whether this FastAPI's ``Depends`` takes ``scope=`` (0.121+)."""
    import fastapi

    return "scope" in inspect.signature(fastapi.Depends).parameters


def _installed(route: Any) -> bool:
    own = vars(route)
    return isinstance(own.get("handle"), _TetherRoute) or hasattr(
        own.get("get_route_handler"), "_tether_lifecycle"
    )


def _serve_by_handler(route: Any, lc: Lifecycle) -> bool:
    """Own the unit of work of an HTTP `APIRoute` by wrapping its request handler.

    FastAPI builds a route's ASGI app from ``route.get_route_handler()`` (when the route
    is made, and for each inclusion of its router on FastAPI 0.137+). tether hooks that
    method and rebuilds the app the way FastAPI built it. It does so only when the
    rebuilt app has the shape of the one FastAPI made (the same functions and classes):
    else (a route class that builds its app another way, a FastAPI layout not known
    here) the route's ``handle`` is wrapped instead, which works everywhere, at the cost
    of a wrapper of ``send``.
    """
    routing = _fastapi_routing()
    if (
        routing is None
        or not getattr(route, "methods", None)
        or getattr(route, "dependant", None) is None
        or not callable(getattr(route, "get_route_handler", None))
    ):
        return False
    make_app = _app_maker(routing, route)
    if make_app is None or not _same_shape(make_app(_probe), route.app):
        return False
    _inline(route, lc)
    _hook_handler(route, lc, wrap=True)
    route.app = make_app(route.get_route_handler())
    return True


def _function_scoped_cleanup(dependant: Any) -> bool:
    """Whether a route has a ``yield`` dependency with ``Depends(scope="function")``
    (FastAPI 0.121+): its cleanup runs after the request handler returns, before the
    response; it may still use the request's resources, so they close after it."""
    stack = list(getattr(dependant, "dependencies", ()))
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if getattr(d, "scope", None) == "function" and call is not None:
            for fn in (inspect.unwrap(call), getattr(call, "__call__", None)):  # noqa: B004
                if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
                    return True
        stack.extend(getattr(d, "dependencies", ()))
    return False


def _app_maker(routing: Any, route: Any) -> Any:
    """How FastAPI makes a route's ASGI app from its request handler, or None."""
    request_response = getattr(routing, "request_response", None)
    if request_response is None:  # pragma: no cover - another FastAPI layout
        return None
    limit = getattr(routing, "wrap_app_with_body_limit", None)  # FastAPI 0.160+
    if limit is None:
        return request_response
    max_body_size = getattr(route, "max_body_size", None)
    return lambda handler: limit(request_response(handler), max_body_size)


async def _probe(request: Any) -> Any:  # pragma: no cover - never called
    raise NotImplementedError


def _same_shape(made: Any, found: Any, depth: int = 0) -> bool:
    """Whether two ASGI apps are built alike: the same classes and functions, the same
    settings, down their ``.app`` chain."""
    if type(made) is not type(found) or depth > 8:
        return False
    if inspect.isfunction(made):
        return made.__code__ is found.__code__
    mine, theirs = getattr(made, "__dict__", None), getattr(found, "__dict__", None)
    if mine is None or theirs is None or mine.keys() != theirs.keys():
        return False
    for key, value in mine.items():
        if key == "app":
            if not _same_shape(value, theirs[key], depth + 1):
                return False
        elif not callable(value) and value != theirs[key]:
            return False
    return True


def _forget_inclusions(routes: Any) -> None:
    """Make FastAPI 0.160+ rebuild the per-inclusion apps it has built already (an app
    that served requests before `install`), so that they are built through tether's
    hook. Nothing to do for an app that has not served yet."""
    for route in routes:
        if getattr(route, "original_router", None) is None:
            continue
        for name in ("_effective_candidates_version", "_effective_low_priority_routes_version"):
            if getattr(route, name, None) is not None:
                setattr(route, name, None)


def _walk(
    routes: Any, *, included: bool, extra: tuple[Any, ...], prefix: str = ""
) -> Iterator[tuple[Any, bool, tuple[Any, ...], str]]:
    """Every route, whether it is served through an inclusion of its router, the
    dependencies that inclusion adds (``include_router(..., dependencies=...)``), and the
    prefix it adds to the route's own path (FastAPI 0.137+; "" before, where an included
    route is a copy with the whole path)."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            # FastAPI 0.137+ includes a router by reference: its routes stay its own, and
            # the inclusion's dependencies are not in their dependants.
            context = getattr(route, "include_context", None)
            added = getattr(context, "dependencies", ())
            inner = prefix + (getattr(context, "prefix", "") or "")
            yield from _walk(
                _routes_of(original), included=True, extra=(*extra, *added), prefix=inner
            )
        elif getattr(route, "dependant", None) is None and hasattr(route, "routes"):
            # Mount, Host: the routes of the app they serve, through its middleware too.
            yield from _walk(_mounted_routes(route), included=included, extra=extra, prefix=prefix)
        else:
            yield route, included, extra, prefix


def _routes_of(app: Any) -> list[Any]:
    """An app's (or a router's) routes, with its low-priority ones: FastAPI 0.165+ keeps
    the groups of ``app.frontend(...)`` routes apart, in ``router._low_priority_routes``,
    tried after every other route."""
    routes = list(getattr(app, "routes", None) or ())
    low = getattr(getattr(app, "router", app), "_low_priority_routes", None)
    if isinstance(low, list) and low:
        routes.extend(low)
    return routes


def _mounted_routes(mount: Any) -> list[Any]:
    """The routes of the app a ``Mount`` (or a ``Host``) serves, through its middleware too
    (``app.mount("/sub", CORSMiddleware(sub))``, whose outermost app has none). Middleware
    keeps the app it wraps as ``app``."""
    app = getattr(mount, "_base_app", None) or getattr(mount, "app", None)
    for _ in range(64):  # a stack of middleware is never this deep; stop on a cycle
        if app is None:
            break
        routes = _routes_of(app)
        if routes:
            return routes
        app = getattr(app, "app", None)
    return list(getattr(mount, "routes", None) or ())


def _is_frontend(route: Any) -> bool:
    """Whether *route* is FastAPI's group of ``frontend(...)`` routes (0.165+): no ``app``
    of its own; its ``handle`` solves the router's dependencies, then serves the file."""
    return type(route).__name__ == "_FrontendRouteGroup"


def _hook_handler(route: Any, lc: Lifecycle, *, wrap: bool) -> None:
    """Hook ``route.get_route_handler``, which FastAPI calls to build the route's request
    handler: when the route is made, and for each inclusion of its router on FastAPI
    0.137+ (while a context variable names the inclusion, with a dependant of its own).

    The hook inlines the resource parameters of each inclusion (without it, those
    requests still get their values, through FastAPI's solver, only slower), and with
    *wrap* wraps the handler it returns (`_handler`): one unit of work per call.
    """
    var = getattr(_fastapi_routing(), "_effective_route_context_var", None)
    build = route.get_route_handler

    def get_route_handler() -> Any:
        context = var.get() if var is not None else None
        if context is None or getattr(context, "original_route", None) is not route:
            context = None
        else:
            _inline(context, lc)
        handler = build()
        served = route if context is None else context
        inlined = getattr(served.dependant.call, "_tether_inlined", None)
        if not wrap:
            return handler if inlined is None else _checking(handler, inlined)
        defer = _function_scoped_cleanup(served.dependant)
        label = _label(served)
        wrapped = _handler(
            handler,
            lc,
            label,
            defer=defer,
            inlined=inlined,
            keep=_keeps(served.endpoint),
            sse=bool(getattr(served, "is_sse_stream", False)),
            threshold=_threshold_of(served.endpoint),
        )
        retries = getattr(served.endpoint, "_tether_retries", 0)
        return _retrying(wrapped, retries, label) if retries else wrapped

    if wrap:
        get_route_handler._tether_lifecycle = lc  # type: ignore[attr-defined]
    route.get_route_handler = get_route_handler


def _checking(handler: Any, inlined: _Inlined) -> Any:
    """A request handler that gives the resource parameters back to FastAPI's solver if
    an override names them (for a handler tether does not wrap otherwise)."""

    async def checked(request: Any) -> Any:
        if inlined.overrides_of.dependency_overrides:
            inlined.check()
        return await handler(request)

    return checked


def _fastapi_routing() -> Any:
    try:
        import fastapi.routing
    except ImportError:  # pragma: no cover - plain Starlette
        return None
    return fastapi.routing


_NONE: frozenset[int] = frozenset()


def _uses(route: Any, lc: Lifecycle, hot: frozenset[int] = _NONE) -> bool:
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        # A plain Starlette route: tether cannot see what it uses, so it owns them all.
        return hasattr(route, "endpoint")
    return _dependant_uses(dependant, lc, hot)


def _depends_use(depends: tuple[Any, ...], lc: Lifecycle, hot: frozenset[int] = _NONE) -> bool:
    """Whether any of these ``Depends(...)`` needs a resource of *lc*."""
    if not depends:
        return False
    from fastapi.dependencies.utils import get_dependant

    for d in depends:
        call = getattr(d, "dependency", None)
        if isinstance(call, Resource):
            if call.lifecycle is lc:
                return True
        elif call is not None and (
            id(call) in hot or _dependant_uses(get_dependant(path="", call=call), lc, hot)
        ):
            return True
    return False


def _dependant_uses(dependant: Any, lc: Lifecycle, hot: frozenset[int] = _NONE) -> bool:
    """Whether *dependant* needs a resource of *lc*, through its dependencies too; *hot*:
    the ids of the dependencies an override replaces with one that does."""
    stack = [dependant]
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if isinstance(call, Resource):
            if call.lifecycle is lc:
                return True
        elif hot and id(call) in hot:
            return True
        stack.extend(getattr(d, "dependencies", ()))
    return False


def _overridden_by_users(app: Any, routes: list[Any], lc: Lifecycle) -> frozenset[int]:
    """The ids of the dependencies that ``dependency_overrides`` (of *app*, and of the
    providers of *routes*: a mounted sub-app's) replace with a callable that uses a
    resource of *lc*: ``app.dependency_overrides[get_user] = user_from_db``."""
    providers = {id(app): app}
    for route in routes:
        provider = getattr(route, "dependency_overrides_provider", None)
        if provider is not None:
            providers.setdefault(id(provider), provider)
    found: set[int] = set()
    for provider in providers.values():
        overrides = getattr(provider, "dependency_overrides", None)
        if not isinstance(overrides, dict):
            continue
        for key, value in overrides.items():
            if not isinstance(key, Resource) and _override_uses(value, lc):
                found.add(id(key))
    return frozenset(found)


def _override_uses(value: Any, lc: Lifecycle) -> bool:
    """Whether an override's callable needs a resource of *lc*."""
    if isinstance(value, Resource):
        return value.lifecycle is lc
    if not callable(value):
        return False
    try:
        from fastapi.dependencies.utils import get_dependant

        return _dependant_uses(get_dependant(path="", call=value), lc)
    except Exception:
        return False


class _Inlined:
    """The resource parameters tether took out of a route's dependency list (`_inline`),
    and how to give them back to FastAPI's solver."""

    __slots__ = ("dependant", "dependencies", "overrides_of", "resources", "undone")

    def __init__(self, dependant: Any, provider: Any, resources: frozenset[Any]) -> None:
        self.dependant = dependant
        self.dependencies = list(dependant.dependencies)  # as FastAPI made them
        self.overrides_of = provider  # has `dependency_overrides` (the app)
        self.resources = resources
        self.undone = False

    def check(self) -> None:
        """Give the parameters back to FastAPI if ``app.dependency_overrides`` now names
        one of them (set while the app runs): FastAPI then resolves the override once per
        request, shared with the sub-dependencies that ask for it, and runs a generator
        override's cleanup, as without tether. Called before FastAPI solves the request;
        the route then keeps FastAPI's path."""
        overrides = self.overrides_of.dependency_overrides
        if overrides and not self.undone and any(r in overrides for r in self.resources):
            self.undone = True
            # A new list: a request being solved goes on with the one it has.
            self.dependant.dependencies = list(self.dependencies)


def _inline(route: Any, lc: Lifecycle) -> _Inlined | None:
    """Give an async endpoint its own resource parameters without FastAPI's solver.

    Each ``Depends`` costs FastAPI a recursive ``solve_dependencies`` call, several times
    what tether needs to hand out an open value. For resources that are parameters of
    an async endpoint itself, tether takes them out of the route's dependency list and
    passes them in a wrapper of the endpoint instead; nested ones, sync endpoints and
    resources overridden through ``app.dependency_overrides`` keep FastAPI's path, and
    an override set while the app runs gives the parameters back (`_Inlined.check`).
    The values are the same either way (one per unit of work).
    """
    dependant = getattr(route, "dependant", None)
    call = getattr(dependant, "call", None)
    if not getattr(route, "methods", None) or dependant is None:
        return None  # HTTP routes only: a WebSocket route keeps FastAPI's solver
    if call is None or not inspect.iscoroutinefunction(call):
        return None
    provider = getattr(route, "dependency_overrides_provider", None)
    if not hasattr(provider, "dependency_overrides"):
        provider = None
    overrides = getattr(provider, "dependency_overrides", None) or {}
    direct = [
        d
        for d in dependant.dependencies
        if isinstance(d.call, Resource)
        and d.call.lifecycle is lc
        and d.name
        and d.call not in overrides
        and not d.dependencies
    ]
    if not direct:
        return None
    pairs = tuple((d.name, d.call) for d in direct)
    inlined = None
    if provider is not None:
        inlined = _Inlined(dependant, provider, frozenset(res for _, res in pairs))
    dependant.dependencies[:] = [
        d for d in dependant.dependencies if all(d is not x for x in direct)
    ]
    endpoint = call

    @functools.wraps(endpoint)
    async def with_resources(**values: Any) -> Any:
        ref = _CURRENT.get()
        unit = ref() if ref is not None else None
        if unit is None:  # pragma: no cover - the route wrapper always sets it
            msg = f"No tether unit of work for {_label(route)}; was the route wrapper removed?"
            raise ScopeError(msg)
        opened = unit.values
        app_values = lc._app_values
        todo = pairs
        if inlined is not None and inlined.undone:
            # FastAPI's solver hands them in now (an override names one); a request it
            # was solving before has not: it goes on with the resources themselves.
            todo = tuple(pair for pair in pairs if pair[0] not in values)
        for name, res in todo:
            value = opened.get(res, _MISSING)
            if value is _MISSING:
                args: Any = None
                if res.fast and not unit.closed and not lc._overrides:
                    args = [] if res.deps else ()
                    for dep in res.deps:  # `ready_args`, inline: what it needs, if open
                        arg = opened.get(dep, _MISSING)
                        if arg is _MISSING and dep.scope == "app":
                            arg = app_values.get(dep, _MISSING)
                        if arg is _MISSING or arg is OPENING:
                            args = None
                            break
                        args.append(arg)
                if args is not None:
                    # `Unit._open` inlined for a plain resource whose dependencies are
                    # open: no coroutine of tether's own.
                    opened[res] = OPENING
                    t0 = _now()
                    kind = res.kind
                    try:
                        if kind is _ASYNC_GEN:
                            handle = res.call(*args)
                            value = await handle.__anext__()
                        elif kind is _ASYNC_FUNC:
                            handle = None
                            value = await res.call(*args)
                        elif kind is _SYNC_GEN:
                            handle = res.call(*args)
                            value = _first(res, handle)
                        else:
                            handle = None
                            value = res.call(*args)
                            if type(value) is CoroutineType:
                                raise coroutine_value(res, value)
                    except BaseException as exc:
                        count_open_failure(res.counters, exc, res.name)
                        if isinstance(exc, StopAsyncIteration):
                            error = no_value(res)
                            unit._open_failed(res, error)
                            raise error from None
                        unit._open_failed(res, exc)
                        raise
                    # `Unit._add`, inline, for a fast resource (no proxy, released at the
                    # handler; an `HttpUnit` names its route, not a stack, in a leak report).
                    c = res.counters
                    now = _now()
                    waited = now - t0
                    c.wait_time += waited
                    if waited > c.max_wait_time:
                        c.max_wait_time = waited
                    c.opened += 1
                    if handle is None:
                        c.closed += 1
                    else:
                        c.in_use += 1
                        if c.in_use > c.max_in_use:
                            c.max_in_use = c.in_use
                        unit.entries.append(Entry(res, handle, value, None, now, unit))
                    opened[res] = value
                    if unit.waiting is not None:
                        unit._opened(res)
                else:
                    value = await unit._open(res)
            elif value is OPENING:
                value = await unit.get(res)
            values[name] = value
        return await endpoint(**values)

    with_resources._tether_inlined = inlined  # type: ignore[attr-defined]  # for `_hook_handler`
    dependant.call = with_resources
    return inlined


def _label(route: Any, prefix: str = "") -> str:
    original = getattr(route, "original_route", None)  # an inclusion's context (0.137+)
    if _is_frontend(route) or _is_frontend(original):
        # FastAPI's group of frontend routes: the paths it serves files under.
        group = route if original is None else original
        prefix += getattr(route, "frontend_prefix", "")
        paths = ", ".join(prefix + getattr(r, "path", "?") for r in getattr(group, "routes", ()))
        return f"FRONTEND {paths or prefix or '/'}"
    methods = getattr(route, "methods", None)
    path = prefix + getattr(route, "path", "?")
    if methods:
        return f"{'|'.join(sorted(methods))} {path}"
    return f"WEBSOCKET {path}" if _is_websocket(route) else path


def _is_websocket(route: Any) -> bool:
    return "websocket" in type(route).__name__.lower()


async def unit_for_connection(lc: Lifecycle, connection: Any, name: str | None = None) -> Unit:
    """Where a resource is asked for on a route tether does not own: say how to fix it.

    One case tether can own from here: a WebSocket route of a router that FastAPI 0.137+
    includes by reference. Its app is built per inclusion, past tether's hook; the
    connection's own exit stack then ends its unit of work, when the endpoint returns.
    """
    scope = connection.scope
    stack = scope.get("fastapi_inner_astack")
    if scope.get("type") == "websocket" and stack is not None and lc.state is not State.CREATED:
        unit = Unit(lc, f"WEBSOCKET {scope.get('path', '?')}")
        try:
            lc._admit(unit)
        except ResourceUnavailable as exc:  # draining: refused as on an app's route
            stack.push_async_exit(_ConnectionRefused(connection, exc))
            raise
        threshold = _threshold_of(scope.get("endpoint"))
        if threshold is not _LIFECYCLES:
            lc._leak_thresholds[unit] = threshold
        # The endpoint's task: cancelled past drain_timeout, and where a leak report
        # says it waits.
        lc._unit_tasks[unit] = _tasks_by_loop.get(_running_loop()) if _PY311 else _current_task()
        token = _CURRENT.set(_ref(unit))  # the endpoint's task: its other resources find it
        stack.push_async_exit(_ConnectionEnd(lc, unit, token, connection))
        return unit
    path = scope.get("path", "?")
    what = "A tether resource" if name is None else f"Resource {name!r}"
    mounted = _mounted_at(scope)
    if lc.state is State.CREATED and mounted and not _installed_app(lc, scope):
        # `outer.mount("/v2", FastAPI(lifespan=lc.lifespan))`: Starlette runs the outer
        # app's lifespan only, never a mounted app's.
        msg = (
            f"{what} was asked for on {path!r} before this Lifecycle started: the app that "
            f"serves it is mounted at {mounted!r}, and Starlette never runs a mounted app's "
            f"lifespan, so its `lifespan=lc.lifespan` did not run. Run it from the outer "
            f"app's lifespan: `FastAPI(lifespan=outer_lc.lifespan(wrap=lc.lifespan))`, "
            f"outer_lc being the outer app's Lifecycle (or `FastAPI(lifespan=lc.lifespan)` "
            f"for an outer app without one), or register these resources on the outer "
            f"app's Lifecycle."
        )
        raise ScopeError(msg)
    if lc.state is State.CREATED and _lifespan_is(scope.get("app"), lc):
        # The app's lifespan is tether's, and nothing ran it: a test client not entered,
        # or a server told not to run lifespans (or one that never does).
        msg = (
            f"{what} was asked for on {path!r} before this Lifecycle started: the app's "
            f"lifespan is `lc.lifespan`, but it has not run. In tests, enter the client "
            f"(`with TestClient(app) as client:`), or, with httpx's `ASGITransport`, which "
            f"never runs a lifespan, wrap the client in `async with lc.lifespan(app):`. Under "
            f"a server, it was started without the ASGI lifespan (`uvicorn --lifespan off`, "
            f"`granian --interface asginl`) or does not run one (daphne): enable it "
            f"(`uvicorn --lifespan on`, `granian --interface asgi`)."
        )
        raise ScopeError(msg)
    other = _lifespan_of(scope.get("app")) if lc.state is State.CREATED else None
    if other is not None and other is not lc and other.state is State.RUNNING:
        # An app factory that made a Lifecycle per app, and a router made with another's
        # resources (one made at import, or another app's).
        msg = (
            f"{what} was asked for on {path!r}, and it is a resource of another Lifecycle "
            f"than the one this app's lifespan runs: the app's has started, the resource's "
            f"never has. Declare the route's resources on the app's Lifecycle: in an app "
            f"factory, make the Lifecycle, its resources and the routers that use them in "
            f"the factory (a router built by a function given the resources)."
        )
        raise ScopeError(msg)
    if lc.state is State.CREATED:
        # The commonest case in tests: `TestClient(app)` without `with`, or httpx's
        # `ASGITransport`, neither of which runs the lifespan that installs tether.
        msg = (
            f"{what} was asked for on {path!r} before this Lifecycle started: "
            f"the app's lifespan has not run, or it is not `lc.lifespan`. Use "
            f"`FastAPI(lifespan=lc.lifespan)`; in tests, enter the client "
            f"(`with TestClient(app) as client:`), or, with httpx's `ASGITransport`, which "
            f"never runs a lifespan, wrap the client in `async with lc.lifespan(app):`."
        )
        raise ScopeError(msg)
    if lc.state is State.CLOSED:
        # An app scope that ran (`lc.run()`, an earlier `with TestClient(app)`) and ended:
        # a client not entered now runs no lifespan.
        msg = (
            f"{what} was asked for on {path!r} after this Lifecycle's app scope closed: "
            f"the app has shut down, and its lifespan is not running now. Start it again: "
            f"in tests, enter the client (`with TestClient(app) as client:`), or, with "
            f"httpx's `ASGITransport`, wrap the client in `async with lc.lifespan(app):`."
        )
        raise ScopeError(msg)
    route = scope.get("route")
    owner = _route_owner(route) if route is not None else None
    if owner is not None and owner is not lc:
        msg = (
            f"{what} was asked for on {path!r}, a route whose unit of work belongs to another "
            f"Lifecycle: a route uses the resources of one Lifecycle (two chained with "
            f"`wrap=` each own only their routes). Register the resources this app uses on "
            f"one Lifecycle."
        )
        raise ScopeError(msg)
    res = name or "resource"
    opening = f"`async with lc.scope() as s: value = await s.get({res})`"
    installed = _installed_app(lc, scope)
    if owner is lc or (route is None and "endpoint" not in scope and installed):
        # The app is tether's, the route too or none matched yet: a middleware, an
        # exception handler or a background task, which run outside the route's unit of work.
        if _in_background_task():
            msg = (
                f"{what} was asked for on {path!r} in a background task (`BackgroundTasks`), "
                f"which runs after the response is sent, once the route's unit of work has "
                f"ended and its values are closed. Open a unit of work in the task: {opening}."
            )
        else:
            msg = (
                f"{what} was asked for on {path!r} outside a route's unit of work (in an HTTP "
                f"middleware or an exception handler, which run before the route's unit of "
                f"work begins or after it ended). Open one there: {opening}."
            )
        raise ScopeError(msg)
    if installed and getattr(route, "dependant", None) is not None and not _uses(route, lc):
        # A FastAPI route of the app tether took over at startup, which it left alone: it
        # declares no resource (a resolver that opens one lazily: `await conn(request)`),
        # or an override set while the app runs replaced a dependency with one that does.
        websocket = scope.get("type") == "websocket"
        label = f"WEBSOCKET {path}" if websocket else f"{scope.get('method', 'GET')} {path}"
        overridden = _overridden_while_running(route, scope.get("app"), lc)
        if overridden:
            cause = (
                f"`app.dependency_overrides` now replaces {overridden} with a dependency that "
                f"uses it, set after the app started: tether takes over the routes that use "
                f"its resources when the app starts. Set the override before the app starts "
                f"(before `with TestClient(app)`), "
            )
        else:
            cause = (
                f"{label} declares no tether resource among its dependencies, so tether did "
                f"not take it over when the app started, and it has no unit of work. Declare "
                f"one: `dependencies=[Depends({res})]` on the route, its router or "
                f"`include_router(...)` (for strawberry's GraphQLRouter, "
                f"`context_getter=...` with a `Depends({res})` parameter), "
            )
            if websocket:  # FastAPI 0.118+ has an exit stack for the connection: no error there
                cause += (
                    "or run FastAPI 0.118+, where such a route gets a unit of work of its own, "
                )
        msg = f"{what} was asked for on {path!r}: {cause}or open a unit of work: {opening}."
        raise ScopeError(msg)
    if (
        installed
        and mounted
        and scope.get("endpoint") is not None
        and (
            route is None
            or (getattr(route, "dependant", None) is None and hasattr(route, "routes"))
        )
    ):
        # A Mount of an ASGI app with no routes (strawberry's `GraphQL` app, say): tether
        # cannot see what it uses, and does not take it over.
        msg = (
            f"{what} was asked for on {path!r}, in an ASGI app mounted at {mounted!r} "
            f"(`app.mount({mounted!r}, asgi_app)`) with no routes tether can see: tether "
            f"does not take it over, so it has no unit of work. Open one where the resource "
            f"is used: {opening}; or serve it from a FastAPI route that declares "
            f"`Depends({res})` (strawberry's GraphQLRouter, with it in `context_getter`)."
        )
        raise ScopeError(msg)
    running = lc.state in (State.STARTING, State.RUNNING, State.DRAINING)
    second = (
        " If this app is a second app served next to the one whose lifespan runs `lc` (an "
        "admin app), give it no lifespan of its own and call "
        "`tether.fastapi.install(admin, lc)` after adding its routes."
        if running and not installed and lc._installed_apps
        else ""
    )
    msg = (
        f"{what} was asked for on {path!r}, a route this Lifecycle does not "
        f"own: the route was added after the app started, or the app's lifespan is not "
        f"`lc.lifespan`. Use `FastAPI(lifespan=lc.lifespan)`, or call "
        f"`tether.fastapi.install(app, lc)` after adding the routes.{second}"
    )
    raise ScopeError(msg)


def _lifespan_is(app: Any, lc: Lifecycle) -> bool:
    """Whether *app*'s lifespan is *lc*'s (``FastAPI(lifespan=lc.lifespan)``, or a
    ``wrap=`` of it), on the error path only."""
    todo = [getattr(getattr(app, "router", None), "lifespan_context", None)]
    for _ in range(32):  # FastAPI's merges (one per included router) and wrappers
        if not todo:
            break
        context = todo.pop()
        if context is None:
            continue
        if getattr(context, "__self__", None) is lc:
            return True
        todo.append(getattr(context, "__wrapped__", None))
        # FastAPI's `merged_lifespan` keeps the lifespans it merges in its closure.
        for cell in getattr(context, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    todo.append(cell.cell_contents)
    return False


def _lifespan_of(app: Any) -> Lifecycle | None:
    """The Lifecycle whose lifespan *app*'s is, if any (on the error path only)."""
    from ._lifecycle import LIFECYCLES

    return next((lc for lc in list(LIFECYCLES) if _lifespan_is(app, lc)), None)


def _mounted_at(scope: Any) -> str:
    """The path the app serving *scope* is mounted at in another (Starlette's ``Mount``
    sets ``app_root_path`` to the outer app's root path), or ""."""
    outer = scope.get("app_root_path")
    root = scope.get("root_path") or ""
    if outer is None or not root.startswith(outer):
        return ""
    return root[len(outer) :]


_BACKGROUND = os.path.join("starlette", "background.py")


def _in_background_task() -> bool:
    """Whether the running code is a Starlette background task (on the error path only)."""
    f: Any = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename.endswith(_BACKGROUND):
            return True
        f = f.f_back
    return False


def _overridden_while_running(route: Any, app: Any, lc: Lifecycle) -> str:
    """The dependencies of *route* that its app's ``dependency_overrides`` now replace with
    one that uses a resource of *lc*, named; "" for none (on the error path only)."""
    provider = getattr(route, "dependency_overrides_provider", None) or app
    overrides = getattr(provider, "dependency_overrides", None)
    if not isinstance(overrides, dict) or not overrides:
        return ""
    by_id = {id(key): value for key, value in overrides.items()}
    names = []
    stack = list(getattr(route.dependant, "dependencies", ()))
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if (
            id(call) in by_id
            and not isinstance(call, Resource)
            and _override_uses(by_id[id(call)], lc)
        ):
            names.append(f"`{getattr(call, '__name__', None) or type(call).__name__}`")
            continue
        stack.extend(getattr(d, "dependencies", ()))
    return ", ".join(sorted(set(names)))


def _route_owner(route: Any) -> Lifecycle | None:
    """The Lifecycle that owns *route*'s unit of work, if one does."""
    own = vars(route) if hasattr(route, "__dict__") else {}
    handle = own.get("handle")
    if isinstance(handle, _TetherRoute):
        return handle.lc
    lc: Lifecycle | None = getattr(own.get("get_route_handler"), "_tether_lifecycle", None)
    return lc


def _installed_app(lc: Lifecycle, scope: Any) -> bool:
    try:
        return scope.get("app") in lc._installed_apps
    except TypeError:  # pragma: no cover - an app that cannot be weakly referenced
        return False


def _leave(token: contextvars.Token[Any]) -> bool:
    """Take the unit *token* put in the context out of it; in another context (a copy
    made for a task), clear the unit there instead and return False."""
    try:
        _CURRENT.reset(token)
    except ValueError:
        _CURRENT.set(None)
        return False
    return True


class _ConnectionEnd:
    """Closes a WebSocket's unit of work when FastAPI's exit stack for it unwinds; then
    answers as `_TetherRoute._websocket` does (`_websocket_ended`): returns True (the
    exception is swallowed) where it answered the exception itself."""

    __slots__ = ("connection", "lc", "token", "unit")

    def __init__(
        self, lc: Lifecycle, unit: Unit, token: contextvars.Token[Any], connection: Any
    ) -> None:
        self.lc = lc
        self.unit = unit
        self.token = token
        self.connection = connection

    async def __call__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        _leave(self.token)  # the cleanups run without the unit in the context, as on HTTP
        ws = self.connection
        send = getattr(ws, "send", None)  # (an `HTTPConnection` made by hand has none)
        try:
            errors = await self.unit.aclose(exc)
            if exc is not None and _drain_cancelled(self.lc, self.unit, exc):
                if send is not None:
                    await _close_for_restart(self.unit.label, ws.scope, send, _socket_stage(ws))
                return False
        finally:
            self.lc._retire(self.unit)
        error = exc if exc is not None else errors[-1] if errors else None
        if error is None or (exc is not None and not isinstance(exc, ResourceUnavailable)):
            return False
        if send is None:
            return False
        return await _websocket_ended(
            self.lc,
            self.unit.label,
            ws.scope,
            send,
            _socket_stage(ws),
            error,
            raised=exc is not None,
        )


class _ConnectionRefused:
    """A WebSocket's unit of work refused while the app drains (FastAPI 0.137+'s routes of
    included routers): answered as `_deny_websocket` answers it on an app's route once the
    exception leaves FastAPI's exit stack, which then swallows it."""

    __slots__ = ("connection", "exc")

    def __init__(self, connection: Any, exc: BaseException) -> None:
        self.connection = connection
        self.exc = exc

    async def __call__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        ws = self.connection
        if exc is not self.exc or getattr(ws, "send", None) is None:
            return False
        stage = _socket_stage(ws)
        with contextlib.suppress(Exception):  # the client is gone: nothing to answer
            if stage == 0:
                await _deny_websocket(ws.scope, ws.send)
            elif stage == 1:
                await ws.send({"type": "websocket.close", "code": 1013, "reason": _SHUTTING_DOWN})
        return True


def _socket_stage(ws: Any) -> int:
    """Where a Starlette WebSocket is: 0 before its ``accept``, 1 open, 2 closed or
    answered (nothing more may be sent)."""
    name = getattr(getattr(ws, "application_state", None), "name", "")
    return 0 if name == "CONNECTING" else 1 if name == "CONNECTED" else 2


# --------------------------------------------------------------------------- the unit


class HttpUnit(Unit):
    """The unit of work of one HTTP request (or one WebSocket connection)."""

    __slots__ = (
        "_receive",
        "_send",
        "body_done",
        "failure",
        "headers",
        "request",
        "state",
        "streaming",
        "task",
        "token",
        "watch",
    )

    # Set by `_run` (the route wrapper's path) before the route runs, not here: the token of
    # the unit in the context, until `leave_context`.
    token: contextvars.Token[Any] | None

    def __init__(self, lc: Lifecycle, label: str, request: Any = None) -> None:
        # `Unit.__init__`'s fields, set here: one call per request, not two.
        self.lc = lc
        self.label = label
        self.values: dict[Resource[Any], Any] = {}
        self.entries: list[Entry] = []
        self.closed = False
        self.started = _now()
        self.track_stacks = False  # a leak report names the route
        self.late = False
        self.waiting = None
        # The Starlette request when tether wraps FastAPI's request handler (the body is
        # read through it); else the route wrapper sets the scope's headers (not the scope
        # itself: a unit referenced from the scope and referencing it back would make every
        # request a reference cycle), and `receive` and `send`.
        self.request = request
        self.headers: Any = None
        self._receive: Receive = None  # type: ignore[assignment]
        self._send: Send = None  # type: ignore[assignment]
        # 0: response not started, 1: started, 2: tether answered instead, 3: aborted (a
        # cleanup failed after the start), 4: a cleanup failed before the start, for the
        # app's exception handler to answer (`_route_failed` raises it)
        self.state = 0
        self.failure: BaseException | None = None
        self.body_done = False
        self.streaming = False  # its values close after FastAPI's producer (`_ProducedUnit`)
        self.task: asyncio.Task[Any] | None = None
        self.watch: _Watch | None = None  # made once the request has run a while

    async def send(self, message: Message) -> None:
        if self.state == 0:
            if message["type"] == "http.response.start":
                self.state = 1
                self.leave_context()
                # Sent from inside an `except` block when an exception handler made this
                # response (HTTPException, ServerErrorMiddleware, the app's own handler,
                # whatever status it chose: a redirect too): that is the failure the
                # cleanups should see, as when the exception escapes FastAPI's handler.
                if message["status"] >= 400:
                    handled = sys.exc_info()[1]
                    self.failure = (
                        handled if handled is not None else FailedResponse(message["status"])
                    )
                elif self.failure is None:  # (its client gone: it stays a failure)
                    # A redirect an exception handler answered with, say.
                    self.failure = _answered_exception()
                if self.entries:
                    errors = await self.release_early(self.failure)
                    if errors and self.failure is None:
                        if _app_answers(_run_scope(), errors[-1]):
                            self.state = 4  # nothing sent: the app's handler answers
                            raise _Replaced from errors[-1]
                        self.state = 2
                        await _answer_error(self._send, errors[-1], self.lc)
                        raise _Replaced from errors[-1]
            await self._send(message)
            return
        if self.state > 1:
            raise _Replaced
        if (
            self.entries
            and message["type"] in _BODY_MESSAGES
            and not message.get("more_body", False)
        ):
            # release="response": close before the last body message, so a failing
            # commit aborts the response instead of completing it. A file a server sends
            # itself (``http.response.pathsend``, which Starlette's `FileResponse` uses
            # where the server offers it: granian) is the whole body in one message.
            errors = await self.aclose(self.failure)
            if errors and self.failure is None:
                self.state = 3
                raise _Replaced from errors[-1]
        await self._send(message)

    def leave_context(self) -> None:
        """Take the unit out of the context (on the route wrapper's path, which put it
        there): the response asks for no resource, and what its cleanups schedule (a
        pool's idle timer) does not carry the request."""
        token = self.token
        # Sent from a task of the response's own (a stream on ASGI before 2.4), in a copy
        # of the context, the token stays: the route's own is reset when it returns.
        if token is not None and _leave(token):
            self.token = None

    async def receive(self) -> Message:
        watch = self.watch
        if watch is None:
            message: Message = await self._receive()
            if message["type"] == "http.disconnect":
                self.went_away()
            elif not message.get("more_body", False):
                self.body_done = True
            return message
        buffer = watch.buffer
        while not buffer:
            if watch.disconnected:
                self.went_away()
                return {"type": "http.disconnect"}
            watch.arrived.clear()
            await watch.arrived.wait()
        return buffer.popleft()

    def went_away(self) -> None:
        """The app read ``http.disconnect``: what is still open closes as a failure.

        A ``StreamingResponse`` on ASGI before 2.4 (uvicorn's) stops when its client goes
        away and returns as if it had finished: without this, a ``release="response"``
        value would close as a success (commit) under a body cut short."""
        if self.entries and self.failure is None:
            self.failure = ClientDisconnected(f"The client went away during {self.label}.")

    def start_watching(self) -> None:
        """Listen for the client going away (once the request body has been read)."""
        request = self.request
        if request is not None:
            self.headers = request.scope["headers"]
            self._receive = request._receive
        if not self.body_done:
            # Read in full through the request (FastAPI reads it before the endpoint runs).
            # Starlette sets `_form = None` as it makes the request: a form is read once it
            # is not None (the watch took over bodies still arriving: a slow upload then
            # waited for ever, trial 18).
            fields = vars(request) if request is not None else {}
            read = "_body" in fields or fields.get("_form") is not None
            if not read:
                for name, value in self.headers:
                    if name == b"transfer-encoding" or (
                        name == b"content-length" and value != b"0"
                    ):
                        return  # the app may still be reading the body: do not compete for it
            self.body_done = True
        watch = self.watch = _Watch()
        if request is not None:
            # The app reads what is left through the request: from here, from the watch
            # (until `stop_watching`: the request must not keep the unit alive).
            request._receive = self.receive
        watch.task = asyncio.get_running_loop().create_task(self._watch(watch))

    def stop_watching(self, original: Receive) -> Receive:
        """Stop listening for the client (the handler is over); return what the response
        should read its messages from, *original* once what the watch read is used."""
        watch = self.watch
        if watch is None:
            return original
        if watch.task is not None:
            watch.task.cancel()
        if self.request is not None:
            self.request._receive = self._receive
        buffer, disconnected = watch.buffer, watch.disconnected
        if not buffer and not disconnected:
            return original

        async def receive() -> Message:
            if buffer:
                return buffer.popleft()
            if disconnected:
                return {"type": "http.disconnect"}
            return await original()

        return receive

    async def _watch(self, watch: _Watch) -> None:
        bodies = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.request":
                bodies += 1
                if bodies > 1:
                    # The body was read in full before the watch began, so a server sends
                    # no more: a `receive` that answers it again and again without waiting
                    # (a middleware replaying the body) would spin this loop, buffering it
                    # for ever. Stop listening; the app reads on from that middleware.
                    return
            if message["type"] == "http.disconnect":
                # Cancel only work that has not answered yet: once the response has started
                # its cleanups may be running (a commit must not be interrupted), and a
                # stream learns of the disconnect from `send` itself.
                watch.disconnected = True
                watch.arrived.set()
                if self.state == 0 and not self.closed and self.task is not None:
                    await self._cancel(watch, self.task)
                return
            watch.buffer.append(message)
            watch.arrived.set()

    async def _cancel(self, watch: _Watch, task: asyncio.Task[Any]) -> None:
        """Cancel the request whose client went away; but not while the app's code runs in
        a worker thread (a ``def`` endpoint or dependency), which no cancel stops:
        cancelling the task then would close its values under the thread (a connection
        back in the pool while the thread still writes on it). The unit closes as a
        failure whatever it opens from here, and the task is cancelled once it is out of
        the thread; if the handler ends first, its values roll back then."""
        if _in_worker_thread(task):
            log.info(
                "tether: client went away during %s, which runs in a worker thread: it is "
                "cancelled when that returns, and rolls back",
                self.label,
            )
            if self.failure is None:
                self.failure = ClientDisconnected(f"The client went away during {self.label}.")
            while _in_worker_thread(task):
                await asyncio.sleep(0.01)  # (this watcher is cancelled when the handler ends)
            if self.state != 0 or self.closed:
                return
        watch.cancelled = True
        log.info("tether: client went away during %s; cancelling it", self.label)
        task.cancel()


_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ASYNCIO = os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep
_thread_waits: tuple[Any, ...] | None = None


def _in_worker_thread(task: asyncio.Task[Any]) -> bool:
    """Whether *task* waits for a worker thread that runs the app's code now (a ``def``
    endpoint or dependency, ``run_in_threadpool``, ``asyncio.to_thread``,
    ``loop.run_in_executor``): its await chain ends in the future of a thread that started,
    awaited by anyio's or asyncio's thread wait or by the app's own code, called from
    outside tether. Not while it waits for a thread token or a free executor thread
    (nothing runs yet), nor in tether's own (a sync resource opening: the thread closes what
    it opens after a cancel)."""
    global _thread_waits
    if _thread_waits is None:
        _thread_waits = (_anyio_run_sync(), asyncio.to_thread.__code__)
    # `_coro`, not `get_coro()`: the same on CPython's tasks, and None on granian's
    # `--task-impl rust` tasks, whose `get_coro()` crashes the process.
    aw: Any = getattr(task, "_coro", None)
    caller = waiter = None
    for _ in range(64):  # an await chain is never this deep
        code = getattr(aw, "cr_code", None)
        if code is None:
            # The end of the chain: a thread the app's own code waits for directly
            # (`await loop.run_in_executor(...)`) counts once it runs; asyncio's own
            # (`getaddrinfo`) and tether's do not.
            return (
                waiter is not None
                and not waiter.startswith((_OURS, _ASYNCIO))
                and _runs_a_thread(getattr(task, "_fut_waiter", None))
            )
        waiter = code.co_filename
        step = getattr(aw, "cr_await", None)
        if code in _thread_waits:
            # The thread's future (its iterator), not a token's wait (a coroutine).
            running = step is not None and not inspect.iscoroutine(step)
            return running and (caller is None or not caller.startswith(_OURS))
        if "/anyio/" not in code.co_filename:
            caller = code.co_filename
        aw = step
    return False


def _runs_a_thread(fut: Any) -> bool:
    """Whether *fut* is the asyncio side of an executor's future (``asyncio.wrap_future``,
    what ``loop.run_in_executor`` returns) whose function runs now in its thread."""
    if not isinstance(fut, asyncio.Future) or fut.done():
        return False
    for callback, _ in getattr(fut, "_callbacks", None) or ():
        if getattr(callback, "__name__", "") != "_call_check_cancel":
            continue  # not asyncio's chain to a concurrent future
        for cell in getattr(callback, "__closure__", None) or ():
            source = cell.cell_contents
            if isinstance(source, concurrent.futures.Future):
                return source.running()
    return False


_run_sync: Any = None


def _anyio_run_sync() -> Any:
    """The code of anyio's step that hands a function to a worker thread and waits for it
    (its asyncio backend's): its locals ``func``, ``context`` and ``future``, and its await
    of that future, are what tether reads of anyio's internals (`_in_worker_thread`,
    `_its_threads`; `task_stack` finds it by name)."""
    global _run_sync
    if _run_sync is None:
        from anyio._backends._asyncio import AsyncIOBackend

        _run_sync = AsyncIOBackend.run_sync_in_worker_thread.__code__
    return _run_sync


def _its_threads(unit: Unit, exc: BaseException) -> list[contextvars.Context]:
    """The contexts of *unit*'s calls into worker threads (a ``def`` endpoint or dependency,
    FastAPI's ``run_in_threadpool``, ``asyncio.to_thread``) whose wait the cancel *exc* cut:
    read from the frames *exc* went through (this thread's, ended: their locals are safe to
    read). Each call runs in a context of its own, a copy of the unit's, entered by its
    thread while the function runs (not ``loop.run_in_executor``, which passes none). Not a
    thread the unit's code started and did not wait for (a background job), which holds none
    of its values. On the failure path only.

    Other threads' frames are never walked (``sys._current_frames()``, then ``f_back``):
    on CPython 3.11 that can crash the process (see `thread_frames`)."""
    run_sync, to_thread = _anyio_run_sync(), asyncio.to_thread.__code__
    found: list[contextvars.Context] = []
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and len(seen) < 8:
        seen.add(id(cause))
        tb = cause.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            context: Any = None
            if frame.f_code is run_sync:
                future = frame.f_locals.get("future")
                if isinstance(future, asyncio.Future) and future.cancelled():
                    context = frame.f_locals.get("context")
            elif frame.f_code is to_thread:  # `await asyncio.to_thread(...)` in the app's code
                context = frame.f_locals.get("ctx")
            if isinstance(context, contextvars.Context) and context not in found:
                ref = context.get(_CURRENT)
                if ref is not None and ref() is unit:
                    found.append(context)
            tb = tb.tb_next
        cause = cause.__context__
    return found


def _running(contexts: list[contextvars.Context]) -> bool:
    """Whether a thread runs in one of *contexts* now: a context is entered by one thread
    at a time, and entering it here fails while the thread's function runs. Entered for
    ``int()``, a call in C that cannot let the thread run meanwhile (a Python function
    could: the thread, entering then, would fail)."""
    for context in contexts:
        try:
            context.run(int)
        except RuntimeError:  # "cannot enter context: ... is already entered"
            return True
    return False


async def _after_its_threads(unit: Unit, exc: BaseException) -> None:
    """A unit cancelled from outside tether (an ``asyncio.timeout`` or ``wait_for`` around
    the app, uvicorn's ``--timeout-graceful-shutdown``, the drain's cancel) while its code
    runs in a worker thread, which no cancel stops: its values close once that thread
    returns, not under it (a connection back in its pool, then another request's, while
    the thread still wrote on it). The wait cannot be cut short: once the app stops, it
    lasts at most ``close_timeout`` more (counted from the stop, not from the cancel). A
    client that went away was waited for already (`HttpUnit._cancel`)."""
    if not isinstance(exc, asyncio.CancelledError):
        return
    contexts = _its_threads(unit, exc)
    if not contexts:
        return
    if not _running(contexts):
        # Its thread may be about to enter the context (past anyio's check that the call
        # was not cancelled): a tick to be sure. Else it ended, or never started.
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass  # cancelled again: as below
        if not _running(contexts):
            return
    log.info(
        "tether: %s was cancelled while it ran in a worker thread, which no cancel stops: "
        "its values close when that returns",
        unit.label,
    )
    lc = unit.lc
    deadline: float | None = None
    while _running(contexts):
        if lc.state is not State.RUNNING:
            if deadline is None:
                deadline = time.monotonic() + lc.close_timeout
            elif time.monotonic() > deadline:
                log.warning(
                    "tether: %s: its worker thread still runs close_timeout=%g s after the "
                    "app began to stop; its values close under it",
                    unit.label,
                    lc.close_timeout,
                )
                return
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            continue  # cancelled again: the values still wait for the thread


class _KeepingUnit(HttpUnit):
    """The unit of work of a route marked ``@release("response")``: nothing is released
    when the response starts; every value closes with the response."""

    __slots__ = ()

    def __init__(self, lc: Lifecycle, label: str, request: Any = None) -> None:
        HttpUnit.__init__(self, lc, label, request)
        self.late = True

    async def release_early(self, exc: BaseException | None) -> list[BaseException]:
        for entry in self.entries:
            entry.late = True
        return []


class _ProducedUnit(_KeepingUnit):
    """The unit of work of an endpoint FastAPI streams as server-sent events (0.137+): a
    generator it runs in a task of its own (its items in a worker thread, for a ``def``
    one), which FastAPI stops only when its exit stack for the request unwinds, after the
    response. Its values close from that stack, after the task has stopped
    (`_close_after_producer`): not when the response ends (a client that went away left the
    generator running, its query on a connection given back to the pool, or a sync session
    closed under its thread), nor before the last body message (a generator that raised has
    ended the stream normally by then, and what it wrote was committed). Once the handler has
    returned its response (``streaming``), each close before then only notes its failure;
    before, they close as on any route (a handler that failed, an ``idempotent`` retry)."""

    __slots__ = ("sent",)

    def __init__(self, lc: Lifecycle, label: str, request: Any = None) -> None:
        _KeepingUnit.__init__(self, lc, label, request)
        self.sent = False  # the last body message went out

    async def send(self, message: Message) -> None:
        await HttpUnit.send(self, message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.sent = True

    def went_away(self) -> None:
        # A client that leaves once the stream has ended (Starlette's disconnect listener
        # reads that from uvicorn as the response completes) cut nothing short.
        if not self.sent:
            HttpUnit.went_away(self)

    async def aclose(self, exc: BaseException | None = None) -> list[BaseException]:
        if not self.streaming:
            return await HttpUnit.aclose(self, exc)
        if exc is not None and self.failure is None:
            self.failure = exc
        return []

    async def close_after_producer(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self.entries and not self.closed:
            self.stop_watching(self._receive)
            failure = exc if exc is not None else self.failure
            if failure is None and not self.sent:
                failure = FailedResponse(500)  # the stream did not end: cut short
            elif (
                failure is not None
                and self.state == 1
                and not isinstance(failure, (ClientDisconnected, FailedResponse))
            ):
                _log_cut_short(self.label, _declared(self.entries), _one(failure))
            try:
                await HttpUnit.aclose(self, failure)
            finally:
                self.closed = True
                self.lc._retire(self)
        else:
            self.closed = True
            self.lc._retire(self)
        return False


def _close_after_producer(unit: HttpUnit, request: Any) -> bool:
    """Close *unit* (a `_ProducedUnit`) from FastAPI's exit stack for *request*, pushed
    before the handler runs so that it unwinds after the producer (which the handler
    enters); whether it was (FastAPI makes the stack for every request)."""
    stack = request.scope.get("fastapi_inner_astack")
    if stack is None or not isinstance(unit, _ProducedUnit):  # pragma: no cover
        return False
    stack.push_async_exit(unit.close_after_producer)
    return True


class _Watch:
    """What listening for a client going away needs (only for requests that run a while)."""

    __slots__ = ("arrived", "buffer", "cancelled", "disconnected", "task")

    def __init__(self) -> None:
        self.buffer: collections.deque[Message] = collections.deque()
        self.arrived = asyncio.Event()
        self.disconnected = False
        self.cancelled = False  # tether cancelled the request because the client went away
        self.task: asyncio.Task[None] | None = None


#: Seconds the refusals of one resource are counted, not logged one by one, after the first.
QUIET = 10.0


class _Refusals:
    """The units of work a route had refused for a resource (503, a WebSocket's 1013): the
    first logged in full, the next ones within `QUIET` seconds counted, and said in one line
    when that window ends (the sweeper's `flush`), with the last one's text. An outage under
    traffic logs a line per route and resource every 10 s, not one per request; one refused
    nothing for a window has its next refusal logged in full again.

    A refusal that is no pool's saturation (a connect refused, a connection lost: not
    ``timed_out``) starts an outage of its resource, which ends with the next successful
    open of it or of a resource opened from it (their ``opened`` counters, read by the
    sweeper): one line says so, and how many units were refused meanwhile. Failure paths
    only, on the event loop."""

    __slots__ = ("lc", "outages", "windows")

    def __init__(self, lc: Lifecycle) -> None:
        # (resource, route, action) -> [window start (monotonic), refusals not logged, the
        # last one's error]
        self.windows: dict[tuple[str, str, str], list[Any]] = {}
        # resource -> [first refusal (monotonic), refusals, what its users had opened at
        # the last one, its users]
        self.outages: dict[Resource[Any], list[Any]] = {}
        self.lc = weakref.ref(lc)  # (the registry's values must not keep its keys alive)

    def log(self, label: str, action: str, exc: BaseException) -> None:
        name = str(getattr(exc, "resource", None) or "?")
        self.outage(name, exc)
        key = (name, label, action)
        window = self.windows.get(key)
        if window is None:
            self.windows[key] = [time.monotonic(), 0, None]
            log.warning("tether: %s %s: %s", label, action, describe(exc))
            return
        window[1] += 1
        window[2] = exc

    def outage(self, name: str, exc: BaseException) -> None:
        lc = self.lc()
        if lc is None or (res := lc._resources.get(name)) is None:
            return  # "shutting down"; the app's own error naming no resource of its
        if getattr(exc, "timed_out", False) and not getattr(exc, "_unreachable", False):
            return  # a pool busy with traffic
        if getattr(exc, "_busy", False):
            return  # a lock held by another writer (SQLite's): busy, no outage (trial 29)
        outage = self.outages.get(res)
        if outage is None:
            # What opens once it answers again: it, and what is opened from it (a pool's
            # connections, an engine's sessions: the error names the pool).
            users = [r for r in lc._resources.values() if r is res or res in r.deps]
            self.outages[res] = outage = [time.monotonic(), 0, 0, users]
        outage[1] += 1
        outage[2] = _opened(outage[3])

    def __call__(self, now: float) -> None:
        """The sweeper's hook: say what each window that ended counted, and which outages
        ended (*now* unused)."""
        for res, (start, refused, opened, users) in list(self.outages.items()):
            if _opened(users) > opened:
                del self.outages[res]
                self.flush(final=True, resource=res.name)  # what the outage's windows counted
                log.warning(
                    "tether: %r opens again: %d unit%s of work refused for it over the last %.0f s",
                    res.name,
                    refused,
                    "" if refused == 1 else "s",
                    time.monotonic() - start,
                )
        self.flush()

    def at_end(self) -> None:
        """As the app scope ends: say what every window counted so far."""
        self.flush(final=True)
        self.outages.clear()

    def flush(self, *, final: bool = False, resource: str | None = None) -> None:
        """Say what each window that ended counted (every window: *final*); *resource*:
        those of that resource only, forgotten (its outage ended: the next refusal is
        logged in full)."""
        moment = time.monotonic()
        for key, window in list(self.windows.items()):
            if resource is not None and key[0] != resource:
                continue
            if moment - window[0] < QUIET and not (final and window[1]):
                continue
            if not window[1]:
                del self.windows[key]  # quiet for a window: the next one logged in full
                continue
            _, label, action = key
            log.warning(
                "tether: %s %s %d more times in the last %.0f s (not logged one by one; the "
                "last: %s)",
                label,
                action,
                window[1],
                moment - window[0],
                describe(window[2]),
            )
            self.windows[key] = [moment, 0, None]
        if resource is not None:
            for key in [key for key in self.windows if key[0] == resource]:
                del self.windows[key]


def _opened(resources: list[Resource[Any]]) -> int:
    return sum(res.counters.opened for res in resources)


_refusals_of: weakref.WeakKeyDictionary[Lifecycle, _Refusals] = weakref.WeakKeyDictionary()


def _refusals(lc: Lifecycle) -> _Refusals:
    found = _refusals_of.get(lc)
    if found is None:
        found = _refusals_of[lc] = _Refusals(lc)
    return found


class _Sweeper:
    """Starts disconnect watchers for requests that have run for a while."""

    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc

    def __call__(self, now: float) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # on trio: disconnects are not watched (asyncio only)
            return
        _watch_disconnects(self.lc, now)


def _watch_disconnects(lc: Lifecycle, now: float) -> None:
    for unit in list(lc._units):
        if (
            isinstance(unit, HttpUnit)
            and unit.watch is None
            and unit.state == 0
            and now - unit.started > WATCH_AFTER
            and not unit.closed
        ):
            unit.start_watching()


# --------------------------------------------------------------------------- routes


_WS_ENDS = frozenset({"websocket.close", "websocket.http.response.start"})
_EXCEPTION_HANDLERS = os.path.join("starlette", "_exception_handler.py")


def _answered_exception() -> BaseException | None:
    """The exception that Starlette's exception handling (``@app.exception_handler``,
    ``WebSocketException``) is answering with the message being sent, if it is: one the
    endpoint raised, and the route's app swallows. Not one the endpoint caught itself and
    answered from its own ``except`` block (an idle WebSocket closed on a timeout)."""
    exc = sys.exc_info()[1]
    if exc is None:
        return None
    f: Any = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_name == "wrapped_app" and code.co_filename.endswith(_EXCEPTION_HANDLERS):
            return exc if f.f_locals.get("exc") is exc else None
        f = f.f_back
    return None


class _TetherRoute:
    """Wraps a route's ``handle``: one unit of work per call."""

    __slots__ = (
        "app",
        "context_of",
        "inlined",
        "label",
        "labels",
        "lc",
        "threshold",
        "unit_class",
    )

    def __init__(
        self,
        app: ASGIApp,
        lc: Lifecycle,
        label: str,
        *,
        included: bool = False,
        inlined: _Inlined | None = None,
        keep: bool = False,
        threshold: Any = _LIFECYCLES,
    ):
        self.app = app
        self.unit_class = _KeepingUnit if keep else HttpUnit
        self.threshold = threshold
        self.lc = lc
        self.label = label
        self.inlined = inlined
        # A route of an included router serves one path per inclusion: its label is
        # the path of the inclusion that serves the request.
        self.context_of: Any = None
        if included:
            self.context_of = getattr(
                _fastapi_routing(), "_get_scope_effective_route_context", None
            )
        self.labels: dict[int, tuple[Any, str]] = {}

    def label_for(self, scope: Scope) -> str:
        """The label of the unit of work serving *scope*."""
        context = None if self.context_of is None else self.context_of(scope)
        if context is None:
            return self.label
        known = self.labels.get(id(context))
        if known is None:
            known = self.labels[id(context)] = (context, _label(context))
        return known[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        lc = self.lc
        if lc.state is not _RUNNING and _refused(lc):
            await _answer(send, 503, _SHUTTING_DOWN, 5.0)
            return
        inlined = self.inlined
        if inlined is not None and inlined.overrides_of.dependency_overrides:
            inlined.check()
        label = self.label if self.context_of is None else self.label_for(scope)
        unit = self.unit_class(lc, label)
        unit.headers = scope["headers"]
        unit._receive = receive
        unit._send = send
        unit.task = _tasks_by_loop.get(_running_loop()) if _PY311 else _current_task()
        lc._units.add(unit)
        lc._units_total += 1
        if self.threshold is not _LIFECYCLES:
            lc._leak_thresholds[unit] = self.threshold
        await _run(unit, self.app, scope, unit.receive)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:  # pragma: no cover - routes only see http and websocket
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        lc = self.lc
        if lc.state is not _RUNNING and _refused(lc):
            await _deny_websocket(scope, send)
            return
        unit = Unit(lc, self.label_for(scope))
        lc._units.add(unit)
        lc._units_total += 1
        if self.threshold is not _LIFECYCLES:
            lc._leak_thresholds[unit] = self.threshold
        # The connection's task: cancelled past drain_timeout, and where a leak report says
        # it waits.
        lc._unit_tasks[unit] = _tasks_by_loop.get(_running_loop()) if _PY311 else _current_task()
        handled: list[BaseException] = []
        stage = 0  # as `_socket_stage`: 0 before the accept, 1 open, 2 closed or answered

        async def closing(message: Message) -> None:
            nonlocal stage
            kind = message["type"]
            if kind in _WS_ENDS:
                stage = 2
                # A close (or a refusal) sent from inside an `except` block: an exception
                # handler answered the exception that ended the endpoint
                # (`WebSocketException`, the app's own handler), which the route's app then
                # swallows. That is the failure the cleanups should see, as on HTTP routes.
                if not handled:
                    exc = _answered_exception()
                    if exc is not None:
                        handled.append(exc)
            elif kind == "websocket.accept":
                stage = 1
            await send(message)

        token = _CURRENT.set(_ref(unit))
        try:
            try:
                await self.app(scope, receive, closing)
            finally:
                _CURRENT.reset(token)  # the cleanups run without it, as on HTTP routes
        except BaseException as exc:
            await _after_its_threads(unit, exc)
            await unit.aclose(exc)
            if _drain_cancelled(lc, unit, exc):
                await _close_for_restart(unit.label, scope, send, stage)
                raise
            if not isinstance(exc, ResourceUnavailable) or not await _websocket_ended(
                lc, unit.label, scope, send, stage, exc, raised=True
            ):
                raise
        else:
            errors = await unit.aclose(handled[0] if handled else None)
            if errors:
                await _websocket_ended(lc, unit.label, scope, send, stage, errors[-1], raised=False)
        finally:
            lc._retire(unit)


async def _run(
    unit: HttpUnit, app: ASGIApp, scope: Scope, receive: Receive, *, current: bool = True
) -> None:
    """Run *app* (a route, a response) with the unit's ``send``, which closes its values
    as the response goes out; close what is left when it ends, then end the unit.

    *current*: the unit is the context's while *app* runs (a route: its dependencies find
    it). A response asks for no resource, and its cleanups run without the unit in the
    context, as the request handler's do."""
    unit.token = _CURRENT.set(_ref(unit)) if current else None
    try:
        try:
            await app(scope, receive, unit.send)
        except BaseException as exc:
            unit.leave_context()
            await _after_its_threads(unit, exc)
            await _route_failed(unit, exc, scope)
        else:
            unit.leave_context()
            if unit.entries:
                await unit.aclose(unit.failure)
    finally:
        if unit.watch is not None and unit.watch.task is not None:
            unit.watch.task.cancel()
        if not unit.streaming:  # (else its values close after FastAPI's producer)
            unit.closed = True
            unit.lc._retire(unit)


async def _route_failed(unit: HttpUnit, exc: BaseException, scope: Scope) -> None:
    """The app raised while tether wrapped its ``send``: close with that failure.

    A cleanup that failed before the response started, with an exception the app has a
    handler for (``@app.exception_handler(IntegrityError)``, an ``HTTPException``, its own
    ``ResourceUnavailable`` handler): raised from here, once every value is closed, for
    that handler to answer, as it would had the endpoint raised it. One that failed after
    the response started aborts it: raised too where the app has a server-error handler,
    for that handler to see (`_app_reports`), else `_Aborted`."""
    if isinstance(exc, _Replaced):
        if unit.entries:
            await unit.aclose(exc.__cause__)
        failed = exc.__cause__
        if failed is not None and (
            unit.state == 4 or (unit.state == 3 and _reported_on_the_way_out(unit, scope, failed))
        ):
            # Raised as it was, without tether's `_Replaced` as its context (raised here,
            # under `_run`'s `except`, it would get one): the server logs its traceback
            # when the app's server-error handler answered it. After the start (state 3)
            # that handler cannot answer (Starlette sends nothing once the response
            # started) but still sees what failed, as for the endpoint's own errors; the
            # app raises, which aborts the response.
            context = failed.__context__
            try:
                raise failed
            finally:
                failed.__context__ = context
        if unit.state == 3:
            # The response started: the app raises, which aborts it; tether's own answer
            # (a 500 or 503 sent at the start, state 2) is complete, and nothing is raised.
            raise _Aborted(
                f"{unit.label}: a cleanup failed after the response started (logged above): "
                f"the response is aborted, its last body message not sent"
            ) from None
        return
    if _client_gone(unit, exc):
        await unit.aclose(unit.failure)
        if unit.state == 0:
            await _answer(unit._send, _GONE_STATUS, _GONE, None)
        return
    held = None
    if unit.state == 1 and not unit.streaming:  # (a produced stream's: `close_after_producer`)
        held = _declared(unit.entries)
    errors = await unit.aclose(exc)
    if held:
        # A body that failed once its response started (a stream's query on a lost
        # connection): the server's traceback names neither the route nor what tether did
        # with the values the body used.
        _log_cut_short(unit.label, held, exc)
    if isinstance(exc, ResourceUnavailable) and unit.state == 0:
        _refusals(unit.lc).log(unit.label, "answered 503", exc)
        await _answer(unit._send, 503, _detail(unit.lc, exc), exc.retry_after)
        return
    if errors and unit.state == 0 and isinstance(errors[-1], ResourceUnavailable):
        if _app_handles(scope, errors[-1]):
            raise errors[-1]
        await _answer(unit._send, 503, _detail(unit.lc, errors[-1]), errors[-1].retry_after)
        return
    if unit.state == 0 and _stopped_by_the_shutdown(unit, exc):
        with contextlib.suppress(Exception):  # the client (or its connection) is gone
            await _answer(unit._send, 503, _SHUTTING_DOWN, 5.0)
    elif unit.state == 0:
        _cut_before_the_start(scope, unit, exc)
    raise _said_instead(exc, errors)


#: What the cancel uvicorn sends the requests still running when its
#: ``--timeout-graceful-shutdown`` runs out says.
_GRACEFUL = "timeout graceful shutdown exceeded"


def _stopped_by_the_shutdown(unit: HttpUnit, exc: BaseException) -> bool:
    """Whether *exc* is the cancel of a request the server's shutdown stopped (uvicorn's,
    once its graceful timeout ran out; tether's drain, `_drain_cancelled`), which is then
    answered 503 with ``Retry-After`` (a load balancer tries another instance) where the
    server answers 500; said in a line. The cancellation goes on once it is sent."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    if _GRACEFUL in str(exc):
        why = "uvicorn's --timeout-graceful-shutdown ran out"
    elif _drain_cancelled(unit.lc, unit, exc):
        why = f"drain_timeout={unit.lc.drain_timeout:g} s ran out"
    else:
        return False
    _log_answered_503(unit.label, why)
    return True


def _log_answered_503(label: str, why: str) -> None:
    log.warning(
        "tether: %s answered 503: the server cancelled it as it shut down (%s); its values "
        "closed with the cancellation (rolled back)",
        label,
        why,
    )


def _cut_before_the_start(scope: Any, unit: HttpUnit, exc: BaseException) -> None:
    """Note, in the request's *scope*, a unit of work cancelled before its response started
    by a cancel that does not say who sent it: a ``BaseHTTPMiddleware``'s task group's,
    passing on the cancel of the request's task (`_AnswersTheShutdown` reads it there)."""
    if scope is not None and isinstance(exc, asyncio.CancelledError):
        scope["tether.cut"] = unit.label


def _has_base_http_middleware(app: Any) -> bool:
    """Whether *app* runs a ``BaseHTTPMiddleware`` (``@app.middleware("http")``)."""
    try:
        from starlette.middleware.base import BaseHTTPMiddleware
    except ImportError:  # pragma: no cover - Starlette has it
        return False
    for middleware in getattr(app, "user_middleware", None) or ():
        cls = getattr(middleware, "cls", None)
        if isinstance(cls, type) and issubclass(cls, BaseHTTPMiddleware):
            return True
    return False


class _AnswersTheShutdown:
    """Around the middleware stack of an app that runs a ``BaseHTTPMiddleware``: answers
    503 with ``Retry-After`` for a request of tether's cancelled by the server's shutdown
    (uvicorn's ``--timeout-graceful-shutdown``) before its response started, as tether does
    without the middleware (`_stopped_by_the_shutdown`). The middleware runs the route in a
    task group of its own: the route's task is cancelled by the task group, with a cancel
    that does not say uvicorn sent it, and the middleware's task, which could still answer,
    is cancelled too; only here does uvicorn's cancel come through as sent. Installed only
    on such apps: a send wrapped per request."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError as exc:
            label = scope.get("tether.cut")
            if label is not None and not started and _GRACEFUL in str(exc):
                _log_answered_503(label, "uvicorn's --timeout-graceful-shutdown ran out")
                with contextlib.suppress(Exception):  # the client (or its connection) is gone
                    await _answer(send, 503, _SHUTTING_DOWN, 5.0)
            raise


def _answer_the_shutdown(app: Any) -> None:
    """Install `_AnswersTheShutdown` on *app* if it runs a ``BaseHTTPMiddleware``: around
    its middleware stack, or, not built yet, around the one it builds."""
    if not _has_base_http_middleware(app):
        return
    stack = getattr(app, "middleware_stack", None)
    if stack is None:  # built at the first request (a lifespan entered by hand)
        build = app.build_middleware_stack
        if not getattr(build, "_tether_answers", False):

            def building() -> ASGIApp:
                return _AnswersTheShutdown(build())

            building._tether_answers = True  # type: ignore[attr-defined]
            app.build_middleware_stack = building
    elif not isinstance(stack, _AnswersTheShutdown):
        app.middleware_stack = _AnswersTheShutdown(stack)


class _ThenCancelled:
    """tether's answer to a request the shutdown cancelled (`_stopped_by_the_shutdown`),
    returned by the handler; the cancellation is raised again once it is sent."""

    __slots__ = ("exc", "response")

    def __init__(self, response: Any, exc: BaseException) -> None:
        self.response = response
        self.exc = exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        except Exception as exc:  # the client (or its connection) is gone
            log.debug("tether: the 503 was not sent: %s", describe(exc))
        raise self.exc


def _run_scope() -> Any:
    """The scope of the `_run` call the running code is under (a cleanup failed in a
    unit's ``send``: which handlers does the app have?), or None (a response sent from a
    task of its own). Only on that failure path."""
    f: Any = sys._getframe(1)
    code = _run.__code__
    while f is not None:
        if f.f_code is code:
            return f.f_locals.get("scope")
        f = f.f_back
    return None


def _client_gone(unit: HttpUnit, exc: BaseException) -> bool:
    """Whether tether cancelled the call because its client went away; if so, the
    cancellation is taken back and the unit closes with `ClientDisconnected`."""
    watch = unit.watch
    if watch is None or not watch.cancelled or not isinstance(exc, asyncio.CancelledError):
        return False
    task = unit.task
    if task is not None and task.cancelling():
        task.uncancel()
    gone = ClientDisconnected(f"The client went away during {unit.label}.")
    gone.__cause__ = exc
    unit.failure = gone
    return True


def _declared(entries: list[Entry]) -> list[str]:
    """The names of the app's own resources among *entries*: not an integration's
    per-unit bookkeeping (httpx's streamed responses, which says its own line)."""
    return list(dict.fromkeys(e.res.name for e in entries if e.res.leak_of is None))


def _log_cut_short(label: str, held: list[str], exc: BaseException) -> None:
    """One line for a response whose body failed after it started, naming the route and
    the values that closed with the failure (the server's traceback follows)."""
    if not held:
        return
    if isinstance(exc, asyncio.CancelledError) and _GRACEFUL in str(exc):
        what = (
            "was cancelled by the server's shutdown (uvicorn's --timeout-graceful-shutdown ran out)"
        )
    else:
        what = f"failed ({describe(exc)})"
    log.warning(
        "tether: %s: the response %s after it started: the client gets it cut short, and %s "
        "closed with that failure (what was not committed is rolled back)",
        label,
        what,
        ", ".join(repr(name) for name in held),
    )


async def _answer(
    send: Send, status: int, detail: str, retry_after: float | None, kind: str = "http"
) -> None:
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", _retry_after(retry_after).encode()))
    await send({"type": f"{kind}.response.start", "status": status, "headers": headers})
    await send({"type": f"{kind}.response.body", "body": body, "more_body": False})


async def _deny_websocket(scope: Scope, send: Send) -> None:
    """A WebSocket handshake while the app shuts down, refused as an HTTP request is: a 503
    with ``Retry-After`` where the server lets the app answer the handshake (ASGI's
    ``websocket.http.response`` extension: uvicorn, Starlette's test client); elsewhere a
    close before accepting, with 1013 "try again later" (the server answers it 403)."""
    if "websocket.http.response" in (scope.get("extensions") or ()):
        await _answer(send, 503, _SHUTTING_DOWN, 5.0, "websocket.http")
    else:
        await send({"type": "websocket.close", "code": 1013, "reason": _SHUTTING_DOWN})


def _drain_cancelled(lc: Lifecycle, unit: Unit, exc: BaseException) -> bool:
    """Whether *exc* is the cancel a shutdown sent *unit* once its ``drain_timeout``
    passed (`Lifecycle._cancel_units`): the app drains, and the unit was in flight when
    the drain cancelled every unit still in flight (or the cancel says so). On the
    failure path only."""
    if not isinstance(exc, asyncio.CancelledError) or lc.state is not State.DRAINING:
        return False
    if str(exc).startswith("tether: drain_timeout="):
        return True
    cancelled = lc._cancelled
    return bool(cancelled) and unit.started <= cancelled[-1].at


async def _close_for_restart(label: str, scope: Scope, send: Send, stage: int) -> None:
    """A WebSocket the drain cancelled (`_drain_cancelled`), its values rolled back: an
    open socket (*stage* 1, as `_socket_stage`) is closed with 1012, "service restart",
    so that its client reconnects (to another instance) rather than see the server drop
    it; a handshake not accepted yet (0) is refused as one that comes while the app
    drains (`_deny_websocket`). Nothing is sent to a socket already closed, nor raised if
    the client is gone."""
    if stage == 2:
        return
    try:
        if stage == 1:
            await send({"type": "websocket.close", "code": 1012, "reason": _SHUTTING_DOWN})
        else:
            await _deny_websocket(scope, send)
    except Exception as exc:  # the client (or the server's side of it) is gone
        log.debug("tether: %s: the close was not sent: %s", label, describe(exc))


async def _websocket_ended(
    lc: Lifecycle,
    label: str,
    scope: Scope,
    send: Send,
    stage: int,
    error: BaseException,
    *,
    raised: bool,
) -> bool:
    """A WebSocket's unit of work ended with *error*, its values closed: the endpoint
    raised it (*raised*), or a cleanup failed once it returned (a commit; logged by then).
    Answered as HTTP routes answer, where the socket still takes an answer (*stage*, as
    `_socket_stage`): `ResourceUnavailable` before the accept with a 503 and
    ``Retry-After`` where the server lets the app answer the handshake (else a close with
    1013, "try again later"), after it with a close with 1013; a failed cleanup with a
    close with 1011. Returns whether it is answered: False for an exception the endpoint
    raised that is left to the app's exception handler for it, or to the server."""
    unavailable = isinstance(error, ResourceUnavailable)
    if raised and (not unavailable or stage == 2 or _app_handles(scope, error)):
        return False
    if stage == 2:
        return True  # closed by the endpoint: the failure is logged, nothing to answer
    if raised:
        action = "answered 503" if stage == 0 else "closed the socket with 1013"
        if isinstance(error, ResourceUnavailable):
            _refusals(lc).log(label, action, error)
        else:
            log.warning("tether: %s %s: %s", label, action, describe(error))
    try:
        extensions = scope.get("extensions") or ()
        if not isinstance(error, ResourceUnavailable):
            await send({"type": "websocket.close", "code": 1011, "reason": "Internal error"})
        elif stage == 0 and "websocket.http.response" in extensions:
            await _answer(send, 503, _detail(lc, error), error.retry_after, "websocket.http")
        else:
            reason = _close_reason(_unavailable_now(error))
            await send({"type": "websocket.close", "code": 1013, "reason": reason})
    except Exception as exc:  # the client is gone
        log.debug("tether: %s: the answer was not sent: %s", label, describe(exc))
    return True


def _close_reason(reason: str) -> str:
    """*reason*, cut to the 123 bytes a close frame has room for."""
    raw = reason.encode()
    return reason if len(raw) <= 123 else raw[:120].decode(errors="ignore") + "..."


async def _answer_error(send: Send, error: BaseException, lc: Lifecycle) -> None:
    if isinstance(error, ResourceUnavailable):
        await _answer(send, 503, _detail(lc, error), error.retry_after)
    else:
        await _answer(send, 500, "Internal Server Error", None)


# --------------------------------------------------------------------------- handlers

_RUNNING = State.RUNNING
_SHUTTING_DOWN = "The service is shutting down; retry shortly."


def _refused(lc: Lifecycle) -> bool:
    """A request while the lifecycle is not running: refused (counted) while it drains.

    Before it has started (`install()` without `lc.lifespan`), or after it closed (only
    in-process: a test client used after an earlier test's lifespan ended), the request
    goes on with the resource graph resolved, so that a resource it asks for says that the
    app scope is not open (not a bare ``TypeError`` from its factory, nor a 503)."""
    if lc.state is State.DRAINING:
        lc._units_refused += 1
        return True
    lc.validate()
    return False


def _handler(
    handler: Any,
    lc: Lifecycle,
    label: str,
    *,
    defer: bool = False,
    inlined: _Inlined | None = None,
    keep: bool = False,
    sse: bool = False,
    threshold: Any = _LIFECYCLES,
) -> Any:
    """Wrap a FastAPI request handler (``request -> response``): one unit of work per call.

    The handler validates the request, runs the dependencies and the endpoint, and
    serialises the response; when it returns, nothing has been sent yet. That is the
    release point of ``release="handler"``: no wrapper of ``send`` and no ASGI layer of
    tether's own on the request's path. Values released with the response
    (``release="response"``) stay open in a wrapper of the response it returned.

    *defer*: the route has a ``Depends(scope="function")`` cleanup, which FastAPI runs
    after the handler returns: the values then close when the response starts (the
    wrapper of the response wraps ``send``), after that cleanup, as on other routes.

    *inlined*: the route's resource parameters tether hands to the endpoint itself,
    given back to FastAPI's solver before it runs if an override now names one.

    *keep*: the route is marked ``@release("response")``: every value stays open until
    the response ends.

    *sse*: the endpoint is a generator FastAPI streams as server-sent events (0.137+), from
    a task of its own: the values close after that task (`_ProducedUnit`).

    *threshold*: the route's own leak threshold (`leak_threshold`), if marked.
    """
    units = lc._units
    unit_class = _ProducedUnit if sse else _KeepingUnit if keep else HttpUnit

    async def tether_handler(request: Any, again: bool = False) -> Any:
        if lc.state is not _RUNNING and _refused(lc):
            return _response(503, _SHUTTING_DOWN, 5.0)
        if inlined is not None and inlined.overrides_of.dependency_overrides:
            inlined.check()
        unit = unit_class(lc, label, request)
        task = unit.task = _tasks_by_loop.get(_running_loop()) if _PY311 else _current_task()
        units.add(unit)
        lc._units_total += 1
        if threshold is not _LIFECYCLES:
            lc._leak_thresholds[unit] = threshold
        token = _CURRENT.set(_ref(unit))
        late = False
        stacked = sse and _close_after_producer(unit, request)
        try:
            try:
                response = await handler(request)
            except BaseException as exc:
                _CURRENT.reset(token)
                await _after_its_threads(unit, exc)
                if defer and not again:
                    late = _defer_failure(unit, exc)
                return await _handler_failed(unit, exc, again, deferred=late)
            # The cleanups run without the unit in the context: what they schedule (a pool's
            # idle timer, set when a connection is released) does not carry it.
            _CURRENT.reset(token)
            if stacked:
                unit.streaming = True
            entries = unit.entries
            if not entries:
                return response
            if defer:
                late = True
                return _LateResponse(response, unit)
            unit.state = 1  # the handler is over: a disconnect no longer cancels it
            if (
                unit.late
                or getattr(response, "status_code", 200) >= 400
                or unit.failure is not None  # its client went away while it ran in a thread
                or in_anyio_scope(task)
            ):
                response, late = await _release_slow(unit, response, again)
                return response
            # The common case: closed here, in reverse (a cleanup that suspends is awaited,
            # shielded); a failing commit answers 500 (503) instead. Closed first: a value a
            # task of the request finishes opening now is not handed out.
            unit.values.clear()
            unit.closed = True
            failed = await close_all(lc, entries, None, [])
            if failed is None:
                return response
            _retry_if_lost(unit, failed, again)
            if _app_answers(request.scope, failed):
                raise failed  # closed: the app's own exception handler answers
            return _error_response(failed, lc)
        finally:
            if not late:
                if unit.streaming:  # its values close after FastAPI's producer
                    if unit.watch is not None:  # the response reads what comes from here
                        unit.stop_watching(unit._receive)
                else:
                    unit.closed = True
                    if unit.watch is not None:
                        unit.stop_watching(unit._receive)
                    units.discard(unit)  # `lc._retire`, inline
                    if lc._drained is not None and not units:
                        lc._drained.set()

    return tether_handler


def _retry_if_lost(unit: HttpUnit, failed: BaseException, again: bool) -> None:
    """A commit that failed with nothing committed: its connection lost (asyncpg refusing to
    send ``COMMIT``), or refused by the server for a conflict with a concurrent transaction
    (a serialization failure found at ``COMMIT``, which rolls it back). An ``idempotent``
    route runs again, as it does when that happens under the endpoint (the response has not
    started)."""
    retryable = (isinstance(failed, ResourceUnavailable) and failed.lost) or (
        transaction_conflict(failed) is not None
    )
    if again and retryable and _body_again(unit.request):
        raise _Retry(failed)


def _body_again(request: Any) -> bool:
    """Whether a run again of the route would find the request's body: not a form (its
    files are closed by now), and not a body the route streamed (``request.stream()``, read
    once: a run again failed with Starlette's "Stream consumed", a 500 where the lost
    connection would have been a 503: trial 24). A body read whole is kept (``_body``)."""
    if getattr(request, "_form", None) is not None:
        return False
    return not getattr(request, "_stream_consumed", False) or hasattr(request, "_body")


async def _release_slow(unit: HttpUnit, response: Any, again: bool) -> tuple[Any, bool]:
    """Release at the handler's return, the other cases: an error status (the values
    roll back), values released with the response, a task in an anyio cancel scope.
    Returns the response to send, and whether the unit goes on with it."""
    status = getattr(response, "status_code", 200)
    if status >= 400:
        unit.failure = FailedResponse(status)
    errors = await unit.release_early(unit.failure)
    if errors and unit.failure is None:
        if unit.entries:
            await unit.aclose(errors[-1])
        _retry_if_lost(unit, errors[-1], again)
        if _app_answers(getattr(unit.request, "scope", None), errors[-1]):
            raise errors[-1]  # closed: the app's own exception handler answers
        return _error_response(errors[-1], unit.lc), False
    if unit.entries:
        return _LateResponse(response, unit), True
    if isinstance(unit.failure, ClientDisconnected):  # rolled back: its client is gone
        return _response(_GONE_STATUS, _GONE, None), False
    return response, False


async def _handler_failed(
    unit: HttpUnit, exc: BaseException, again: bool = False, *, deferred: bool = False
) -> Any:
    """The handler raised: close with that failure, then answer 503 for
    `ResourceUnavailable` (unless the app has an exception handler for it: then it is
    re-raised, for that handler), 499 for a client that went away (the server drops it),
    else re-raise.

    *again*: the route may run again (`idempotent`) if the connection was lost.
    *deferred*: the values close later, after the route's ``Depends(scope="function")``
    cleanups (`_defer_failure`)."""
    if _client_gone(unit, exc):
        if deferred:
            return _ClosedFirst(_response(_GONE_STATUS, _GONE, None), unit, exc)
        await unit.aclose(unit.failure)
        return _response(_GONE_STATUS, _GONE, None)
    errors = [] if deferred else await unit.aclose(exc)
    # Not a request whose body is gone: a form's files are closed by now, a stream read.
    if again and _body_again(unit.request):
        lost = _why_run_again(exc, errors)
        if lost is not None:
            raise _Retry(lost) from exc
    if isinstance(exc, ResourceUnavailable):
        if _app_handles(getattr(unit.request, "scope", None), exc):
            raise exc
        _refusals(unit.lc).log(unit.label, "answered 503", exc)
        answer = _response(503, _detail(unit.lc, exc), exc.retry_after)
        return _ClosedFirst(answer, unit, exc) if deferred else answer
    if errors and isinstance(errors[-1], ResourceUnavailable):
        if _app_handles(getattr(unit.request, "scope", None), errors[-1]):
            raise errors[-1]
        return _response(503, _detail(unit.lc, errors[-1]), errors[-1].retry_after)
    if _stopped_by_the_shutdown(unit, exc):
        answer = _response(503, _SHUTTING_DOWN, 5.0)
        return _ThenCancelled(_ClosedFirst(answer, unit, exc) if deferred else answer, exc)
    _cut_before_the_start(getattr(unit.request, "scope", None), unit, exc)
    raise _said_instead(exc, errors)


def _said_instead(exc: BaseException, errors: list[BaseException]) -> BaseException:
    """What to raise for the endpoint's *exc*: tether's own error for it, if an integration's
    cleanup said what *exc* meant (`raise ScopeError(...) from exc`: asyncpg's "another
    operation is in progress" is two tasks on one connection), else *exc*, whatever the
    other cleanups raised. On the failure path only."""
    for error in errors:
        if error.__cause__ is exc and isinstance(error, TetherError):
            return error
    return exc


def _app_handles(scope: Any, exc: BaseException) -> bool:
    """Whether the app serving *scope* has an exception handler for *exc*
    (``@app.exception_handler``, for its class or a base class; Starlette's own for
    ``HTTPException``), looked up by MRO as Starlette does: then the handler answers, as
    it does on routes served through their ``handle``."""
    handlers = scope.get("starlette.exception_handlers") if scope is not None else None
    if not handlers:
        return False
    by_class = handlers[0]
    return any(cls in by_class for cls in type(exc).__mro__)


def _app_answers(scope: Any, failed: BaseException) -> bool:
    """Whether a handler of the app's answers *failed* (a cleanup's failure at the release
    point, before the response started): then it is raised, once every value is closed, as
    if the endpoint had raised it. That is a handler for its class or a base class
    (`_app_handles`); else, for any exception but `ResourceUnavailable` (tether's 503 comes
    first), the app's server-error handler (``@app.exception_handler(Exception)`` or
    ``(500)``) if it has one. Starlette's ``ServerErrorMiddleware`` calls that one for what
    nothing else handled (an HTTP middleware's ``except`` around ``call_next`` sees it on
    its way), then raises it on to the server, which logs it, as for the endpoint's own
    errors. Without either, tether answers 500 (503) itself."""
    if _app_handles(scope, failed):
        return True
    if scope is None or isinstance(failed, ResourceUnavailable):
        return False
    return _app_reports(scope, failed)


def _app_reports(scope: Any, failed: BaseException) -> bool:
    """Whether the app has a server-error handler (``@app.exception_handler(Exception)``
    or ``(500)``) that *failed* reaches. Starlette's ``ServerErrorMiddleware`` calls it for
    what escapes the app, response started or not (it sends its answer only if not). For a
    cleanup's failure after the response started, it gets the failure itself, not tether's
    `_Aborted` (an error reporter records what failed); a handler for the failure's class
    cannot answer a started response: Starlette raises its ``RuntimeError``, caused by the
    failure, on to the server-error handler, as for an endpoint's error raised mid-body."""
    if scope is None:
        return False
    # The innermost app's (a mounted app's own, if it has one): the first
    # `ServerErrorMiddleware` the exception reaches on its way out. Its handler, not the
    # app's `exception_handlers`: the one the stack was built with is the one that runs.
    stack = getattr(scope.get("app"), "middleware_stack", None)
    if isinstance(stack, _AnswersTheShutdown):
        stack = stack.app
    return (
        isinstance(failed, Exception)
        and isinstance(stack, ServerErrorMiddleware)
        and stack.handler is not None
    )


def _reported_on_the_way_out(unit: HttpUnit, scope: Any, failed: BaseException) -> bool:
    """After the response started: whether a server-error handler sees *failed* on its way
    out, the innermost app's (`_app_reports`) or, for a route of a mounted app, that of an
    app the Lifecycle serves that mounts it (an error reporter is registered on the main
    app, and versioned sub-apps mounted on it: ``app.mount("/v1", v1)``). Nothing can be
    answered any more: only who sees it is asked. On the failure path only."""
    if _app_reports(scope, failed):
        return True
    inner = scope.get("app") if scope is not None else None
    if inner is None or not isinstance(failed, Exception):
        return False
    return any(
        outer is not inner and _mounts(outer, inner) and _app_reports({"app": outer}, failed)
        for outer in list(unit.lc._installed_apps.keys())
    )


def _mounts(outer: Any, inner: Any, depth: int = 0) -> bool:
    """Whether *outer*'s routes mount *inner*, directly or through mounted apps and routers
    (``Mount``, ``Host``: a route with an ``app``)."""
    if depth > 8:  # no app is mounted this deep; stop on anything circular
        return False
    for route in getattr(getattr(outer, "router", outer), "routes", ()):
        for app in (getattr(route, "_base_app", None), getattr(route, "app", None)):
            if app is inner or (app is not None and _mounts(app, inner, depth + 1)):
                return True
    return False


def _defer_failure(unit: HttpUnit, exc: BaseException) -> bool:
    """The handler of a route with a ``Depends(scope="function")`` cleanup raised: that
    cleanup runs as the exception leaves FastAPI's exit stack for the function, and may
    still use the request's values. They close with the failure on the request's exit
    stack (which FastAPI unwinds after that one, before the error response is made);
    returns whether they do."""
    request = unit.request
    stack = request.scope.get("fastapi_inner_astack") if request is not None else None
    if stack is None or not unit.entries:
        return False
    unit.state = 1  # the handler is over: a disconnect no longer cancels it
    if unit.watch is not None:
        unit.stop_watching(unit._receive)

    async def close(exc_type: Any, exc_value: BaseException | None, tb: Any) -> bool:
        await _close_deferred(unit, exc)
        return False

    stack.push_async_exit(close)
    return True


async def _close_deferred(unit: HttpUnit, exc: BaseException) -> None:
    """Close the values `_defer_failure` kept open, once, with the failure."""
    if not unit.closed:
        try:
            await unit.aclose(unit.failure if unit.failure is not None else exc)
        finally:
            unit.closed = True
            unit.lc._retire(unit)


class _ClosedFirst:
    """An answer tether makes itself (503, 499) on a route whose values wait for its
    ``Depends(scope="function")`` cleanups (`_defer_failure`): FastAPI runs those cleanups
    when the handler returns it, and the values close then, before it is sent, as they
    do before any other response."""

    __slots__ = ("exc", "response", "unit")

    def __init__(self, response: Any, unit: HttpUnit, exc: BaseException) -> None:
        self.response = response
        self.unit = unit
        self.exc = exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _close_deferred(self.unit, self.exc)
        await self.response(scope, receive, send)


class _LateResponse:
    """A handler's response sent with values of its unit still open.

    Its ``send`` closes them: the ``release="handler"`` ones (if the handler deferred
    them) when the response starts, the ``release="response"`` ones just before the last
    body message, so a failing commit aborts the response instead of completing it; the
    unit ends when the response does. Should the response never be sent (a dependency's
    cleanup failing in between), FastAPI's exit stack for the request closes them.
    """

    __slots__ = ("response", "unit")

    def __init__(self, response: Any, unit: HttpUnit) -> None:
        self.response = response
        self.unit = unit
        request = unit.request
        stack = request.scope.get("fastapi_inner_astack") if request is not None else None
        if stack is not None:
            stack.push_async_exit(self._unsent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.response, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        unit = self.unit
        unit._send = send
        unit._receive = unit.stop_watching(receive)
        unit.watch = None
        await _run(unit, self.response, scope, unit.receive, current=False)

    async def _unsent(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        unit = self.unit
        if not unit.closed and not unit.streaming:
            unit.stop_watching(unit._receive)
            try:
                await unit.aclose(exc if exc is not None else FailedResponse(500))
            finally:
                unit.closed = True
                unit.lc._retire(unit)
        return False


# The answer to a client that went away (nginx's "client closed request"). The server drops
# it (uvicorn ignores what is sent after a disconnect), but a BaseHTTPMiddleware in the stack
# needs a response from the app, or raises "No response returned." and logs a traceback.
_GONE_STATUS = 499
_GONE = "The client closed the request before the response."


def _response(status: int, detail: str, retry_after: float | None) -> Any:
    from starlette.responses import Response

    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    headers = None
    if retry_after is not None:
        headers = {"retry-after": _retry_after(retry_after)}
    return Response(body, status_code=status, headers=headers, media_type="application/json")


#: The longest ``Retry-After`` sent: a day, as ``health_router(cache=)``'s bound.
_LONGEST_RETRY = 86400


def _retry_after(seconds: object) -> str:
    """The ``Retry-After`` header's value for a :class:`~tether.ResourceUnavailable`'s
    ``retry_after``: whole seconds, at least 1, at most a day. The declaration refuses a
    value that is no finite number, but the app's own code may raise the error with one
    (``retry_after=float("inf")``, ``"soon"``): then its 503 goes out with ``Retry-After:
    1`` and a WARNING, instead of failing as a 500. A numeric string (``"5"``) is read as
    its number."""
    try:
        whole = seconds if isinstance(seconds, int) else round(float(seconds))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        log.warning(
            "tether: a ResourceUnavailable was raised with retry_after=%r, which is not a "
            "finite number of seconds; its 503 is sent with Retry-After: 1. Raise it with a "
            "finite number of seconds, e.g. retry_after=1.",
            seconds,
        )
        return "1"
    return str(min(_LONGEST_RETRY, max(1, whole)))


def _error_response(error: BaseException, lc: Lifecycle) -> Any:
    if isinstance(error, ResourceUnavailable):
        return _response(503, _detail(lc, error), error.retry_after)
    return _response(500, "Internal Server Error", None)


def _detail(lc: Lifecycle, error: ResourceUnavailable) -> str:
    """A 503's detail: tether's message, or with ``Lifecycle(expose_errors=False)`` the
    resource's name only (the message is logged)."""
    if lc.expose_errors or error.resource == "lifecycle":  # "shutting down": nothing inside
        return str(error)
    return _unavailable_now(error)


def _unavailable_now(error: ResourceUnavailable) -> str:
    what = "A resource" if error.resource is None else repr(error.resource)
    return f"{what} is unavailable now. Retry later."


# --------------------------------------------------------------------------- health


_DAY = 86400.0  # the longest `health_router(cache=)`


def health_router(
    lc: Lifecycle,
    *,
    prefix: str = "/health",
    cache: float = 1.0,
    optional: Iterable[str] = (),
    **unknown: Never,  # a misspelt option: refused naming the one meant
) -> Any:
    """An ``APIRouter`` serving ``{prefix}/live`` and ``{prefix}/ready``.

    ``live`` answers 200 while the process serves, and 503 (``"status": "broken"``, naming
    them) once an app resource failed while the app ran, which only a restart opens again
    (a task of its own around its ``yield`` failed). ``ready`` answers 200 when the app
    scope runs and every ``check`` passes, and 503 while starting, while draining, or
    when a check fails; its body is the report.

    The checks' report is reused for *cache* seconds, and probes that arrive while the
    checks run wait for that run: a storm of probes (several load balancers, a kubelet
    per node) costs the database one round of checks per *cache* seconds. The state is
    never cached: ``ready`` fails the moment the app starts draining. ``cache=0`` runs
    the checks for every probe.

    *optional* names the resources the app can serve without (a cache, an upstream many
    instances share): their checks are run and reported (``"optional": true``), failing
    or down, but do not fail ``ready``, so that their outage does not take every instance
    out of rotation at once.
    """
    from fastapi import APIRouter

    if unknown:
        raise not_options("health_router()", unknown, health_router)
    check_lifecycle(lc, "health_router()", "health_router(lc)")
    _check_prefix(prefix, "health_router", '"/live" and "/ready"', "/health")
    check_number(cache, "cache", "health_router()", least=None, example="1.0, or 0 for every probe")
    if not is_seconds(cache, zero=True):
        msg = (
            f"health_router(cache={cache!r}): cache is how long, in seconds, /ready reuses "
            f"the checks' report, and must be a number >= 0; e.g. cache=1.0, or 0 to run "
            f"the checks for every probe."
        )
        raise ValueError(msg)
    if cache == float("inf"):
        msg = (
            f"health_router(cache={cache!r}): cache is how long, in seconds, /ready reuses "
            f"the checks' report: an infinite cache would answer the first report for ever, "
            f"never running the checks again. Pass a finite number, e.g. cache=1.0, or 0 to "
            f"run the checks for every probe."
        )
        raise ValueError(msg)
    if cache > _DAY:
        msg = (
            f"health_router(cache={cache!r}): cache is how long, in seconds, /ready reuses "
            f"the checks' report: {cache:g} s is over a day, so /ready would go on answering "
            f"200 long after the database went away. Pass a number of seconds up to 86400, "
            f"e.g. cache=1.0, or 0 to run the checks for every probe."
        )
        raise ValueError(msg)
    spared = _optional_checks(lc, optional)
    router = APIRouter(prefix=prefix, tags=["health"])
    last = _Reports(lc, cache)

    @router.get("/live")
    async def live() -> Any:
        failed = broken(lc)
        if failed:  # an app resource that failed while the app ran opens again on a restart
            body = {"status": "broken", "state": lc.state.value, "broken": failed}
            return JSONResponse(body, status_code=503)
        return {"status": "alive", "state": lc.state.value}

    logged: dict[str, str] = {}  # expose_errors=False: each check's error, logged once

    @router.get("/ready")
    async def ready() -> JSONResponse:
        report = await last.report()
        ok = report.ok or (
            bool(spared)
            and report.state == "running"
            and all(c.ok or c.name in spared for c in report.checks)
        )
        headers = {} if ok else {"Retry-After": "5"}
        if not lc.expose_errors:  # kept from the body: in the log, each time it changes
            for check in report.checks:
                error = check.error or ""
                # Its figures aside (a time, a count: "none handed out for 7.2 s"), which
                # change at each round: a line per probe, not per change (trial 14).
                kind = _FIGURES.sub("#", error)
                if logged.get(check.name, "") != kind:
                    if error:
                        log.warning("tether: readiness check %r fails: %s", check.name, error)
                    elif logged.get(check.name):
                        log.info("tether: readiness check %r passes again", check.name)
                    logged[check.name] = kind
        body = report.as_dict(errors=lc.expose_errors)
        if spared:
            body["status"] = "ok" if ok else "unavailable"
            for name, check in body["checks"].items():
                if name in spared:
                    check["optional"] = True
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)

    return router


def _optional_checks(lc: Lifecycle, optional: object) -> frozenset[str]:
    """`health_router`'s *optional*, checked: names of resources declared on *lc*."""
    where = "health_router(optional=...)"
    if isinstance(optional, str) or not isinstance(optional, Iterable):
        msg = (
            f"{where}: optional={optional!r} is {_a_type(optional)}, not a list of resource "
            f'names: pass them in a list, e.g. optional=["cache"].'
        )
        raise TypeError(msg)
    names = list(optional)
    declared = lc.resources
    for name in names:
        if not isinstance(name, str):
            got = f"{name!r}, {_a_type(name)}"
            if isinstance(name, Resource):
                got = f"the resource {name.name!r} itself"
            msg = (
                f"{where}: {got} is no resource name: pass the names, e.g. "
                f'optional=["cache"] (a resource\'s name is its .name).'
            )
            raise TypeError(msg)
        if name not in declared:
            near = closest(name, declared)
            meant = f" (did you mean {near!r}?)" if near else ""
            msg = (
                f"{where}: {name!r} is no resource of this Lifecycle{meant}. Name a declared "
                f"resource, declared before health_router() is called; its resources: "
                f"{', '.join(map(repr, declared)) or 'none yet'}."
            )
            raise ValueError(msg)
    return frozenset(names)


#: Seconds the dashboard's checks.json reuses a round of checks.
_CHECKS_REUSED = 1.0

#: The figures in a check's error, left out when telling whether it changed.
_FIGURES = re.compile(r"\d+(?:\.\d+)?")


class _Reports:
    """The readiness report, reused for *cache* seconds; probes that come while a round of
    checks runs wait for it, unless it started more than *cache* seconds ago (a check
    stuck on a database that does not answer): then they start a round of their own.

    A report is only reused in the app scope that made it, with the same overrides: the
    next test's app (its own `TestClient`, another `lc.override`) runs its own checks."""

    __slots__ = (
        "cache",
        "key",
        "last",
        "last_started",
        "lc",
        "round_key",
        "running",
        "started",
        "until",
    )

    def __init__(self, lc: Lifecycle, cache: float) -> None:
        self.lc = lc
        self.cache = cache
        self.last: HealthReport | None = None
        self.last_started = 0.0  # when the round that made `last` started
        self.until = 0.0
        self.running: anyio.Event | None = None
        self.started = 0.0
        self.key: tuple[int, ...] = ()  # the app scope and overrides `last` was made in
        self.round_key: tuple[int, ...] = ()  # and the round under way

    def _key(self) -> tuple[int, ...]:
        lc = self.lc
        return (lc._runs, *map(id, lc._overrides.values()))

    async def report(self) -> HealthReport:
        lc = self.lc
        if lc.state is not _RUNNING or lc._stopping or not self.cache:
            return await lc.health()  # starting, stopping, draining: says so at once, no I/O
        now = time.monotonic()
        key = self._key()
        if key != self.key:
            self.last = None  # made in another app scope, or before an override
        if self.last is not None and now < self.until:
            return self.last
        running = self.running
        if running is not None and now - self.started < self.cache and key == self.round_key:
            await running.wait()  # a round under way: its report will do
            if (
                self.last is not None
                and now < self.until
                and lc.state is _RUNNING
                and not lc._stopping  # SIGTERM came during the round: its report is old
            ):
                return self.last
        self.running = mine = anyio.Event()
        self.round_key = key
        self.started = started = time.monotonic()
        try:
            report = await lc.health()
            if started >= self.last_started:  # not overtaken by a round started later
                self.last, self.last_started, self.key = report, started, key
                self.until = time.monotonic() + self.cache
            return report
        finally:
            if self.running is mine:
                self.running = None
            mine.set()


def _check_prefix(prefix: object, fn: str, paths: str, default: str) -> None:
    """Refuse a router's *prefix* FastAPI would refuse (with an AttributeError or an
    AssertionError of its own) where the router is made: not a string, not starting with
    "/", ending with "/"."""
    if not isinstance(prefix, str):
        kind = "is not" if prefix is None else f"is {_a_type(prefix)}, not"
        msg = (
            f"{fn}(): prefix={prefix!r} {kind} a string. Pass the path "
            f'its routes go under, e.g. prefix="{default}" (the default), or "" for none.'
        )
        raise TypeError(msg)
    if prefix == "" or (prefix.startswith("/") and not prefix.endswith("/")):
        return
    wrong = []
    if not prefix.startswith("/"):
        wrong.append('does not start with "/"')
    if prefix.endswith("/"):
        wrong.append('ends with "/"')
    fixed = prefix.strip("/")
    fix = f'prefix="/{fixed}"' if fixed else 'prefix="" for its routes at the root'
    msg = (
        f"{fn}(prefix={prefix!r}): the prefix {' and '.join(wrong)}: it must start with "
        f'"/" and not end with one, as its routes ({paths}) start with "/", or be "" for '
        f"none. Pass {fix}."
    )
    raise ValueError(msg)


def _check_dependencies(dependencies: object) -> None:
    """Refuse dashboard_router()'s *dependencies* that FastAPI would fail on: one
    ``Depends(...)`` not in a list, an item that is not a ``Depends(...)``."""
    from fastapi import params

    if dependencies is None:
        return
    single = isinstance(dependencies, params.Depends | str | bytes)
    if single or not hasattr(dependencies, "__iter__"):
        given = getattr(getattr(dependencies, "dependency", None), "__name__", None)
        msg = (
            f"dashboard_router(): dependencies={dependencies!r} is {_a_type(dependencies)}, "
            f"not a list. Pass a list of Depends(...), e.g. "
            f"dependencies=[Depends({given or 'require_admin'})]."
        )
        raise TypeError(msg)
    for i, item in enumerate(dependencies if isinstance(dependencies, list | tuple) else ()):
        if not isinstance(item, params.Depends):
            shown = getattr(item, "__name__", None) if callable(item) else None
            msg = (
                f"dashboard_router(): dependencies[{i}]={item!r} is {_a_type(item)}, not a "
                f"Depends(...). Wrap it: dependencies=[Depends({shown or 'require_admin'})]."
            )
            raise TypeError(msg)


#: The longest ``refresh`` a browser's ``setTimeout`` takes (2**31 - 1 ms, in seconds).
_MOST_REFRESH = 2_147_483


def dashboard_router(
    lc: Lifecycle,
    *,
    prefix: str = "/tether",
    dependencies: Sequence[Any] | None = None,
    refresh: float = 2.0,
    include_in_schema: bool = False,
) -> Any:
    """An ``APIRouter`` serving a live dashboard of *lc* at ``{prefix}/``.

    The page polls ``{prefix}/stats.json`` every *refresh* seconds: the lifecycle's state,
    every resource's counters (``lc.stats()``), and the oldest units of work in flight
    with what each holds, and where a value held past the leak threshold was acquired.
    Its "Run checks" button reads ``{prefix}/checks.json`` (``lc.health()``, 503 when a
    check fails, as ``/health/ready``; a round of checks is reused for a second). The page
    is self-contained: no script or style is loaded from elsewhere.

    It shows route paths and source file names: guard it with *dependencies*, e.g.
    ``dependencies=[Depends(require_admin)]``, which apply to all three routes. Served with
    none (from this call, the app or an ``include_router``), it is named in a warning when
    the app starts; ``dependencies=[]`` says that something else guards it (a middleware,
    the network).
    """
    from fastapi import APIRouter

    from ._dashboard import page, security_headers, snapshot

    check_lifecycle(lc, "dashboard_router()", "dashboard_router(lc)")
    _check_prefix(prefix, "dashboard_router", '"/", "/stats.json" and "/checks.json"', "/tether")
    check_number(refresh, "refresh", "dashboard_router()", least=None, above=True, example="2.0")
    check_bool(include_in_schema, "include_in_schema", "dashboard_router()")
    if not is_seconds(refresh):
        msg = (
            f"dashboard_router(refresh={refresh!r}): refresh is how often the page polls "
            f"its stats, in seconds, and must be a positive number; e.g. refresh=2.0."
        )
        raise ValueError(msg)
    if refresh > _MOST_REFRESH:  # a browser's timer takes it as no delay: it would poll
        msg = (
            f"dashboard_router(refresh={refresh!r}): refresh is how often the page polls "
            f"its stats, in seconds, and must be at most {_MOST_REFRESH:,} (about 24 days: "
            f"past that, a browser's timer reads it as no delay, and the page would poll "
            f"without pause); e.g. refresh=2.0, or 3600 for about never."
        )
        raise ValueError(msg)
    _check_dependencies(dependencies)
    router = APIRouter(
        prefix=prefix,
        tags=["tether"],
        dependencies=list(dependencies or ()),
        include_in_schema=include_in_schema,
    )
    # Route names unique to this router, so two dashboards in one app find their own JSON.
    stats_name = f"tether_dashboard_stats_{id(router):x}"
    checks_name = f"tether_dashboard_checks_{id(router):x}"

    @router.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> HTMLResponse:
        urls = request.url_for(stats_name).path, request.url_for(checks_name).path
        headers = {"Cache-Control": "no-store", **security_headers()}
        return HTMLResponse(page(*urls, refresh), headers=headers)

    # No dependencies= given (not even []): named in a warning when the app starts, unless
    # the app or an include_router guards it (`_unguarded_dashboard`).
    dashboard._tether_unguarded = dependencies is None  # type: ignore[attr-defined]

    @router.get("/stats.json", name=stats_name)
    async def stats() -> JSONResponse:
        return JSONResponse(snapshot(lc), headers={"Cache-Control": "no-store"})

    # Reused for a second, and shared by the requests that come while it runs, as
    # /health/ready's: a storm of requests (the page open in many tabs, or a client hammering
    # an unguarded dashboard) runs one round of checks a second, not one each (trial 19).
    last = _Reports(lc, _CHECKS_REUSED)

    @router.get("/checks.json", name=checks_name)
    async def checks() -> JSONResponse:
        report = await last.report()
        return JSONResponse(
            report.as_dict(),
            status_code=200 if report.ok else 503,
            headers={"Cache-Control": "no-store"},
        )

    return router
