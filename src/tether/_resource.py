"""Resource: a named factory with a scope. Everything per-factory is worked out here, once."""

from __future__ import annotations

import enum
import functools
import inspect
import os
import re
import types
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._errors import ScopeError
from ._stats import Counters, PoolStats

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from ._scope import Unit

T = TypeVar("T")

Scope = Literal["app", "request"]
Release = Literal["handler", "response"]
Check = Callable[[Any], Any]


class Kind(enum.IntEnum):
    """How a factory produces its value and how it is cleaned up."""

    ASYNC_GEN = 1  # async def f(): ... yield value ...
    SYNC_GEN = 2  # def f(): ... yield value ...
    ASYNC_CM = 3  # @asynccontextmanager, or a class with __aenter__/__aexit__
    SYNC_CM = 4  # @contextmanager, or a class with __enter__/__exit__
    ASYNC_FUNC = 5  # async def f(): return value  (no cleanup)
    SYNC_FUNC = 6  # def f(): return value  (no cleanup)


SYNC_KINDS = frozenset({Kind.SYNC_GEN, Kind.SYNC_CM})


def _contextlib_helper(fn: Any) -> bool:
    """Whether *fn* is the function ``@contextmanager`` / ``@asynccontextmanager`` made (its
    code is contextlib's, or a backport's of it): an ordinary ``functools.wraps`` wrapper,
    which also keeps the generator function in ``__wrapped__``, passes the call through."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    path = str(code.co_filename)
    return "contextlib" in os.path.basename(path) or "contextlib" in os.path.basename(
        os.path.dirname(path)
    )


def _same_kind(helper: Any, wrapped: Any) -> None:
    """Refuse ``@asynccontextmanager`` on a sync generator function, and ``@contextmanager``
    on an async one, when the resource is declared: each would fail at its first use, with
    Python's ``AttributeError`` (``'_AsyncGeneratorContextManager' object has no attribute
    '__enter__'``) naming no resource."""
    names = helper.__code__.co_names
    is_async = "_AsyncGeneratorContextManager" in names
    if not is_async and "_GeneratorContextManager" not in names:
        return  # a backport's helper, or another: as before
    if is_async and inspect.isgeneratorfunction(wrapped):
        given, other = "@asynccontextmanager", "a sync generator function (`def`)"
        fix = "make it `async def`, or use @contextmanager"
    elif not is_async and inspect.isasyncgenfunction(wrapped):
        given, other = "@contextmanager", "an async generator function (`async def`)"
        fix = "use @asynccontextmanager, or make it a `def`"
    else:
        return
    name = getattr(wrapped, "__qualname__", repr(wrapped))
    msg = f"A resource factory: {given} is on {name}, which is {other}: {fix}."
    raise TypeError(msg)


def kind_of(factory: Callable[..., Any]) -> Kind:
    """Classify *factory* once, at registration.

    A ``functools.partial`` is its function; an ordinary decorator made with
    ``functools.wraps`` passes the call through, so it has the kind of the function it
    wraps (``__wrapped__``), but ``@(async)contextmanager``'s own function makes a context
    manager of the generator function it wraps.
    """
    if inspect.isclass(factory):
        if hasattr(factory, "__aenter__") and hasattr(factory, "__aexit__"):
            return Kind.ASYNC_CM
        if hasattr(factory, "__enter__") and hasattr(factory, "__exit__"):
            return Kind.SYNC_CM
        return Kind.SYNC_FUNC
    fn: Any = factory
    for _ in range(100):  # the chain of wrappers (bounded: a __wrapped__ may loop)
        while isinstance(fn, functools.partial):
            fn = fn.func
        if inspect.isasyncgenfunction(fn):
            return Kind.ASYNC_GEN
        if inspect.isgeneratorfunction(fn):
            return Kind.SYNC_GEN
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None and _contextlib_helper(fn):
            _same_kind(fn, wrapped)
            if inspect.isasyncgenfunction(wrapped):
                return Kind.ASYNC_CM
            if inspect.isgeneratorfunction(wrapped):
                return Kind.SYNC_CM
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - callable objects
        ):
            return Kind.ASYNC_FUNC
        if wrapped is None or not callable(wrapped) or not isinstance(fn, types.FunctionType):
            # Only a function's decorator passes the call through: an object that wraps a
            # function (asgiref's AsyncToSync, say) may run it instead.
            break
        fn = wrapped
    return Kind.SYNC_FUNC


#: FastAPI's parameter markers, as written in an annotation's text (under
#: ``from __future__ import annotations``, when it cannot be evaluated).
_MARKER_TEXT = re.compile(
    r"\b(Depends|Security|Header|Query|Path|Body|Cookie|Form|File)\(\s*"
    r"(?:dependency\s*=\s*)?([A-Za-z_][\w.]*)?"
)


def _fastapi_marker(param: inspect.Parameter) -> tuple[str, str | None] | None:
    """FastAPI's ``Depends()``, ``Header()``, ``Query()``... in *param*'s default or its
    ``Annotated`` metadata, if any (told by the class's module: FastAPI is not imported),
    as (its class name, the name of its dependency function, if any). An annotation left
    as a string (one that could not be evaluated) is read as text."""
    annotation = param.annotation
    metadata = getattr(annotation, "__metadata__", ())
    for marker in (param.default, *metadata):
        if type(marker).__module__ == "fastapi.params":
            dependency = getattr(marker, "dependency", None)
            dep = None if dependency is None else getattr(dependency, "__name__", "the function")
            return type(marker).__name__, dep
    if isinstance(annotation, str) and "Annotated" in annotation:
        found = _MARKER_TEXT.search(annotation)
        if found is not None:
            kind, dep = found.group(1), found.group(2)
            if kind not in ("Depends", "Security"):
                dep = None  # Header("x-token"): its argument is not a function
            return kind, dep
    return None


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """*factory*'s signature, its string annotations (``from __future__ import
    annotations``) evaluated where they can be."""
    try:
        return inspect.signature(factory, eval_str=True)
    except Exception:  # an annotation that does not evaluate: a name under TYPE_CHECKING
        pass
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def parameters_of(factory: Callable[..., Any], name: str = "") -> tuple[str, ...]:
    """The parameter names of *factory*: each names a resource it depends on. The
    keyword-only ones come last (as in any signature): see `caller`."""
    sig = _signature(factory)
    if sig is None:
        return ()
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        marker = _fastapi_marker(p)
        if marker is not None:
            kind, dep = marker
            head = (
                f"Resource {name!r}: parameter {p.name!r} is FastAPI's {{}}, which tether does "
                f"not resolve: tether calls a resource's factory itself, and passes it only "
                f"other resources, by parameter name."
            )
            if dep is not None:
                msg = head.format(f"{kind}({dep})") + (
                    f" Register {dep} as a resource, @lc.resource(name={p.name!r}), and drop "
                    f"the {kind}()."
                )
            else:
                msg = head.format(f"{kind}()") + (
                    f" Read it in the route (`{p.name}: Annotated[str, {kind}()]`) and pass "
                    f"it to the work there, or drop the parameter."
                )
            raise TypeError(msg)
        if p.default is not p.empty:
            continue  # a parameter with a default is configuration, not a dependency
        names.append(p.name)
    return tuple(names)


def caller(factory: Callable[..., Any]) -> Callable[..., Any]:
    """What tether calls with the values of *factory*'s dependencies, in the order of its
    parameters: *factory* itself, or, when some of them are keyword-only, a function that
    passes those by keyword (worked out once; the common factory costs nothing more)."""
    sig = _signature(factory)
    if sig is None:
        return factory
    keywords = tuple(
        p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    )
    if not keywords:
        return factory
    count = -len(keywords)

    def call(*args: Any) -> Any:
        return factory(*args[:count], **dict(zip(keywords, args[count:], strict=True)))

    return call


_MISSING: Any = object()

# The unit of work of the running request (set by the ASGI glue for the call's task), as
# a weak reference: see tether.fastapi.
current_unit: ContextVar[Callable[[], Unit | None] | None] = ContextVar("tether_unit", default=None)


class Resource(Generic[T]):
    """A named factory with a scope, registered on a :class:`~tether.Lifecycle`.

    Made by ``@lc.resource``. It is a FastAPI dependency as it is:
    ``Annotated[T, Depends(res)]`` gives the value for the current request
    (or WebSocket connection), opened on first use and closed by tether.
    """

    __slots__ = (
        "__weakref__",
        "aside_check",
        "async_api",
        "backoff",
        "call",
        "check",
        "check_late",
        "check_timeout",
        "concurrency",
        "counters",
        "counts_waits",
        "deps",
        "error_status",
        "factory",
        "fast",
        "guard",
        "has_cleanup",
        "is_sync",
        "kind",
        "late",
        "leak_of",
        "lifecycle",
        "limiter",
        "name",
        "params",
        "pool_stats",
        "release",
        "required",
        "retries",
        "retry_after",
        "saturation",
        "scope",
        "thread",
        "timeout",
    )

    def __init__(
        self,
        lifecycle: Lifecycle,
        factory: Callable[..., Any],
        *,
        name: str,
        scope: Scope,
        check: Check | None,
        timeout: float | None,
        release: Release,
        retries: int,
        backoff: float,
        concurrency: int | None,
        thread: bool | None,
        check_timeout: float,
        retry_after: float,
        guard: bool,
    ) -> None:
        self.lifecycle = lifecycle
        self.factory = factory
        self.name = name
        self.scope = scope
        self.check = check
        self.timeout = timeout
        self.release = release
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.check_timeout = check_timeout
        self.retry_after = retry_after
        self.guard = guard
        self.kind = kind_of(factory)
        self.params = parameters_of(factory, name)
        # What the factory is called through, with its dependencies' values in order.
        self.call = caller(factory)
        # Sync generators and context managers run in threads (they manage real
        # connections); a plain `def` runs inline unless asked otherwise, or given a
        # `timeout=`: inline, nothing could stop it (a blocking connect ran past it).
        if thread is None:
            thread = self.kind in SYNC_KINDS or (
                self.kind is Kind.SYNC_FUNC and timeout is not None
            )
        self.thread = thread
        self.is_sync = self.kind in SYNC_KINDS or self.kind is Kind.SYNC_FUNC
        self.has_cleanup = self.kind not in (Kind.ASYNC_FUNC, Kind.SYNC_FUNC)
        self.late = release == "response"
        self.deps: tuple[Resource[Any], ...] = ()
        self.limiter: Any = None  # anyio.CapacityLimiter, made when the lifecycle starts
        self.counters = Counters()
        # For an app resource that is a driver's pool, set by its integration: reads the
        # pool's own figures from its value (lc.stats().pools).
        self.pool_stats: Callable[[Any], PoolStats] | None = None
        # Set by an integration whose pool counts its waits that time out in its own
        # `timeouts` (httpx, Redis: the wait happens in a call, not in an open of tether's):
        # the metrics then add no dependent's timeouts to the pool's, the same event.
        self.counts_waits = False
        # For an app resource that is a driver's pool, set by its integration: whether every
        # connection is in use, read before a health check runs, so that a pool busy with
        # traffic is reported at once instead of the check queueing behind that traffic.
        # None: not saturated (run the check); (True, note): busy and serving (ready, the
        # check is not run); (False, reason): saturated and nothing handed out for too long.
        self.saturation: Callable[[Any], tuple[bool, str] | None] | None = None
        # With `saturation`, set by an integration: for a pool read as busy, a check of the
        # server on a connection of its own, outside the pool (an awaitable), when nothing
        # has been handed out for longer than the check's timeout (None otherwise): a server
        # that froze, its pool filled by commands that wait on it, read as busy, and ready,
        # until a wait for a connection timed out (trial 14).
        self.aside_check: Callable[[Any, float], Awaitable[None] | None] | None = None
        # Set by an integration: what a check that does not finish within check_timeout
        # most likely waits for (SQLite: a lock, for up to its busy timeout), said with it.
        self.check_late: str | None = None
        # Which response statuses take the failure path (None: 400 and more), set by
        # `lc.resource(error_status=...)`.
        self.error_status: Callable[[int], bool] | None = None
        # An app resource the app starts without when it cannot open (retried in the
        # background), set by `lc.resource(required=False)`.
        self.required = True
        self.fast = False
        # For an integration's own per-unit resource (`per_unit`: Redis's dedicated
        # connections, httpx's streamed responses): the app resource a leak of it is counted
        # on and named as, and what of it was held ("a dedicated connection: ...").
        self.leak_of: tuple[Resource[Any], str] | None = None
        # Set by an integration whose value's API is async (an AsyncSession, an asyncpg
        # connection): what the value is, for the warning given a `def` endpoint taking it.
        self.async_api: str | None = None
        self.set_deps(())

    def set_deps(self, deps: tuple[Resource[Any], ...]) -> None:
        """Bind the resources this one depends on (when the graph is resolved)."""
        self.deps = deps
        # A plain request resource (no timeout, no proxy, released at the handler, run on
        # the loop) is opened inline by the ASGI glue once what it needs is open.
        self.fast = (
            self.scope == "request"
            and self.timeout is None
            and not self.guard
            and not self.late
            and (
                self.kind in (Kind.ASYNC_GEN, Kind.ASYNC_FUNC)
                or (self.kind in (Kind.SYNC_FUNC, Kind.SYNC_GEN) and not self.thread)
            )
        )

    def __repr__(self) -> str:
        return f"<tether.Resource {self.name!r} scope={self.scope!r}>"

    # FastAPI inspects the signature of a dependency to know what to inject. A Resource
    # asks for the HTTP connection (works for HTTP and WebSocket routes alike). The
    # annotation is resolved lazily so the core does not import Starlette.
    @property
    def __signature__(self) -> inspect.Signature:
        from starlette.requests import HTTPConnection

        return inspect.Signature(
            [
                inspect.Parameter(
                    "connection",
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    annotation=HTTPConnection,
                )
            ]
        )

    async def __call__(self, connection: Any = None) -> T:
        """Give the value for the current request's unit of work (the FastAPI dependency)."""
        ref = current_unit.get()
        unit = ref() if ref is not None else None
        if unit is None or unit.lc is not self.lifecycle:
            if connection is None:  # called by hand, not by FastAPI, outside a unit of work
                return self._called_by_hand()
            unit = await self.lifecycle._unit_for_connection(connection, self.name)
        values = unit.values
        value = values.get(self, _MISSING)
        if value is _MISSING or value is OPENING:
            return await unit.get(self)
        return value  # type: ignore[no-any-return]

    def _called_by_hand(self) -> T:
        """``await resource()`` outside a request: an app resource's value, as `lc.get`."""
        if self.scope == "app":
            return self.lifecycle.get(self)
        msg = (
            f"Request resource {self.name!r} was called outside a request, with no unit of "
            f"work to open it in. In a route, let FastAPI call it: `Depends({self.name})`; "
            f"elsewhere, open a unit of work: `async with lc.scope() as s: "
            f"await s.get({self.name})`."
        )
        raise ScopeError(msg)


class _Opening:
    """The placeholder of a value being opened in a unit of work (one shared instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<opening>"


OPENING: Any = _Opening()
