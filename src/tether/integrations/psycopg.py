"""psycopg 3 with tether: the pool lives for the app, a connection for one unit of work.

::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from psycopg import AsyncConnection

    import tether
    from tether.integrations import psycopg as tpsy

    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, lambda: os.environ["DATABASE_URL"], max_size=10)
    conn = tpsy.connection(lc, pool, transaction=True)

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes")
    async def add(text: str, c: Annotated[AsyncConnection, Depends(conn)]) -> dict[str, str]:
        await c.execute("INSERT INTO notes (text) VALUES (%s)", [text])  # committed before 200
        return {"status": "created"}

* :func:`pool` is an app resource: ``psycopg_pool.AsyncConnectionPool`` (psycopg's own
  pool), opened when the app starts (never at import) and waited for until it holds
  ``min_size`` connections, checked with ``SELECT 1``, its connection budget checked
  against the server's ``max_connections``, closed at shutdown. It refuses use from
  another event loop than its own (:class:`~tether.ScopeError`).
* :func:`connection` is a request resource: one connection per unit of work, in
  autocommit mode, or (``transaction=True``) in one transaction committed before the
  response starts and rolled back on any failure.
* The connection handed out is psycopg's ``AsyncConnection`` behind a thin proxy that
  refuses use once the connection went back to the pool
  (:class:`~tether.ResourceClosedError`, naming ``release="response"``), and what a unit of
  work added to it (notify and notice handlers, notifications unread) goes with it.
* No connection free within ``timeout`` (``PoolTimeout``), or too many waiting, is a
  :class:`~tether.ResourceUnavailable` (503 with ``Retry-After``) naming the pool, its
  size, how many connections are in use and how many requests wait.
* psycopg's pool never hands a dirty connection out again: a connection returned inside
  a transaction is rolled back, one returned in the middle of a query is closed, a
  broken one is replaced (``AsyncConnectionPool._reset_connection``). psycopg itself
  cancels a query on the server when the task running it is cancelled.
* ``pgbouncer=True`` configures psycopg for PgBouncer's transaction (or statement) mode:
  no server-side prepared statements (``prepare_threshold=None``), and no budget check
  against the server behind PgBouncer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Never, TypeVar, cast

import anyio

try:
    import psycopg
    import psycopg_pool
    from psycopg import IsolationLevel
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
    from psycopg.rows import tuple_row
    from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.psycopg needs psycopg 3 and its pool: pip install 'tether[psycopg]'"
    raise ImportError(msg) from exc
try:
    from psycopg_pool.base import AttemptWithBackoff
except ImportError:  # pragma: no cover - psycopg_pool before 3.3
    from psycopg_pool.base import ConnectionAttempt as AttemptWithBackoff  # type: ignore[no-redef, attr-defined]

from .._errors import (
    ResourceClosedError,
    ResourceUnavailable,
    check_bool,
    check_number,
    closest,
    describe,
    for_good,
    not_options,
    refused_for_good,
    unstopped,
)
from .._resource import Resource
from .._scope import SALVAGE, wait_to_the_end
from .._stats import PoolStats
from . import _once
from ._common import (
    IN_BLOCK_RESET,
    LOSES_CANCEL,
    LOST_NOTE,
    READ_ONLY_UNIT,
    RESET_SESSION,
    SAVEPOINT,
    SERVER_READ_ONLY,
    SESSION_SETTINGS,
    SETTLE,
    STOP_WITHIN,
    BudgetPolicy,
    ConnectionOf,
    Dsn,
    LoopBound,
    PerResource,
    async_block,
    asyncio_only,
    block_override,
    cancel_request_of,
    check_budget,
    check_budget_policy,
    check_check,
    check_driver_scheme,
    check_dsn,
    check_ports,
    check_resource,
    check_transaction_options,
    commit_not_sent,
    connect_or_close,
    connection_lost,
    depends_on,
    did_you_mean,
    dropped_cancellation,
    failed_transaction,
    forget_budget,
    keyword_names,
    lost_after_commit,
    lost_at_commit,
    not_an_option,
    note_pgbouncer,
    plain_dsn,
    pooler_never_sent,
    read_budget,
    read_only,
    read_only_failure,
    redact,
    registered,
    remember_secrets,
    resolve_dsn,
    saturation,
    scrub_secrets,
    server_of,
    shut_down_socket,
    terminate_backend,
    unavailable,
    unreachable,
)
from ._common import workers as worker_count

_EXAMPLE_DSN = "lambda: os.environ['DATABASE_URL']"

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check, Release

__all__ = ["Pool", "connection", "once", "pool", "rolled_back"]

log = logging.getLogger("tether")

Connection = psycopg.AsyncConnection[Any]


class _State:
    """What tether knows about one pool it opened (for messages and the loop check)."""

    __slots__ = (
        "acquiring",
        "bound",
        "callbacks",
        "cancels",
        "configured",
        "discarded",
        "name",
        "out",
        "pgbouncer",
        "rolled_back",
        "served",
        "servers",
        "shown",
        "timed_out_at",
        "timeout",
    )

    def __init__(self, name: str, timeout: float, shown: str, pgbouncer: bool = False) -> None:
        self.name = name
        self.pgbouncer = pgbouncer
        self.timeout = timeout
        self.shown = shown  # the conninfo, password redacted
        self.bound = LoopBound(name)
        self.rolled_back: list[str] = []  # the resources of the `rolled_back` blocks open now
        self.served = time.monotonic()  # when the pool last handed out a connection
        self.timed_out_at = -math.inf  # when a wait for one last timed out (PoolTimeout)
        # Connections given back closed or mid-query after the pool closed: psycopg_pool closes
        # them without counting them in ``returns_bad``.
        self.discarded = 0
        # Calls of getconn under way. psycopg counts a waiter that timed out as waiting until
        # the pool next hands a connection out; these calls are the ones that still wait.
        self.acquiring = 0
        # The connections handed out and not given back. psycopg's own figure for them
        # (``pool_size`` - ``pool_available``) also counts a connection it is still making.
        self.out: weakref.WeakSet[Connection] = weakref.WeakSet()
        # What the pool's ``configure`` set on each connection's session (``SET``), as SQL
        # that sets it again: the reset's ``RESET ALL`` undoes it, and it is put back.
        self.configured: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        # The notice and notify handlers the pool's ``configure`` added to each connection
        # (none for most): what a unit of work adds is dropped as the connection goes back.
        self.callbacks: weakref.WeakKeyDictionary[Connection, _Callbacks] = (
            weakref.WeakKeyDictionary()
        )
        # The server each connection reached (`_noting_server`; None behind PgBouncer), where
        # `_end_backend` ends its backend.
        self.servers: weakref.WeakKeyDictionary[Connection, dict[str, str]] | None = None
        # A cancel request for each connection's backend (`cancel_request_of`), made as it
        # was: `_end_backend` sends it when the server has no slot left for its connection.
        self.cancels: weakref.WeakKeyDictionary[Connection, Any] = weakref.WeakKeyDictionary()


#: Whether psycopg_pool has what tether's pre-ping loop calls (`Pool._getconn_with_check_loop`).
_OWN_CHECK_LOOP = all(
    callable(getattr(AsyncConnectionPool, name, None))
    for name in ("_getconn_with_check_loop", "_getconn_unchecked", "_check_connection", "_putconn")
)

#: The longest wait between two attempts at replacing a lost connection (give or take 10 %).
RECONNECT_DELAY_CAP = 2.0


class _Attempt(AttemptWithBackoff):
    """psycopg_pool's attempts at replacing a lost connection, their delay capped at
    `RECONNECT_DELAY_CAP`, jittered so that a pool's attempts do not all come at once. Its
    own double from 1 s up to ``reconnect_timeout`` (5 minutes): after an outage of 45 s a
    connection's next attempt came up to 12 s after the server was back, and every request
    waited for it and got a 503 saying the database could not be reached (asyncpg's and
    SQLAlchemy's pools connect on demand)."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        if self.delay > RECONNECT_DELAY_CAP:
            self.delay = RECONNECT_DELAY_CAP * random.uniform(0.9, 1.1)


class Pool(AsyncConnectionPool[Connection]):
    """``AsyncConnectionPool`` that refuses to be used from another event loop than its own,
    and tries to replace a lost connection at least every `RECONNECT_DELAY_CAP` seconds.

    Everything else is psycopg's: this is psycopg's pool, not one of tether's.
    """

    _tether: _State | None = None

    async def _add_connection(self, attempt: Any, growing: bool = False) -> None:
        if attempt is None:
            attempt = _Attempt(timeout=self.reconnect_timeout)
        await super()._add_connection(attempt, growing=growing)

    async def _getconn_with_check_loop(self, deadline: float) -> Connection:
        """psycopg_pool's loop of checks of the connection it hands out (``pre_ping``),
        without its backoff between two connections that fail the check while there may be
        live ones among the pool's (up to ``max_size``): after an idle timeout (the server's
        ``idle_session_timeout``, a proxy's) had closed several, each dead one cost the
        next a wait of 1, 2, 4 s..., and a pool of 4 answered 503 after ``timeout`` with the
        database up (trial 18). A dead connection is discarded, and its replacement made,
        as before; past ``max_size`` failures in a row (what is handed out keeps dying: the
        server is going down), psycopg's own delay, 1 s. On a psycopg_pool whose private
        methods differ from 3.3's, psycopg's own loop."""
        if not _OWN_CHECK_LOOP:
            return await super()._getconn_with_check_loop(deadline)
        failed = 0
        while True:
            conn = await self._getconn_unchecked(deadline - time.monotonic())
            try:
                await self._check_connection(conn)
            except Exception:
                await self._putconn(conn, from_getconn=True)
            except BaseException:  # cancelled: the connection goes back, no more tries
                await self._putconn(conn, from_getconn=True)
                raise
            else:
                return conn
            failed += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolTimeout()
            if failed > self.max_size:
                await asyncio.sleep(min(1.0, left))

    async def getconn(self, timeout: float | None = None) -> Connection:
        state = self._tether
        if state is None:
            return await super().getconn(timeout)
        state.bound.check()
        task = asyncio.current_task() if LOSES_CANCEL else None
        cancels = task.cancelling() if task is not None else 0
        state.acquiring += 1
        try:
            conn = await super().getconn(timeout)
        except PoolTimeout:
            state.timed_out_at = time.monotonic()  # readiness: the waits are failing
            raise
        finally:
            state.acquiring -= 1
        state.served = time.monotonic()
        state.out.add(conn)
        if task is not None and task.cancelling() > cancels:
            # Cancelled just as the pool handed it the connection: on Python 3.11,
            # asyncio.wait_for (in psycopg_pool's wait) then returns the connection and
            # drops the cancellation (CPython gh-86296, fixed in 3.12). Deliver it, and
            # give the connection back, as Python 3.12 does.
            with anyio.CancelScope(shield=True):
                await self.putconn(conn)
            raise dropped_cancellation(task)
        return conn

    async def putconn(self, conn: Connection) -> None:
        state = self._tether
        if state is not None:
            state.out.discard(conn)
            if self.closed and conn.pgconn.transaction_status in _RETURNED_BAD:
                # psycopg_pool closes what comes back to a closed pool (a unit of work still
                # running as the app shut down) without counting it: one closed or mid-query
                # is discarded, as the pool open would count it (``returns_bad``), and as
                # asyncpg's is counted whenever it comes back.
                state.discarded += 1
        await super().putconn(conn)


#: The states in which psycopg_pool counts a connection given back as bad (``returns_bad``):
#: closed (or broken), or still running a query (it closes it).
_RETURNED_BAD = frozenset({TransactionStatus.UNKNOWN, TransactionStatus.ACTIVE})


async def _first_row(probe: psycopg.AsyncConnection[Any], query: str) -> Any:
    """*query*'s first row on *probe* (in autocommit: a refused query leaves it usable)."""
    async with probe.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query)
        return await cur.fetchone()


@functools.cache
def _pool_options() -> tuple[frozenset[str], frozenset[str]] | None:
    """The keyword arguments this psycopg_pool's ``AsyncConnectionPool`` takes besides those
    pool() sets itself, and those with pool()'s own (for a suggestion); ``None`` if its
    signature cannot be read."""
    try:
        taken = keyword_names(AsyncConnectionPool.__init__)
    except (TypeError, ValueError):  # pragma: no cover - a signature inspect cannot read
        return None
    own = keyword_names(pool) - {"lc"}
    return taken - own - {"self", "open"}, (taken | own) - {"self", "open"}


def _check_pool_options(pool_kw: Mapping[str, Any], where: str) -> None:
    """Refuse a keyword argument neither pool() nor this psycopg_pool's
    ``AsyncConnectionPool`` takes (``max_idel=5``) at the declaration: psycopg_pool would
    refuse it only when the app starts, after a connection to the database (so, the database
    down, as a database that cannot be reached)."""
    options = _pool_options()
    if options is None:
        return  # pragma: no cover - a signature inspect cannot read
    accepted, known = options
    for key in pool_kw:
        if key in accepted:
            continue
        if key == "open":
            msg = (
                f"{where}: open= is pool()'s to set: it opens the pool when the app starts "
                f"and closes it at shutdown. Remove it."
            )
            raise TypeError(msg)
        of = f"psycopg_pool.AsyncConnectionPool (psycopg_pool {psycopg_pool.__version__})"
        raise not_an_option(where, key, "pool()", of, did_you_mean(key, known))


@functools.cache
def _libpq_options() -> frozenset[str]:
    """The connection options this libpq takes (``dbname``, ``application_name``, ...)."""
    return frozenset(option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults())


@functools.cache
def _connect_options(connection_class: type[Any]) -> frozenset[str] | None:
    """The connection arguments *connection_class* takes: its ``connect()``'s own
    (``autocommit``, ``row_factory``, ...) and libpq's options; ``None`` if they cannot be
    read."""
    try:
        return (keyword_names(connection_class.connect) - {"conninfo"}) | _libpq_options()
    except Exception:  # pragma: no cover - a signature or a libpq that cannot be read
        return None


#: Connection arguments of other drivers, and what libpq calls them.
_LIBPQ_NAMES = {"database": "dbname", "db": "dbname", "username": "user"}


def _fix(key: str, accepted: frozenset[str]) -> str:
    """The fix for a connection argument *key* not in *accepted*: its libpq name, or the
    closest one."""
    close = _LIBPQ_NAMES.get(key) or closest(key, accepted)
    return f"Did you mean {close!r}? Fix or remove it." if close else "Remove it."


def _libpq() -> str:
    number = psycopg.pq.version()
    return f"libpq {number // 10000}.{number % 10000}"


def _check_connect_options(
    kwargs: Mapping[str, Any] | None, pool_kw: Mapping[str, Any], where: str
) -> None:
    """Refuse a connection argument of *kwargs* neither psycopg's ``connect()`` nor libpq
    takes (``{'autocomit': True}``) at the declaration: libpq would refuse it only when the
    app starts."""
    if not kwargs:
        return
    connection_class = pool_kw.get("connection_class", psycopg.AsyncConnection)
    accepted = _connect_options(connection_class) if isinstance(connection_class, type) else None
    if accepted is None:
        return  # pragma: no cover - a signature or a libpq that cannot be read
    for key in kwargs:
        if key in accepted:
            continue
        fix = _fix(str(key), accepted)
        of = (
            "psycopg.AsyncConnection"
            if connection_class is psycopg.AsyncConnection
            else connection_class.__qualname__
        )
        msg = (
            f"{where}: kwargs has {key!r}, which is not a connection option of libpq "
            f"({_libpq()}) nor of {of}.connect() (psycopg {psycopg.__version__}). {fix}"
        )
        raise TypeError(msg)


def _invalid_option(exc: BaseException, where: str) -> BaseException | None:
    """libpq's refusal of an option it does not know (in the conninfo, or its URL's query), made
    a configuration mistake (no retry, no 503) naming the fix; ``None`` for another error."""
    if not isinstance(exc, psycopg.ProgrammingError):
        return None
    said = str(exc).strip()
    if not said.startswith(("invalid connection option", "invalid URI query parameter")):
        return None
    found = said.split('"')
    key = found[1] if len(found) > 2 else ""
    fix = _fix(key, _libpq_options())
    msg = f"{where}: {_libpq()} refused the conninfo: {said}. {fix}"
    return for_good(psycopg.ProgrammingError(redact(msg)))


def _check_conninfo(value: object, where: str, *, returned: bool = False) -> None:
    """Refuse a conninfo libpq cannot read, before any connection is tried: a SQLAlchemy
    URL (``postgresql+psycopg://``, `check_driver_scheme`), one libpq cannot parse
    (``missing "=" after ...``: psycopg's ``conninfo_to_dict``, libpq's
    ``PQconninfoParse``, which connects to nothing and reads no environment), or one with an
    option libpq does not know (`_invalid_option`). A configuration mistake no retry mends
    (marked `for_good`), at declaration for a string, when the app starts for one a
    function returned (*returned*). libpq's error, which quotes the conninfo, is chained
    with its password redacted (`scrub_secrets`): its type and traceback stay."""
    check_driver_scheme(value, where, what="conninfo", reader="libpq", returned=returned)
    conninfo = plain_dsn(value)
    if not isinstance(conninfo, str):
        return  # check_dsn refused it already
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        if "://" in conninfo:
            # A URL's password, where libpq quotes it in a form redact's patterns do not find
            # (an unencoded space: 'unexpected spaces found in "pa?ss w0rd"'), as resolve_dsn
            # notes it when the app starts. Not a key/value conninfo's: the words after an
            # unquoted password's space would be noted too (a "dbname"), hidden everywhere.
            remember_secrets(conninfo)
        scrub_secrets(exc)
        invalid = _invalid_option(exc, where)
        if invalid is not None:
            raise invalid from exc
        given = "the conninfo the function given for it returned" if returned else "the conninfo"
        said = redact(f"{where}: {_libpq()} cannot parse {given}: {str(exc).strip()}")
        msg = (  # worded so that redact, which the StartupError's text goes through, keeps it
            f"{unstopped(said)}. Fix it: pass a URL, postgresql://host:port/dbname with "
            f"user:password@ before the host (URL-encoded: %40 for @), or key=value pairs, "
            f"host=... port=5432 dbname=... (a value with spaces in single quotes)."
        )
        raise for_good(psycopg.ProgrammingError(msg)) from exc
    ports = str(params.get("port") or "").split(",")  # (libpq: an empty one is the default)
    ports = [port for port in ports if port.strip()]
    check_ports(ports, conninfo, where, what="conninfo", returned=returned)


def pool(
    lc: Lifecycle,
    conninfo: Dsn,
    *,
    name: str = "pool",
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 5.0,
    open_timeout: float = 10.0,
    connect_timeout: int = 5,
    pgbouncer: bool = False,
    budget: BudgetPolicy = "warn",
    workers: int | None = None,
    reserved: int = 3,
    kwargs: Mapping[str, Any] | None = None,
    pre_ping: bool = True,
    check: Check | bool = True,
    retries: int = 0,
    backoff: float = 0.5,
    required: bool = True,
    **pool_kw: Any,
) -> Resource[Pool]:
    """Register a psycopg pool as an app resource of *lc*; return the resource.

    Args:
        conninfo: ``postgresql://user:password@host:port/db`` or ``"host=... dbname=..."``,
            or a function returning it (called when the app starts, not at import).
        min_size, max_size: connections the pool keeps open at least, and opens at most.
        timeout: seconds a unit of work waits for a free connection before
            :class:`~tether.ResourceUnavailable` (503).
        open_timeout: seconds the startup waits for the pool to hold ``min_size``
            connections (then :class:`~tether.StartupError` saying why it could not).
        connect_timeout: seconds to establish one connection (libpq's ``connect_timeout``).
        pgbouncer: the conninfo points at PgBouncer in transaction or statement mode:
            ``prepare_threshold=None`` (no server-side prepared statements), and no budget
            check (PgBouncer owns the server connections).
        budget, workers, reserved: the connection budget, as for
            :func:`tether.integrations.asyncpg.pool`.
        kwargs: connection parameters (``application_name``, ``row_factory``, ...).
        pre_ping: check each connection (an empty query) when it leaves the pool, so one
            that died while idle (a database restart) is replaced, not handed out.
        check: the health check: ``True`` runs ``SELECT 1``, ``False`` none, or a
            function given the pool.
        retries, backoff: retry opening the pool at startup.
        required: ``False`` starts the app without it when it cannot open (see
            ``lc.resource``): what needs it answers 503 until a background retry opens it.
        pool_kw: passed to ``AsyncConnectionPool`` (``max_idle``, ``max_lifetime``,
            ``max_waiting``, ``configure``, ``reset``, ...).
    """
    where = f"Pool {name!r}"
    check_dsn(conninfo, where, what="conninfo", example=_EXAMPLE_DSN)
    if not callable(conninfo):
        _check_conninfo(conninfo, where)
    check_number(min_size, "min_size", where, integer=True, least=None, example="1")
    check_number(max_size, "max_size", where, integer=True, least=None, example="10")
    if max_size < 1 or not 0 <= min_size <= max_size:
        msg = f"Pool {name!r}: need 0 <= min_size <= max_size and max_size >= 1."
        raise ValueError(msg)
    check_number(timeout, "timeout", where, above=True)
    check_number(open_timeout, "open_timeout", where, above=True, example="10")
    check_number(connect_timeout, "connect_timeout", where)
    check_number(reserved, "reserved", where, integer=True, example="3")
    if workers is not None:
        check_number(workers, "workers", where, integer=True, least=1, example="4")
    check_bool(pgbouncer, "pgbouncer", where)
    check_budget_policy(budget, where)
    check_bool(pre_ping, "pre_ping", where)
    check_bool(required, "required", where)
    check_check(
        check,
        where,
        default="SELECT 1 on a connection of the pool",
        of="pool",
        example="lambda pool: pool.check() (psycopg_pool's own check of its idle connections)",
    )
    if check is AsyncConnectionPool.check_connection:
        msg = (
            f"Pool {name!r}: check=AsyncConnectionPool.check_connection is psycopg_pool's "
            f"check of a connection as it leaves the pool, but tether's pool() takes check= "
            f"as its health check (given the pool), which it would fail for ever. Drop "
            f"check=: pre_ping=True (the default) passes that check to psycopg_pool."
        )
        raise TypeError(msg)
    _check_pool_options(pool_kw, where)
    _check_connect_options(kwargs, pool_kw, where)
    threshold = (kwargs or {}).get("prepare_threshold")
    if pgbouncer and threshold is not None:
        log.warning(
            "tether: pool %r: pgbouncer=True sets psycopg's prepare_threshold=None (no "
            "prepared statements, which PgBouncer in transaction mode does not keep across "
            "transactions), in place of the prepare_threshold=%r given in kwargs=. Drop it "
            "from kwargs=.",
            name,
            threshold,
        )

    async def open_pool() -> AsyncIterator[Pool]:
        asyncio_only(where, "psycopg's async pool")
        target = resolve_dsn(conninfo, where, what="conninfo", example=_EXAMPLE_DSN)
        _check_conninfo(target, where, returned=callable(conninfo))
        state = _State(name, timeout, redact(target), pgbouncer)
        connect_kwargs: dict[str, Any] = {"connect_timeout": connect_timeout, **(kwargs or {})}
        if pgbouncer:
            connect_kwargs["prepare_threshold"] = None
        options: dict[str, Any] = {
            "check": AsyncConnectionPool.check_connection if pre_ping else None,
            **pool_kw,
        }
        configure = options.get("configure")
        if configure is not None:
            options["configure"] = _keeping_configured(configure, state)
        if not pgbouncer:  # (behind it, no backend of ours is ended: its pids are its own)
            options["configure"] = _noting_server(options.get("configure"), state)

        # One connection by hand first: an unreachable database fails at once, with
        # libpq's reason (the pool would retry quietly until open_timeout), and it reads
        # max_connections for the budget before the pool opens any.
        try:
            probe = await _connect(target, **{**connect_kwargs, "autocommit": True})
        except psycopg.ProgrammingError as exc:
            scrub_secrets(exc)  # libpq's errors may quote the conninfo: no password shown
            invalid = _invalid_option(exc, where)
            if invalid is None:
                raise
            raise invalid from exc
        except (psycopg.OperationalError, OSError) as exc:
            scrub_secrets(exc)
            if refused_for_good(exc) is not None:
                # Wrong credentials, unknown database (PgBouncer's refusals too): not a
                # matter of retrying.
                raise
            raise unreachable(name, state.shown, exc) from exc
        try:
            if not (pgbouncer or budget == "off"):
                server_max, server = await read_budget(
                    name, budget, functools.partial(_first_row, probe)
                )
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
        finally:
            with anyio.CancelScope(shield=True):  # also when a cancellation ends the open
                await probe.close()
        try:
            p = Pool(
                target,
                open=False,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                kwargs=connect_kwargs,
                name=name,
                **options,
            )
        except BaseException:  # options psycopg_pool refuses: the share noted is not taken
            forget_budget(lc, name)
            raise
        p._tether = state
        try:
            await p.open(wait=True, timeout=open_timeout)
        except BaseException as exc:
            forget_budget(lc, name)
            # Timed out, or cancelled half-way: close it, or its workers and the
            # connections they made stay behind.
            with anyio.CancelScope(shield=True):
                await p.close()
            if not isinstance(exc, PoolTimeout):
                scrub_secrets(exc)
                raise
            # The connection made by hand just before got in: what failed is the pool's
            # own making of one (psycopg logs each failure, and retries until the timeout).
            msg = (
                f"Pool {name!r} did not open {min_size} connection(s) in {open_timeout:g} s, "
                f"although a connection made just before to {state.shown} got in. So the "
                f"pool's own setup of a connection fails: a configure= that raises or leaves "
                f"a transaction open, or kwargs the server refuses (psycopg logs each attempt "
                f"as \"error connecting in '{name}'\"); or the server is slow to accept more "
                f"connections: give open_timeout= more seconds."
            )
            raise ResourceUnavailable(redact(msg), resource=name) from exc
        try:
            log.info(
                "tether: psycopg pool %r open on %s (min_size=%d, max_size=%d%s)",
                name,
                state.shown,
                min_size,
                max_size,
                ", pgbouncer" if pgbouncer else "",
            )
            yield p
        finally:
            forget_budget(lc, name)
            with anyio.CancelScope(shield=True):
                await _ends_done(p)
                await p.close(timeout=lc.close_timeout / 2)

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
    res.async_api = "a psycopg AsyncConnectionPool"
    return res


def _aside_check(p: Any, within: float) -> Awaitable[None] | None:
    """A busy pool's check (``Resource.aside_check``): ``SELECT 1`` on a connection of its
    own, with the pool's conninfo and connection parameters, outside the pool, once none has
    been handed out for longer than *within* (the check's timeout, which bounds it). A server
    that stops answering without closing its connections (frozen, a network partition that
    drops packets) fills the pool with queries waiting on it, read as busy, so ready, until
    a wait for a connection timed out."""
    state: _State | None = getattr(p, "_tether", None)
    if state is None or state.pgbouncer or time.monotonic() - state.served <= within:
        return None  # (behind PgBouncer, its SELECT would queue behind the traffic too)
    return _select_1_aside(p)


async def _select_1_aside(p: Any) -> None:
    kwargs = {**p.kwargs, "autocommit": True, "prepare_threshold": None}
    try:
        other = await _connect(p.conninfo, **kwargs)
    except psycopg.OperationalError as exc:
        if exc.sqlstate is not None or refused_for_good(exc) is not None:
            return  # the server answered (too many clients, say): it is not frozen
        raise
    try:
        async with psycopg.AsyncCursor(other) as cur:  # whatever the row/cursor factory
            await cur.execute("SELECT 1")
    finally:
        await other.close()


def _figures(name: str, p: Any) -> PoolStats:
    """psycopg_pool's own figures (``get_stats()``, which resets nothing), but for the
    connections in use: those handed out and not given back. psycopg's ``pool_size`` also
    counts the connections it is making or resetting, which are neither in use nor idle.
    Discarded: the connections it found broken (``connections_lost``) and those given back
    broken or closed (``returns_bad``: tether closes one whose state is not known before it
    gives it back), and those given back so after the pool closed, which psycopg_pool does
    not count (tether does)."""
    stats = p.get_stats()
    state: _State | None = getattr(p, "_tether", None)
    size, idle = int(stats["pool_size"]), int(stats["pool_available"])
    return PoolStats(
        name=name,
        max=int(p.max_size),
        open=size,
        in_use=_in_use(p, size, idle),
        idle=idle,
        waiting=_waiting(p, stats),
        created=int(stats.get("connections_num", 0)) - int(stats.get("connections_errors", 0)),
        create_time=int(stats.get("connections_ms", 0)) / 1000,
        discarded=int(stats.get("returns_bad", 0))
        + int(stats.get("connections_lost", 0))
        + (state.discarded if state is not None else 0),
    )


def _in_use(p: Any, size: int, idle: int) -> int:
    state: _State | None = getattr(p, "_tether", None)
    return size - idle if state is None else len(state.out)


def _waiting(p: Any, stats: dict[str, int]) -> int:
    """The units of work waiting for a connection: psycopg's ``requests_waiting``, less the
    waiters that gave up (psycopg keeps those in its queue until it next hands one out)."""
    waiting = int(stats.get("requests_waiting", 0))
    state: _State | None = getattr(p, "_tether", None)
    return waiting if state is None else min(waiting, state.acquiring)


def _saturation(name: str, p: Any) -> tuple[bool, str] | None:
    state: _State | None = getattr(p, "_tether", None)
    if state is None:
        return None
    return saturation(
        _figures(name, p), state.served, state.timeout, "timeout", timed_out_at=state.timed_out_at
    )


def _pool_check(check: Check | bool) -> Check | None:
    if check is True:
        return _select_1
    if check is False:
        return None
    return check


async def _select_1(p: Any) -> None:
    async with p.connection() as c:
        await c.execute("SELECT 1")


# --------------------------------------------------------------------------- connections


def connection(
    lc: Lifecycle,
    pool: Resource[Pool] | Resource[AsyncConnectionPool[Any]],
    *,
    name: str = "conn",
    transaction: bool = False,
    release: Release = "handler",
    error_status: Callable[[int], bool] | None = None,
    timeout: float | None = None,
    reset_timeout: float = 5.0,
    reset_session: bool = True,
    isolation: str | IsolationLevel | None = None,
    readonly: bool = False,
    **unknown: Never,  # a misspelt option: refused naming the one meant
) -> Resource[Connection]:
    """Register a connection of *pool* as a request resource of *lc*; return the resource.

    Args:
        pool: the pool resource (from :func:`pool`, or any resource giving an
            ``AsyncConnectionPool``).
        transaction: ``False`` (default): autocommit, each statement commits on its own
            (use ``async with conn.transaction():`` for a block). ``True``: the unit of
            work is one transaction, committed when the endpoint succeeded (before the
            response starts, so a failing commit is an error response, never a 200),
            rolled back on any failure (an exception, an ``HTTPException``, an error
            status, a client that went away).
        release: ``"handler"`` (default) returns the connection before the response
            starts; ``"response"`` after its last byte (streaming bodies that query). The
            connection handed out refuses use after it went back
            (:class:`~tether.ResourceClosedError`): the pool may have given it to another
            request, whose transaction the statement would run in.
        error_status: which response statuses roll back (given the status, true for a
            failure); default: every status of 400 or more. ``lambda status: status >= 500``
            commits on a 4xx (see ``lc.resource``).
        timeout: seconds to wait for a free connection (default: the pool's); the pool's
            check of it (``pre_ping``) gets as long again, then 503 (a connection that
            stopped answering: a network that drops packets).
        reset_timeout: seconds a rollback may take; past it (or if it fails) the
            connection is closed, and the pool replaces it.
        reset_session: before the connection goes back, undo what the unit of work left on
            the session (``SET``, ``SET ROLE``, cursors, ``LISTEN``, advisory locks, temporary
            tables), as asyncpg's pool does: one round trip per unit of work. ``False`` skips
            it, for code that never changes the session (the next unit of work would inherit
            it).
        isolation, readonly: of the transaction (``"serializable"``, ``"repeatable_read"``,
            ``"read_committed"``, ``"read_uncommitted"``, or psycopg's ``IsolationLevel``;
            ``None``: the server's default): with ``transaction=True`` only (without a
            transaction there is none they apply to, and a ``ValueError`` says so). psycopg
            begins the unit's transaction with them; the connection goes back to the pool as
            it came.
    """
    if unknown:
        raise not_options("tether.integrations.psycopg.connection()", unknown, connection)
    check_resource(
        lc,
        pool,
        where=f"tether.integrations.psycopg.connection(name={name!r})",
        param="pool",
        maker="tether.integrations.psycopg.pool()",
        example="tether.integrations.psycopg.pool(lc, conninfo)",
    )
    if timeout is not None:
        check_number(timeout, "timeout", f"Connection {name!r}", above=True)
    check_number(reset_timeout, "reset_timeout", f"Connection {name!r}", above=True)
    check_bool(transaction, "transaction", f"Connection {name!r}")
    check_bool(reset_session, "reset_session", f"Connection {name!r}")
    check_bool(readonly, "readonly", f"Connection {name!r}")
    check_transaction_options(
        name, transaction, isolation, readonly, known="psycopg", also=tuple(IsolationLevel)
    )
    level = _LEVELS[isolation] if isinstance(isolation, str) else isolation
    pool_name = pool.name
    given_back = _given_back_message(name, pool_name, release)

    async def open_connection(p: Any) -> AsyncIterator[Connection]:
        state: _State | None = getattr(p, "_tether", None)
        if state is not None and state.rolled_back:  # tests only
            from ..testing import outside_the_block

            outside_the_block(state.rolled_back[0], pool_name)
        conn = await _getconn(p, pool_name, timeout)
        pid = conn.pgconn.backend_pid  # libpq's, no round trip: for `_end_backend`
        reset = reset_session and (state is None or not state.pgbouncer)
        kept = _settings(conn)
        callbacks = _callbacks(conn, state)
        try:
            await conn.set_autocommit(not transaction)
            if level is not None:  # no round trip: psycopg's BEGIN carries them
                await conn.set_isolation_level(level)
            if readonly:
                await conn.set_read_only(True)
        except BaseException:
            # Interrupted before the unit of work got it (a cancellation): give it back
            # shielded. (After `yield`, tether's own close is shielded.)
            with anyio.CancelScope(shield=True):
                await p.putconn(conn)
            raise
        handed = _Handed(conn, begin=transaction)
        try:
            try:
                yield cast("Connection", handed)
            except BaseException as exc:
                if state is None or not state.pgbouncer:
                    note_pgbouncer(exc)
                if (
                    not readonly
                    and read_only(exc)
                    and await _server_read_only(conn, name, reset_timeout)
                ):
                    # The server is read-only (a failover reached a replica): this
                    # connection and every other one of the pool go to the wrong server.
                    await conn.close()  # the pool replaces a closed connection
                    await _replace_all(p)
                    log.warning("tether: %r: %s", pool_name, describe(exc))
                    raise read_only_failure(pool_name) from exc
                lost = isinstance(exc, psycopg.OperationalError) and conn.broken
                if not transaction:
                    if lost:
                        never = pooler_never_sent(pool_name, exc)
                        if never is not None:
                            raise never from exc  # it did not run: a 503
                        exc.add_note(LOST_NOTE)  # still a 500: the statement may have run
                    raise
                await _rollback(conn, name, reset_timeout)
                if lost:
                    if handed._tether_committing:
                        # Lost during the endpoint's own commit(): it may have committed.
                        raise lost_at_commit(pool_name, describe(exc)) from exc
                    if handed._tether_committed:
                        # The endpoint's own commit() went through: that part stays, and
                        # running the request again would repeat it. A 500.
                        raise lost_after_commit(pool_name, describe(exc)) from exc
                    # The server ended the transaction with the connection: nothing was
                    # committed, so retrying is safe. A 503, not a 500.
                    raise connection_lost(pool_name, describe(exc)) from exc
                raise
            if transaction:
                if conn.info.transaction_status == TransactionStatus.INERROR:
                    # A failed statement aborted it, its error caught: PostgreSQL would
                    # answer COMMIT with a rollback, and psycopg raises nothing.
                    await _rollback(conn, name, reset_timeout)
                    raise _failed_unit(name)
                broken = conn.broken
                try:
                    committed = await _commit(conn)
                except psycopg.OperationalError as exc:
                    if broken or conn.info.transaction_status == TransactionStatus.ACTIVE:
                        # Lost before it (a statement met the close, its error caught), and
                        # psycopg knew: it refused to send COMMIT. Or libpq refused to send
                        # it, still mid-query (psycopg before 3.3.7 leaves a query cut short
                        # by an anyio scope so). Nothing was committed since the endpoint's
                        # own commit(), if it made one.
                        if handed._tether_committing:
                            raise lost_at_commit(pool_name, describe(exc)) from exc
                        if handed._tether_committed:
                            raise lost_after_commit(pool_name, describe(exc)) from exc
                        raise commit_not_sent(pool_name, exc) from exc
                    raise
                if not committed:
                    raise psycopg.errors.InFailedSqlTransaction(_commit_rolled_back(name))
        finally:
            handed._tether_give_back(given_back, res)  # the unit of work is over
            # psycopg's pool checks what comes back: a transaction left open is rolled
            # back, a connection mid-query or broken is closed and replaced.
            ending: asyncio.Task[None] | None = None
            try:
                if reset:
                    again = state.configured.get(conn, "") if state is not None else ""
                    await _reset_session(conn, name, reset_timeout, again)
                ending = _end_if_running(p, conn, pid, name, state)
                if ending is None and not conn.closed and _settings(conn) != kept:
                    await _restore(conn, kept, name)  # (closes one mid-query)
            finally:
                _drop_callbacks(conn, callbacks)
                if ending is None:
                    # A close given up on (its salvage over) cancels each await as it comes:
                    # one that left a query running still has its backend ended.
                    ending = _end_if_running(p, conn, pid, name, state)
                if ending is None:
                    await p.putconn(conn)
                else:
                    # Done before the client's answer, past the close's deadline too.
                    await wait_to_the_end(ending)

    res = lc.resource(name=name, release=release, error_status=error_status)(
        depends_on(open_connection, pool)
    )
    _connections[res] = ConnectionOf(pool, transaction, level, readonly)
    res.async_api = "a psycopg AsyncConnection"
    return res


#: psycopg's isolation levels by the names ``connection(isolation=...)`` takes (asyncpg's).
_LEVELS = {
    "read_committed": IsolationLevel.READ_COMMITTED,
    "read_uncommitted": IsolationLevel.READ_UNCOMMITTED,
    "repeatable_read": IsolationLevel.REPEATABLE_READ,
    "serializable": IsolationLevel.SERIALIZABLE,
}


_R = TypeVar("_R")

#: A statement that commits the transaction (`_Handed.execute`).
_RAW_COMMIT = re.compile(r"\s*(COMMIT|END)\s*(WORK|TRANSACTION)?\s*;?\s*$", re.IGNORECASE)

#: A transaction still open, COMMIT not run (`_Handed.commit`).
_OPEN_TRANSACTION = frozenset({TransactionStatus.INTRANS, TransactionStatus.INERROR})


class _Handed:
    """A connection as :func:`connection` hands it to a unit of work: psycopg's
    ``AsyncConnection`` to the code using it (its attributes and methods, ``isinstance``)
    until tether gives it back to the pool. Used after that (a ``StreamingResponse`` body
    with ``release="handler"``, a background task), it raises
    :class:`~tether.ResourceClosedError`, counted as one leak, where the connection itself
    would run the statement in whatever unit of work the pool gave it to next, inside that
    one's transaction. One object per unit of work, one check per attribute read; a cursor
    made before the release is psycopg's own and is not checked.

    Two methods are its own. ``transaction()`` (*begin*: the unit of work is one transaction)
    begins the unit's transaction first if no statement has yet: psycopg's block would
    otherwise be the outer transaction, committed at its end whatever became of the unit's.
    ``commit()`` notes that the endpoint committed part of its work itself: a connection lost
    after it, or during it, is then not "nothing was committed". A ``commit()`` of an aborted
    transaction (answered ``ROLLBACK``) commits nothing. ``execute()`` notes a raw ``COMMIT``
    the same way (one run on a cursor of its own is not seen)."""

    __slots__ = (
        "__weakref__",
        "_tether_begin",
        "_tether_committed",
        "_tether_committing",
        "_tether_conn",
        "_tether_counted",
        "_tether_gone",
    )

    _tether_conn: Connection
    _tether_gone: tuple[str, Resource[Any]] | None
    _tether_counted: bool
    _tether_begin: bool
    _tether_committed: bool
    _tether_committing: bool

    def __init__(self, conn: Connection, *, begin: bool = False) -> None:
        object.__setattr__(self, "_tether_conn", conn)
        object.__setattr__(self, "_tether_gone", None)
        object.__setattr__(self, "_tether_counted", False)
        object.__setattr__(self, "_tether_begin", begin)
        object.__setattr__(self, "_tether_committed", False)
        object.__setattr__(self, "_tether_committing", False)

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AbstractAsyncContextManager[psycopg.AsyncTransaction]:
        conn = self._tether_live()
        if not self._tether_begin:
            return conn.transaction(savepoint_name, force_rollback)
        return _within_unit(conn, savepoint_name, force_rollback)

    async def commit(self) -> None:
        conn = self._tether_live()
        if conn.autocommit or conn.info.transaction_status != TransactionStatus.INTRANS:
            # Nothing to commit, or an aborted transaction (PostgreSQL answers ROLLBACK):
            # nothing of the endpoint's own is committed.
            await conn.commit()
            return
        await self._tether_committing_by(conn, conn.commit())

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        """psycopg's, noting a raw ``COMMIT`` (or ``END``) of the unit's transaction as
        `commit` notes its own: a connection lost after it was the 503 "nothing was
        committed", and an ``idempotent`` route ran again (trial 38)."""
        conn = self._tether_live()
        if (
            isinstance(query, str)
            and _RAW_COMMIT.match(query) is not None
            and not conn.autocommit
            and conn.info.transaction_status == TransactionStatus.INTRANS
        ):
            return await self._tether_committing_by(conn, conn.execute(query, *args, **kwargs))
        return await conn.execute(query, *args, **kwargs)

    async def _tether_committing_by(self, conn: Connection, committing: Awaitable[_R]) -> _R:
        """Await *committing*, the endpoint's own ``COMMIT`` of the unit's open transaction,
        noted: sent and its answer lost (the connection lost meanwhile), whether the server
        committed is unknown, so no 503 "nothing was committed" after it; done, what it
        committed stays."""
        object.__setattr__(self, "_tether_committing", True)
        try:
            result = await committing
        except BaseException as exc:
            # Still committing unless COMMIT surely did not commit: the server answered it
            # with an error (a deferred constraint, a serialization failure: its SQLSTATE),
            # or it did not run (the transaction still open), on a connection still whole.
            # A cancel (a deadline around the commit) that cut it once COMMIT was sent left
            # psycopg to close the connection: unknown.
            answered = getattr(exc, "sqlstate", None) is not None
            if not conn.broken and (answered or conn.info.transaction_status in _OPEN_TRANSACTION):
                object.__setattr__(self, "_tether_committing", False)
            raise
        object.__setattr__(self, "_tether_committing", False)
        object.__setattr__(self, "_tether_committed", True)
        return result

    @property  # type: ignore[misc]
    def __class__(self) -> type[Any]:  # isinstance(conn, psycopg.AsyncConnection) holds
        return type(self._tether_conn)

    def _tether_give_back(self, message: str, res: Resource[Any], *, leak: bool = True) -> None:
        """From now on, raise *message*; the first use counts one leak of *res* (if *leak*)."""
        object.__setattr__(self, "_tether_gone", (message, res))
        if not leak:
            object.__setattr__(self, "_tether_counted", True)

    def _tether_live(self) -> Connection:
        gone = self._tether_gone
        if gone is None:
            return self._tether_conn
        message, res = gone
        if not self._tether_counted:
            object.__setattr__(self, "_tether_counted", True)
            res.counters.leaks += 1
        raise ResourceClosedError(message, resource=res.name)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            # Introspection (getattr(x, "__self__", None), a debugger) and psycopg's private
            # parts: never a statement, and an error would break the caller, not a misuse.
            return getattr(self._tether_conn, attr)
        return getattr(self._tether_live(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._tether_live(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._tether_live(), attr)

    async def __aenter__(self) -> Any:
        return await self._tether_live().__aenter__()

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._tether_live().__aexit__(*exc)

    def __repr__(self) -> str:
        given = " (given back to the pool)" if self._tether_gone is not None else ""
        return f"{self._tether_conn!r}{given}"


@asynccontextmanager
async def _within_unit(
    conn: Connection, savepoint_name: str | None, force_rollback: bool
) -> AsyncIterator[psycopg.AsyncTransaction]:
    """psycopg's ``conn.transaction()`` as a savepoint of the unit's transaction: begun first
    (psycopg's own ``BEGIN``, with the connection's isolation level and read-only setting) if
    no statement has begun it yet. Only then: no round trip of its own otherwise."""
    if not conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        async with conn.lock:
            await conn.wait(conn._start_query())
    async with conn.transaction(savepoint_name, force_rollback) as tx:
        yield tx


async def _commit(conn: Connection) -> bool:
    """``conn.commit()``, reading the server's answer: ``False`` if PostgreSQL answered
    ``COMMIT`` with ``ROLLBACK`` (the transaction was aborted, and psycopg raises nothing).
    The status read before the commit misses an abort that happens while the commit waits
    for the connection: a ``cursor.stream()`` loop left early holds the connection until
    its generator is closed, and closing it cancels the query on the server, which aborts
    the transaction. Same round trip as ``commit()``."""
    if conn._num_transactions or conn._pipeline is not None or conn._tpc:
        await conn.commit()  # psycopg's refusals, or its pipeline's sync
        return True
    async with conn.lock:
        if conn.info.transaction_status == TransactionStatus.IDLE:
            return True
        result = await conn.wait(conn._exec_command(b"COMMIT"))
    return result is None or result.command_status != b"ROLLBACK"


def _commit_rolled_back(name: str) -> str:
    return (
        f"Connection {name!r}: PostgreSQL answered the unit of work's COMMIT with ROLLBACK: "
        f"its transaction had been aborted as the commit waited for the connection, so "
        f"nothing was committed. Most likely a `cursor.stream()` loop was left early "
        f"(return or break), and closing its generator cancelled the query still running on "
        f"the server, which aborts the transaction. Read what the loop needs first, or "
        f"`LIMIT` the query, or close the stream yourself (`async with "
        f"contextlib.aclosing(cur.stream(...)) as rows:`) inside `async with "
        f"conn.transaction():`."
    )


async def _server_read_only(conn: Connection, name: str, within: float) -> bool:
    """For an error with SQLSTATE 25006: whether it is the server that is read-only (a
    failover reached a replica), not the unit of work's own read-only transaction
    (``set_read_only(True)``, ``SET TRANSACTION READ ONLY``), which is the endpoint's bug.
    On the error path only: the unit's transaction is rolled back, then one query asks the
    server. One that cannot be asked counts as read-only (as before this check)."""
    if conn.read_only and not conn.autocommit:
        return False  # psycopg began the transaction READ ONLY, as told
    if conn.closed or conn.broken:
        return True

    async def ask() -> bool:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.rollback()
        async with psycopg.AsyncCursor(conn, row_factory=tuple_row) as cur:
            await cur.execute(SERVER_READ_ONLY, prepare=False)
            row = await cur.fetchone()
        if not conn.autocommit:
            await conn.rollback()
        return bool(row and row[0])

    try:
        async with asyncio.timeout(within):
            return await ask()
    except Exception as exc:
        log.warning(
            "tether: %r: a write was refused as read-only, and asking the server whether it "
            "is read-only failed (%s); taken as a failover",
            name,
            describe(exc),
        )
        return True


def _given_back_message(name: str, pool_name: str, release: str) -> str:
    when = (
        "release='handler' gives it back when the endpoint returns, before the response"
        if release == "handler"
        else "release='response' gives it back after the response"
    )
    return (
        f"Connection {name!r} was given back to pool {pool_name!r} at the end of its unit of "
        f"work (in a request, {when}), and cannot be used after: the pool may have handed it "
        f"to another request, and the statement would run in that one's transaction. A "
        f"StreamingResponse body that queries needs release='response'; a background task, "
        f"a connection of its own (`async with lc.scope() as s: await s.get({name})`)."
    )


#: The notice and notify handlers on a connection object (psycopg's lists, copied).
_Callbacks = tuple[list[Any], list[Any]]
_NO_CALLBACKS: _Callbacks = ([], [])


def _callbacks(conn: Connection, state: _State | None) -> _Callbacks | None:
    """The handlers the connection had when the pool gave it (what its ``configure`` added,
    noted as it made it: none for most); of a pool tether did not open, a copy taken now."""
    if state is not None:
        return state.callbacks.get(conn)
    return (list(conn._notice_handlers), list(conn._notify_handlers))


def _drop_callbacks(conn: Connection, kept: _Callbacks | None) -> None:
    """Drop what the unit of work left on the connection object for notices and notifications,
    as the connection goes back: the notice and notify handlers it added (they would receive
    the next units' notices and notifications, and pile up, one per unit), and the
    notifications received and not read (a ``LISTEN`` of its own, which the reset's ``UNLISTEN
    *`` ended; the next unit's ``conn.notifies()`` would yield them first). *kept*: the
    handlers the connection had when the pool gave it. Two list comparisons when nothing
    changed."""
    notice, notify = kept or _NO_CALLBACKS
    if conn._notice_handlers != notice:
        conn._notice_handlers[:] = notice
    if conn._notify_handlers != notify:
        conn._notify_handlers[:] = notify
    backlog = conn._notifies_backlog
    if backlog:
        backlog.clear()


def _settings(conn: Connection) -> tuple[Any, ...]:
    """What psycopg keeps on the connection object, not on the server's session, and a unit
    of work may change: the next one would inherit it (``set_read_only(True)`` would make
    its writes fail as on a replica)."""
    return (
        conn.read_only,
        conn.isolation_level,
        conn.deferrable,
        conn.row_factory,
        conn.cursor_factory,
        conn.server_cursor_factory,
    )


async def _restore(conn: Connection, kept: tuple[Any, ...], name: str) -> None:
    """Put back the connection object's settings (:func:`_settings`) as the unit of work
    found them; a connection that cannot take them back (a transaction left open) is closed,
    and the pool replaces it."""
    read_only, isolation_level, deferrable, row_factory, cursor_factory, server_factory = kept
    try:
        await conn.set_read_only(read_only)
        await conn.set_isolation_level(isolation_level)
        await conn.set_deferrable(deferrable)
        conn.row_factory = row_factory
        conn.cursor_factory = cursor_factory
        conn.server_cursor_factory = server_factory
    except Exception as exc:
        log.warning(
            "tether: %r: could not put back the connection's settings (%s); closed (the pool "
            "replaces it)",
            name,
            describe(exc),
        )
        await conn.close()


async def _replace_all(p: Any) -> None:
    """Replace every connection of *p*: ``drain()`` closes the idle ones now and the others
    when they come back (psycopg_pool 3.2 and later); older pools check theirs."""
    drain = getattr(p, "drain", None)
    try:
        await (drain() if drain is not None else p.check())
    except Exception as exc:  # pragma: no cover - best effort, the 503 goes out anyway
        log.warning("tether: replacing the connections of a psycopg pool failed: %s", exc)


async def _connect(target: str, **kwargs: Any) -> Connection:
    """``AsyncConnection.connect``; a connection made after a cancellation is closed.

    psycopg abandons a connection attempt that is cancelled half-way with its socket
    open, until the garbage collector finds it (and the server keeps an idle backend
    meanwhile).
    """
    return await connect_or_close(Connection.connect(target, **kwargs), _finish)


def _finish(conn: Connection) -> None:
    conn.pgconn.finish()


async def _getconn(p: Any, pool_name: str, timeout: float | None) -> Connection:
    waited = timeout if timeout is not None else p.timeout
    # psycopg's pool bounds the wait, not the pre-ping, which on a connection that stopped
    # answering (packets dropped, no reset) would wait for ever: it gets as long again.
    deadline = asyncio.timeout(2 * waited)
    try:
        async with deadline:
            conn: Connection = await p.getconn(timeout)
    except TimeoutError as exc:
        if not deadline.expired():
            raise
        reason = (
            f"the database did not answer the check of a pooled connection within "
            f"2 x timeout={waited:g} s (the network or the server may be down; the "
            f"connection was closed)"
        )
        raise _unavailable(p, pool_name, reason, timed_out=True) from exc
    except PoolTimeout as exc:
        state: _State | None = getattr(p, "_tether", None)
        if state is not None and not state.out:
            # None in use, so none to wait for: the pool could not make one (a database
            # down or restarting, its connections lost and not yet replaced).
            reason = (
                f"none is in use, and the pool could not make one within timeout={waited:g} "
                f"s: the database cannot be reached, or is restarting"
            )
            raise _unavailable(p, pool_name, reason, timed_out=True, unreachable=True) from exc
        reason = (
            f"no connection came free within timeout={waited:g} s; the requests holding "
            f"them are slow, the pool is too small for the load, or the database cannot "
            f"be reached"
        )
        raise _unavailable(p, pool_name, reason, timed_out=True) from exc
    except TooManyRequests as exc:
        raise _unavailable(p, pool_name, str(exc)) from exc
    return conn


def _unavailable(
    p: Any, pool_name: str, reason: str, *, timed_out: bool = False, unreachable: bool = False
) -> ResourceUnavailable:
    try:
        stats = p.get_stats()
        size, idle = int(stats.get("pool_size", 0)), int(stats.get("pool_available", 0))
        in_use = _in_use(p, size, idle)
        waiting = _waiting(p, stats)
    except Exception:  # pragma: no cover - a pool-like value without stats
        return unavailable(pool_name, reason, timed_out=timed_out, unreachable=unreachable)
    return unavailable(
        pool_name, reason, size=p.max_size, in_use=in_use, waiting=waiting,
        timed_out=timed_out, unreachable=unreachable,
    )  # fmt: skip


#: Seconds psycopg is given, after its query was cancelled at the end of a bound, to have
#: the server confirm the cancel, before it is told to close the connection instead.
_CANCEL_GRACE = 0.2


async def _bounded(work: Awaitable[None], within: float) -> None:
    """Await *work* (queries on one connection) for *within* seconds at most, then raise
    ``TimeoutError``.

    One ``asyncio.timeout`` is not enough: psycopg answers a cancelled query by cancelling it
    on the server and waiting up to 5 s more for the server to confirm, so a server that
    stopped answering held the unit of work ``within`` + 5 s. Cancelled again,
    ``_CANCEL_GRACE`` later, psycopg closes the connection at once (3.3.9; 3.3.6 leaves it
    to the caller, who closes it). Both in this task: no task of its own per release."""
    async with asyncio.timeout(within + _CANCEL_GRACE):  # then psycopg closes it
        async with asyncio.timeout(within):  # psycopg cancels the query on the server
            await work


#: Seconds the unit's end waits, at most, for a ``stream()`` or ``notifies()`` generator it
#: left open to let go of the connection (asyncio closes one left early soon after: psycopg
#: then cancels its query, one round trip), before it closes the connection instead.
_LET_GO = 0.5


async def _let_go(conn: Connection, name: str, within: float) -> bool:
    """Whether the connection is free for the rollback or the reset: not held by a
    ``cursor.stream()`` or ``conn.notifies()`` generator the unit of work left open (psycopg's
    generators hold the connection's lock while suspended), or by a query another task still
    runs on it (a ``gather`` whose other query failed). One left early is closed by
    asyncio's finaliser once the loop runs it: given a few turns and up to `_LET_GO` s. One
    still held (kept alive by a reference: an exception's traceback keeps the endpoint's
    locals) would make the rollback wait *within* seconds for nothing: the connection is
    closed at once, and the pool replaces it. One attribute read when nothing holds it."""
    lock = conn.lock
    if not lock.locked() or conn.closed:
        return True
    for _ in range(3):
        await asyncio.sleep(0)
        if not lock.locked():
            return True
    try:
        async with asyncio.timeout(min(within, _LET_GO)):
            await lock.acquire()
        lock.release()
        return True
    except TimeoutError:
        log.warning(
            "tether: %r: the connection is still held at the end of its unit of work (its "
            "lock is taken): %s; closed (the pool replaces it). Close such a generator in the "
            "endpoint (`async with contextlib.aclosing(...)`), and await every task using the "
            "connection before the unit of work ends (or give each its own connection).",
            name,
            _held_by(conn, min(within, _LET_GO)),
        )
        await _hang_up_held(conn)
        return False


#: What holds a connection at its unit's end (`_held_by`): a generator suspended between rows.
_HELD_SUSPENDED = (
    "by a `cursor.stream()` or `conn.notifies()` generator left open (kept alive by a "
    "reference, such as an exception's traceback)"
)
#: ... or a query it waits for the server's answer to.
_HELD_WAITING = (
    "by a query still running on it: in another task (`asyncio.gather` of queries on one "
    "connection, one of which failed, or a task not awaited), or in a `cursor.stream()` or "
    "`conn.notifies()` generator being closed, whose cancel of its query took longer than "
    "{waited:g} s"
)


def _held_by(conn: Connection, waited: float) -> str:
    """What holds *conn* (its lock taken), as the warning says it: a task waiting on its
    socket runs a query (another task's, or a generator's close cancelling its query, which
    outlasted *waited* s); none waiting, a generator suspended between rows holds it. Where
    the loop cannot say (uvloop), both."""
    waiting = _HELD_WAITING.format(waited=waited)
    try:
        fileno = conn.pgconn.socket
    except (OSError, psycopg.Error):  # no socket any more: nothing to tell them apart by
        return f"{_HELD_SUSPENDED}, or {waiting}"
    if getattr(asyncio.get_running_loop(), "_selector", None) is None:
        return f"{_HELD_SUSPENDED}, or {waiting}"
    return waiting if _waited_on(fileno) else _HELD_SUSPENDED


async def _hang_up_held(conn: Connection) -> None:
    """Close *conn* while another task may hold it, waiting mid-query. psycopg's C
    generators keep libpq's connection pointer across their waits: closing it (``PQfinish``)
    under one that resumes later reads freed memory (a segfault, seen under load), and a
    wait on the closed socket never wakes (a task that hangs for good). So the socket is shut
    down first: a holder waiting on it wakes, fails (``server closed the connection``) and
    lets go; then the connection is closed. A holder that does not let go within `_LET_GO`
    is not inside a wait (a generator suspended between rows reads the connection afresh
    when it resumes)."""
    try:
        fileno = conn.pgconn.socket
    except psycopg.Error:  # no socket any more: nothing waits on it
        fileno = -1
    # A generator between rows does not wait on the socket: no wait for it.
    if fileno >= 0 and shut_down_socket(fileno) and await _holder_waits(conn, fileno):
        lock = conn.lock
        try:
            async with asyncio.timeout(_LET_GO):
                await lock.acquire()
            lock.release()
        except TimeoutError:
            pass
    _hung_up_held.add(conn)
    await conn.close()


#: The connections `_hang_up_held` closed under a task that held them: a query of that task
#: may still run on the server (PostgreSQL notices a client gone only when it next writes to
#: it: a ``pg_sleep``, a long aggregate runs to its end), so its backend is ended as the
#: connection goes back.
_hung_up_held: weakref.WeakSet[Connection] = weakref.WeakSet()


async def _holder_waits(conn: Connection, fileno: int) -> bool:
    """Whether the task holding *conn* waits inside a query (`_waited_on`), its socket just
    shut down. psycopg's wait yields to the loop without a reader or writer registered when
    the loop has been busy (its ``await sleep(0)``): such a holder is given two turns of the
    loop to wait again, or to fail on the shut socket and let go (False: nothing to wait
    for). A generator suspended between rows waits on nothing in that time."""
    for _ in range(2):
        if _waited_on(fileno):
            return True
        if not conn.lock.locked():
            return False
        await asyncio.sleep(0)
    return _waited_on(fileno)


def _waited_on(fileno: int) -> bool:
    """Whether a task waits on socket *fileno* (psycopg's waits register it with the event
    loop). Where the loop cannot say (uvloop has no selector to ask), taken to be."""
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    if selector is None:
        return True
    try:
        selector.get_key(fileno)
    except (KeyError, ValueError):
        return False
    return True


def _behind_pgbouncer(state: _State | None) -> bool:
    return state is not None and state.pgbouncer


def _hung_up(conn: Connection) -> bool:
    """Whether this side closed the connection (libpq's ``PQfinish``); one the server
    ended keeps its libpq object."""
    return cast("Any", conn.pgconn).pgconn_ptr is None


def _left_running(conn: Connection) -> bool:
    """Whether a query may still run on the server for *conn* as it goes back: psycopg hung
    up on it (the server did not), or it is still mid-query (``ACTIVE``)."""
    if conn.broken:
        return _hung_up(conn)
    # libpq's status read directly: `conn.info` makes an object each time (per unit of work).
    return conn.pgconn.transaction_status == TransactionStatus.ACTIVE


#: The backends `_end_if_running` is ending, until each connection is given back, and the
#: pool each goes back to: the pool's close waits for its own (`_ends_done`).
_ENDING: dict[asyncio.Task[None], Any] = {}


def _end_if_running(
    p: Any, conn: Connection, pid: int, name: str, state: _State | None
) -> asyncio.Task[None] | None:
    """If a query may still run on the server for *conn* as it goes back, end its backend
    then give *conn* back to *p*, from a task of its own (returned), which a close given up
    on does not cancel: psycopg hung up on the connection, not the server, nor a close() of
    tether's (its cancel of a query interrupted again by an anyio cancel scope, or by the end
    of tether's salvage of a close cut short, or not confirmed in time), or left it
    mid-query (psycopg before 3.3.7 on that interruption; the pool closes it), or tether hung
    it up under another task's query (`_hang_up_held`): a query may still run on the server,
    its transaction and locks held. Awaited in the unit's cleanup, the end would be cancelled
    with it, and the connection not given back (CI's load, trial 8's slow ``COMMIT``)."""
    if not (_left_running(conn) or (conn.closed and conn in _hung_up_held)):
        return None
    if _behind_pgbouncer(state):
        return None  # the pid is PgBouncer's, which drops the server side itself

    servers = state.servers if state is not None else None
    server = servers.get(conn) if servers is not None else None
    cancel = state.cancels.get(conn) if state is not None else None

    async def end_then_give_back() -> None:
        try:
            if servers is None or server is not None:
                await _end_backend(p, pid, name, server, cancel)
            else:  # (made before the pool's configure ran: none is)
                log.warning(
                    "tether: %r: could not end backend %d on the server (which of the "
                    "conninfo's hosts it is on is not known); a query it was running may run "
                    "to its end",
                    name,
                    pid,
                )
        finally:
            await p.putconn(conn)

    task = asyncio.get_running_loop().create_task(end_then_give_back())
    _ENDING[task] = p
    task.add_done_callback(_ENDING.pop)
    return task


async def _ends_done(p: Any) -> None:
    """Wait (shielded, at most `SALVAGE` seconds) for the backends of *p* being ended."""
    pending = [task for task, pool in _ENDING.items() if pool is p]
    if pending:
        with anyio.CancelScope(shield=True):
            await asyncio.wait(pending, timeout=SALVAGE)


async def _end_backend(
    p: Any, pid: int, name: str, server: dict[str, str] | None, cancel: Any = None
) -> None:
    """End backend *pid* on the server: its connection was closed on this side (or is about
    to be, mid-query), and PostgreSQL only notices a client gone when it next writes to it,
    so a query it runs (``pg_sleep``, a long aggregate) would run to its end, its
    transaction open and its row locks held, with nothing in the pool's figures. Psycopg's
    own cancel of a query is cut short when an anyio cancel scope (Starlette's
    ``StreamingResponse`` as the client leaves, ``anyio.move_on_after``) cancels it again.

    Through a short connection of its own, with the pool's conninfo and connection
    parameters but not its ``configure``: as the login role (a setup's ``SET ROLE`` to a
    role of less privilege may not end the login role's backends), and with no pool slot
    (a pool of one, or a busy one, has none to spare). Only on this rare path.
    Not behind PgBouncer: the pid is PgBouncer's, which drops the server side itself.
    *server*: the one the connection reached (with several hosts, the first that answers
    now may be another, where the pid is another session's, or none). *cancel*: its cancel
    request, sent instead when the server has no slot left (`terminate_backend`)."""
    kwargs = {**p.kwargs, **(server or {}), "autocommit": True, "prepare_threshold": None}
    connect = functools.partial(_connect, p.conninfo, **kwargs)
    await terminate_backend(connect, pid, repr(name), STOP_WITHIN, cancel)


async def _rollback(conn: Connection, name: str, within: float) -> None:
    if conn.closed or not await _let_go(conn, name, within):
        return  # lost with the server: nothing to roll back, the pool replaces it
    try:
        await _bounded(conn.rollback(), within)
    except Exception as exc:
        log.warning(
            "tether: %r: rollback failed (%s); closing the connection (the pool replaces it)",
            name,
            describe(exc),
        )
        await conn.close()


# --------------------------------------------------------------------------- tests


# How each connection resource made here was registered: for :func:`rolled_back`.
_connections: PerResource[ConnectionOf] = PerResource("psycopg_connections")


async def _back_to_savepoint(conn: Connection) -> None:
    await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
    await conn.execute(f"RELEASE SAVEPOINT {SAVEPOINT}")


async def _drop_unit(conn: Connection, name: str) -> None:
    """End a read-only unit of work's savepoint (of ``transaction=True``): roll back to it,
    as it wrote nothing, and its read-only setting must not reach the block; if a statement
    failed in it and its error was caught, raise what a commit raises."""
    failed = conn.info.transaction_status == TransactionStatus.INERROR
    await _back_to_savepoint(conn)
    if failed:
        raise _failed_unit(name)


async def _keep_unit(conn: Connection, name: str, *, strict: bool, reset: str = "") -> None:
    """Release the unit of work's savepoint (its commit), its deferred constraints checked
    first, as ``COMMIT`` checks them: a violation rolls back to it and is raised, as
    ``COMMIT`` raises it; then run *reset* (production's reset on release) in the same round
    trip. If a statement failed in it and its error was caught, roll back to it instead, and
    (*strict*) raise what a commit raises."""
    from ..testing import _CHECK_DEFERRED

    if conn.info.transaction_status != TransactionStatus.INERROR:
        try:
            await conn.execute(
                "; ".join((*_CHECK_DEFERRED, f"RELEASE SAVEPOINT {SAVEPOINT}")) + reset,
                prepare=False,  # several statements: PostgreSQL cannot prepare them
            )
        except psycopg.DatabaseError:  # a deferred constraint violated: COMMIT's error
            if conn.broken:
                raise
            await _back_to_savepoint(conn)
            raise
        return
    await _back_to_savepoint(conn)
    if strict:
        raise _failed_unit(name)


def _failed_unit(name: str) -> psycopg.errors.InFailedSqlTransaction:
    """What the commit of a unit of work whose transaction a failed statement aborted (its
    error caught) raises: nothing of it was committed."""
    savepoint = "`async with conn.transaction():`"
    return psycopg.errors.InFailedSqlTransaction(failed_transaction("Connection", name, savepoint))


@async_block
@asynccontextmanager
async def rolled_back(connection: Resource[Any]) -> AsyncIterator[Connection]:
    """Roll back, when the block ends, everything the app writes through *connection* in it.

    For tests. While the block runs, every unit of work that asks for *connection* (a
    request, ``lc.scope()``) gets the same connection, inside one transaction that the
    block opened, and runs in a savepoint of its own: tether's commit at the release point
    (or the endpoint's ``conn.commit()``) releases it, a failure (an exception, an error
    status) or ``conn.rollback()`` rolls back to it, and the outer transaction is rolled
    back at the end. So tests that write the same rows pass in any order, and the database
    is left as it was. ``async with conn.transaction():`` in an endpoint is a savepoint
    inside the unit's, as in production.

    With ``transaction=False`` (autocommit), what a failing unit of work wrote is kept, as
    in production, unless a statement of it failed: then the whole unit is rolled back
    (a statement after a failed one, its error caught, fails in the test where production
    runs it: run what may fail in ``async with conn.transaction():``). The connection is
    not in autocommit mode while the block runs.

    As in production, each unit's commit checks the deferred constraints (a violation is the
    driver's error, where ``COMMIT`` raises it), and the session's settings (``SET``, ``SET
    LOCAL``, ``set_config(..., true)``, the role) are reset after each unit, as on release.

    The block's transaction runs at the resource's ``isolation``; a ``readonly=True``
    resource's units of work are read-only (each its savepoint), while the test, outside
    them, may write its data on the block's connection.

    The units of work take turns on the one connection: one that asks for *connection*
    while another holds it waits for it, up to the pool's acquire timeout, then raises a
    ``RuntimeError`` saying why (at once if its own task holds it: a nested ``lc.scope()``).
    As in production, a unit of work's connection is unusable after the unit: a statement on
    it (a ``StreamingResponse`` body with ``release="handler"``, a background task) raises
    :class:`~tether.ResourceClosedError`, counted as a leak, where it would run in the next
    unit's savepoint. The callbacks a unit adds (``add_notice_handler``,
    ``add_notify_handler``) go at its end; those the test adds on the block's connection, with
    the block.

    The block yields the connection: query it between requests to see what the app wrote (and
    do not commit on it); after the block it raises :class:`~tether.ResourceClosedError`. The
    app scope must be running, on this event loop (with ``TestClient``:
    ``client.portal.wrap_async_context_manager(...)``).
    """
    from ..testing import _aborted, _Turns

    spec = registered(_connections, connection, "psycopg")
    lc = connection.lifecycle
    name = connection.name
    p = lc.get(spec.pool)  # a ScopeError naming the fix if the app scope is not running
    state: _State | None = getattr(p, "_tether", None)
    turns = _Turns(name, state.timeout if state is not None else 5.0)
    conn: Connection = await p.getconn()  # a ScopeError on another event loop than the pool's
    if state is not None:
        state.rolled_back.append(name)  # another resource of the pool is outside: warned
    kept, autocommit = _settings(conn), conn.autocommit
    pooled = _callbacks(conn, None)  # the handlers the test adds on the block's go with it
    # Each unit of work gets the connection as production hands it: unusable after the unit.
    given_back = _given_back_message(name, spec.pool.name, connection.release)
    block = _Handed(conn)
    # As production's reset on release (none behind PgBouncer), then what each unit of work
    # found set again: what the pool's `configure` set, and the test on the block's connection.
    resets = state is None or not state.pgbouncer
    # A read-only unit's savepoint is read-only; the block is not: the test seeds its data.
    begin = f"SAVEPOINT {SAVEPOINT}" + (READ_ONLY_UNIT if spec.readonly else "")
    try:
        await conn.set_autocommit(False)
        if spec.isolation is not None:
            await conn.set_isolation_level(spec.isolation)
        await conn.execute("SELECT 1")  # begins the outer transaction
        lock = turns.lock

        async def commit() -> None:  # the endpoint's own: ends the unit's savepoint, opens one
            if spec.transaction:
                try:
                    if spec.readonly:  # nothing written: its read-only setting goes with it
                        await _back_to_savepoint(conn)
                    else:
                        await _keep_unit(conn, name, strict=False)  # a failed one rolls back
                finally:
                    await conn.execute(begin, prepare=False)

        async def rollback() -> None:
            if spec.transaction:
                await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")

        async def joined() -> AsyncIterator[Connection]:
            async with turns.turn():
                if conn.info.transaction_status == TransactionStatus.INERROR:  # the test's
                    raise RuntimeError(_aborted(name, "`async with conn.transaction():`"))
                callbacks = _callbacks(conn, None)  # as the unit found them, as in production
                reset = ""
                if resets and not spec.readonly:  # (a read-only unit's go with its savepoint)
                    # Tuples, whatever the pool's row_factory (dict_row: row[0] a KeyError).
                    async with psycopg.AsyncCursor(conn, row_factory=tuple_row) as cur:
                        await cur.execute(SESSION_SETTINGS)
                        row = await cur.fetchone()
                    reset = f"; {IN_BLOCK_RESET}{(row[0] if row else None) or ''}"
                await conn.execute(begin, prepare=False)  # (maybe two statements)
                # Instance attributes: the unit's commit and rollback act on its savepoint.
                conn.commit = commit  # type: ignore[method-assign]
                conn.rollback = rollback  # type: ignore[method-assign]
                handed = _Handed(conn)
                try:
                    try:
                        yield cast("Connection", handed)
                    except BaseException:
                        with anyio.CancelScope(shield=True):
                            if spec.transaction:
                                await _back_to_savepoint(conn)
                            else:
                                try:  # autocommit: kept
                                    await _keep_unit(conn, name, strict=False, reset=reset)
                                except psycopg.DatabaseError:
                                    pass  # rolled back: the unit's own error is raised
                        raise
                    if spec.readonly:  # nothing to keep: its settings go with its savepoint
                        await _drop_unit(conn, name)
                    else:
                        await _keep_unit(conn, name, strict=spec.transaction, reset=reset)
                finally:
                    handed._tether_give_back(given_back, connection)  # the unit of work is over
                    del conn.commit, conn.rollback
                    _drop_callbacks(conn, callbacks)

        try:
            with block_override(lc, connection, joined):
                yield cast("Connection", block)
        finally:
            block._tether_give_back(_block_over(name), connection, leak=False)
            with anyio.CancelScope(shield=True):
                # A unit of work still holding it ends first (noted for the pytest plugin).
                held = await turns.settle(connection, SETTLE)
                try:
                    if held:
                        await conn.rollback()
                        await conn.set_autocommit(autocommit)
                        if _settings(conn) != kept:
                            await _restore(conn, kept, name)
                    else:
                        # A unit of work still has it (its own `rollback` on the object, a
                        # query perhaps running): closing it rolls back.
                        await conn.close()  # the pool replaces a closed connection
                except Exception:  # busy or lost: closing the connection rolls back
                    await conn.close()
                finally:
                    if held:  # one still waiting fails on the returned connection
                        lock.release()
    finally:
        if state is not None:
            state.rolled_back.remove(name)
        if not conn.closed:
            _drop_callbacks(conn, pooled)
        with anyio.CancelScope(shield=True):
            await p.putconn(conn)


def _block_over(name: str) -> str:
    return (
        f"Connection {name!r} of rolled_back({name}) was given back to its pool when the block "
        f"ended (its transaction rolled back), and cannot be used after: the pool may have "
        f"handed it to a unit of work. Query it inside the `async with "
        f"rolled_back({name}) as conn:` block."
    )


# --------------------------------------------------------------------------- once


class _OnceSession(_once.RowSession):
    """One connection of the pool, in autocommit mode with explicit ``BEGIN`` and ``COMMIT``
    (so ``conn.transaction()`` in the user's function is a savepoint), for
    :func:`tether.integrations._once.run`."""

    def __init__(self, conn: Connection) -> None:
        self.connection = conn

    async def begin(self) -> None:
        await self.connection.execute("BEGIN")

    async def commit(self) -> None:
        await self.connection.execute("COMMIT")

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        # psycopg's own cursor, whatever the pool's cursor_factory (AsyncRawCursor: `%s`
        # would be a syntax error).
        async with psycopg.AsyncCursor(self.connection, row_factory=tuple_row) as cur:
            await cur.execute(_PARAM.sub("%s", sql), args)
            return await cur.fetchone() if cur.description is not None else None

    def in_transaction(self) -> bool:
        return self.connection.info.transaction_status == TransactionStatus.INTRANS


_PARAM = re.compile(r"\$\d+")


def once(
    lc: Lifecycle,
    pool: Resource[Pool] | Resource[AsyncConnectionPool[Any]],
    fn: Callable[[Connection], Awaitable[Any]],
    *,
    key: str,
    name: str | None = None,
    record: bool = True,
    table: str = "tether_once",
    timeout: float | None = None,
) -> Resource[bool]:
    pool_name = pool.name

    async def run_once(p: Any, job: _once.Job) -> bool:
        conn = await _getconn(p, pool_name, None)
        pid = conn.info.backend_pid  # now: psycopg closes a connection whose cancel fails
        state: _State | None = getattr(p, "_tether", None)
        callbacks = _callbacks(conn, state)
        try:
            autocommit = conn.autocommit
            await conn.set_autocommit(True)
            ran = await _once.run(_OnceSession(conn), job)
            await conn.set_autocommit(autocommit)
            if state is None or not state.pgbouncer:
                # What the job left on the session (a `SET search_path` for a migration, a
                # temporary table) is not the first request's.
                again = state.configured.get(conn, "") if state is not None else ""
                await _reset_session(conn, job.name, 5.0, again)
            _drop_callbacks(conn, callbacks)
        except BaseException:
            # The server ends the transaction, and frees the lock, with the connection.
            with anyio.CancelScope(shield=True):
                await conn.close()
                await p.putconn(conn)  # the pool replaces a closed connection
                await _stop_waiting(p, pid, job.locks, job.name)
            raise
        with anyio.CancelScope(shield=True):
            await p.putconn(conn)
        return ran

    return _once.declare(
        lc, pool, fn, key=key, name=name, record=record, table=table, timeout=timeout,
        run_with=run_once,
    )  # fmt: skip


once.__doc__ = _once.DOC.format(
    dep="pool", conn="a psycopg ``AsyncConnection``", nested="``async with conn.transaction():``",
    extra="",
)  # fmt: skip


async def _stop_waiting(p: Any, pid: int, locks: list[int], name: str) -> None:
    """End *pid* on the server if it still waits for (or holds) one of *locks*."""
    try:
        async with (
            asyncio.timeout(1.0),
            p.connection(timeout=1.0) as other,
            psycopg.AsyncCursor(other) as cur,  # whatever the pool's cursor_factory
        ):
            await cur.execute(_PARAM.sub("%s", _once.STOP_WAITING), (pid, locks))
    except Exception as exc:
        log.warning("tether: %r: could not end backend %d on the server (%s)", name, pid, exc)


def _noting_server(
    configure: Callable[[Connection], Awaitable[None]] | None, state: _State
) -> Callable[[Connection], Awaitable[None]]:
    """The pool's ``configure`` (if any), after a note of the server each new connection
    reached (`_end_backend`): with several hosts (in the conninfo, or libpq's ``PGHOST``, a
    service file) the first that answers later may be another server. Once per connection."""
    servers = state.servers = weakref.WeakKeyDictionary()
    cancels = state.cancels

    async def noting(conn: Connection) -> None:
        servers[conn] = server_of(conn.info)
        cancel = cancel_request_of(conn.pgconn)
        if cancel is not None:
            cancels[conn] = cancel
        if configure is not None:
            await configure(conn)

    return noting


def _keeping_configured(
    configure: Callable[[Connection], Awaitable[None]], state: _State
) -> Callable[[Connection], Awaitable[None]]:
    """The pool's ``configure``, closing a connection it fails on (psycopg's pool drops it
    unclosed, and its backend stays until the garbage collector finds it), then a note of
    the settings it left on the session (its ``SET``s), for the reset to put back."""

    async def configured(conn: Connection) -> None:
        try:
            await configure(conn)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        if conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.close()
            msg = f"configure={configure!r} left the connection in a transaction: discarded"
            raise psycopg.ProgrammingError(msg)
        if conn._notice_handlers or conn._notify_handlers:
            state.callbacks[conn] = (list(conn._notice_handlers), list(conn._notify_handlers))
        if state.pgbouncer:
            return  # no reset to put them back after
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(SESSION_SETTINGS)
            row = await cur.fetchone()
        if not conn.autocommit:
            await conn.rollback()  # the query began a transaction: end it
        if row is not None and row[0]:
            state.configured[conn] = row[0]

    return configured


async def _reset_session(conn: Connection, name: str, within: float, again: str = "") -> None:
    """Undo what the unit of work left on the session before the connection goes back
    (``RESET_SESSION``: ``SET``, ``SET ROLE``, cursors, ``LISTEN``, advisory locks,
    temporary tables), as asyncpg's pool does on release: one round trip, in autocommit (the
    connection is idle: switching costs none). psycopg's pool has a ``reset=`` hook, but it
    returns the connection from a worker task later, not before ``putconn`` returns. A
    connection that cannot be reset in *within* seconds is closed, and the pool replaces it."""
    if conn.closed or conn.broken or not await _let_go(conn, name, within):
        return
    status = conn.info.transaction_status
    if status not in (TransactionStatus.IDLE, TransactionStatus.INTRANS, TransactionStatus.INERROR):
        return  # mid-query: psycopg's pool closes it

    async def reset() -> None:
        if status != TransactionStatus.IDLE:
            await conn.rollback()
        autocommit = conn.autocommit
        if not autocommit:
            await conn.set_autocommit(True)
        # Not prepared, whatever the connection's prepare_threshold: PostgreSQL cannot prepare
        # several statements, and the reset would fail on every connection (each closed).
        await conn.execute(RESET_SESSION + again, prepare=False)
        if not autocommit:
            await conn.set_autocommit(False)

    try:
        await _bounded(reset(), within)
    except Exception as exc:
        log.warning(
            "tether: %r: could not reset the connection's session (%s); closed (the pool "
            "replaces it)",
            name,
            describe(exc),
        )
        await conn.close()
