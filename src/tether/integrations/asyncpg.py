"""asyncpg with tether: the pool lives for the app, a connection for one unit of work.

::

    from typing import Annotated

    import asyncpg
    from fastapi import Depends, FastAPI

    import tether
    from tether.integrations import asyncpg as tpg

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, lambda: os.environ["DATABASE_URL"], max_size=10)
    conn = tpg.connection(lc, pool, transaction=True)

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes")
    async def add(text: str, c: Annotated[asyncpg.Connection, Depends(conn)]) -> dict[str, str]:
        await c.execute("INSERT INTO notes (text) VALUES ($1)", text)  # committed before 200
        return {"status": "created"}

* :func:`pool` is an app resource: ``asyncpg``'s own pool, created when the app starts
  (never at import), checked with ``SELECT 1``, its connection budget checked against the
  server's ``max_connections``, closed at shutdown. It refuses use from another event
  loop than the one that opened it (:class:`~tether.ScopeError`).
* :func:`connection` is a request resource: one connection per unit of work, however many
  dependencies ask for it, optionally in a transaction that commits before the response
  starts and rolls back on any failure.
* A pool with no connection free within ``acquire_timeout``, or a database that cannot
  be reached, is a :class:`~tether.ResourceUnavailable` (503 with ``Retry-After``) naming
  the pool, its size, how many connections are in use and how many requests wait.
* A connection never goes back to the pool in an unknown state. A query cancelled
  mid-flight (the client went away, a timeout) is cancelled on the server by asyncpg;
  the connection is then rolled back and reset before it is reused, and if that cannot
  be done in ``reset_timeout`` seconds (or another task still uses the connection), it
  is terminated instead.
* ``pgbouncer=True`` configures asyncpg for PgBouncer's transaction (or statement) mode:
  no named prepared statements, no session reset query, no budget check against the
  server behind PgBouncer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import math
import os
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Never

import anyio

try:
    import asyncpg
    import asyncpg.exceptions as pg_errors
    from asyncpg.transaction import TransactionState as _TxState
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.asyncpg needs asyncpg: pip install 'tether[asyncpg]'"
    raise ImportError(msg) from exc

from .._errors import (
    ClientDisconnected,
    ResourceUnavailable,
    ScopeError,
    check_bool,
    check_number,
    describe,
    for_good,
    not_options,
    refused_for_good,
)
from .._resource import Resource, current_unit
from .._scope import wait_to_the_end
from .._stats import PoolStats
from . import _once
from ._common import (
    IN_BLOCK_RESET,
    LOST_NOTE,
    READ_ONLY_UNIT,
    RESET_SESSION,
    SAVEPOINT,
    SERVER_READ_ONLY,
    SESSION_SETTINGS,
    SETTLE,
    BudgetPolicy,
    ConnectionOf,
    Dsn,
    LoopBound,
    PerResource,
    async_block,
    asyncio_only,
    block_override,
    check_budget,
    check_budget_policy,
    check_check,
    check_driver_scheme,
    check_dsn,
    check_ports,
    check_resource,
    check_transaction_options,
    commit_not_sent,
    connection_lost,
    depends_on,
    did_you_mean,
    failed_transaction,
    forget_budget,
    keyword_names,
    not_an_option,
    note_pgbouncer,
    plain_dsn,
    pooler_never_sent,
    queue_full,
    read_budget,
    read_only,
    read_only_failure,
    redact,
    registered,
    resolve_dsn,
    saturation,
    scrub_secrets,
    sqlstates,
    still_in_use,
    unavailable,
    unreachable,
    url_ports,
    used_concurrently,
)
from ._common import workers as worker_count

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check, Release
    from .._scope import Unit

__all__ = ["Pool", "connection", "once", "pool", "rolled_back"]

log = logging.getLogger("tether")

_EXAMPLE_DSN = "lambda: os.environ['DATABASE_URL']"
_STOP_WITHIN = 1.0  # seconds to terminate, on the server, the backend of a discarded connection

#: Errors that mean "the database cannot be reached (right now)", not "the query is wrong".
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefusedError, socket.gaierror, TimeoutError (connect timeout)
    pg_errors.PostgresConnectionError,  # 08xxx
    pg_errors.CannotConnectNowError,  # 57P03: starting up, shutting down
    pg_errors.AdminShutdownError,  # 57P01
    pg_errors.CrashShutdownError,  # 57P02
    pg_errors.TooManyConnectionsError,  # 53300
)


# --------------------------------------------------------------------------- the pool


class _State:
    """What tether knows about one pool it opened (for messages and the loop check)."""

    __slots__ = (
        "acquire_timeout",
        "bound",
        "closing",
        "codecs",
        "configured",
        "connect_kept",
        "create_time",
        "created",
        "discarded",
        "due_since",
        "expired",
        "expires",
        "idle_since",
        "lifetime",
        "listeners",
        "loggers",
        "max_waiting",
        "name",
        "own_listeners",
        "pgbouncer",
        "ping_after",
        "recycled",
        "rolled_back",
        "served",
        "shown",
        "timed_out_at",
        "waiting",
    )

    def __init__(self, name: str, acquire_timeout: float, shown: str, pgbouncer: bool) -> None:
        self.name = name
        self.pgbouncer = pgbouncer
        self.acquire_timeout = acquire_timeout
        self.shown = shown  # the DSN, password redacted
        self.waiting = 0  # units of work waiting for a connection right now
        self.max_waiting: int | None = None  # past it, a unit is refused at once
        self.bound = LoopBound(name)
        self.rolled_back: list[str] = []  # the resources of the `rolled_back` blocks open now
        # With max_lifetime: when each connection expires (set as it is made).
        self.expires: weakref.WeakKeyDictionary[Any, float] | None = None
        # When connections past their lifetime were closed in the last second (see _due).
        self.recycled: collections.deque[float] = collections.deque()
        # When an acquire first found each connection past its lifetime and left it serving.
        self.due_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.lifetime = math.inf  # max_lifetime
        self.served = time.monotonic()  # when a unit of work last got a connection
        self.timed_out_at = -math.inf  # when a unit of work's wait for one last timed out
        self.created = 0  # connections the pool made, in create_time seconds
        self.create_time = 0.0
        self.discarded = 0  # connections closed as broken or in a state not known
        # What tells a connection the pool retires from one lost (see _on_close): times
        # expire_connections() ran (connections made before are retired), and the pool closing.
        self.expired = 0
        self.closing = False
        # The connection options pool() derived from its own (connect_timeout, pgbouncer):
        # kept by set_connect_args(), which replaces all of asyncpg's.
        self.connect_kept: dict[str, Any] = {}
        # With pre_ping: a connection back in the pool for ping_after seconds or more is
        # pinged before a unit of work without a transaction gets it (set as it is released).
        self.ping_after = 0.0
        self.idle_since: weakref.WeakKeyDictionary[Any, float] | None = None
        # What the pool's ``init`` left on each connection it ran on: its settings (``SET``),
        # as SQL that sets them again after the reset's ``RESET ALL``, and its query loggers.
        self.configured: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.loggers: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()
        # The termination listeners each connection had when the pool made it: tether's own
        # (_on_close), and those its ``connect`` and ``init`` added; those a unit of work adds
        # go as it gives the connection back. *own_listeners*: every connection's are tether's
        # one alone (the common case: a length check on release, no look-up).
        self.listeners: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()
        self.own_listeners = True
        # The connections on which a unit of work changed a type codec (``set_type_codec``,
        # ``set_builtin_type_codec``): closed as they are given back (see _CodecsNoted).
        # Empty (the common case): one truth test on release.
        self.codecs: set[Any] = set()


class Pool(asyncpg.Pool):  # type: ignore[misc]
    """``asyncpg.Pool`` that refuses to be used from another event loop than its own.

    Everything else is asyncpg's: this is asyncpg's pool, not one of tether's.
    """

    __slots__ = ("_tether",)

    def __init__(self, *args: Any, tether: _State, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tether = tether

    def acquire(self, *, timeout: float | None = None) -> Any:
        self._tether.bound.check()
        return super().acquire(timeout=timeout)

    # Noted for the count of connections lost (_on_close): those they close are retired.
    async def expire_connections(self) -> None:
        self._tether.expired += 1
        await super().expire_connections()

    async def close(self) -> None:
        self._tether.closing = True
        await super().close()

    # Every way back to the pool (a unit's, `rolled_back`'s, the app's own `pool.acquire()`):
    # a connection whose type codecs were changed while it was held is closed, not returned
    # (`_CodecsNoted`), so the next holder does not decode with them, nor is blamed for them.
    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        codecs = self._tether.codecs
        if codecs:
            raw = _raw(connection)
            if raw in codecs:
                codecs.discard(raw)
                log.warning(
                    "tether: pool %r: a type codec was changed (set_type_codec, "
                    "set_builtin_type_codec or reset_type_codec) on a connection while it was "
                    "held, which asyncpg's reset keeps: the connection was closed, not "
                    "returned, so the next holder does not decode with it. Set codecs in the "
                    "pool's init= (every connection, once)",
                    self._tether.name,
                )
                _terminate(connection)
                with contextlib.suppress(pg_errors.InterfaceError):  # released as it closed
                    await super().release(connection, timeout=timeout)
                return
        await super().release(connection, timeout=timeout)

    # asyncpg's replaces every connection option. Those pool() derived from its own stay
    # unless given (``connect_timeout``; with ``pgbouncer=True``, no statement cache, which
    # would break behind PgBouncer after a credentials rotation), and what tether's messages
    # name (a 503 "cannot reach ...") follows the new arguments.
    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        state = self._tether
        super().set_connect_args(dsn, **{**state.connect_kept, **connect_kwargs})
        state.shown = _shown(dsn, connect_kwargs)


def _shown(dsn: str | None, kwargs: Mapping[str, Any]) -> str:
    """How messages name what the pool connects to: the DSN, its password redacted, or (none
    given) the connection arguments that say where, never the password."""
    if dsn:
        return redact(dsn)
    where = [
        f"{key}={kwargs[key]!r}" for key in ("host", "port", "user", "database") if key in kwargs
    ]
    return f"the database ({', '.join(where)})" if where else "the database"


def _create_pool_defaults() -> dict[str, Any]:
    """``asyncpg.create_pool``'s keyword defaults (they differ between asyncpg versions)."""
    params = inspect.signature(asyncpg.create_pool).parameters.values()
    return {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }


@functools.cache
def _pool_options() -> tuple[frozenset[str], frozenset[str]] | None:
    """The keyword arguments this asyncpg's ``create_pool`` takes, with those of ``connect``
    (create_pool passes its other keyword arguments to each connect), and those with
    pool()'s own (for a suggestion); ``None`` if a signature cannot be read."""
    try:
        taken = (keyword_names(asyncpg.create_pool) | keyword_names(asyncpg.connect)) - {"dsn"}
    except (TypeError, ValueError):  # pragma: no cover - a signature inspect cannot read
        return None
    return taken, taken | (keyword_names(pool) - {"lc", "dsn"})


def _check_options(kw: Mapping[str, Any], where: str) -> None:
    """Refuse a keyword argument neither pool() nor this asyncpg's ``create_pool`` and
    ``connect`` take (``comand_timeout=5``) at the declaration: asyncpg would refuse it only
    when the app starts. Not with ``connect=``: that function may take other ones."""
    options = _pool_options()
    if options is None or kw.get("connect") is not None:
        return
    accepted, known = options
    for key in kw:
        if key in accepted:
            continue
        of = f"asyncpg.create_pool() or asyncpg.connect() (asyncpg {asyncpg.__version__})"
        raise not_an_option(where, key, "pool()", of, did_you_mean(key, known))


async def _no_reset(conn: Any) -> None:
    """PgBouncer transaction mode: no session state to reset (asyncpg still rolls back)."""


def _resetting(
    state: _State, own: Callable[[Any], Awaitable[None]] | None = None
) -> Callable[[Any], Awaitable[None]]:
    """asyncpg's reset on release, and what it leaves: ``SET ROLE`` and ``SET SESSION
    AUTHORIZATION`` (which survive its ``RESET ALL``) and temporary tables
    (``RESET_SESSION``); then what the pool's ``init`` set, set again: one round trip, as
    asyncpg's. Then the app's own ``reset=``, if it gave one (it replaced all of this
    before, and a unit's ``SET ROLE`` and temporary tables reached the next: trial 23)."""

    async def reset(conn: Any) -> None:
        configured = state.configured
        await conn.execute(RESET_SESSION + (configured.get(conn, "") if configured else ""))

    if own is None:
        return reset

    async def both(conn: Any) -> None:
        await reset(conn)
        await own(conn)

    return both


#: PgBouncer's refusal of a startup parameter it does not track (``server_settings=``).
_UNSUPPORTED_PARAMETER = re.compile(r"unsupported startup parameter: ([\w.]+)")


def _parameter_refused(name: str, parameter: str) -> ValueError:
    msg = (
        f"Pool {name!r}: the server refused the startup parameter {parameter!r} "
        f'("unsupported startup parameter"): PgBouncer passes on only the few it tracks, '
        f"refuses the others, and drops those its ignore_startup_parameters lists without a "
        f"word. Take {parameter!r} out of server_settings=, and set it with the role's "
        f"defaults (ALTER ROLE ... SET {parameter} = ...) or PgBouncer's connect_query. No "
        f"retry mends this, so none was made."
    )
    return ValueError(msg)


def _check_reset_options(kw: dict[str, Any], pgbouncer: bool, where: str) -> None:
    """``reset=`` and ``statement_cache_size=`` against what tether sets itself."""
    own = kw.get("reset")
    if own is not None and not callable(own):
        msg = (
            f"{where}: reset={own!r} is not a coroutine function. asyncpg calls reset(conn) "
            f"as a connection goes back to the pool: `async def reset(conn): await "
            f"conn.execute(...)`. tether resets the session itself (RESET ALL, SET ROLE, "
            f"temporary tables, what init= set kept); yours runs after it."
        )
        raise TypeError(msg)
    if not pgbouncer:
        return
    cache = kw.get("statement_cache_size")
    if cache is not None and cache != 0:
        msg = (
            f"{where}: statement_cache_size={cache!r} with pgbouncer=True. PgBouncer in "
            f"transaction mode runs each transaction on any server connection, where "
            f"asyncpg's named statements are missing or are another client's (errors such as "
            f'"prepared statement __asyncpg_stmt_3__ does not exist", or a statement run with '
            f"another one's parameters): pgbouncer=True sets statement_cache_size=0. Drop "
            f"statement_cache_size=, or drop pgbouncer=True if this DSN reaches PostgreSQL "
            f"directly or PgBouncer in session mode."
        )
        raise ValueError(msg)
    if own is not None:
        msg = (
            f"{where}: reset= with pgbouncer=True. Behind PgBouncer in transaction mode the "
            f"reset would run on whichever server connection PgBouncer picks, not on the "
            f"session the unit of work used (tether runs none there; PgBouncer's own "
            f"server_reset_query does not run in that mode either). Drop reset=, and keep "
            f"session state out of the units of work (SET LOCAL in a transaction, not SET)."
        )
        raise ValueError(msg)


def _keeping_init(state: _State, init: Callable[[Any], Awaitable[None]]) -> Callable[..., Any]:
    """The pool's ``init`` (run once per new connection), then a note of what it left for the
    reset to keep: its settings (a ``SET search_path``: the pool's first release would undo
    them before any request ran with them), read in one query, and its query loggers and
    termination listeners (those a unit of work adds go)."""

    async def noted(conn: Any) -> None:
        await init(conn)
        if conn._query_loggers:
            state.loggers[conn] = set(conn._query_loggers)
        _note_listeners(state, conn)
        if not state.pgbouncer:  # no reset to put them back after
            settings = await conn.fetchval(SESSION_SETTINGS)
            if settings:
                state.configured[conn] = settings

    return noted


def _note_listeners(state: _State, conn: Any) -> None:
    """Note the termination listeners *conn* has as the pool makes it (tether's own, and those
    the pool's ``connect`` and ``init`` added): they stay on it, those a unit of work adds go."""
    listeners = getattr(conn, "_termination_listeners", None)
    if listeners is None:
        return  # an asyncpg without them: nothing to keep
    state.listeners[conn] = set(listeners)
    if len(listeners) != 1:
        state.own_listeners = False  # one more than tether's: compare each connection's own


def _drop_callbacks(raw: Any, state: _State | None) -> None:
    """Drop the callbacks a unit of work added on the connection object as the connection goes
    back: its query loggers (``conn.add_query_logger``), which would receive the next units'
    queries and arguments, and its termination listeners (``conn.add_termination_listener``),
    which a later unit's close would run, given that unit's connection. Both would pile up,
    one per unit: asyncpg's own reset clears the listeners and log listeners, not these.
    Those the pool's ``init`` added stay, and so does tether's own termination listener.
    A falsy check and a length check when nothing was added (one look-up and one set
    comparison each, for a pool whose ``init`` added some)."""
    if state is None:
        return  # a pool tether did not open: what its init added is not known
    # asyncpg >= 0.30's (the pool refuses a connection that is not one): read directly.
    # Notification and log listeners: asyncpg's release clears them too, after warning of
    # each (an InterfaceWarning per request of a route that listened: trial 23), and the
    # reset unlistens on the server.
    if raw._listeners:
        raw._listeners.clear()
    if raw._log_listeners:
        raw._log_listeners.clear()
    if raw._query_loggers:  # none, the common case: nothing to drop
        _put_back_loggers(raw, state.loggers.get(raw))
    listeners = raw._termination_listeners
    if state.own_listeners and len(listeners) <= 1:
        return  # tether's own alone, the common case (none: asyncpg ran them as it closed)
    kept = state.listeners.get(raw)
    if kept is not None and listeners != kept:
        listeners.clear()
        listeners.update(kept)


def _put_back_loggers(raw: Any, kept: set[Any] | None) -> None:
    """Make *raw*'s query loggers *kept* (None: none)."""
    loggers = getattr(raw, "_query_loggers", None)  # None: no longer the pool's
    if loggers is None:
        return
    if kept is None:
        if loggers:
            loggers.clear()
    elif loggers != kept:
        loggers.clear()
        loggers.update(kept)


def pool(
    lc: Lifecycle,
    dsn: Dsn,
    *,
    name: str = "pool",
    min_size: int = 1,
    max_size: int = 10,
    acquire_timeout: float = 5.0,
    max_waiting: int | None = None,
    max_lifetime: float | None = None,
    connect_timeout: float = 5.0,
    pgbouncer: bool = False,
    budget: BudgetPolicy = "warn",
    workers: int | None = None,
    reserved: int = 3,
    server_settings: Mapping[str, str] | None = None,
    pre_ping: bool | float = 1.0,
    check: Check | bool = True,
    retries: int = 0,
    backoff: float = 0.5,
    required: bool = True,
    **kw: Any,
) -> Resource[asyncpg.Pool]:
    """Register an asyncpg pool as an app resource of *lc*; return the resource.

    Args:
        dsn: ``postgresql://user:password@host:port/db``, or a function returning it
            (called when the app starts, so settings can be read then, not at import).
        min_size, max_size: connections the pool keeps open at least, and opens at most.
        acquire_timeout: seconds a unit of work waits for a free connection before
            :class:`~tether.ResourceUnavailable` (503). :func:`connection` uses it.
        max_waiting: the most units of work waiting for a connection at once (default: no
            limit). With every connection in use and that many waiting, the next one is
            refused at once (503) instead of waiting ``acquire_timeout`` for a connection
            it would likely not get: under overload, latency stays bounded.
        max_lifetime: seconds a connection is used for, at most (default: for ever, as
            asyncpg). An older one is closed when it is next acquired, never while a unit of
            work holds it, and the pool opens a new one; each connection's lifetime is up to
            5 % shorter, and the pool closes at most ``ceil(0.1 * max_size)`` of them in any
            second (``ceil(max_size / max_lifetime)`` if more, for lifetimes under 10 s): one
            due past that keeps serving, up to ``max_lifetime`` + ``min(10 s,
            max_lifetime)``, so connections made together are not all replaced together. For a
            server or proxy that moves (DNS failover, PgBouncer rotation) and for backends
            that grow. psycopg's pool has ``max_lifetime`` (3600 s by default), SQLAlchemy's
            ``pool_recycle``.
        connect_timeout: seconds to establish one connection.
        pgbouncer: the DSN points at PgBouncer in transaction or statement mode:
            ``statement_cache_size=0`` (unnamed statements, re-parsed each time), no
            session reset query on release, and no budget check (PgBouncer owns the
            server connections).
        budget: what to do when ``workers x max_size + reserved`` exceeds the server's
            ``max_connections``: ``"warn"`` (log a warning), ``"error"``
            (:class:`~tether.StartupError`) or ``"off"``.
        workers: worker processes sharing the database (default: the server's ``-w``/
            ``--workers`` (gunicorn, uvicorn), else ``WEB_CONCURRENCY``, else 1).
        reserved: connections kept for everything else (migrations, psql, other apps).
        server_settings: session settings, e.g. ``{"application_name": "api"}``.
        pre_ping: check a connection that sat in the pool at least this many seconds (a
            ``SELECT 1``, bounded by ``acquire_timeout``) before a unit of work without a
            transaction gets it: one that died unnoticed (a network or NAT that dropped it
            without a reset, a failover) is replaced, or answered 503 within the timeout,
            instead of failing or hanging the endpoint's first query. ``True``: every time;
            ``False``: never, as asyncpg. With ``transaction=True`` the ``BEGIN`` is the check.
        check: the health check: ``True`` runs ``SELECT 1``, ``False`` none, or a
            function given the pool.
        retries, backoff: retry opening the pool at startup (the database may come up
            after the app).
        required: ``False`` starts the app without it when it cannot open (see
            ``lc.resource``): what needs it answers 503 until a background retry opens it.
        kw: passed to asyncpg's pool (``max_queries``, ``init``, ``setup``, ...) and to
            each connection (``command_timeout``, ``ssl``, ...). What ``init`` sets with
            ``SET`` is noted as it runs and set again by each release's reset, so every unit
            of work starts with it; the query loggers and termination listeners it adds
            stay, those a unit adds go. Type codecs go in ``init`` (or ``setup``): a
            connection on which a unit of work changed one is closed as it goes back.
            ``init`` must not create temporary tables: the reset drops them.
    """
    where = f"Pool {name!r}"
    check_dsn(dsn, where, example=_EXAMPLE_DSN)
    if not callable(dsn):
        check_driver_scheme(dsn, where, what="DSN", reader="asyncpg")
        plain = str(plain_dsn(dsn))
        check_ports(url_ports(plain), plain, where, what="DSN")
    check_number(min_size, "min_size", where, integer=True, least=None, example="1")
    check_number(max_size, "max_size", where, integer=True, least=None, example="10")
    if max_size < 1 or not 0 <= min_size <= max_size:
        msg = f"Pool {name!r}: need 0 <= min_size <= max_size and max_size >= 1."
        raise ValueError(msg)
    check_number(acquire_timeout, "acquire_timeout", where, above=True, need="a positive number")
    check_number(max_waiting, "max_waiting", where, integer=True, none=True, example="20")
    ping_after = _ping_after(name, pre_ping)
    check_number(max_lifetime, "max_lifetime", where, above=True, none=True, example="3600")
    check_number(connect_timeout, "connect_timeout", where, above=True)
    check_number(reserved, "reserved", where, integer=True, example="3")
    if workers is not None:
        check_number(workers, "workers", where, integer=True, least=1, example="4")
    check_bool(pgbouncer, "pgbouncer", where)
    check_budget_policy(budget, where)
    check_bool(required, "required", where)
    check_check(
        check,
        where,
        default="SELECT 1 on a connection of the pool",
        of="pool",
        example='lambda pool: pool.fetchval("SELECT 1")',
    )
    _check_options(kw, where)
    _check_reset_options(kw, pgbouncer, where)

    async def open_pool() -> AsyncIterator[asyncpg.Pool]:
        asyncio_only(where, "asyncpg")
        target = resolve_dsn(dsn, where, example=_EXAMPLE_DSN)
        check_driver_scheme(target, where, what="DSN", reader="asyncpg", returned=callable(dsn))
        check_ports(url_ports(target), target, where, what="DSN", returned=callable(dsn))
        state = _State(name, acquire_timeout, redact(target), pgbouncer)
        state.max_waiting = max_waiting
        if ping_after is not None:
            state.ping_after = ping_after
            state.idle_since = weakref.WeakKeyDictionary()
        options = _create_pool_defaults()
        options.update(min_size=min_size, max_size=max_size, timeout=connect_timeout)
        if server_settings:
            options["server_settings"] = dict(server_settings)
        if "reset" in options:  # asyncpg >= 0.30
            options["reset"] = _no_reset if pgbouncer else _resetting(state, kw.get("reset"))
        if pgbouncer:
            options["statement_cache_size"] = 0
        options.update((key, value) for key, value in kw.items() if key != "reset")
        kept = ("timeout", "statement_cache_size") if pgbouncer else ("timeout",)
        state.connect_kept = {key: options[key] for key in kept}
        options["connect"] = _counting(state, options.get("connect") or asyncpg.connect)
        if options.get("init") is not None:
            options["init"] = _keeping_init(state, options["init"])
        if options.get("setup") is not None:
            options["setup"] = _keeping_setup(state, options["setup"])
        if max_lifetime is not None:
            state.expires = weakref.WeakKeyDictionary()
            state.lifetime = max_lifetime
            options["init"] = _stamping(state.expires, max_lifetime, options.get("init"))
        p = Pool(target, tether=state, **options)
        try:
            await p
        except BaseException as exc:
            # Cancelled or failed half-way: the connections made so far go too.
            _terminate_pool(p)
            scrub_secrets(exc)  # asyncpg's parse errors may quote a piece of the DSN
            unsupported = _UNSUPPORTED_PARAMETER.search(str(exc))
            if isinstance(exc, pg_errors.ProtocolViolationError) and unsupported:
                raise for_good(_parameter_refused(name, unsupported[1])) from exc
            # Wrong credentials, unknown database, PgBouncer's refusals of them included (a
            # ProtocolViolationError, 08P01): not a matter of retrying.
            if isinstance(exc, UNREACHABLE) and refused_for_good(exc) is None:
                raise unreachable(name, state.shown, exc) from exc
            raise
        try:
            server_max: int | None = None
            server: str | None = None
            # PgBouncer multiplexes: the server's max_connections is its business.
            if not (pgbouncer or budget == "off"):
                server_max, server = await read_budget(name, budget, p.fetchrow)
            if server_max is not None:
                check_budget(
                    name,
                    server_max=server_max,
                    per_worker=max_size,
                    workers=worker_count(workers),
                    reserved=reserved,
                    policy=budget,
                    lc=lc,
                    server=server,
                )
            log.info(
                "tether: asyncpg pool %r open on %s (min_size=%d, max_size=%d%s)",
                name,
                state.shown,
                min_size,
                max_size,
                ", pgbouncer" if pgbouncer else "",
            )
            yield p
        finally:
            forget_budget(lc, name)
            # Shielded here too: when opening is interrupted (a startup cancelled while it
            # reads max_connections), this runs during the cancellation.
            with anyio.CancelScope(shield=True):
                await _close_pool(p, name, lc.close_timeout / 2)

    res: Resource[Any] = lc.resource(
        scope="app",
        name=name,
        check=_pool_check(check),
        retries=retries,
        backoff=backoff,
        required=required,
    )(open_pool)
    res.pool_stats = lambda p: _figures(name, p)
    res.saturation = lambda p: _saturation(name, p)
    res.aside_check = _aside_check
    res.async_api = "an asyncpg pool"
    return res


def _aside_check(p: Any, within: float) -> Awaitable[None] | None:
    """A busy pool's check (``Resource.aside_check``): ``SELECT 1`` on a connection of its
    own, made with the pool's connect arguments, outside the pool, once none has been handed
    out for longer than *within* (the check's timeout, which bounds it). A server that stops
    answering without closing its connections (frozen, a network partition that drops
    packets) fills the pool with queries waiting on it, read as busy, so ready, until a wait
    for a connection timed out."""
    state: _State | None = getattr(p, "_tether", None)
    if state is None or state.pgbouncer or time.monotonic() - state.served <= within:
        return None  # (behind PgBouncer, its SELECT would queue behind the traffic too)
    return _select_1_aside(p)


async def _select_1_aside(p: Any) -> None:
    try:
        conn = await asyncpg.connect(*p._connect_args, **p._connect_kwargs)
    except pg_errors.PostgresError:
        return  # the server answered (too many clients, say): it is not frozen
    try:
        await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()


def _ping_after(name: str, pre_ping: object) -> float | None:
    if pre_ping is True:
        return 0.0
    if pre_ping is False:
        return None
    if isinstance(pre_ping, int | float) and pre_ping >= 0:
        return float(pre_ping)
    msg = (
        f"Pool {name!r}: pre_ping={pre_ping!r} must be True, False or a number of seconds of "
        f"0 or more."
    )
    raise ValueError(msg)


def _counting(state: _State, connect: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """asyncpg's ``connect`` (run for each connection the pool makes), counted and timed,
    with a termination listener that counts the connection if it is lost while idle."""

    async def counted(*args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        conn = await connect(*args, **kwargs)
        now = time.monotonic()
        state.created += 1
        state.create_time += now - t0
        if state.idle_since is not None:
            state.idle_since[conn] = now  # in the pool from now on, until a unit takes it
        listen = getattr(conn, "add_termination_listener", None)
        if listen is not None:  # else not a connection: asyncpg refuses it
            listen(functools.partial(_on_close, state, state.expired))
            _note_listeners(state, conn)  # init, if any, notes again after it
            _note_codecs(conn)
        return conn

    counted.__wrapped__ = connect  # type: ignore[attr-defined]
    return counted


class _CodecsNoted:
    """Mixed into each connection's class as the pool makes it (:func:`_note_codecs`): a type
    codec changed while a unit of work holds the connection is noted, and the connection is
    closed as it goes back (``_give_back``), not handed to the next unit. asyncpg keeps codecs
    on the connection and its reset leaves them, so the next unit on that connection would
    decode (and encode) with them, and units on the other connections without. Those the
    pool's ``init`` sets (no unit holds the connection yet) and its ``setup`` sets (run again
    for each unit) are the pool's: kept."""

    __slots__ = ()

    async def set_type_codec(self, typename: str, *args: Any, **kwargs: Any) -> None:
        _codec_changed(self)
        await super().set_type_codec(typename, *args, **kwargs)  # type: ignore[misc]
        _codec_set(self, "set_type_codec", typename, args, kwargs)

    async def set_builtin_type_codec(self, typename: str, *args: Any, **kwargs: Any) -> None:
        _codec_changed(self)
        await super().set_builtin_type_codec(typename, *args, **kwargs)  # type: ignore[misc]
        _codec_set(self, "set_builtin_type_codec", typename, args, kwargs)

    # Back to asyncpg's own codec: a codec the pool's ``init`` set is gone from the connection,
    # so the next unit on it would decode without it.
    async def reset_type_codec(self, typename: str, *args: Any, **kwargs: Any) -> None:
        _codec_changed(self)
        await super().reset_type_codec(typename, *args, **kwargs)  # type: ignore[misc]
        _codec_reset(self, typename, kwargs.get("schema", "public"))


#: `rolled_back`: the codec calls made on each connection outside a unit of work of a block
#: (the pool's ``init`` and ``setup``, a test's on the block's connection), the last per type,
#: method and format, in the order made: what a block sets again after one of its units changed
#: the codec of that type. A few entries per connection that has codecs, none for the others.
_kept_codecs: weakref.WeakKeyDictionary[
    Any, dict[tuple[str, str, str, Any], tuple[tuple[Any, ...], dict[str, Any]]]
] = weakref.WeakKeyDictionary()

#: `rolled_back`: the types (name, schema) whose codec the unit of work of a block running on
#: each connection changed so far; the block puts them back as the unit ends.
_unit_codecs: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _codec_set(
    conn: Any, method: str, typename: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Note a codec call on *conn* that went through: for the unit of a `rolled_back` block
    running on it, the type it changed; else the call, to make again after such a unit."""
    schema = kwargs.get("schema", "public")
    changed = _unit_codecs.get(conn)
    if changed is not None:
        changed.add((typename, schema))
        return
    calls = _kept_codecs.setdefault(conn, {})
    key = (typename, schema, method, kwargs.get("format"))
    calls.pop(key, None)  # the latest last: a later call on the type wins
    calls[key] = (args, dict(kwargs))


def _codec_reset(conn: Any, typename: str, schema: str) -> None:
    """Note a ``reset_type_codec`` on *conn* that went through: for the unit of a
    `rolled_back` block running on it, a type it changed; else the calls made on the type are
    undone, not to make again after such a unit."""
    changed = _unit_codecs.get(conn)
    if changed is not None:
        changed.add((typename, schema))
        return
    calls = _kept_codecs.get(conn)
    if calls:
        for key in [k for k in calls if k[:2] == (typename, schema)]:
            del calls[key]


async def _put_back_codecs(raw: Any, changed: set[tuple[str, str]], name: str) -> None:
    """`rolled_back`: put the codecs of the types a unit of work changed (*changed*) back as
    it found them, for the block's next unit: asyncpg's own, then those the pool's ``init`` and
    ``setup`` and the test set on the connection. (Production closes such a connection.)"""
    log.warning(
        "tether: %r: the unit of work changed a type codec (set_type_codec, "
        "set_builtin_type_codec or reset_type_codec), which asyncpg's reset keeps: in "
        "production the connection is closed, not returned, so the next unit on it does not "
        "decode with it; in this rolled_back() block the codecs it changed were put back as "
        "the unit found them. Set codecs in the pool's init= (every connection, once), not per "
        "unit of work",
        name,
    )
    calls = list(_kept_codecs.get(raw, {}).items())
    try:
        for typename, schema in sorted(changed):
            await super(_CodecsNoted, raw).reset_type_codec(typename, schema=schema)
        for (typename, schema, method, _), (args, kwargs) in calls:
            if (typename, schema) in changed:  # set again, not noted again
                await getattr(super(_CodecsNoted, raw), method)(typename, *args, **kwargs)
    except Exception as exc:
        log.warning(
            "tether: %r: could not put back the type codecs the unit of work changed (%s); "
            "the block's next units decode with them",
            name,
            describe(exc),
        )


#: Each connection class met, with :class:`_CodecsNoted` mixed in.
_noted_classes: dict[type, type] = {}


def _note_codecs(conn: Any) -> None:
    """Make *conn* an instance of its class with :class:`_CodecsNoted` mixed in: the same
    layout (no slot added), so its class can be set, whatever ``connect`` made it with."""
    cls = type(conn)
    if issubclass(cls, _CodecsNoted) or not isinstance(conn, asyncpg.Connection):
        return
    noted = _noted_classes.get(cls)
    if noted is None:
        attrs = {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        try:
            noted = type(cls.__name__, (_CodecsNoted, cls), attrs)
        except TypeError:  # a class that cannot be subclassed so (a metaclass of its own)
            noted = cls
        _noted_classes[cls] = noted
    if noted is not cls:
        conn.__class__ = noted


def _codec_changed(conn: Any) -> None:
    """Note that a unit of work changed a codec of *conn*: the pool holding it closes it as it
    comes back. Not held (the pool's ``init``, a connection outside a pool): nothing to do."""
    holder = getattr(getattr(conn, "_proxy", None), "_holder", None)
    state: _State | None = getattr(getattr(holder, "_pool", None), "_tether", None)
    if state is not None:
        codecs = state.codecs
        for gone in [c for c in codecs if c.is_closed()]:  # never given back (a lost one)
            codecs.discard(gone)
        codecs.add(conn)


def _keeping_setup(state: _State, setup: Callable[[Any], Awaitable[None]]) -> Callable[..., Any]:
    """The pool's ``setup`` (run as each unit of work acquires): the codecs it sets are the
    pool's, set again for every unit, so not a reason to close the connection."""

    async def kept(proxy: Any) -> None:
        await setup(proxy)
        if state.codecs:
            state.codecs.discard(_raw(proxy))

    return kept


def _on_close(state: _State, expired: int, conn: Any) -> None:
    """Termination listener of each connection the pool made (*expired*: ``state.expired``
    when it was made). asyncpg runs it once, soon after the connection closed: it counts one
    lost while it sat idle in the pool.

    The server or the network can end a connection no unit of work holds
    (``pg_terminate_backend``, ``idle_session_timeout``, a restart): asyncpg makes another in
    its place, and no unit of work gives it back closed to count it. Not counted here:

    * one handed out when it closed (asyncpg gives the listener its pool proxy): counted as
      it is given back (``_give_back``), if it is tether's;
    * one the client terminated (tether, asyncpg's ``max_inactive_connection_lifetime``);
    * one retired: made before ``expire_connections()``, or closed with the pool.

    An idle one closed otherwise is one asyncpg gave up on (its ``init`` failed): discarded.
    """
    if isinstance(conn, asyncpg.pool.PoolConnectionProxy):
        return
    if getattr(conn, "_aborted", False) or state.closing or expired != state.expired:
        return
    state.discarded += 1


def _stamping(
    expires: weakref.WeakKeyDictionary[Any, float],
    lifetime: float,
    init: Callable[[Any], Awaitable[None]] | None,
) -> Callable[[Any], Awaitable[None]]:
    """asyncpg's ``init`` (run once per new connection): note when the connection expires,
    then run the user's own ``init``."""

    async def stamped(conn: Any) -> None:
        expires[conn] = time.monotonic() + lifetime * (1 - 0.05 * random.random())
        if init is not None:
            await init(conn)

    return stamped


def _figures(name: str, p: Any) -> PoolStats:
    """asyncpg's own figures, and the tasks tether sees waiting in ``acquire``."""
    size, idle = int(p.get_size()), int(p.get_idle_size())
    state = getattr(p, "_tether", None)
    return PoolStats(
        name=name,
        max=int(p.get_max_size()),
        open=size,
        in_use=size - idle,
        idle=idle,
        waiting=state.waiting if state is not None else None,
        created=state.created if state is not None else None,
        create_time=state.create_time if state is not None else None,
        discarded=state.discarded if state is not None else None,
    )


def _saturation(name: str, p: Any) -> tuple[bool, str] | None:
    state: _State | None = getattr(p, "_tether", None)
    if state is None:
        return None
    return saturation(
        _figures(name, p),
        state.served,
        state.acquire_timeout,
        "acquire_timeout",
        timed_out_at=state.timed_out_at,
    )


def _pool_check(check: Check | bool) -> Check | None:
    if check is True:
        return _select_1
    if check is False:
        return None
    return check


async def _select_1(p: Any) -> None:
    await p.fetchval("SELECT 1")


def _terminate_pool(p: Any) -> None:
    try:
        p.terminate()
    except Exception:  # pragma: no cover - a pool that never got as far as its holders
        log.debug("tether: terminating a pool that did not open", exc_info=True)


async def _close_pool(p: Any, name: str, within: float) -> None:
    """Close gracefully (waits for connections in use); terminate what is left after *within*,
    their backends sent a cancel request first: PostgreSQL notices a client gone only when it
    next writes to it, and a ``COMMIT`` waiting for a lock committed once it was free, after
    the process had exited (trial 37: a forced exit closed the pool beside a unit still
    closing)."""
    closing = asyncio.ensure_future(p.close())
    try:
        done, _ = await asyncio.wait({closing}, timeout=within)
        if done:
            closing.result()
            return
        log.warning(
            "tether: asyncpg pool %r did not close within %g s (connections still in use); "
            "terminating them",
            name,
            within,
        )
        state: _State | None = getattr(p, "_tether", None)
        if state is None or not state.pgbouncer:  # (PgBouncer's pids: it ends its side)
            # Before the close is stopped: asyncpg's pool terminates them as it is.
            await _cancel_in_use(p)
    finally:
        if not closing.done():
            closing.cancel()  # asyncpg's pool terminates its connections on that
            with contextlib.suppress(asyncio.CancelledError):
                await closing
        p.terminate()


async def _cancel_in_use(p: Any) -> None:
    """Send each connection *p* has in use a cancel request, at once, within 1 s (asyncpg's
    own, which needs no connection slot): what runs on it stops, and rolls back."""
    backends = []
    for holder in list(getattr(p, "_holders", ())):
        con = getattr(holder, "_con", None)
        if con is not None and getattr(holder, "_in_use", None) is not None:
            backend = _backend(con)
            if backend is not None and None not in backend:
                backends.append(backend)
    if backends:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_WITHIN):
            await asyncio.gather(*(_cancel_request(b) for b in backends), return_exceptions=True)


# --------------------------------------------------------------------------- connections


def connection(
    lc: Lifecycle,
    pool: Resource[asyncpg.Pool],
    *,
    name: str = "conn",
    transaction: bool = False,
    release: Release = "handler",
    error_status: Callable[[int], bool] | None = None,
    acquire_timeout: float | None = None,
    reset_timeout: float = 5.0,
    isolation: str | None = None,
    readonly: bool = False,
    **unknown: Never,  # a misspelt option: refused naming the one meant
) -> Resource[asyncpg.Connection]:
    """Register a connection of *pool* as a request resource of *lc*; return the resource.

    Args:
        pool: the pool resource (from :func:`pool`, or any resource giving an asyncpg pool).
        transaction: run the unit of work in one transaction: committed when the endpoint
            succeeded (before the response starts, so a failing commit is an error
            response, never a 200), rolled back on any failure (an exception, an
            ``HTTPException``, an error status, a client that went away).
        release: ``"handler"`` (default) returns the connection before the response
            starts; ``"response"`` after its last byte (streaming bodies that query).
        error_status: which response statuses roll back (given the status, true for a
            failure); default: every status of 400 or more. ``lambda status: status >= 500``
            commits on a 4xx (see ``lc.resource``).
        acquire_timeout: seconds to wait for a free connection (default: the pool's), and
            then for the ``BEGIN`` of ``transaction=True``: a database that stops answering
            is a 503 within it. (Your own queries are bounded by asyncpg's
            ``command_timeout``, which :func:`pool` passes on; none by default.)
        reset_timeout: seconds a rollback and reset may take when the connection goes
            back; past it (or if it fails) the connection is terminated, not returned.
        isolation, readonly: of the transaction (``"serializable"``, ...): with
            ``transaction=True`` only (without a transaction there is none they apply to,
            and a ``ValueError`` says so).
    """
    if unknown:
        where = "tether.integrations.asyncpg.connection()"
        raise not_options(where, unknown, connection)
    check_bool(transaction, "transaction", f"Connection {name!r}")
    check_bool(readonly, "readonly", f"Connection {name!r}")
    check_transaction_options(name, transaction, isolation, readonly, known="asyncpg")
    check_resource(
        lc,
        pool,
        where=f"tether.integrations.asyncpg.connection(name={name!r})",
        param="pool",
        maker="tether.integrations.asyncpg.pool()",
        example="tether.integrations.asyncpg.pool(lc, dsn)",
    )
    if acquire_timeout is not None:
        check_number(acquire_timeout, "acquire_timeout", f"Connection {name!r}", above=True)
    check_number(reset_timeout, "reset_timeout", f"Connection {name!r}", above=True)
    pool_name = pool.name

    async def open_connection(p: Any) -> AsyncIterator[asyncpg.Connection]:
        state: _State | None = getattr(p, "_tether", None)  # None: a pool tether did not open
        timeout = acquire_timeout or (state.acquire_timeout if state is not None else 5.0)
        if transaction:
            conn, tx = await _acquire_tested(
                p, pool_name, state, timeout, name, reset_timeout, (isolation, readonly)
            )
        else:
            conn, tx = await _acquire(p, pool_name, state, timeout), None
            if state is not None and _idle(state, conn):
                conn, _ = await _acquire_tested(
                    p, pool_name, state, timeout, name, reset_timeout, None, conn
                )
        interrupted = False
        unit = current_unit.get()  # (for a WARNING naming it)
        try:
            try:
                yield conn
            except BaseException as exc:
                # Stopped from outside, wherever its code was (inside its own `async with
                # conn.transaction():`, say): a transaction it left open is not its mistake.
                interrupted = isinstance(exc, ClientDisconnected | asyncio.CancelledError)
                _note_prepared(exc, pgbouncer=state is not None and state.pgbouncer)
                _note_timeout(conn, exc)
                if not readonly and read_only(exc):
                    if tx is not None:  # aborted: the check below needs it rolled back
                        await _rollback(p, conn, tx, name, reset_timeout)
                    if not await _read_only_server(conn, reset_timeout):
                        raise  # the unit's own read-only transaction, or a read-only pool
                    # The server is read-only (a failover reached a replica): this
                    # connection and every other one of the pool go to the wrong server.
                    _terminate(conn)
                    await p.expire_connections()
                    log.warning("tether: %r: %s", pool_name, describe(exc))
                    raise read_only_failure(pool_name) from exc
                if _concurrent(exc):
                    # The other task's query still runs on it: nothing to roll back with.
                    await _discard(p, conn, _backend(conn), name)
                    done = "The connection was terminated (what ran on it was rolled back)."
                    raise used_concurrently("Connection", name, "asyncpg", done) from exc
                lost = _is_lost(conn, exc)
                if tx is None:
                    if lost:
                        never = pooler_never_sent(pool_name, exc)
                        if never is not None:
                            raise never from exc  # it did not run: a 503
                        exc.add_note(LOST_NOTE)  # still a 500: the statement may have run
                    raise
                if not lost and not _closed(conn) and not _raw(conn).is_in_transaction():
                    log.warning("tether: %s", _ended_by_endpoint(name, _NOTHING_ROLLED_BACK))
                await _rollback(p, conn, tx, name, reset_timeout)
                if lost:
                    # The server ended the transaction with the connection: nothing was
                    # committed, so retrying is safe. A 503, not a 500.
                    raise connection_lost(pool_name, describe(exc)) from exc
                raise
            if tx is not None:
                try:
                    await _commit(conn, tx, name)
                except asyncio.CancelledError:
                    # Cut short (close_timeout): the COMMIT still waits on the server, not
                    # a transaction the unit left open by mistake.
                    interrupted = True
                    raise
                except (pg_errors.InternalClientError, pg_errors.InterfaceError) as exc:
                    if _concurrent(exc):
                        # A task the endpoint started still runs a query on it: terminated
                        # under that task, which rolls the transaction back.
                        await _discard(p, conn, _backend(conn), name)
                        done = "the connection was terminated under that task (its query fails)"
                        raise ScopeError(still_in_use("Connection", name, done)) from exc
                    # asyncpg refused to send COMMIT: the connection is mid-way through
                    # something else, most often an error the server sent unasked as it
                    # ended the session (a restart, pg_terminate_backend) before the close
                    # arrived; or it has read the close already. Nothing was committed: a
                    # 503, and the connection goes.
                    if not _is_lost(conn, exc):
                        raise
                    _terminate(conn)
                    raise commit_not_sent(pool_name, exc) from exc
        finally:
            # Not counted in use while it goes back: asyncpg hands it to a unit of work
            # waiting for one before its release returns here, and that one counts it.
            counters = res.counters
            counters.in_use -= 1
            try:
                await _give_back(p, conn, name, reset_timeout, interrupted, unit)
            finally:
                counters.in_use += 1  # as tether's bookkeeping takes it off, at once

    res = lc.resource(name=name, release=release, error_status=error_status)(
        depends_on(open_connection, pool)
    )
    _connections[res] = ConnectionOf(pool, transaction, isolation, readonly)
    res.async_api = "an asyncpg connection"
    return res


#: SQLSTATEs of a prepared statement the server does not have (26000) or has already (42P05).
_PREPARED_STATEMENT = frozenset({"26000", "42P05"})


def _note_prepared(exc: BaseException, *, pgbouncer: bool) -> None:
    """Say what a prepared statement the server does not have, or has already, means: one
    of asyncpg's (``__asyncpg_stmt_...``) is its cache broken by PgBouncer in transaction mode
    (the fix: ``pgbouncer=True``); one the app named itself outlives the unit of work on its
    pooled connection, which no pool option changes."""
    if not any(code in _PREPARED_STATEMENT for code in sqlstates(exc)):
        return
    said = str(exc)
    if "__asyncpg_" in said:
        if not pgbouncer:
            note_pgbouncer(exc)
        return
    found = re.search(r'"([^"]*)"', said)
    named = f"the prepared statement {found.group(1)!r}" if found else "this prepared statement"
    note = (
        f"tether: {named} is the app's own (SQL PREPARE, or conn.prepare(..., name=...)), "
        f"not one the driver caches. It lives in one server session, and the session reset "
        f"keeps it: the next unit of work on that pooled connection finds it there (preparing "
        f"it again fails), and a unit on another connection does not have it. DEALLOCATE it "
        f"in the unit of work that prepared it, or use conn.prepare() without a name."
    )
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


async def _read_only_server(conn: Any, within: float) -> bool:
    """Whether a write refused as read-only (25006) on *conn* means the server is read-only
    (a failover reached a replica) rather than the unit's own read-only transaction
    (``conn.transaction(readonly=True)``, ``SET TRANSACTION READ ONLY``) or a pool read-only
    on purpose. Asked on the error path only, after the transaction is rolled back: one
    query. When it cannot be asked (the connection broke), the server is taken to be
    read-only, as before the check: the pool is replaced."""
    try:
        async with asyncio.timeout(within):
            if conn.is_in_transaction():  # the unit's own, aborted by the error
                await conn.execute("ROLLBACK")
            return bool(await conn.fetchval(SERVER_READ_ONLY))
    except Exception:
        return True


#: Errors a query raises when the server went away under it (a restart, a crash, a kill).
LOST: tuple[type[BaseException], ...] = (
    pg_errors.ConnectionDoesNotExistError,
    pg_errors.AdminShutdownError,
    pg_errors.CrashShutdownError,
    pg_errors.CannotConnectNowError,
    ConnectionError,  # ConnectionResetError, BrokenPipeError
)


def _concurrent(exc: BaseException) -> bool:
    """Whether *exc* is asyncpg refusing a query while another runs on the connection, or a
    task group's error with one such (trial 35: tasks of a task group sharing the unit's
    connection got asyncpg's error, not tether's)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_concurrent(inner) for inner in exc.exceptions)
    busy = "another operation is in progress"
    return isinstance(exc, pg_errors.InterfaceError) and busy in str(exc)


def _note_timeout(conn: Any, exc: BaseException) -> None:
    """Say what an empty ``TimeoutError`` raised by asyncpg itself was: its
    ``command_timeout`` (or a call's ``timeout=``) ran out on a statement, which asyncpg then
    cancelled on the server. The 500 and its traceback said nothing else."""
    if not isinstance(exc, TimeoutError) or str(exc):
        return
    tb = exc.__traceback__
    if tb is None:
        return
    while tb.tb_next is not None:
        tb = tb.tb_next
    if "asyncpg" not in tb.tb_frame.f_code.co_filename:
        return  # the endpoint's own (asyncio.timeout), not asyncpg's
    try:
        timeout = _raw(conn)._config.command_timeout
    except Exception:  # pragma: no cover - a connection that works otherwise
        timeout = None
    given = "" if timeout is None else f", else the pool's command_timeout={timeout:g} s"
    exc.add_note(
        f"tether: asyncpg's timeout for a statement (the call's timeout={given}) ran out on a "
        f"statement of this unit of work, and asyncpg cancelled it on the server. If the "
        f"statement is slow by design, give that call a longer timeout= (conn.fetch(..., "
        f"timeout=30)), or raise the pool's command_timeout=."
    )


def _still_querying(name: str, unit: Callable[[], Unit | None] | None) -> str:
    """The WARNING for a unit of work's connection on which a task it started (and did not
    await) still runs a query as the unit ends: terminated under it (asyncpg cannot reset
    it). *unit*: the unit of work's reference, as the connection was opened in it."""
    held = unit() if unit is not None else None
    label = f" ({held.label})" if held is not None and held.label else ""
    return (
        f"{name!r}: a task still ran a query on the connection when its unit of work{label} "
        f"ended (a task started with it and not awaited); the connection was terminated under "
        f"it (its query fails), and its backend with it. Await every task using the "
        f"connection before the unit of work ends, or give the task a connection of its own "
        f"(`async with lc.scope() as s: await s.get({name})` in the task)."
    )


def _is_lost(conn: Any, exc: BaseException) -> bool:
    if isinstance(exc, LOST):
        return True
    if isinstance(exc, pg_errors.InternalClientError):
        # asyncpg refused to send the statement: its protocol is mid-way through something
        # else, most often an error the server sent unasked as it ended the session (a
        # restart, pg_terminate_backend) before the close arrived. The connection is done.
        return True
    # asyncpg refusing a call on a closed connection. Once asyncpg has read the close, its
    # pool takes the connection back by itself, and every call on the proxy tether handed
    # out (``is_closed`` too) says it was "released back to the pool": lost as well.
    return isinstance(exc, pg_errors.InterfaceError) and _closed(conn)


async def _acquire(p: Any, pool_name: str, state: _State | None, timeout: float) -> Any:
    if state is not None:
        if state.rolled_back:  # tests only
            from ..testing import outside_the_block

            outside_the_block(state.rolled_back[0], pool_name)
        if (
            state.max_waiting is not None
            and state.waiting >= state.max_waiting
            # Those waiting beyond what the pool can hand out without a release (its idle
            # connections, and those it has yet to make: asyncpg's size counts the connected
            # ones, so a pool still filling, cold or after a restart, has room) queue.
            and state.waiting - p.get_idle_size() - (p.get_max_size() - p.get_size())
            >= state.max_waiting
        ):
            raise queue_full(
                pool_name,
                waiting=state.waiting,
                max_waiting=state.max_waiting,
                size=_max_size(p),
                in_use=_in_use(p),
            )
        state.waiting += 1
    try:
        conn = await p.acquire(timeout=timeout)
        if state is not None:
            state.served = time.monotonic()
            if state.expires is not None:
                while _due(state, state.expires, p, conn):
                    # Past max_lifetime: closed now that no unit of work holds it; the pool
                    # opens a new one in its place.
                    _terminate(conn)
                    await p.release(conn)
                    conn = await p.acquire(timeout=timeout)
        return conn
    except TimeoutError as exc:
        if state is not None:
            state.timed_out_at = time.monotonic()  # readiness: the waits are failing
        raise _timed_out(p, pool_name, state, timeout) from exc
    except UNREACHABLE as exc:
        shown = state.shown if state is not None else "the database"
        raise unreachable(pool_name, shown, exc) from exc
    finally:
        if state is not None:
            state.waiting -= 1


#: Attempts at a connection that answers its BEGIN or ping (a connection ended on the server
#: while it sat in the pool fails its first statement: it is replaced).
_ATTEMPTS = 3


async def _acquire_tested(
    p: Any,
    pool_name: str,
    state: _State | None,
    timeout: float,
    name: str,
    reset_timeout: float,
    begin: tuple[str | None, bool] | None,
    conn: Any = None,
) -> tuple[Any, Any]:
    """A connection of *p* that answered: inside a new transaction when *begin* gives its
    isolation and read-only flag, else pinged if it sat idle long enough (*conn*: one just
    acquired, to ping first). Returns the connection and its transaction (or None).

    asyncpg's pool does not test a connection before handing it out. One ended on the
    server while it sat idle (``pg_terminate_backend``, a restart, a proxy) may be handed
    out before asyncpg has read the news, and then fails the ``BEGIN`` or the ping: nothing
    of the unit of work ran yet, so it is terminated and another one taken, up to
    ``_ATTEMPTS``. One that does not answer within *timeout* is terminated and a 503.
    """
    for attempt in range(1, _ATTEMPTS + 1):
        if conn is None:
            conn = await _acquire(p, pool_name, state, timeout)
        tx = None
        try:
            if begin is not None:
                tx = conn.transaction(isolation=begin[0], readonly=begin[1])
                await _answered(conn, pool_name, timeout, "BEGIN", tx.start())
            elif state is not None and _idle(state, conn):
                # The simple protocol's SELECT 1: asyncpg fails on an empty one (asyncpg#1259).
                ping = conn.execute("SELECT 1")
                await _answered(conn, pool_name, timeout, "the ping of a pooled connection", ping)
        except Exception as exc:
            stale = _is_lost(conn, exc)
            if stale:
                _terminate(conn)
            await _give_back(p, conn, name, reset_timeout)
            if not stale:
                raise
            if attempt == _ATTEMPTS:
                reason = f"{attempt} connections in a row were dead: {describe(exc)}"
                raise unavailable(pool_name, reason, lost=True, unreachable=True) from exc
            log.info("tether: %r: a pooled connection was dead (%s); took another", name, exc)
            conn = None
        except BaseException:
            _terminate(conn)  # interrupted mid-BEGIN or mid-ping: its state is unknown
            await _give_back(p, conn, name, reset_timeout)
            raise
        else:
            return conn, tx
    raise AssertionError  # pragma: no cover - the loop returns or raises


def _ended_by_endpoint(name: str, more: str) -> str:
    """The WARNING for a ``transaction=True`` unit whose transaction the endpoint ended
    itself (a raw ``COMMIT`` or ``ROLLBACK``): what it ran after ran in autocommit, and no
    failure of the unit rolls it back (trial 23). Nothing was said before."""
    return (
        f"{name!r}: the endpoint ended the unit of work's transaction itself (a COMMIT or "
        f"ROLLBACK it ran on the connection): the statements after it ran outside any "
        f"transaction, each committed as it ran{more}. For a part of the unit, use `async with "
        f"conn.transaction():` (a savepoint); to commit as you go, use a connection resource "
        f"without transaction=True."
    )


_NOTHING_ROLLED_BACK = ", and this unit's failure rolls none of them back"


async def _commit(conn: Any, tx: Any, name: str) -> None:
    """Commit *tx* as asyncpg's ``Transaction.commit()`` does, reading the server's answer:
    PostgreSQL answers ``COMMIT`` of a transaction that a failed statement aborted with
    ``ROLLBACK`` and no error, and asyncpg drops the answer. (asyncpg keeps the
    transaction's status to itself: its own bookkeeping is done here too.)"""
    raw = _raw(conn)
    top: Any = getattr(raw, "_top_xact", None)
    if top is None or top is not tx or not hasattr(top, "_state"):
        # An asyncpg that works otherwise, or a connection its pool took back as it closed
        # (``tx.commit()`` then refuses, sending nothing).
        await tx.commit()
        return
    raw._top_xact = None
    if not raw.is_in_transaction():
        log.warning("tether: %s", _ended_by_endpoint(name, ""))
        top._state = _TxState.COMMITTED
        return
    try:
        answer = await raw.execute("COMMIT;")
    except BaseException:
        top._state = _TxState.FAILED
        raise
    top._state = _TxState.COMMITTED
    if answer == "ROLLBACK":
        savepoint = "`async with conn.transaction():`"
        msg = failed_transaction("Connection", name, savepoint)
        raise pg_errors.InFailedSQLTransactionError(msg)


def _raw(conn: Any) -> Any:
    """The connection behind asyncpg's pool proxy (what the pool's callbacks are given, so
    what tether's per-connection records are keyed by)."""
    return getattr(conn, "_con", conn)


def _idle(state: _State, conn: Any) -> bool:
    """Whether *conn* sat in the pool long enough to be pinged (with ``pre_ping``)."""
    if state.idle_since is None:
        return False
    since = state.idle_since.get(_raw(conn))
    return since is not None and time.monotonic() - since >= state.ping_after


async def _answered(
    conn: Any, pool_name: str, timeout: float, what: str, operation: Awaitable[Any]
) -> None:
    """*operation* on *conn* (*what*: its name in the message), bounded by the acquire
    timeout: a connection that stopped answering (a network that drops packets, with no
    reset) is a 503 within it, not a request that hangs. Such a connection is terminated:
    what the server made of the statement is unknown."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            await operation
    except TimeoutError as exc:  # this deadline's, or asyncpg's command_timeout
        _terminate(conn)
        within = f"acquire_timeout={timeout:g} s" if deadline.expired() else "command_timeout"
        reason = (
            f"the database did not answer {what} within {within} (the connection was "
            f"terminated; the network or the server may be down)"
        )
        raise unavailable(pool_name, reason, timed_out=deadline.expired()) from exc


#: Seconds, at most, a connection past its lifetime keeps serving while the pool replaces
#: others (``min(RECYCLE_SLACK, max_lifetime)``): at ``ceil(0.1 * max_size)`` a second, or
#: ``ceil(max_size / max_lifetime)``, a whole pool made at once is replaced within that.
RECYCLE_SLACK = 10.0


def _due(state: _State, expires: weakref.WeakKeyDictionary[Any, float], p: Any, conn: Any) -> bool:
    """Whether *conn*, just acquired, is to be closed for its age: past its lifetime, and
    fewer than the budget closed so in the last second (else it serves this unit of work,
    and is closed on a later acquire), or left serving so for the slack already.

    The budget, ``ceil(0.1 * max_size)`` a second, spreads the replacement of connections
    made together (a pool warmed at once) instead of replacing them all in the same second;
    with a lifetime under 10 s that would not keep up (every connection is replaced once a
    lifetime), so it is ``ceil(max_size / max_lifetime)`` then.
    """
    raw = _raw(conn)
    deadline = expires.get(raw)
    now = time.monotonic()
    if deadline is None or now <= deadline:
        return False
    recycled = state.recycled
    while recycled and recycled[0] <= now - 1.0:
        recycled.popleft()
    size = _max_size_of(p)
    budget = max(math.ceil(0.1 * size), math.ceil(size / state.lifetime))
    slack = min(RECYCLE_SLACK, state.lifetime)
    if len(recycled) >= budget:
        # The slack runs from the first acquire that found it due, not from its deadline:
        # the connections of a pool idle past their lifetime come due unseen, and the burst
        # after the idle spell replaces them at the budget's rate, not all at once.
        first = state.due_since.setdefault(raw, now)
        if now <= first + slack:
            return False
    state.due_since.pop(raw, None)
    recycled.append(now)
    return True


def _max_size_of(p: Any) -> int:
    size = _max_size(p)
    return size if size is not None else 1


def _timed_out(p: Any, pool_name: str, state: _State | None, timeout: float) -> ResourceUnavailable:
    in_use = _in_use(p)
    max_size = _max_size(p)
    if max_size is not None and in_use is not None and in_use < max_size:
        reason = f"connecting to the database took longer than acquire_timeout={timeout:g} s"
    else:
        reason = (
            f"no connection came free within acquire_timeout={timeout:g} s "
            f"(max_size={max_size}); the requests holding them are slow, or the pool is "
            f"too small for the load"
        )
    # The others waiting: this unit, timing out, no longer waits (as psycopg and SQLAlchemy
    # count it).
    waiting = max(state.waiting - 1, 0) if state is not None else None
    return unavailable(
        pool_name, reason, size=max_size, in_use=in_use, waiting=waiting, timed_out=True
    )


def _in_use(p: Any) -> int | None:
    try:
        return int(p.get_size()) - int(p.get_idle_size())
    except Exception:  # pragma: no cover - a pool-like value without these
        return None


def _max_size(p: Any) -> int | None:
    try:
        return int(p.get_max_size())
    except Exception:  # pragma: no cover
        return None


async def _rollback(p: Any, conn: Any, tx: Any, name: str, within: float) -> None:
    """Roll back this unit of work's transaction; terminate the connection if that fails.

    After a cancelled query asyncpg has sent the server a cancel request: the rollback
    first waits for the server to acknowledge it, then ends the transaction.
    """
    if _closed(conn):
        return  # lost with the server, which ended the transaction: nothing to roll back
    backend = _backend(conn)
    try:
        async with asyncio.timeout(within):
            await tx.rollback()
    except Exception as exc:
        log.warning(
            "tether: %r: rollback failed (%s); terminating the connection", name, describe(exc)
        )
        await _discard(p, conn, backend, name)
    except BaseException:
        _terminate(conn)  # interrupted: no time to ask the server for anything
        raise


async def _give_back(
    p: Any,
    conn: Any,
    name: str,
    within: float,
    interrupted: bool = False,
    unit: Callable[[], Unit | None] | None = None,
) -> None:
    """Return *conn* to *p* reset, or terminate it: never return it in an unknown state.

    * closed (the server went away): asyncpg discards it, the pool reconnects later;
    * left inside a transaction by the unit of work: rolled back first (waiting for a
      cancelled query to be acknowledged by the server), with a warning, unless the unit
      was *interrupted* (its client went away, it was cancelled): its code was stopped
      wherever it was, inside its own ``async with conn.transaction():`` say;
    * on which the unit of work changed a type codec: closed instead (asyncpg's reset
      keeps codecs);
    * then asyncpg's own release: it waits for a cancellation in flight and runs the
      session reset (tether's: ``RESET_SESSION``);
    * if any of that fails or takes longer than *within* (another task still running a
      query on it, say), the connection is terminated instead, and its backend with it.
    """
    state: _State | None = getattr(p, "_tether", None)
    try:
        closed = bool(conn.is_closed())
        left_in_transaction = not closed and conn.is_in_transaction()
    except pg_errors.InterfaceError:
        # Already released: lost, or terminated (by tether, or the endpoint), and asyncpg
        # released it as it closed. Nothing to give back; asyncpg replaces it.
        if state is not None:
            state.discarded += 1
        return
    if closed and state is not None:
        state.discarded += 1  # lost: asyncpg replaces it
    raw = _raw(conn)  # now: the release detaches it from the proxy
    if state is not None and state.codecs and raw in state.codecs:
        await _close_with_codecs(p, conn, raw, state, name, closed)
        return
    if not closed:  # closed: asyncpg runs (or ran) its termination listeners, and drops all
        _drop_callbacks(raw, state)
    backend = _backend(conn)  # now: a failed release terminates and detaches the connection
    try:
        if left_in_transaction:
            if interrupted:
                # A streaming body the client left inside its `async with
                # conn.transaction():` (whose own rollback the cancellation cut short), a
                # cancelled task: stopped mid-way, not left open by mistake.
                log.debug(
                    "tether: %r: the unit of work was interrupted (the client went away, or "
                    "it was cancelled) inside a transaction it opened; rolling it back",
                    name,
                )
            else:
                log.warning(
                    "tether: %r: connection returned inside an open transaction; rolling it "
                    "back (commit or roll back the transactions you start)",
                    name,
                )
            async with asyncio.timeout(within):
                await conn.execute("ROLLBACK")
        # Bounded by its own timeout: asyncpg terminates the connection when it runs out.
        await p.release(conn, timeout=within)
        if state is not None and state.idle_since is not None:
            state.idle_since[raw] = time.monotonic()
    except Exception as exc:
        if _concurrent(exc):
            log.warning("tether: %s", _still_querying(name, unit))
        else:
            log.warning(
                "tether: %r: connection could not be reset (%s); terminated, not returned to "
                "the pool",
                name,
                describe(exc),
            )
        if state is not None and not closed:
            state.discarded += 1
        await _discard(p, conn, backend, name)
    except BaseException:
        if state is not None and not closed:
            state.discarded += 1
        _terminate(conn)
        if left_in_transaction and backend is not None:
            # Cut short while it rolled back (the salvage of a close given up on ended): the
            # server may still run what the connection was sent (a COMMIT waiting for a
            # lock, its cancel request stopped with the connection), which would commit once
            # the lock is free, after the client's 500. Ended from a task of its own,
            # before the client's answer (`wait_to_the_end`), bounded of its own.
            loop = asyncio.get_running_loop()
            await wait_to_the_end(loop.create_task(_discard(p, conn, backend, name)))
        raise


async def _close_with_codecs(
    p: Any, conn: Any, raw: Any, state: _State, name: str, closed: bool
) -> None:
    """Close *conn*, on which the unit of work changed a type codec, instead of returning it:
    asyncpg's reset keeps codecs, and the next unit on it would decode (and encode) with them.
    The pool opens another in its place (its ``init`` sets the pool's codecs). Not counted
    as discarded: its state is known, and a connection that came back *closed* was counted."""
    state.codecs.discard(raw)
    if not closed:
        log.warning(
            "tether: %r: the unit of work changed a type codec (set_type_codec, "
            "set_builtin_type_codec or reset_type_codec), which asyncpg's reset keeps: the "
            "connection was closed, not returned, so the next unit on it does not decode with "
            "it. Set codecs in the pool's init= (every connection, once), not per unit of work",
            name,
        )
    _terminate(conn)
    with contextlib.suppress(pg_errors.InterfaceError):
        await p.release(conn)


def _terminate(conn: Any) -> None:
    try:
        conn.terminate()  # gives its slot back to the pool, which reconnects when needed
    except pg_errors.InterfaceError:
        pass  # already released


def _closed(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except pg_errors.InterfaceError:
        return True  # already released


async def _terminate_at(p: Any, addr: Any, pid: int) -> None:
    """End backend *pid* on the server at *addr* (the pool's own connections reached
    another of its DSN's hosts), through a connection made for it there."""
    made = getattr(p, "_connect", None)
    own_connect = getattr(made, "__wrapped__", made) is asyncpg.connect  # not the app's connect=
    if isinstance(addr, str) and ".s.PGSQL." in addr:  # a unix socket: DIR/.s.PGSQL.PORT
        host, port = os.path.dirname(addr), int(addr.rsplit(".", 1)[1])
    elif isinstance(addr, tuple):
        host, port = addr[:2]
    else:
        own_connect = False
    if not own_connect:
        msg = (
            f"the pool's connections are on another server than {addr!r}, its backend's, "
            f"and the pool's connect= is the app's: tether cannot make one there"
        )
        raise RuntimeError(msg)
    other = await asyncpg.connect(
        *p._connect_args, **{**p._connect_kwargs, "host": host, "port": port}
    )
    try:
        await other.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        other.terminate()


#: A connection's backend: its pid, the address it reached (a DSN may name several hosts),
#: and what asyncpg's cancel request for it needs (its connection parameters and secret
#: key, `_cancel_request`), read as it is released: sent when no connection can end it
#: (`_discard`), as it needs no connection slot. (A plain tuple: made at each release.)
_Backend = tuple[int, Any, Any, Any]


def _backend(conn: Any) -> _Backend | None:
    """*conn*'s backend; None once closed or released. (Read at each release: attribute
    reads only.)"""
    try:
        if conn.is_closed():
            return None
        raw = getattr(conn, "_con", conn)  # a pool's proxy: its connection
        pid = int(conn.get_server_pid())
        protocol = getattr(raw, "_protocol", None)
        secret = getattr(protocol, "backend_secret", None)
        return pid, getattr(raw, "_addr", None), getattr(raw, "_params", None), secret
    except pg_errors.InterfaceError:
        return None  # already released


async def _cancel_request(backend: _Backend) -> None:
    """Send *backend* asyncpg's own cancel request (as its query cancel sends it)."""
    from asyncpg import connect_utils

    pid, addr, params, secret = backend
    await connect_utils._cancel(
        loop=asyncio.get_running_loop(),
        addr=addr,
        params=params,
        backend_pid=pid,
        backend_secret=secret,
    )


async def _discard(p: Any, conn: Any, backend: _Backend | None, name: str) -> None:
    """Terminate *conn* and make sure its backend *pid* stops too.

    Closing the socket alone does not stop a query running on the server (PostgreSQL
    only notices a client gone when it next writes to it), and ``terminate()`` also
    cancels the cancel request asyncpg may still have in flight for it. So the backend
    is terminated on the server as well, through another connection of the pool.
    """
    _terminate(conn)
    state: _State | None = getattr(p, "_tether", None)
    if backend is None or (state is not None and state.pgbouncer):
        return  # behind PgBouncer the pid is PgBouncer's, which drops the server side itself
    pid, addr, params, secret = backend
    can_cancel = addr is not None and params is not None and secret is not None
    try:
        async with asyncio.timeout(_STOP_WITHIN):
            async with p.acquire(timeout=_STOP_WITHIN) as other:
                # A DSN of several hosts: the pool's connections may be on another server
                # (made after a failover), where that pid is another session's, or none.
                there = addr is None or getattr(other._con, "_addr", None) in (None, addr)
                if there:
                    await other.fetchval("SELECT pg_terminate_backend($1)", pid)
            if not there:
                await _terminate_at(p, addr, pid)
    except Exception as exc:
        why = describe(exc)
        if can_cancel:
            # No connection to end it from (the pool's all in use, the server full): a
            # cancel request needs no slot. Its query (a COMMIT waiting for a lock) is
            # cancelled, and the backend then finds its client gone.
            try:
                async with asyncio.timeout(_STOP_WITHIN):
                    await _cancel_request(backend)
            except Exception as also:
                why = f"{why}; its cancel request failed too: {describe(also)}"
            else:
                log.info(
                    "tether: %r: could not end backend %d on the server (%s): its query was "
                    "cancelled with a cancel request",
                    name,
                    pid,
                    why,
                )
                return
        log.warning(
            "tether: %r: could not terminate backend %d on the server (%s); a query it "
            "was running may run to its end",
            name,
            pid,
            why,
        )


# --------------------------------------------------------------------------- tests


# How each connection resource made here was registered: for :func:`rolled_back`.
_connections: PerResource[ConnectionOf] = PerResource("asyncpg_connections")


async def _keep_unit(conn: Any, name: str, after: str) -> None:
    """Release the unit of work's savepoint (its commit), its deferred constraints checked
    first, as ``COMMIT`` checks them: a violation rolls back to it and is raised, as
    ``COMMIT`` raises it. If a statement failed in it and its error was caught, PostgreSQL
    refuses: roll back to it, and raise what a commit raises. Then *after*: the session's
    reset, as production resets it on release (``SET``, ``SET LOCAL``, the role...), and
    what the unit found set again, in the same round trip."""
    from ..testing import _CHECK_DEFERRED

    back = f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
    try:
        await conn.execute("; ".join((*_CHECK_DEFERRED, f"RELEASE SAVEPOINT {SAVEPOINT}")) + after)
    except pg_errors.InFailedSQLTransactionError as exc:
        await conn.execute(back)
        savepoint = "`async with conn.transaction():`"
        msg = failed_transaction("Connection", name, savepoint)
        raise pg_errors.InFailedSQLTransactionError(msg) from exc
    except pg_errors.PostgresError:  # a deferred constraint violated: COMMIT's error
        await conn.execute(back)
        raise


@async_block
@asynccontextmanager
async def rolled_back(connection: Resource[Any]) -> AsyncIterator[asyncpg.Connection]:
    """Roll back, when the block ends, everything the app writes through *connection* in it.

    For tests. While the block runs, every unit of work that asks for *connection* (a
    request, ``lc.scope()``) gets the same connection, inside one transaction that the
    block opened, and runs in a savepoint of its own: tether's commit at the release point
    releases it, a failure (an exception, an error status) rolls back to it, and the outer
    transaction is rolled back at the end. So tests that write the same rows pass in any
    order, and the database is left as it was. ``async with conn.transaction():`` in an
    endpoint is a savepoint inside the unit's, as in production.

    With ``transaction=False`` (autocommit), what a failing unit of work wrote is kept, as
    in production, unless a statement of it failed: then the whole unit is rolled back
    (a statement after a failed one, its error caught, fails in the test where production
    runs it: run what may fail in ``async with conn.transaction():``).

    As in production, each unit's commit checks the deferred constraints (a violation is the
    driver's error, where ``COMMIT`` raises it), and the session's settings (``SET``, ``SET
    LOCAL``, ``set_config(..., true)``, the role) are reset after each unit, as on release.
    The outer transaction begins with the resource's ``isolation`` and ``readonly``.

    The units of work take turns on the one connection: one that asks for *connection*
    while another holds it waits for it, up to the pool's acquire timeout, then raises a
    ``RuntimeError`` saying why (at once if its own task holds it: a nested ``lc.scope()``).
    As in production, each unit of work gets a pool proxy of its own, released as the unit
    ends: a statement on it after (a ``StreamingResponse`` body with ``release="handler"``, a
    background task) raises asyncpg's ``InterfaceError`` ("released back to the pool"), where
    it would run in the next unit's savepoint. The callbacks a unit adds (query loggers, log
    and termination listeners) go at its end; those the test adds on the block's connection,
    with the block.

    The block yields the connection: query it between requests to see what the app wrote (and
    do not commit on it). The app scope must be running, on this event loop (with
    ``TestClient``: ``client.portal.wrap_async_context_manager(...)``).
    """
    from ..testing import _aborted, _Turns

    spec = registered(_connections, connection, "asyncpg")
    lc = connection.lifecycle
    name = connection.name
    p = lc.get(spec.pool)  # a ScopeError naming the fix if the app scope is not running
    state: _State | None = getattr(p, "_tether", None)
    reset = state is None or not state.pgbouncer  # as the pool's reset on release
    turns = _Turns(name, state.acquire_timeout if state is not None else 5.0)
    conn = await p.acquire()  # a ScopeError on another event loop than the pool's
    if state is not None:
        state.rolled_back.append(name)  # another resource of the pool is outside: warned
    raw = _raw(conn)
    pooled = _found_callbacks(raw)  # the test's own go with the block
    try:
        isolation, readonly = spec.isolation, spec.readonly
        # Read-only per unit of work, not for the block: the test seeds its data on it.
        outer = conn.transaction(isolation=isolation)
        await outer.start()
        lock = turns.lock
        back = f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"

        async def joined() -> AsyncIterator[asyncpg.Connection]:
            async with turns.turn():
                found_callbacks = _found_callbacks(raw)  # as the unit found them
                begin = f"SAVEPOINT {SAVEPOINT}"
                if readonly:  # undone with the savepoint, which a read-only unit rolls back
                    begin += READ_ONLY_UNIT
                try:
                    # What the test set on the session (the unit's reset puts it back after).
                    found = await conn.fetchval(SESSION_SETTINGS) if reset and not readonly else ""
                    await conn.execute(begin)
                except pg_errors.InFailedSQLTransactionError as exc:  # the test's statement
                    raise RuntimeError(_aborted(name, "`async with conn.transaction():`")) from exc
                after = f"; {IN_BLOCK_RESET}{found or ''}" if reset else ""
                handed = _unit_proxy(conn)
                # A codec the test changed on the block's connection: the pool closes it after.
                noted = state is not None and raw in state.codecs
                _unit_codecs[raw] = set()  # the codecs the unit changes (asyncpg's reset keeps)
                try:
                    try:
                        yield handed
                    except BaseException:
                        with anyio.CancelScope(shield=True):
                            if spec.transaction:
                                await conn.execute(back)
                            else:
                                with contextlib.suppress(pg_errors.PostgresError):
                                    await _keep_unit(conn, name, after)  # autocommit: kept
                        raise
                    finally:
                        _release_proxy(handed, conn)
                        if not _closed(conn):  # closed: asyncpg ran its listeners, dropped all
                            _put_back_callbacks(raw, found_callbacks)
                    if readonly:  # nothing to keep: its settings go with its savepoint
                        await conn.execute(back)
                    else:
                        await _keep_unit(conn, name, after)
                finally:
                    changed = _unit_codecs.pop(raw, None)
                    if changed and not _closed(conn):
                        if state is not None and not noted:  # put back: nothing to close for
                            state.codecs.discard(raw)
                        with anyio.CancelScope(shield=True):
                            await _put_back_codecs(raw, changed, name)

        try:
            with block_override(lc, connection, joined):
                yield conn
        finally:
            with anyio.CancelScope(shield=True):
                # A unit of work still holding it ends first (noted for the pytest plugin).
                held = await turns.settle(connection, SETTLE)
                try:
                    await outer.rollback()
                except Exception:  # busy or lost: closing the connection rolls back
                    _terminate(conn)
                finally:
                    if held:  # one still waiting fails on the released connection
                        lock.release()
    finally:
        if state is not None:
            state.rolled_back.remove(name)
        if not _closed(conn):
            _put_back_callbacks(_raw(conn), pooled)
        with anyio.CancelScope(shield=True):
            await p.release(conn)


def _unit_proxy(conn: Any) -> Any:
    """`rolled_back`: the block's connection as asyncpg's pool hands one to a unit of work, a
    proxy of its own, released as the unit ends (:func:`_release_proxy`): used after, it raises
    asyncpg's ``InterfaceError`` ("connection has been released back to the pool"), as in
    production, where the block's proxy would still run the statement in the next unit."""
    cls = asyncpg.pool.PoolConnectionProxy
    if type(conn) is not cls:
        return conn  # a pool tether did not open, handing out something else: as it is
    proxy: Any = object.__new__(cls)
    # Not attached to the connection (which keeps the block's proxy, given to its callbacks).
    proxy._con = conn._con
    proxy._holder = conn._holder
    return proxy


def _release_proxy(proxy: Any, conn: Any) -> None:
    if proxy is not conn:
        proxy._con = None


#: `rolled_back`: the callbacks on a connection object that production's release drops (those
#: a unit of work added): tether drops the query loggers and termination listeners, asyncpg's
#: reset the log listeners.
_UNIT_CALLBACKS = ("_query_loggers", "_termination_listeners", "_log_listeners")


def _found_callbacks(raw: Any) -> list[tuple[set[Any], set[Any]]]:
    """Copies of *raw*'s callbacks (``_UNIT_CALLBACKS``), to put back with
    :func:`_put_back_callbacks`."""
    found = []
    for attr in _UNIT_CALLBACKS:
        now = getattr(raw, attr, None)
        if now is not None:
            found.append((now, set(now)))
    return found


def _put_back_callbacks(raw: Any, found: list[tuple[set[Any], set[Any]]]) -> None:
    """Make *raw*'s callbacks what :func:`_found_callbacks` found: in `rolled_back` the units
    of work share the block's connection, and what one adds goes at its end, as on release."""
    for now, before in found:
        if now != before:
            now.clear()
            now.update(before)


# --------------------------------------------------------------------------- once


class _OnceSession:
    """One connection of the pool, for :func:`tether.integrations._once.run`."""

    def __init__(self, conn: Any) -> None:
        self.connection = conn
        self._tx: Any = None

    async def begin(self) -> None:
        self._tx = self.connection.transaction()
        await self._tx.start()

    async def commit(self) -> None:
        await self._tx.commit()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.connection.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        row = await self.connection.fetchrow(sql, *args)
        return None if row is None else tuple(row)

    def in_transaction(self) -> bool:
        return bool(self.connection.is_in_transaction())


def once(
    lc: Lifecycle,
    pool: Resource[asyncpg.Pool],
    fn: Callable[[asyncpg.Connection], Awaitable[Any]],
    *,
    key: str,
    name: str | None = None,
    record: bool = True,
    table: str = "tether_once",
    timeout: float | None = None,
) -> Resource[bool]:
    pool_name = pool.name

    async def run_once(p: Any, job: _once.Job) -> bool:
        state: _State | None = getattr(p, "_tether", None)
        conn = await _acquire(p, pool_name, state, state.acquire_timeout if state else 5.0)
        backend = _backend(conn)
        try:
            ran = await _once.run(_OnceSession(conn), job)
        except BaseException:
            # The server ends the transaction, and frees the lock, with the connection.
            with anyio.CancelScope(shield=True):
                await _discard(p, conn, backend, job.name)
            raise
        with anyio.CancelScope(shield=True):
            await _give_back(p, conn, job.name, 5.0)
        return ran

    return _once.declare(
        lc, pool, fn, key=key, name=name, record=record, table=table, timeout=timeout,
        run_with=run_once,
    )  # fmt: skip


once.__doc__ = _once.DOC.format(
    dep="pool", conn="an ``asyncpg.Connection``", nested="``async with conn.transaction():``",
    extra="",
)  # fmt: skip
