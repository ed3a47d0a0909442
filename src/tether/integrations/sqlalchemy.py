"""SQLAlchemy 2 with tether: the engine lives for the app, a session for one unit of work.

::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from sqlalchemy.ext.asyncio import AsyncSession

    import tether
    from tether.integrations import sqlalchemy as tsa

    lc = tether.Lifecycle()
    engine = tsa.engine(lc, lambda: os.environ["DATABASE_URL"], pool_size=10)
    session = tsa.session(lc, engine)

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes")
    async def add(text: str, s: Annotated[AsyncSession, Depends(session)]) -> dict[str, str]:
        s.add(Note(text=text))  # committed before the response starts
        return {"status": "created"}

* :func:`engine` is an app resource: ``create_async_engine`` runs when the app starts
  (never at import), with an explicit pool (size, overflow, wait timeout, pre-ping),
  one probe connection (``SELECT 1``, and the connection budget against the server's
  ``max_connections`` on PostgreSQL), and ``dispose()`` at shutdown.
* :func:`session` is a request resource: one ``AsyncSession`` holding one connection and
  one transaction per unit of work, however many dependencies ask for it. It commits when
  the endpoint succeeded (before the response starts, so a failing commit is a 500, never
  a 200), rolls back on any failure (an exception, an ``HTTPException``, an error status,
  a client that went away), and always closes.
* A pool that has no connection free within ``pool_timeout``, or a database that cannot
  be reached, is a :class:`~tether.ResourceUnavailable` (503 with ``Retry-After``) naming
  the pool and its state.
* :func:`sync_engine` and :func:`sync_session` are the same for ``def`` endpoints: they
  open in tether's threads, at most ``pool_size + max_overflow`` at once, so a pool
  smaller than the worker threadpool cannot deadlock it.

Passwords never appear in tether's errors and logs: URLs are shown with
``render_as_string(hide_password=True)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import anyio.to_thread

try:
    from sqlalchemy import event, text
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        create_async_engine,
    )
    from sqlalchemy.orm import Session
    from sqlalchemy.orm.session import SessionTransactionState
    from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool, StaticPool
    from sqlalchemy.util import await_only, greenlet_spawn
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.sqlalchemy needs SQLAlchemy 2: pip install 'tether[sqlalchemy]'"
    raise ImportError(msg) from exc

from .._errors import (
    ResourceClosedError,
    ResourceUnavailable,
    ScopeError,
    TetherError,
    check_bool,
    check_number,
    closest,
    describe,
    for_good,
    refused_for_good,
    unknown_keywords,
    unstopped,
)
from .._resource import Resource
from .._scope import SALVAGE, set_token_wait, wait_to_the_end
from .._stats import PoolStats
from . import _once
from ._common import (
    BUDGET_FALLBACK,
    BUDGET_QUERY,
    IN_BLOCK_RESET,
    RESET_SESSION,
    SERVER_READ_ONLY,
    SESSION_SETTINGS,
    SQLITE_BUSY_SNAPSHOT,
    STOP_WITHIN,
    BudgetPolicy,
    FileWatch,
    LoopBound,
    PerResource,
    async_block,
    asyncio_only,
    block_override,
    budget_refused,
    budget_unread,
    caller_outside,
    cancel_request_of,
    check_budget,
    check_budget_policy,
    check_check,
    check_dsn_value,
    check_resource,
    closed_by_tether,
    commit_not_sent,
    connection_lost,
    depends_on,
    failed_transaction,
    forget_budget,
    lost_after_commit,
    lost_at_commit,
    note_pgbouncer,
    plain_dsn,
    queue_full,
    read_budget,
    read_only,
    read_only_failure,
    redact,
    registered,
    remember_secrets,
    saturation,
    server_of,
    shut_down_socket,
    sqlite_busy,
    sqlite_cannot_open,
    sqlite_file_of,
    sqlite_lock_hint,
    sqlstates,
    still_in_use,
    terminate_backend,
    unavailable,
    used_concurrently,
)
from ._common import workers as worker_count

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check

__all__ = ["engine", "once", "rolled_back", "session", "sync_engine", "sync_session"]

log = logging.getLogger("tether")

Url = str | URL | Callable[[], "str | URL"]
Release = Literal["handler", "response"]


# --------------------------------------------------------------------------- bookkeeping


class _PoolInfo:
    """What tether knows about an engine resource's pool (for messages and limits)."""

    __slots__ = (
        "claims",
        "connect_params",
        "create_time",
        "created",
        "discarded",
        "engine",
        "lock",
        "max_overflow",
        "max_waiting",
        "name",
        "open_within",
        "pgbouncer",
        "pool_size",
        "pool_timeout",
        "rolled_back",
        "served",
        "shown_url",
        "timed_out_at",
        "users",
        "waiting",
    )

    def __init__(self, name: str, pool_size: int, max_overflow: int, pool_timeout: float) -> None:
        self.name = name
        # The dialect and the arguments of its last connect (`_aside_check`'s own connection).
        self.connect_params: tuple[Any, Any, Any] | None = None
        self.pool_size = pool_size
        self.max_overflow = max_overflow
        self.pool_timeout = pool_timeout
        # Seconds an async session may take to get a usable connection (the wait, a
        # connect, the pre-ping); None: unbounded (an engine tether did not make).
        self.open_within: float | None = None
        self.shown_url = "?"
        self.waiting = 0  # units of work waiting for a connection right now
        # Units of work that found a connection free (or one to make), not yet taken: the
        # pool does not count them in use yet (a sync session's checkout is in a thread).
        self.claims = 0
        self.max_waiting: int | None = None  # past it, a unit is refused at once
        self.engine: Engine | None = None  # the open engine (the sync one of an AsyncEngine)
        # An engine resource the user made (not engine()/sync_engine()): its app value is
        # the engine, read when a unit of work first asks (`_users_engine`).
        self.users: Resource[Any] | None = None
        self.lock = threading.Lock()
        # When the pool last handed out a connection (None: not known, an engine whose pool
        # class is not tether's).
        self.served: float | None = None
        # When a unit of work's wait for one last timed out (readiness: the waits fail).
        self.timed_out_at = -math.inf
        self.created = 0  # connections the pool made, in create_time seconds
        self.create_time = 0.0
        self.discarded = 0  # connections invalidated: broken, or in a state not known
        self.pgbouncer = False  # the engine was declared to reach PgBouncer (pgbouncer=True)
        # The session resources of the `rolled_back` blocks open on this engine now: a
        # session of another resource of the engine is outside them (warned of).
        self.rolled_back: list[str] = []

    @property
    def limit(self) -> int | None:
        """Most connections the pool hands out at once (None: unbounded overflow)."""
        if self.max_overflow < 0:
            return None
        return self.pool_size + self.max_overflow

    def enter_wait(self) -> _Ticket:
        """Count a unit of work asking for a connection: waiting if none is free for it (or
        units wait already: a connection coming free is theirs), refused past
        ``max_waiting``; else it claims the free one, until the pool hands it out (a burst
        on a pool with one free connection: that one unit is not waiting). With the pool's
        numbers not known (an engine of the user's), counted waiting, never refused."""
        ticket = _Ticket(self)
        with self.lock:
            free = self.free()
            if free is None:
                self.waiting += 1
                ticket.state = _WAITING
            elif free > 0 and self.waiting == 0:
                self.claims += 1
                ticket.state = _CLAIMED
            else:
                full = free <= 0  # (else those waiting are about to take what is free)
                if full and self.max_waiting is not None and self.waiting >= self.max_waiting:
                    raise self.too_many_waiting()
                self.waiting += 1
                ticket.state = _WAITING
        return ticket

    def free(self) -> int | None:
        """Connections the pool can hand out at once, less those claimed (None: not known)."""
        pool: Any = self.engine.pool if self.engine is not None else None
        checked_out = _pool_number(pool, "checkedout")
        size = _pool_number(pool, "size")
        max_overflow = getattr(pool, "_max_overflow", self.max_overflow)
        if checked_out is None or size is None or max_overflow < 0:
            return None
        return size + max_overflow - checked_out - self.claims

    def too_many_waiting(self) -> ResourceUnavailable:
        """The 503 for a unit of work past ``max_waiting``, every connection in use."""
        pool: Any = self.engine.pool if self.engine is not None else None
        max_overflow = getattr(pool, "_max_overflow", self.max_overflow)
        return queue_full(
            self.name,
            waiting=self.waiting,
            max_waiting=self.max_waiting or 0,
            size=int(_pool_number(pool, "size") or 0) + max_overflow,
            # with the free ones claimed: taken by a unit whose checkout has not run yet
            in_use=None if (out := _pool_number(pool, "checkedout")) is None else out + self.claims,
        )

    def pool_timeout_now(self) -> float | None:
        """The live pool's ``pool_timeout`` (None: not known, an engine of the user's not
        opened yet)."""
        pool: Any = self.engine.pool if self.engine is not None else None
        timeout = getattr(pool, "_tether_timeout", None)
        if timeout is None:
            timeout = getattr(pool, "_timeout", None)
        if timeout is None and self.pool_timeout > 0:
            timeout = self.pool_timeout
        return None if timeout is None else float(timeout)

    def timed_out(self, exc: BaseException | None) -> ResourceUnavailable:
        self.timed_out_at = time.monotonic()
        pool: Any = self.engine.pool if self.engine is not None else None
        # The live pool's own numbers (for an engine tether did not make, the only ones).
        pool_size = _pool_number(pool, "size")
        pool_size = self.pool_size if pool_size is None else pool_size
        max_overflow = getattr(pool, "_max_overflow", self.max_overflow)
        timeout = self.pool_timeout_now() or self.pool_timeout
        checked_out = _pool_number(pool, "checkedout")
        overflow = _pool_number(pool, "overflow")
        state = f"pool_size={pool_size}, max_overflow={max_overflow}"
        if checked_out is not None:
            state += f", checked out {checked_out}"
        if overflow is not None:
            state += f", overflow {max(overflow, 0)}"
        reason = (
            f"no connection came free within pool_timeout={timeout:g} s ({state}); "
            f"the requests holding them are slow, or the pool is too small for the load"
        )
        return unavailable(
            self.name,
            reason,
            size=pool_size + max_overflow if max_overflow >= 0 else None,
            in_use=checked_out,
            waiting=max(self.waiting - 1, 0),  # the one failing is no longer waiting
            timed_out=True,
        )

    def no_answer(self, within: float) -> ResourceUnavailable:
        self.timed_out_at = time.monotonic()
        reason = (
            f"the database did not answer within {within:g} s (pool_timeout + "
            f"connect_timeout): a pooled connection or a new one stopped answering (the "
            f"network or the server may be down; the connection was discarded)"
        )
        return unavailable(self.name, reason, waiting=max(self.waiting - 1, 0), timed_out=True)

    def unreachable(self, exc: BaseException) -> ResourceUnavailable:
        return unavailable(
            self.name,
            f"cannot connect to {self.shown_url}: {_describe_db(exc)}",
            refused=refused_for_good(exc),
            unreachable=True,
        )


_pools: PerResource[_PoolInfo] = PerResource("sqlalchemy_pools")

_WAITING, _CLAIMED, _TAKEN = 1, 2, 3


class _Ticket:
    """One unit of work's ask for a connection of a pool (`_PoolInfo.enter_wait`): counted
    waiting, or claiming a free one, until the pool hands it one (`took`) or the ask ends
    (`leave`). It bounds the whole wait, a sync session's wait for its limiter's token
    included: *deadline*, `pool_timeout` after the ask. The pool's classes of tether's
    engines see it (`_ASKING`) as they hand a connection out."""

    __slots__ = ("deadline", "info", "reset", "state")

    def __init__(self, info: _PoolInfo) -> None:
        self.info = info
        self.state = 0
        timeout = info.pool_timeout_now()
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reset: contextvars.Token[_Ticket | None] | None = None

    @property
    def within(self) -> float | None:
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def remaining(self, configured: float) -> float:
        """The pool's wait for this unit: what is left of its bound."""
        within = self.within
        return configured if within is None else min(configured, within)

    def took(self) -> None:
        """The pool handed the unit a connection (or began making one for it)."""
        info = self.info
        with info.lock:
            if self.state == _WAITING:
                info.waiting -= 1
            elif self.state == _CLAIMED:
                info.claims -= 1
            self.state = _TAKEN

    def timed_out(self) -> ResourceUnavailable:
        """A sync session's wait for its limiter's token ran out: the pool's timeout."""
        return self.info.timed_out(None)

    def leave(self) -> None:
        self.took()
        if self.reset is not None:
            _ASKING.reset(self.reset)
            self.reset = None


# The ask of the unit of work checking a connection out in this task (an async session:
# SQLAlchemy's greenlets share the task's context) or thread (a sync session: its thread
# runs in a copy of the task's).
_ASKING: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar(
    "tether_sqlalchemy_asking", default=None
)


def _ask(info: _PoolInfo) -> tuple[_Ticket, bool]:
    """Start a unit of work's ask for a connection, seen by the pool (`_ASKING`) until
    `leave`: the ask already started for it on the event loop (a sync session's, by its
    wait for the limiter's token, `_token_wait`), else a new one (raises past
    ``max_waiting``), with True: the caller leaves it."""
    ticket = _ASKING.get()
    if ticket is not None and ticket.info is info and ticket.state != _TAKEN:
        return ticket, False
    ticket = info.enter_wait()
    ticket.reset = _ASKING.set(ticket)
    return ticket, True


def _took_connection() -> None:
    ticket = _ASKING.get()
    if ticket is not None:
        ticket.took()


def _pool_number(pool: Any, method: str) -> int | None:
    fn = getattr(pool, method, None)
    if fn is None:
        return None
    try:
        return int(fn())
    except Exception:  # pragma: no cover - a pool class without that count
        return None


def _describe_db(exc: BaseException) -> str:
    # SQLAlchemy's DBAPIError wraps the driver's error; its str() adds the SQL and a link.
    orig = getattr(exc, "orig", None)
    if isinstance(exc, sa_exc.DBAPIError) and isinstance(orig, BaseException):
        return describe(orig)
    return describe(exc)


def _info_for(engine: Resource[Any]) -> _PoolInfo:
    info = _pools.get(engine)
    if info is None:
        # An engine resource the user made: tether knows its name only.
        info = _PoolInfo(engine.name, 0, -1, 0.0)
        info.users = engine
        _pools[engine] = info
    return info


def _outside_the_block(info: _PoolInfo, lazy: Session | None) -> None:
    """Tests only: a session of a resource other than that of a ``rolled_back`` block open
    on its engine gets a connection of its own, outside the block: warned of now, or, for a
    session that connects on first use (*lazy*), as it takes one (one never used takes none).
    """
    from ..testing import outside_the_block

    def warn() -> None:
        # One may end meanwhile, on the loop's thread.
        blocks = info.rolled_back[:] or _blocks_on_its_database(info)
        if blocks:
            outside_the_block(blocks[0], info.name)

    if lazy is None:
        warn()
        return

    def after_begin(session: Any, transaction: Any, connection: Any) -> None:
        warn()  # if the block is still open

    event.listen(lazy, "after_begin", after_begin, once=True)


#: Tests only: the engines with a ``rolled_back`` block open, of every Lifecycle. Empty in
#: production, where a session's open reads it once.
_BLOCKED: list[_PoolInfo] = []


def _database_of(info: _PoolInfo) -> tuple[Any, ...] | None:
    eng = info.engine
    if eng is None:
        return None
    url = eng.url
    return (url.get_backend_name(), url.host, url.port, url.database)


def _blocks_on_its_database(info: _PoolInfo) -> list[str]:
    """The ``rolled_back`` blocks open on another engine of the same database (host, port
    and database; a ``sync_engine()`` beside the async engine): a session of *info*'s is
    outside them, and its writes stay after the test (trial 21: a ``def`` route's rows,
    in silence)."""
    database = _database_of(info)
    if database is None:
        return []
    for other in _BLOCKED[:]:
        if other is not info and other.rolled_back and _database_of(other) == database:
            return other.rolled_back[:]
    return []


# --------------------------------------------------------------------------- errors


def _is_unreachable(exc: BaseException) -> bool:
    """Whether *exc*, raised while taking a connection, means the database cannot be had.

    Taking a connection is a checkout, a pre-ping and maybe a connect: any driver error
    there (refused, reset, "the database system is starting up", "too many clients",
    authentication) means there is no connection to give, whatever the endpoint does.
    """
    # OSError: ConnectionRefusedError, TimeoutError, socket.gaierror, ...
    return isinstance(exc, sa_exc.DBAPIError | OSError)


def _is_lost(exc: BaseException) -> bool:
    """Whether *exc*, raised by the endpoint, means the connection was lost under it.

    The server then ended the transaction itself: retrying is safe, hence a 503. (A
    commit that fails that way is not mapped: the commit may have happened.)
    """
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def _refused_to_send(exc: sa_exc.DBAPIError) -> bool:
    """Whether asyncpg refused to send the statement, so the server never saw it: its
    protocol is mid-way through something else (``InternalClientError``), or it has read
    the connection's close already (an ``InterfaceError`` saying so)."""
    cause: BaseException | None = exc.orig
    while cause is not None:
        kind = type(cause)
        if kind.__module__.startswith("asyncpg"):
            if kind.__name__ == "InternalClientError":
                return True
            if kind.__name__ == "InterfaceError":
                return "connection is closed" in str(cause)
        cause = cause.__cause__
    return False


def _open_failure(info: _PoolInfo, exc: BaseException) -> ResourceUnavailable | None:
    watch: FileWatch | None = getattr(info.engine, "_tether_sqlite_file", None)
    problem = _sqlite_file_problem(watch) if watch is not None else None
    if isinstance(exc, _SQLiteFileChanged) or (problem is not None and _is_unreachable(exc)):
        return unavailable(info.name, problem or str(exc), advice="", unreachable=True)
    if isinstance(exc, sa_exc.TimeoutError):
        return info.timed_out(exc)
    if note_pgbouncer(exc, info.pgbouncer):
        return None  # a pool set up for the wrong server, not one out of connections: a 500
    if _is_unreachable(exc):
        return info.unreachable(exc)
    return None


def _replace_pool(sync_conn: Connection, exc: BaseException | None) -> None:
    """The server is read-only (a failover reached a replica): *sync_conn* and every
    connection of its pool opened before now go to it. They are replaced, as SQLAlchemy
    replaces them after a disconnect: each older one is recycled at its next checkout."""
    sync_conn.engine.pool._invalidate(sync_conn.connection, exc, _checkin=False)
    sync_conn.invalidate(exc)


def _pool_of(eng: Any) -> Any:
    return getattr(getattr(eng, "sync_engine", eng), "pool", None)


async def _read_only_server(eng: AsyncEngine | AsyncConnection, exc: BaseException) -> bool:
    """For a write refused as read-only (SQLSTATE 25006), once the unit's transaction is
    rolled back: whether the server itself is read-only (a failover reached a replica), not
    the unit's own read-only transaction (``SET TRANSACTION READ ONLY``,
    ``postgresql_readonly``) or an engine read-only on purpose. If it is, the pool's
    connections are replaced. On the error path only: one checkout and one query. Under
    `rolled_back` (*eng* is the block's connection, its transaction aborted) it is the
    unit's own. When it cannot be asked, the server is taken to be read-only, and the pool
    replaced."""
    if isinstance(eng, AsyncConnection):
        return False
    if eng.dialect.name != "postgresql":  # the question is PostgreSQL's
        _pool_of(eng)._invalidate(None, exc, _checkin=False)
        return True
    try:
        async with asyncio.timeout(_turn_timeout(eng)):
            async with eng.connect() as c:
                if not (await c.exec_driver_sql(SERVER_READ_ONLY)).scalar():
                    return False
                await c.run_sync(_replace_pool, exc)
                return True
    except Exception:
        _pool_of(eng)._invalidate(None, exc, _checkin=False)
        return True


def _sync_read_only_server(eng: Engine | Connection, exc: BaseException) -> bool:
    """`_read_only_server` for a sync session (in tether's closing thread)."""
    if isinstance(eng, Connection):
        return False
    if eng.dialect.name != "postgresql":
        _pool_of(eng)._invalidate(None, exc, _checkin=False)
        return True
    try:
        with eng.connect() as c:
            if not c.exec_driver_sql(SERVER_READ_ONLY).scalar():
                return False
            _replace_pool(c, exc)
            return True
    except Exception:
        _pool_of(eng)._invalidate(None, exc, _checkin=False)
        return True


def _interrupt_cancelled(eng: Engine) -> None:
    """A statement whose task is cancelled (a client gone, a timeout) is interrupted, and its
    transaction rolled back in the connection's thread.

    aiosqlite runs the statement in its connection's thread, where the cancel does not
    reach: it ran to its end (seconds, or hours). SQLAlchemy invalidates the connection (so
    the unit of work cannot go on as if nothing happened: ``PendingRollbackError``, nothing
    committed), and its close then left the transaction, and SQLite's write lock, in place
    for as long as the statement's cursor lived. Interrupted, SQLite stops the statement at
    its next step; the rollback queued right behind it (before the close) ends the
    transaction, so the next writer gets the lock at once.
    """

    def handle_error(context: Any) -> None:
        if isinstance(context.original_exception, Exception) or context.connection is None:
            return  # an error of the statement, not a cancel
        try:
            driver = context.connection.connection.driver_connection
            raw, queue = driver._conn, driver._tx  # sqlite3's connection, aiosqlite's queue
            done = asyncio.get_running_loop().create_future()
        except Exception:  # closed already, not aiosqlite, or no loop
            return
        raw.interrupt()
        done.add_done_callback(_retrieved)
        queue.put_nowait((done, raw.rollback))

    event.listen(eng, "handle_error", handle_error)


def _stopped_once(eng: Engine) -> Callable[[], Awaitable[None]]:
    """An aiosqlite connection's thread is stopped once: a second ``stop()`` does nothing.
    Returns what waits (at the engine's close) for the threads so stopped to end.

    SQLAlchemy terminates a connection invalidated as its task is cancelled by closing it
    (shielded), and, cancelled again there (an anyio scope cancels each await: a readiness
    check past ``check_timeout`` waiting for a lock), by stopping its thread. The close,
    still running, then stopped it again, and waited for a thread that had ended: forever,
    so ``asyncio.run()`` (uvicorn's) never returned at exit. Nothing waits for such a
    thread, which ends once its statement has (a lock waited for): one still running when
    the loop closes reports to a closed loop ("Event loop is closed"), so the engine's
    close waits for it, as for the thread of any connection closed that still finishes its
    work (a rollback `_interrupt_cancelled` queued behind a statement)."""
    threads: dict[Any, Any] = {}  # each connection's driver and its thread, while alive

    def connect(dbapi_connection: Any, record: Any) -> None:
        driver: Any = getattr(dbapi_connection, "driver_connection", None)
        if not hasattr(driver, "_running"):
            return  # not aiosqlite
        # aiosqlite 0.21+ keeps its thread as `_thread`; before, the connection was it.
        thread = getattr(driver, "_thread", driver)
        if isinstance(thread, threading.Thread):
            for known in [d for d, t in threads.items() if not t.is_alive()]:
                del threads[known]  # (ended: forgotten)
            threads[driver] = thread
        stop = getattr(driver, "stop", None)
        if stop is None:
            return  # an aiosqlite without stop() (before 0.22.1): SQLAlchemy closes it

        def stop_once() -> Any:
            if not driver._running:
                return None  # stopped: its thread ends (or ended) with the first stop
            return stop()

        driver.stop = stop_once

    event.listen(eng, "connect", connect)

    async def threads_ended() -> None:
        # Of the connections closed or stopped (not one the app still holds open).
        ending = [t for d, t in list(threads.items()) if not d._running and t.is_alive()]
        if ending:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_THREADS_END):
                while any(thread.is_alive() for thread in ending):
                    await anyio.sleep(0.01)

    return threads_ended


async def _no_threads() -> None:
    """What an engine of no SQLite file waits for at its close (`_stopped_once`)."""


#: Seconds an SQLite engine's close waits for the threads of connections SQLAlchemy stopped
#: (`_stopped_once`): past the busy timeout their statements ended on.
_THREADS_END = 10.0


#: The driver connections `_let_go` hung up under another task. The error that task then gets
#: is a disconnect, on which SQLAlchemy replaces every connection of the pool by default
#: (``invalidate_pool_on_disconnect``): only that one was hung up, the others are fine.
_hung_up: weakref.WeakSet[Any] = weakref.WeakSet()


def _keep_pool_on_hang_up(eng: Engine) -> None:
    """The error of a connection tether hung up (`_let_go`) invalidates that connection
    only, not the whole pool, as SQLAlchemy does on a disconnect."""

    def handle_error(context: Any) -> None:
        if not _hung_up or not context.is_disconnect or context.connection is None:
            return
        try:
            driver = context.connection.connection.driver_connection
        except Exception:  # closed or invalidated already
            return
        if driver in _hung_up:
            context.invalidate_pool_on_disconnect = False

    event.listen(eng, "handle_error", handle_error)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a rollback the interrupt also reached: the close follows


_FAILED = "tether_failed"  # in a connection's info: a statement failed in its transaction
_IN_FAILED_TRANSACTION = "25P02"


#: The cancel requests `_cancel_before_hang_up` sends, until they are sent, and the backends
#: `_end_after_psycopg_hang_up` ends, until they are ended.
_CANCELS: set[asyncio.Task[None]] = set()


def _cancel_before_hang_up(eng: Engine, name: str) -> None:
    """Have the server cancel the statement of an asyncpg connection discarded while asyncpg
    cancels it. A task cancelled mid-statement again and again (anyio's cancel scopes:
    under a ``BaseHTTPMiddleware``, or a task group, the request's task is cancelled at
    every await) fails at once in SQLAlchemy, which discards the connection and so hangs
    it up: that cancels asyncpg's own cancel request, and the statement ran on, for its
    whole length, after the unit of work (and at a shutdown, the process) had ended (trial
    17). The same request is sent from a task of tether's own, which the hang-up does not
    cancel; the engine's close waits for it. Not otherwise: a connection discarded with no
    cancel under way runs nothing. (psycopg closes its connection itself first, its own
    cancel request cancelled the same way: not mended here.)"""

    def invalidated(dbapi_connection: Any, record: Any, exc: BaseException | None) -> None:
        raw = getattr(dbapi_connection, "driver_connection", None)
        pending = getattr(raw, "_cancellations", None)
        if not pending or all(task.done() for task in pending):
            return
        try:
            from asyncpg import connect_utils

            protocol = raw._protocol  # type: ignore[union-attr]
            request = connect_utils._cancel(
                loop=raw._loop,  # type: ignore[union-attr]
                addr=raw._addr,  # type: ignore[union-attr]
                params=raw._params,  # type: ignore[union-attr]
                backend_pid=protocol.backend_pid,
                backend_secret=protocol.backend_secret,
            )
        except Exception as exc:  # another asyncpg: its own cancel, as before
            log.debug("tether: engine %r: no cancel request sent: %s", name, describe(exc))
            return
        task = raw._loop.create_task(_send_cancel(request, name))  # type: ignore[union-attr]
        _CANCELS.add(task)
        task.add_done_callback(_CANCELS.discard)

    event.listen(eng, "invalidate", invalidated)


def _end_after_psycopg_hang_up(eng: AsyncEngine, name: str) -> None:
    """End the backend of a psycopg connection that psycopg closed itself mid-query, as it
    does when its cancel of a statement is interrupted again (the end of tether's salvage of
    a close cut short, an anyio cancel scope) or not confirmed in 5 s: PostgreSQL notices the
    client gone only when it next writes to it, so a ``COMMIT`` waiting for a lock went on
    waiting, and committed once the lock was free, after the client's 500. From a task of
    tether's own, on a connection of its own (a pool's slot may be taken), when the
    connection is invalidated (the first thing SQLAlchemy does with it): a close given up
    on cancels every await of its own. The backend's pid is read when the connection is made
    (libpq's, no round trip); the engine's close waits for the task, as for
    `_cancel_before_hang_up`'s."""
    sync = eng.sync_engine
    params: list[Any] = [(), {}]

    def do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        params[:] = [cargs, cparams]  # as the later listeners leave them (a token renewed)

    def connect(dbapi_connection: Any, record: Any) -> None:
        with contextlib.suppress(Exception):
            driver = dbapi_connection.driver_connection
            record.info[_PID] = driver.pgconn.backend_pid
            # The server it reached, where its backend is ended: with several hosts (the
            # URL's, libpq's PGHOST, a service file) the first that answers then may be
            # another; with async_creator= (no do_connect), its database and user too.
            info = driver.info
            record.info[_SERVER] = {**server_of(info), "dbname": info.dbname, "user": info.user}
            # Sent instead of the end if the server has no slot left (`terminate_backend`).
            record.info[_CANCEL] = cancel_request_of(driver.pgconn)

    def invalidate(dbapi_connection: Any, record: Any, exc: BaseException | None) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        pid = record.info.get(_PID) if record is not None else None
        try:
            pgconn = driver.pgconn  # type: ignore[union-attr]
            # Hung up by psycopg itself; or, before psycopg 3.3.7, left mid-query (an anyio
            # scope's cancel cut its cancel short), which the invalidation now closes.
            running = (driver.broken and pgconn.pgconn_ptr is None) or (  # type: ignore[union-attr]
                pgconn.pgconn_ptr is not None and pgconn.transaction_status == _ACTIVE
            )
            loop = asyncio.get_running_loop()
        except Exception:  # not psycopg's, or no loop: nothing to do
            return
        if not running or pid is None:
            return
        cargs, cparams = params
        server = record.info.get(_SERVER)
        if server is None:
            return  # not known which server: ending that pid elsewhere could end another
        if cargs or "conninfo" in cparams or "dbname" in cparams:
            server = {k: v for k, v in server.items() if k not in ("dbname", "user")}
        cparams = {**cparams, **server}
        cancel = record.info.get(_CANCEL)
        task = loop.create_task(_end_backend_alone(cargs, cparams, pid, name, cancel))
        _CANCELS.add(task)
        task.add_done_callback(_CANCELS.discard)
        # The session whose close this is waits for it (`_backends_ended`), while it runs.
        closing = asyncio.current_task()
        if closing is not None:
            _ENDING_FOR.setdefault(closing, []).append(task)
            task.add_done_callback(functools.partial(_ended, closing))

    event.listen(sync, "do_connect", do_connect)
    event.listen(sync, "connect", connect)
    event.listen(sync, "invalidate", invalidate)


#: The tasks ending backends (`_end_after_psycopg_hang_up`), by the task whose close of a
#: session began them: that close waits for them.
_ENDING_FOR: dict[asyncio.Task[Any], list[asyncio.Task[None]]] = {}


def _ended(closing: asyncio.Task[Any], task: asyncio.Task[None]) -> None:
    ending = _ENDING_FOR.get(closing)
    if ending is not None and task in ending:
        ending.remove(task)
        if not ending:
            del _ENDING_FOR[closing]


async def _backends_ended() -> None:
    """Wait, past the session's close_timeout too, for the backends its close began to end:
    done before the client's answer, or a ``COMMIT`` still waiting for a lock on the server
    could commit after the client's 500 (CI's load)."""
    ending = _ENDING_FOR.pop(cast("asyncio.Task[Any]", asyncio.current_task()), None)
    if ending:
        await wait_to_the_end(asyncio.gather(*ending, return_exceptions=True))


_PID = "tether_pid"  # in a connection's info: its backend's pid (psycopg's, on PostgreSQL)
_SERVER = "tether_server"  # ... and the server it reached (its host, port, database, user)
_CANCEL = "tether_cancel"  # ... and a cancel request for its backend (`cancel_request_of`)
_ACTIVE = 1  # libpq's PQTRANS_ACTIVE: a query in progress (psycopg's TransactionStatus.ACTIVE)


async def _end_backend_alone(
    cargs: Any, cparams: dict[str, Any], pid: int, name: str, cancel: Any = None
) -> None:
    """End backend *pid* from a psycopg connection made for it, with the engine's own
    connect arguments (as its dialect makes one); or send it *cancel*, its cancel request,
    if the server has no slot left for that connection."""
    import psycopg

    kwargs = dict(cparams)
    make = kwargs.pop("async_creator_fn", psycopg.AsyncConnection.connect)

    async def connect() -> Any:
        other = await make(*cargs, **kwargs)
        await other.set_autocommit(True)
        return other

    await terminate_backend(connect, pid, f"engine {name!r}", STOP_WITHIN, cancel)


async def _send_cancel(request: Awaitable[Any], name: str) -> None:
    try:
        async with asyncio.timeout(SALVAGE):
            await request
    except (Exception, asyncio.CancelledError) as exc:  # best effort, as asyncpg's own
        log.debug("tether: engine %r: the cancel request failed: %s", name, describe(exc))


async def _cancels_sent() -> None:
    """Wait (shielded, at most `SALVAGE` seconds) for the cancel requests under way."""
    pending = [task for task in _CANCELS if task.get_loop() is asyncio.get_running_loop()]
    if pending:
        with anyio.CancelScope(shield=True):
            await asyncio.wait(pending, timeout=SALVAGE)


def _refuse_failed_commits(
    eng: Engine, name: str, savepoint: str = "`async with session.begin_nested():`"
) -> None:
    """PostgreSQL answers ``COMMIT`` of a transaction that a failed statement aborted with a
    rollback and no error, and the drivers report success: an endpoint that caught the
    statement's error would answer 200 with nothing committed. A failed statement marks its
    connection; a commit on a marked connection first asks the server whether the
    transaction can still commit (one round trip, only then: a savepoint rolled back may
    have saved it), and fails the commit when it cannot. psycopg and psycopg2 say with no
    round trip that the transaction is aborted (``transaction_status``): a commit on such a
    connection is checked too, however the transaction was aborted (a statement run on the
    driver's connection itself, which SQLAlchemy does not see fail).

    A commit refused rolls the driver's connection back first: SQLAlchemy counts the
    transaction as ended when its ``commit`` listener raises, and skips the pool's rollback
    on return, so the connection went back to the pool "idle in transaction (aborted)"
    (with ``pgbouncer=True`` or ``reset_session=False``, where tether's reset does not run).
    *savepoint* is the form the message recommends (``async with`` or ``with``)."""

    def handle_error(context: Any) -> None:
        conn = context.connection
        if conn is not None and not conn.closed:
            conn.info[_FAILED] = True

    def begin(conn: Any) -> None:
        conn.info.pop(_FAILED, None)

    def commit(conn: Any) -> None:
        if conn.info.pop(_FAILED, None) is None and not _aborted(conn):
            return
        try:
            conn.exec_driver_sql("SELECT 1")
        except sa_exc.DBAPIError as exc:
            if _IN_FAILED_TRANSACTION not in sqlstates(exc):
                raise
            try:
                conn.connection.dbapi_connection.rollback()
            except Exception as again:  # a connection lost meanwhile: never reused as it is
                with contextlib.suppress(Exception):
                    conn.invalidate(again)
            raise sa_exc.PendingRollbackError(
                failed_transaction("Engine", name, savepoint)
            ) from exc

    event.listen(eng, "handle_error", handle_error)
    event.listen(eng, "begin", begin)
    event.listen(eng, "commit", commit)


def _aborted(conn: Any) -> bool:
    """Whether psycopg (or psycopg2) says *conn*'s transaction is aborted, with no round trip
    (libpq's transaction status); False for other drivers (asyncpg does not say)."""
    try:
        info = getattr(conn.connection.driver_connection, "info", None)  # None: asyncpg
        return info is not None and bool(info.transaction_status == _IN_ERROR)
    except Exception:  # pragma: no cover - a connection closed meanwhile
        return False


_STREAMS = "tether_streams"  # in a connection's info: its server-side cursors, this checkout
_RETURNED = "_tether_returned"  # on a server-side cursor's execution context: its message


def _stream_closed_message(name: str) -> str:
    return (
        f"Engine {name!r}: a result read after its connection went back to the pool: its "
        f"server-side cursor (stream(), stream_scalars(), yield_per) was opened in a unit of "
        f"work that has ended (in a request, a session with release='handler' is closed when "
        f"the endpoint returns, before the response), and reading it would run on a "
        f"connection another unit of work may hold now, aborting its transaction. Read it "
        f"before the endpoint returns, or declare the session it comes from with "
        f"release='response' for a StreamingResponse body that reads it; a background task "
        f"needs a session of its own (`async with lc.scope() as s: await s.get(session)`)."
    )


def _end_streams(contexts: Iterable[Any], message: str, *, alive: bool = True) -> None:
    """Mark the server-side cursors of *contexts* as ended (a later read raises *message*)
    and close them on the client (*alive*: their connection is still there)."""
    for context in list(contexts):
        setattr(context, _RETURNED, message)
        if not alive:
            continue  # the connection is gone (invalidated): its cursor with it
        try:
            context.cursor.close()  # on the client: the transaction has ended
        except Exception:  # closed already, or a driver refusing: marked all the same
            pass


def _close_streams_on_return(eng: Engine, name: str) -> None:
    """Close the server-side cursors a unit of work opened (``stream()``,
    ``stream_scalars()``, ``yield_per``) when their connection goes back to the pool, so a
    result read later (a StreamingResponse body reading a result its endpoint opened, the
    session released at the handler) raises :class:`ResourceClosedError` naming the fix.

    Without it the driver's cursor kept the pooled connection: its FETCH ran on it while
    another unit of work held it, the server aborted that unit's transaction, and its
    ``COMMIT`` silently rolled back. The cursor is closed on the client, with no round trip
    (its transaction has ended: the server has closed it already).

    Every statement's listener only looks at a flag; the pool's ``checkin`` listener is added
    when the engine opens its first server-side cursor, so connections go back on
    SQLAlchemy's short path until then."""
    message = _stream_closed_message(name)
    ended = (
        f"Engine {name!r}: a result read after the transaction it was opened in ended (a "
        f"commit or rollback while it was being read): its server-side cursor (stream(), "
        f"stream_scalars(), yield_per) lived in that transaction. Read it to the end before "
        f"committing, or commit on a connection of its own."
    )
    lock = threading.Lock()
    returning = False

    def after_cursor_execute(
        conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, many: Any
    ) -> None:
        if not getattr(context, "_is_server_side", False):
            return
        nonlocal returning
        if not returning:
            with lock:
                if not returning:
                    event.listen(eng, "checkin", checkin)
                    if conn.dialect.driver == "psycopg2":
                        event.listen(eng, "commit", ending)
                        event.listen(eng, "rollback", ending)
                    returning = True
        # Weakly: a result the app dropped cannot be read again, and a connection held long
        # (a job's, a WebSocket's) would keep every streamed statement's context.
        streams = conn.info.get(_STREAMS)
        if streams is None:
            streams = conn.info[_STREAMS] = weakref.WeakSet()
        streams.add(context)

    def ending(conn: Any) -> None:
        # psycopg2 closes a named cursor only in the transaction that opened it (a later
        # close raises, and SQLAlchemy logs that at ERROR when the result is read): closed
        # here, as the transaction ends, which ends it on the server anyway; a read after it
        # raises saying so (a job committing inside its read loop), or, once the connection
        # went back, that it did.
        if conn.closed:
            return  # a rollback of an error on a stale result's connection (closed already)
        for context in list(conn.info.get(_STREAMS, ())):
            setattr(context, _RETURNED, ended)
            try:
                context.cursor.close()
            except Exception:  # an aborted transaction, a lost connection: dropped at checkin
                pass

    def checkin(dbapi_connection: Any, record: Any) -> None:
        contexts = record.info.pop(_STREAMS, None)
        if contexts:
            _end_streams(contexts, message, alive=dbapi_connection is not None)

    def handle_error(context: Any) -> ResourceClosedError | None:
        returned = getattr(context.execution_context, _RETURNED, None)
        if returned is None:
            return None
        # The cursor tether closed: not the connection lost (psycopg2's "cursor already
        # closed" reads as a disconnect, which would invalidate the whole pool).
        context.is_disconnect = False
        return ResourceClosedError(returned, resource=name)

    event.listen(eng, "after_cursor_execute", after_cursor_execute)
    event.listen(eng, "handle_error", handle_error)


def _count_connections(eng: Engine, info: _PoolInfo) -> None:
    """Count the connections the pool makes, and the time that takes (from the dialect's
    connect to the pool's ``connect`` event, stamped on the connection's record), and those
    it invalidates (a disconnect, a session that could not be reset, a unit of work
    interrupted mid-query): since this engine opened, as every driver pool's figures are (a
    Lifecycle run again opens a new one)."""
    info.created = 0
    info.create_time = 0.0
    info.discarded = 0

    def do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        record.info["tether_connecting"] = time.monotonic()
        info.connect_params = (dialect, cargs, cparams)  # as the later listeners leave them

    def connect(dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop("tether_connecting", None)
        info.created += 1
        if started is not None:
            info.create_time += time.monotonic() - started

    def invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
        if dbapi_connection is not None:
            info.discarded += 1

    event.listen(eng, "do_connect", do_connect)
    event.listen(eng, "connect", connect)
    event.listen(eng, "invalidate", invalidate)


def _note_checkouts(eng: Engine, info: _PoolInfo) -> None:
    """Note when the (sync) engine's pool last handed out a connection (readiness under load;
    an async engine's pool class notes it itself)."""
    info.served = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        info.served = time.monotonic()

    event.listen(eng, "checkout", checkout)


_UNREAD = "tether_unread"  # in a connection's info: its settings are to be read at checkout
_RESET = "tether_reset"  # in a connection's info: its reset, setting those settings again
_CALLBACKS = "tether_callbacks"  # in a connection's info: its driver's callbacks, as set up
_KEPT = "tether_kept"  # in a connection's info: its driver's settings (psycopg's), as set up


def _reset_sessions(eng: Engine, name: str, *, server: bool = True) -> None:
    """When a connection goes back to the pool (after SQLAlchemy's rollback), undo what a unit
    of work may have left on its PostgreSQL session (``RESET_SESSION``: ``SET``, ``SET ROLE``,
    cursors, ``LISTEN``, advisory locks, temporary tables), as asyncpg's pool does: one round
    trip. A connection that cannot be reset is invalidated, never handed to the next unit of
    work as it was.

    What the engine's ``connect`` listeners set with ``SET`` (the ``search_path`` recipe of
    SQLAlchemy's documentation), which ``RESET ALL`` undoes too, is put back in the same round
    trip: it is read (``SESSION_SETTINGS``) at the connection's first checkout, which comes
    after every ``connect`` listener has run, however and whenever it was added (on the engine
    once it is open, so after tether's own, or on ``Pool`` or ``Engine`` themselves). One query
    per connection, and only for one made while the engine had ``connect`` listeners besides
    SQLAlchemy's and tether's: none otherwise, and none at later checkouts. The ``checkout``
    listener that reads them is added only then too: with none, SQLAlchemy hands out a
    pooled connection on its shorter path.

    What the driver keeps on the connection object goes back as the pool's setup left it too
    (``_callbacks``: noted with the settings, or when the connection is made if there is
    nothing to read): the listeners, loggers and notice/notify handlers a unit of work added
    are dropped, psycopg's unread notifications too, and psycopg's and psycopg2's transaction
    settings (``_driver_settings``) are put back; and a transaction the unit of work began
    itself and left open (a raw ``BEGIN`` in autocommit, which SQLAlchemy's rollback does not
    see on asyncpg) is rolled back, with a warning, before the reset.

    ``server=False`` (behind PgBouncer in transaction mode, where the next transaction may run
    on another server connection, and a ``SET`` outlives none): no reset of the server's
    session, and no settings read; what the driver keeps on the client's connection object
    goes back all the same, with no round trip."""
    reading = False

    def connect(dbapi_connection: Any, record: Any) -> None:
        nonlocal reading
        if any(fn not in own for fn in eng.pool.dispatch.connect):
            record.info[_UNREAD] = True
            if not reading:
                reading = True
                event.listen(eng, "checkout", checkout)
        else:  # every connect listener has run: what the driver keeps now is the setup's
            record.info[_CALLBACKS] = _callbacks(dbapi_connection)
            record.info[_KEPT] = _driver_settings(dbapi_connection)

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_UNREAD, False):
            record.info[_CALLBACKS] = _callbacks(dbapi_connection)
            record.info[_KEPT] = _driver_settings(dbapi_connection)
            if server:
                record.info[_RESET] = RESET_SESSION + _read_settings(dbapi_connection)

    def checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is None:
            return  # invalidated: it is not coming back
        try:
            _reset_driver(
                dbapi_connection,
                record.info.get(_RESET, RESET_SESSION) if server else "",
                record.info.get(_CALLBACKS),
                name,
                record.info.get(_KEPT),
            )
        except Exception as exc:
            log.warning(
                "tether: engine %r: could not reset a connection's session (%s); discarded",
                name,
                _describe_db(exc),
            )
            try:
                record.invalidate(exc)
            except Exception:  # pragma: no cover - closing a broken connection
                pass

    event.listen(eng, "connect", connect)
    # The engine's own listeners: SQLAlchemy's setup of the dialect, and tether's. (Those on
    # Pool or Engine themselves are not among them: the user's.)
    own = set(getattr(eng.pool.dispatch.connect, "listeners", ()))
    event.listen(eng, "checkin", checkin)


def _read_settings(dbapi_connection: Any) -> str:
    """SQL that sets again what ``SET`` made of the session's settings (``SESSION_SETTINGS``),
    or "". Read on the driver's connection: in autocommit if it is idle, so the query opens no
    transaction (switching costs no round trip); in the one a listener left open otherwise."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    package = type(driver).__module__.partition(".")[0]
    if package == "asyncpg":
        return str(await_only(driver.fetchval(SESSION_SETTINGS)) or "")
    if package not in ("psycopg", "psycopg2"):
        return ""
    switch = driver.info.transaction_status == 0 and not driver.autocommit  # idle
    if inspect.iscoroutinefunction(driver.commit):
        if switch:
            await_only(driver.set_autocommit(True))
        row = await_only(await_only(driver.execute(SESSION_SETTINGS)).fetchone())
        if switch:
            await_only(driver.set_autocommit(False))
    else:
        if switch:
            driver.autocommit = True
        cursor = driver.cursor()
        try:
            cursor.execute(SESSION_SETTINGS)
            row = cursor.fetchone()
        finally:
            cursor.close()
            if switch:
                driver.autocommit = False
    return str(row[0] or "") if row is not None else ""


#: The callbacks a driver keeps on its connection object, which a unit of work can add to
#: (asyncpg's ``add_log_listener``, ``add_query_logger``, ``add_termination_listener``;
#: psycopg's ``add_notice_handler``, ``add_notify_handler``). Private attributes, read with a
#: default: a version without one is left alone. asyncpg's ``LISTEN`` callbacks
#: (``_listeners``) are not among them: the reset's ``UNLISTEN *`` ends every one on the
#: server, so they are all dropped, as asyncpg's own pool does.
_DRIVER_CALLBACKS = {
    "asyncpg": ("_log_listeners", "_query_loggers", "_termination_listeners"),
    "psycopg": ("_notice_handlers", "_notify_handlers"),
}

_IDLE, _IN_TRANSACTION, _IN_ERROR = 0, 2, 3  # libpq's transaction status (psycopg's ``info``)

_LEFT_OPEN = (
    "tether: %r: connection returned inside an open transaction; rolling it back (commit or "
    "roll back the transactions you start)"
)  # tether.asyncpg's words for the same mistake


def _driver_of(dbapi_connection: Any) -> tuple[Any, str]:
    """The driver's own connection under SQLAlchemy's adapter, and its package's name."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    return driver, type(driver).__module__.partition(".")[0]


def _callbacks(dbapi_connection: Any) -> dict[str, Any]:
    """Copies of the callbacks the driver keeps on *dbapi_connection* (``_DRIVER_CALLBACKS``):
    what the pool's setup (SQLAlchemy's dialect, the engine's ``connect`` listeners) added."""
    driver, package = _driver_of(dbapi_connection)
    kept: dict[str, Any] = {}
    for attr in _DRIVER_CALLBACKS.get(package, ()):
        value = getattr(driver, attr, None)
        if isinstance(value, set | list):
            kept[attr] = value.copy()
    return kept


#: What psycopg and psycopg2 keep on their connection object for every later transaction,
#: which a unit of work can change (psycopg2's ``set_session()``, the attributes, psycopg's
#: ``set_read_only()``...): the driver applies them to every later transaction, with its
#: ``BEGIN``, where the reset's ``RESET ALL`` does not reach them. A unit that left
#: ``readonly=True`` made every later unit's writes fail (as on a replica), one that left
#: ``autocommit=True`` made their rollbacks undo nothing.
_DRIVER_SETTINGS = {
    "psycopg": ("autocommit", "isolation_level", "read_only", "deferrable"),
    "psycopg2": ("autocommit", "isolation_level", "readonly", "deferrable"),
}
#: And what makes their cursors and rows (SQLAlchemy's results need the driver's default
#: tuples: a unit's ``row_factory = dict_row`` broke every later unit's queries), and
#: psycopg's ``prepare_threshold`` (``pgbouncer=True`` sets it for every unit).
_DRIVER_ATTRIBUTES = {
    "psycopg": ("row_factory", "cursor_factory", "prepare_threshold"),
    "psycopg2": ("cursor_factory",),
}
#: psycopg2's lists of the server's notices and of the notifications a ``LISTEN`` received,
#: which grow until someone reads them (SQLAlchemy empties ``notices`` after its statements,
#: not after the driver's own cursors).
_PSYCOPG2_LISTS = ("notices", "notifies")


def _driver_settings(dbapi_connection: Any) -> dict[str, Any]:
    """What psycopg or psycopg2 keeps on *dbapi_connection*, as the pool's setup left it: its
    transaction settings (``_DRIVER_SETTINGS``), its row and cursor factories
    (``_DRIVER_ATTRIBUTES``), and psycopg2's notice and notification lists
    (the objects: a ``connect`` listener may put its own there). Nothing for other drivers."""
    driver, package = _driver_of(dbapi_connection)
    attrs = (*_DRIVER_SETTINGS.get(package, ()), *_DRIVER_ATTRIBUTES.get(package, ()))
    if package == "psycopg2":
        attrs = (*attrs, *_PSYCOPG2_LISTS)
    return {attr: getattr(driver, attr) for attr in attrs if hasattr(driver, attr)}


def _restore_settings(driver: Any, package: str, kept: dict[str, Any] | None) -> None:
    """Put the driver's transaction settings back as the pool's setup left them (*kept*:
    ``_driver_settings``; the connection is idle), and psycopg2's lists too, emptied: a
    notification for a unit's ``LISTEN`` is not the next unit's to read."""
    if kept is None:
        return  # a connection made before tether's listeners: nothing known to go back to
    is_async = inspect.iscoroutinefunction(driver.commit)
    for attr in _DRIVER_SETTINGS.get(package, ()):
        if attr not in kept or getattr(driver, attr) == kept[attr]:
            continue
        if is_async:  # psycopg's AsyncConnection: set_autocommit(), set_read_only(), ...
            await_only(getattr(driver, f"set_{attr}")(kept[attr]))
        else:
            setattr(driver, attr, kept[attr])
    for attr in _DRIVER_ATTRIBUTES.get(package, ()):
        if attr in kept and getattr(driver, attr) is not kept[attr]:
            setattr(driver, attr, kept[attr])  # no I/O: a plain attribute, async too
    if package != "psycopg2":
        return
    for attr in _PSYCOPG2_LISTS:
        before = kept.get(attr)
        if before is not None and getattr(driver, attr) is not before:
            setattr(driver, attr, before)
        items: Any = getattr(driver, attr, None)
        if isinstance(items, list):
            del items[:]
        elif hasattr(items, "clear"):
            items.clear()


def _drop_callbacks(driver: Any, package: str, kept: dict[str, Any] | None) -> None:
    """Put the driver's callbacks back as *kept* (``_callbacks``): those a unit of work added
    would receive the next units' notifications, notices and queries (and pile up)."""
    if package == "asyncpg":
        listeners = getattr(driver, "_listeners", None)
        if listeners:
            # Stale, they would also make a later add_listener() skip its LISTEN.
            listeners.clear()
    for attr, before in (kept or {}).items():
        now = getattr(driver, attr, None)
        if now is None or now == before:
            continue
        if isinstance(now, set):
            now.clear()
            now.update(before)
        elif isinstance(now, list):
            now[:] = before


def _reset_driver(
    dbapi_connection: Any,
    sql: str = RESET_SESSION,
    kept: dict[str, Any] | None = None,
    name: str = "engine",
    settings: dict[str, Any] | None = None,
) -> None:
    """Run the reset *sql* (``RESET_SESSION``, then what the connection's ``connect``
    listeners set, if any; none if ""), in one round trip, opening no transaction.

    Before it, the callbacks the unit of work added on the driver's connection are dropped
    (*kept*: those to keep, ``_callbacks``), and a transaction it began itself and left open is
    rolled back, with a warning; after it, the driver's transaction settings go back as the
    pool's setup left them (*settings*: ``_driver_settings``), and the notifications (psycopg2:
    the notices too) nobody read are dropped."""
    driver, package = _driver_of(dbapi_connection)
    _drop_callbacks(driver, package, kept)
    if package == "asyncpg":
        if driver.is_in_transaction():
            # SQLAlchemy's rollback ends only a transaction its adapter began: not a raw
            # BEGIN in autocommit, nor an unfinished driver.transaction().
            log.warning(_LEFT_OPEN, name)
            if dbapi_connection is not driver:
                dbapi_connection.rollback()  # the adapter's own, if any (its state too)
            if driver.is_in_transaction():
                if getattr(driver, "_top_xact", None) is not None:
                    driver._top_xact = None  # as asyncpg's own reset: it is rolled back
                await_only(driver.execute("ROLLBACK"))
        if sql:
            await_only(driver.execute(sql))  # no transaction open: it stays none
        return
    if package not in ("psycopg", "psycopg2"):
        return
    # Never prepared (psycopg's prepare_threshold=0 would prepare it, and PostgreSQL refuses
    # to prepare several statements); psycopg2 prepares nothing.
    options: dict[str, Any] = {"prepare": False} if package == "psycopg" else {}
    status = getattr(getattr(driver, "info", None), "transaction_status", _IDLE)
    left_open = status in (_IN_TRANSACTION, _IN_ERROR)
    if left_open:  # SQLAlchemy's rollback was skipped (pool_reset_on_return=None)
        log.warning(_LEFT_OPEN, name)
    # In autocommit, so the reset opens no transaction (the connection is idle here:
    # switching costs no round trip).
    is_async = inspect.iscoroutinefunction(driver.commit)
    autocommit = driver.autocommit
    if is_async:
        if left_open:
            await_only(driver.execute("ROLLBACK"))
        if sql and not autocommit:
            await_only(driver.set_autocommit(True))
        if sql:
            await_only(driver.execute(sql, **options))
        if sql and not autocommit:
            await_only(driver.set_autocommit(False))
    elif left_open or sql:
        cursor = driver.cursor()
        try:
            if left_open:
                cursor.execute("ROLLBACK")
            if sql:
                driver.autocommit = True
                cursor.execute(sql, **options)
        finally:
            cursor.close()
            driver.autocommit = autocommit
    _restore_settings(driver, package, settings)
    backlog = getattr(driver, "_notifies_backlog", None)  # psycopg >= 3.2
    if backlog:
        backlog.clear()  # notifications of the unit's LISTEN, for the next notifies()


def _use_failure(
    info: _PoolInfo, exc: BaseException, committed: bool, committing: bool = False
) -> TetherError | None:
    """What the unit's failure *exc* (raised by the endpoint) is answered with, if not
    itself. *committed*: the endpoint's own ``commit()`` went through before it, so a lost
    connection is no longer "nothing was committed" (a 503 that a retry, or an
    ``idempotent`` route, would answer by repeating what was committed), but a 500.
    *committing*: it began one, which may have committed before the connection was lost:
    a 500 too."""
    if read_only(exc):  # the server's (`_read_only_server`): the pool is being replaced
        if committed:
            said = _describe_db(exc)
            cause = f"the server refused a write as read-only, as a replica does: {said}"
            return lost_after_commit(info.name, cause)
        return read_only_failure(info.name)
    if isinstance(exc, sa_exc.TimeoutError):
        return info.timed_out(exc)
    if isinstance(exc, sa_exc.OperationalError) and sqlite_busy(exc.orig):
        if committed:
            return None  # a 503 would have the client write again what the commit wrote
        return _locked(info, exc)
    if _is_lost(exc):
        if committed:
            return lost_after_commit(info.name, _describe_db(exc))
        at_commit = isinstance(exc, sa_exc.DBAPIError) and exc.statement is None
        if committing and at_commit and not _refused_to_send(cast("sa_exc.DBAPIError", exc)):
            # Lost at the COMMIT itself (SQLAlchemy names no statement for it): not in the
            # commit's flush (its INSERT names one: no COMMIT was sent), nor after a
            # commit that failed before it, and was rolled back, nor a COMMIT asyncpg
            # refused to send on a connection it knew closed.
            return lost_at_commit(info.name, _describe_db(exc))
        # The server ended the transaction with the connection: nothing was committed.
        return connection_lost(info.name, _describe_db(exc))
    return None


def _commit_locked(
    info: _PoolInfo, exc: sa_exc.DBAPIError, s: Session
) -> ResourceUnavailable | None:
    """The 503 for tether's own ``COMMIT`` refused as SQLite's "database is locked" (nothing
    committed: rolled back), unless the endpoint's own ``commit()`` wrote something before."""
    if not sqlite_busy(exc.orig) or cast("_Guarded", s)._tether_committed:
        return None
    return _locked(info, exc)


def _locked(info: _PoolInfo, exc: sa_exc.DBAPIError) -> ResourceUnavailable:
    """The 503 for SQLite's "database is locked" (*exc*), with nothing written: another
    connection held the lock past SQLite's busy timeout (in a statement, or at ``COMMIT``, which
    waits for the readers of a rollback journal), or committed after this unit of work's first
    read (a WAL snapshot too old to write from). As the aiosqlite integration answers it."""
    url = getattr(info.engine, "url", None)
    db = repr(url.database) if isinstance(url, URL) and url.database else "(in memory)"
    said = _describe_db(exc)
    snapshot = getattr(exc.orig, "sqlite_errorcode", None) == SQLITE_BUSY_SNAPSHOT
    if snapshot:
        reason = (
            f"another writer committed to the SQLite database {db} after this unit of work "
            f"first read it, so it cannot write from that read ({said}: SQLITE_BUSY_SNAPSHOT, "
            f"refused at once); nothing was written. Retry it"
        )
    else:
        statement = (exc.statement or "").lstrip().upper()
        if exc.statement is None:
            during = "at COMMIT"
        elif statement.startswith(("SELECT", "WITH", "PRAGMA")):
            during = "a read waited for the lock"
        else:
            during = "a statement waited for the write lock"
        path = url.database if isinstance(url, URL) else None
        # (its `-wal` file is there while a connection has it open in WAL mode)
        in_wal = bool(path) and os.path.exists(f"{path}-wal")
        wal = "" if in_wal else "use WAL mode (its readers never block the writer), "
        reason = (
            f"the SQLite database {db} is locked by another writer ({during}; {said}); "
            f"nothing was written. Retry shortly; if it persists, keep the transactions that "
            f"write short, {wal}or let a writer wait longer for the lock: "
            f"connect_args={{'timeout': 15}} (SQLite's busy timeout, in seconds: 5 by default)"
        )
    locked = ResourceUnavailable(
        redact(f"Engine {info.name!r}: {reason}."),
        resource=info.name,
        timed_out=not snapshot,  # SQLite's wait of its busy timeout (a snapshot: at once)
    )
    locked._busy = True  # type: ignore[attr-defined]  # busy, not down: no outage line
    return locked


# --------------------------------------------------------------------------- engine options


def _resolve_url(url: Url, name: str) -> URL:
    raw = plain_dsn(url() if callable(url) else url)  # a function may return anything
    example = "lambda: os.environ['DATABASE_URL']"
    check_dsn_value(raw, "", what="URL", example=example, returned=callable(url), strings=False)
    remember_secrets(raw)  # its password, for redact(): SQLAlchemy's errors may quote it
    if not isinstance(raw, str | URL):  # SQLAlchemy's error would print it, password and all
        given = "the function given for the URL returned" if callable(url) else "the URL is"
        msg = (
            f"{given} a {type(raw).__name__}, not a string or a sqlalchemy.engine.URL; build "
            f"the URL from it (URL.create(...))."
        )
        raise TypeError(msg)
    return _read_url(raw, name, returned=callable(url))


def _unique_statement_name() -> str:
    # Named prepared statements must not collide across the client connections PgBouncer
    # multiplexes onto one server connection (transaction mode).
    return f"__tether_{uuid.uuid4().hex}__"


def _is_memory_sqlite(u: URL) -> bool:
    if u.get_backend_name() != "sqlite":
        return False
    db = u.database or ""
    return db in ("", ":memory:") or u.query.get("mode") == "memory" or ":memory:" in db


#: SQLAlchemy's own dialects and their drivers: for the "did you mean" of one it has not.
_DIALECTS = {
    "postgresql": ("asyncpg", "psycopg", "psycopg2", "pg8000", "psycopg2cffi"),
    "sqlite": ("aiosqlite", "pysqlite", "pysqlcipher"),
    "mysql": ("aiomysql", "asyncmy", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"),
    "mariadb": ("aiomysql", "asyncmy", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"),
    "oracle": ("oracledb", "cx_oracle"),
    "mssql": ("pyodbc", "pymssql", "aioodbc"),
}


def _read_url(url: str | URL, name: str, *, returned: bool = False) -> URL:
    """``make_url(url)``, or a ``ValueError`` naming the engine and the fix: a string
    SQLAlchemy cannot read as a URL, or a port that is not a number (SQLAlchemy's error
    quotes it, which may be a piece of an unencoded password); *returned*: by the function
    given for it, marked as no retry mends it. Never quotes the URL."""
    try:
        return make_url(url)
    except (sa_exc.ArgumentError, ValueError) as exc:
        given = "the function given for the URL returned one" if returned else "the URL is one"
        port = isinstance(exc, ValueError) and "int()" in str(exc)
        why = (
            "its port is not a number, or a password holding '/', '?', '#' or '@' is not "
            "URL-encoded (%2F, %3F, %23, %40)"
            if port
            else f"{type(exc).__name__}: {unstopped(str(exc))}"
        )
        msg = (
            f"Engine {name!r}: {given} SQLAlchemy cannot read: {why}. No engine can be made "
            f"with it, and no retry mends that. Pass dialect+driver://user:password@host:port/"
            f"database, e.g. 'postgresql+asyncpg://app:pw@db:5432/app' (or build one from its "
            f"parts with sqlalchemy.engine.URL.create, which encodes the password)."
        )
        error = ValueError(msg)
        raise (for_good(error) if returned else error) from None


def _check_dialect(u: URL, name: str, *, is_async: bool, returned: bool = False) -> None:
    """Refuse a URL whose dialect or driver SQLAlchemy has not (``postgres://``, as hosting
    platforms give it, a typo in the driver): SQLAlchemy's ``NoSuchModuleError`` at startup
    was retried as a database slow to come up. A ``ValueError`` naming the close match;
    *returned*: by the function given for the URL, marked as no retry mends it."""
    try:
        u.get_dialect(_is_async=is_async)
    except sa_exc.NoSuchModuleError as exc:
        backend, _, driver = u.drivername.partition("+")
        wanted = "postgresql+asyncpg" if is_async else "postgresql+psycopg"
        if backend in ("postgres", "pgsql", "pg"):
            fix = (
                f"SQLAlchemy names PostgreSQL's dialect 'postgresql' (a {backend}:// URL, as "
                f"hosting platforms give it, is read by libpq and asyncpg, not SQLAlchemy): "
                f"use {wanted}://..., e.g. lambda: os.environ['DATABASE_URL'].replace("
                f"'{backend}://', '{wanted}://', 1)."
            )
        elif backend not in _DIALECTS:
            near = closest(backend, _DIALECTS)
            fix = (
                f"Did you mean {near!r}?"
                if near is not None
                else f"SQLAlchemy's own are {', '.join(map(repr, sorted(_DIALECTS)))}; another "
                f"needs its package installed."
            )
        else:
            near = closest(driver, _DIALECTS[backend])
            fix = (
                f"Did you mean '{backend}+{near}'?"
                if near is not None
                else f"Its drivers include {', '.join(_DIALECTS[backend])}."
            )
        msg = (
            f"Engine {name!r}: SQLAlchemy has no dialect {u.drivername!r} (NoSuchModuleError: "
            f"{exc}), so no engine can be made, and no retry mends that. {fix}"
        )
        error = ValueError(msg)
        raise (for_good(error) if returned else error) from None
    except Exception:  # anything else: create_engine says it, as the app starts
        return


def _check_async_driver(u: URL, name: str) -> None:
    """Refuse a URL of a sync driver for :func:`engine` (an async engine), saying which."""
    try:
        # The dialect create_async_engine picks (psycopg's async one for postgresql+psycopg).
        is_async = getattr(u.get_dialect(_is_async=True), "is_async", False)
    except Exception:  # a driver SQLAlchemy does not know: create_engine says what is wrong
        return
    if is_async:
        return
    backend = u.get_backend_name()
    drivers = {
        "sqlite": "'sqlite+aiosqlite'",
        "postgresql": "'postgresql+asyncpg' or 'postgresql+psycopg'",
        "mysql": "'mysql+aiomysql' or 'mysql+asyncmy'",
    }.get(backend, "an async one")
    msg = (
        f"Engine {name!r}: {u.drivername!r} is a sync driver, and engine() makes an async "
        f"engine, which needs an async driver: use {drivers} in the URL (e.g. "
        f"{u.set(drivername=_ASYNC_DRIVER.get(backend, u.drivername)).render_as_string()!r}), "
        f"or declare a sync engine with sync_engine()."
    )
    raise ValueError(msg)


_ASYNC_DRIVER = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_SYNC_DRIVER = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def _check_sync_driver(u: URL, name: str) -> None:
    """Refuse a URL of an async driver for :func:`sync_engine`, saying which (SQLAlchemy's
    own error, at startup, blamed the pool class and suggested retries)."""
    try:
        is_async = getattr(u.get_dialect(), "is_async", False)
    except Exception:  # a driver SQLAlchemy does not know: create_engine says what is wrong
        return
    if not is_async:
        return
    backend = u.get_backend_name()
    drivers = {
        "sqlite": "'sqlite'",
        "postgresql": "'postgresql+psycopg' or 'postgresql+psycopg2'",
        "mysql": "'mysql+pymysql' or 'mysql+mysqldb'",
    }.get(backend, "a sync one")
    example = u.set(drivername=_SYNC_DRIVER.get(backend, backend)).render_as_string()
    msg = (
        f"Engine {name!r}: {u.drivername!r} is an async driver, and sync_engine() makes a "
        f"sync engine, which needs a sync driver: use {drivers} in the URL (e.g. "
        f"{example!r}), or declare an async engine with engine() and its sessions with "
        f"session()."
    )
    raise ValueError(msg)


def _options(
    u: URL,
    *,
    name: str,
    pool_size: int,
    max_overflow: int,
    pool_timeout: float,
    pool_pre_ping: bool,
    pgbouncer: bool,
    application_name: str | None,
    connect_timeout: float | None,
    engine_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """``create_engine`` keyword arguments for *u*: the pool, and the driver's settings."""
    options = dict(engine_kwargs)
    connect_args: dict[str, Any] = dict(options.pop("connect_args", None) or {})
    backend = u.get_backend_name()
    driver = u.get_driver_name()
    if "poolclass" not in options and not _is_memory_sqlite(u):
        options.setdefault("pool_size", pool_size)
        options.setdefault("max_overflow", max_overflow)
        options.setdefault("pool_timeout", pool_timeout)
    options.setdefault("pool_pre_ping", pool_pre_ping)
    if backend == "postgresql":
        if driver == "asyncpg":
            if application_name is not None:
                settings = dict(connect_args.get("server_settings") or {})
                settings.setdefault("application_name", application_name)
                connect_args["server_settings"] = settings
            if connect_timeout is not None:
                connect_args.setdefault("timeout", connect_timeout)
            if pgbouncer:
                # No statement cache on either side, and unique names for the statements
                # SQLAlchemy still prepares (SQLAlchemy docs, "Prepared Statement Name
                # with PGBouncer").
                connect_args.setdefault("statement_cache_size", 0)
                connect_args.setdefault("prepared_statement_cache_size", 0)
                connect_args.setdefault("prepared_statement_name_func", _unique_statement_name)
        elif driver in ("psycopg", "psycopg_async", "psycopg2", "psycopg2cffi"):
            if application_name is not None:
                connect_args.setdefault("application_name", application_name)
            if connect_timeout is not None:
                # libpq takes whole seconds (and treats 1 as 2).
                connect_args.setdefault("connect_timeout", max(2, round(connect_timeout)))
            if pgbouncer and driver.startswith("psycopg") and not driver.startswith("psycopg2"):
                connect_args.setdefault("prepare_threshold", None)  # never prepare
        elif pgbouncer:
            msg = (
                f"Engine {name!r}: pgbouncer=True does not know how to configure the "
                f"{driver!r} driver. Use postgresql+asyncpg or postgresql+psycopg, or "
                f"configure the driver yourself with connect_args=."
            )
            raise ValueError(msg)
    elif pgbouncer:
        msg = f"Engine {name!r}: pgbouncer=True is for PostgreSQL URLs, not {backend!r}."
        raise ValueError(msg)
    if _is_memory_sqlite(u) and "poolclass" not in options:
        # One connection for every thread and task: SQLAlchemy's default for a sync engine
        # is one per thread (SingletonThreadPool), and tether opens and closes sessions in
        # threads of its own, each of which would see a database of its own, empty; a
        # shared-cache URI (`file::memory:?cache=shared`) gets a queue pool, whose
        # connections lock each other's tables.
        options["poolclass"] = StaticPool
        connect_args.setdefault("check_same_thread", False)
    if connect_args:
        options["connect_args"] = connect_args
    return options


def _budget(
    lc: Lifecycle,
    info: _PoolInfo,
    server_max: tuple[int | None, str | None],
    *,
    budget: BudgetPolicy,
    workers: int | None,
    reserved: int,
) -> None:
    if server_max[0] is None:  # not read (not PostgreSQL, PgBouncer, "off"), or none given
        return
    per_worker = info.limit
    if per_worker is None:
        log.warning(
            "tether: engine %r has max_overflow=-1 (no limit): its connection budget "
            "cannot be checked; set max_overflow to a number.",
            info.name,
        )
        return
    check_budget(
        info.name,
        server_max=server_max[0],
        per_worker=per_worker,
        workers=worker_count(workers),
        reserved=reserved,
        policy=budget,
        lc=lc,
        server=server_max[1],
    )


async def _first_row(conn: AsyncConnection, query: str) -> Any:
    return (await conn.execute(text(query))).one()


def _read_budget_sync(
    conn: Connection, name: str, policy: BudgetPolicy
) -> tuple[int | None, str | None]:
    """`_common.read_budget` on a sync engine's connection (in its thread, no event loop)."""
    try:
        row = conn.execute(text(BUDGET_QUERY)).one()
        return int(row[0]), str(row[1])
    except sa_exc.DBAPIError as exc:
        if not budget_refused(name, exc):
            raise
    conn.rollback()  # the refused query aborted the transaction
    try:
        return int(conn.execute(text(BUDGET_FALLBACK)).one()[0]), None
    except sa_exc.DBAPIError as exc:
        if budget_unread(name, exc, policy):
            return None, None
        raise


def _wants_budget(u: URL, pgbouncer: bool, budget: BudgetPolicy, name: str) -> bool:
    if budget == "off" or u.get_backend_name() != "postgresql":
        return False
    if pgbouncer:
        log.info(
            "tether: engine %r connects through PgBouncer: the server's max_connections "
            "is PgBouncer's to share, so the connection budget is not checked here "
            "(check max_client_conn and the pool sizes of PgBouncer instead).",
            name,
        )
        return False
    return True


def _check_of(check: bool | Check | None, default: Check) -> Check | None:
    if check is True:
        return default
    if check is False or check is None:
        return None
    return check


def _register_engine(
    lc: Lifecycle,
    factory: Callable[..., Any],
    *,
    name: str,
    check: Check | None,
    retries: int,
    backoff: float,
    required: bool,
    info: _PoolInfo,
) -> Resource[Any]:
    res = lc.resource(
        scope="app", name=name, check=check, retries=retries, backoff=backoff, required=required
    )(factory)
    _pools[res] = info
    res.pool_stats = lambda eng: _figures(name, eng, info)
    res.saturation = lambda eng: _saturation(info, eng)
    res.aside_check = lambda eng, within: _aside_check(info, eng, within)
    return res


def _aside_check(info: _PoolInfo, eng: Any, within: float) -> Awaitable[None] | None:
    """A busy async engine's check (``Resource.aside_check``): ``SELECT 1`` on a connection
    of its own, made by the dialect with the arguments of the pool's last connect, outside
    the pool, once none has been handed out for longer than *within* (the check's timeout,
    which bounds it). Not for a sync engine (a thread no timeout interrupts)."""
    params = info.connect_params
    if params is None or not isinstance(eng, AsyncEngine) or info.served is None:
        return None
    if info.pgbouncer:
        return None  # its SELECT would queue behind the traffic too
    if time.monotonic() - info.served <= within:
        return None
    return _select_1_aside(*params)


async def _select_1_aside(dialect: Any, cargs: Any, cparams: Any) -> None:
    def probe() -> None:
        try:
            conn = dialect.connect(*cargs, **cparams)
        except Exception as exc:
            if next(sqlstates(exc), None) is not None:
                return  # the server answered (too many clients, say): it is not frozen
            raise
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            cursor.close()
        finally:
            conn.close()

    await greenlet_spawn(probe)


def _figures(name: str, eng: Any, info: _PoolInfo | None = None) -> PoolStats:
    """The figures of an engine's queue pool (an async engine's too); other pools (SQLite's
    single connection, ``NullPool``) have none, and are left out."""
    pool = eng.pool
    idle, in_use = _idle(pool), int(pool.checkedout())
    overflow = int(getattr(pool, "_max_overflow", 0))
    return PoolStats(
        name=name,
        max=int(pool.size()) + overflow if overflow >= 0 else None,
        open=idle + in_use,
        in_use=in_use,
        idle=idle,
        waiting=None,  # SQLAlchemy does not say
        created=info.created if info is not None else None,
        create_time=info.create_time if info is not None else None,
        discarded=info.discarded if info is not None else None,
    )


def _idle(pool: Any) -> int:
    """The connections idle in *pool*: its checked-in records that hold one. A record whose
    connection was invalidated (a cancelled query, a lost server) stays in the queue empty,
    to connect again when next checked out; ``checkedin()`` counts it all the same."""
    queue = getattr(pool, "_pool", None)
    # SQLAlchemy's queues: the async one wraps an asyncio queue (made on first use), whose
    # items are in `_queue`; the thread one keeps them in `queue`.
    inner = getattr(queue, "__dict__", {}).get("_queue", queue)
    records = getattr(inner, "_queue", None) if inner is not queue else None
    if records is None:
        records = getattr(queue, "queue", None)
    if records is None:
        return int(pool.checkedin())
    return sum(1 for record in list(records) if record.dbapi_connection is not None)


def _saturation(info: _PoolInfo, eng: Any) -> tuple[bool, str] | None:
    if info.served is None or info.max_overflow < 0:
        return None
    figures = _figures(info.name, eng)
    figures = dataclasses.replace(figures, waiting=info.waiting)
    return saturation(
        figures, info.served, info.pool_timeout, "pool_timeout", timed_out_at=info.timed_out_at
    )


# --------------------------------------------------------------------------- async engine


_POOL_LOGGER = f"{AsyncAdaptedQueuePool.__module__}.{AsyncAdaptedQueuePool.__name__}"


def _loop_bound_pool(bound: LoopBound, info: _PoolInfo) -> type[AsyncAdaptedQueuePool]:
    """SQLAlchemy's async queue pool, refusing to hand out a connection on another loop.

    The check runs before the pool takes a connection (and before its pre-ping, which on
    another loop fails deep in the driver with "attached to a different loop"). A pool
    recreated by ``dispose()`` or an invalidation keeps the class, so the check too. It
    also notes when it last handed out a connection (readiness under load).
    """
    info.served = time.monotonic()

    class LoopBoundPool(AsyncAdaptedQueuePool):
        # SQLAlchemy names a pool's logger after its class: the name of the pool it is, so
        # that `sqlalchemy.pool` logging (its debug recipe, its WARN default) covers it.
        _sqla_logger_namespace = _POOL_LOGGER

        def _do_get(self) -> ConnectionPoolEntry:
            bound.check()
            try:
                entry = super()._do_get()
            except sa_exc.TimeoutError:
                info.timed_out_at = time.monotonic()  # also a wait outside tether's sessions
                raise
            _took_connection()
            return entry

        def _inc_overflow(self) -> bool:
            made = super()._inc_overflow()
            if made:  # a connection is being made for the unit: no longer free for others
                _took_connection()
            return made

    return LoopBoundPool


def _sync_pool(info: _PoolInfo) -> type[QueuePool]:
    """SQLAlchemy's queue pool, whose wait for a connection is what is left of the unit of
    work's bound (`_Ticket`): a sync session first waits for a token of its limiter, on the
    event loop, and the two waits together last ``pool_timeout`` at most, as an async
    session's one wait does. It notes its hand-outs for the unit's ask too."""

    class SyncPool(QueuePool):
        _sqla_logger_namespace = f"{QueuePool.__module__}.{QueuePool.__name__}"
        _tether_timeout: float

        @property
        def _timeout(self) -> float:  # read by QueuePool._do_get, in the unit's thread
            ticket = _ASKING.get()
            configured = self._tether_timeout
            if ticket is None or ticket.state == _TAKEN:
                return configured
            return ticket.remaining(configured)

        @_timeout.setter
        def _timeout(self, value: float) -> None:
            self._tether_timeout = value

        def _do_get(self) -> ConnectionPoolEntry:
            entry = super()._do_get()
            _took_connection()
            return entry

        def _inc_overflow(self) -> bool:
            made = super()._inc_overflow()
            if made:
                _took_connection()
            return made

    return SyncPool


async def _select_one(eng: AsyncEngine) -> None:
    _same_sqlite_file(eng.sync_engine)
    async with eng.connect() as conn:
        await conn.execute(_check_query(eng.sync_engine))


def _check_query(eng: Engine) -> Any:
    """The default check's statement: ``SELECT 1``; on SQLite, one that reads the file (its
    header), as the aiosqlite integration's check does: ``SELECT 1`` passed while another
    process held a lock that made every unit of work a 503 (trial 30)."""
    if eng.dialect.name == "sqlite" and not _is_memory_sqlite(eng.url):
        return _READ_THE_FILE
    return _SELECT_1


_SELECT_1 = text("SELECT 1")
_READ_THE_FILE = text("PRAGMA schema_version")


def _sqlite_check_late(u: URL, options: Mapping[str, Any]) -> str | None:
    """What a readiness check of an SQLite file that does not finish in time waits for."""
    if u.get_backend_name() != "sqlite" or _is_memory_sqlite(u):
        return None
    busy = (options.get("connect_args") or {}).get("timeout")
    if busy is None and "timeout" in u.query:  # (the URL's ?timeout=30: trial 36)
        return sqlite_lock_hint(f"timeout={u.query['timeout']} in the URL")
    return sqlite_lock_hint(f"connect_args={{'timeout': {5 if busy is None else busy!r}}}")


def _note_sqlite_file(eng: Engine, u: URL) -> None:
    """Note which file an SQLite engine opened (its device and inode), once it is open, and
    keep to it: once the file is deleted, SQLite would create a new, empty one for each new
    connection ("no such table", and a restart would find it empty), while the pooled ones
    go on reading the deleted one (SQLite refuses their writes: "attempt to write a readonly
    database", a 500), and `SELECT 1` passes on either. New connections open the file
    read-write without creating it, and a checkout after the file changed refuses the pooled
    connection: a 503 naming the file (`_open_failure`), and the engine's check fails
    (`_same_sqlite_file`)."""
    database = u.database or ""
    if u.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return
    if database.startswith("file:") or u.query.get("mode") == "memory":
        return  # a URI: opened as given
    try:
        watch = FileWatch(os.path.abspath(database))
    except OSError:
        return
    eng._tether_sqlite_file = watch  # type: ignore[attr-defined]
    uri = f"{Path(watch.path).as_uri()}?mode=rw"

    def open_existing(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        if cargs and isinstance(cargs[0], str) and not cparams.get("uri"):
            cargs[0] = uri
            cparams["uri"] = True

    def same_file(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        problem = _sqlite_file_problem(watch)
        if problem is not None:
            raise _SQLiteFileChanged(problem)  # SQLAlchemy discards the connection

    event.listen(eng, "do_connect", open_existing)
    event.listen(eng, "checkout", same_file)


class _SQLiteFileChanged(RuntimeError):
    """A checkout refused: the engine's SQLite file is gone, or another is at its path."""


def _sqlite_file_problem(watch: FileWatch) -> str | None:
    changed = watch.changed()
    if changed is None:
        return None
    if changed == "gone":
        return (
            f"the SQLite file {watch.path!r} is gone (deleted, or its volume unmounted, after "
            f"the app started): tether opens no new connection to it (SQLite would create it "
            f"anew, empty) and refuses the pooled ones (they would read the deleted file). "
            f"Put the same file back (moved back, not a copy), or restart the app to open "
            f"the one at its path then (a copy restored from a backup, or a new, empty one)"
        )
    return (
        f"another file is at the SQLite file's path {watch.path!r} now, not the one the app "
        f"opened at startup (replaced, or restored from a copy, after the app started): "
        f"tether refuses the pooled connections (they would read the file they opened) and "
        f"serves only that file while the app runs. Restart the app to open the one at its "
        f"path now"
    )


def _same_sqlite_file(eng: Engine) -> None:
    """Fail the check of an SQLite engine whose file was deleted or replaced since it
    opened (`_note_sqlite_file`)."""
    watch: FileWatch | None = getattr(eng, "_tether_sqlite_file", None)
    problem = _sqlite_file_problem(watch) if watch is not None else None
    if problem is not None:
        raise RuntimeError(f"{problem}.")


def _locked_at_startup(name: str, u: URL, exc: sa_exc.OperationalError) -> bool:
    """Whether *exc*, of the startup's read of an SQLite file, is a lock another connection
    holds (a migration, a backup): said, and the engine opens all the same, its units of work
    answered 503 while it lasts, as before the startup read the file (it failed the start,
    worded as a server that cannot be reached: trial 33)."""
    if u.get_backend_name() != "sqlite" or not sqlite_busy(exc.orig):
        return False
    log.warning(
        "tether: engine %r: the SQLite database %r is locked by another connection as the app "
        "starts (%s); starting all the same: units of work wait for the lock (the busy "
        "timeout), and are answered 503 while it lasts",
        name,
        u.database,
        _describe_db(exc),
    )
    return True


def _said_in_memory(u: URL, name: str, options: Mapping[str, Any]) -> None:
    """Say, as the engine opens, what an in-memory SQLite database shares: its one connection
    (`StaticPool`, tether's choice) has one transaction, which units of work that run at once
    share, so one that fails rolls back the others' writes after their 2xx, in silence
    (trial 30). The aiosqlite integration refuses ``:memory:``; here a test's one request at a
    time is a common, safe use."""
    if _is_memory_sqlite(u) and options.get("poolclass") is StaticPool:
        log.warning(
            "tether: engine %r is an in-memory SQLite database: one connection, whose one "
            "transaction the units of work that run at the same time share, so one that fails "
            "rolls back the writes of the others (answered 2xx), or has its own committed by "
            "another. Fine for a test that sends one request at a time; where requests run at "
            "once, use a file (%s:///./app.db), or rolled_back(session) in tests, which "
            "serialises them.",
            name,
            u.drivername,  # (a sync engine's: sqlite, trial 34)
        )


def _sqlite_path_error(name: str, u: URL, exc: BaseException) -> Exception | None:
    """For an SQLite URL whose path cannot be a database (a directory, a file of something
    else, a directory missing), the error saying so, marked as a mistake no retry mends; it
    read as a server that cannot be reached ("check that the database runs and is
    reachable", retries=, connect_timeout=: trial 30). None for another failure."""
    path = u.database
    if u.get_backend_name() != "sqlite" or not path or _is_memory_sqlite(u):
        return None
    orig = getattr(exc, "orig", None) or exc
    missing = "create it (SQLAlchemy creates the database file, not its directory)."
    if path.startswith("file:") and u.query.get("uri") in ("true", "1"):  # a URI (trial 33)
        file = sqlite_file_of(path)
        return sqlite_cannot_open(f"Engine {name!r}", path, file, orig, missing_dir=missing)
    return sqlite_cannot_open(f"Engine {name!r}", path, Path(path), orig, missing_dir=missing)


def _check_pool_numbers(
    where: str,
    pool_size: object,
    max_overflow: object,
    pool_timeout: object,
    connect_timeout: object,
    max_waiting: object,
    reserved: object,
    workers: object,
) -> None:
    """Refuse an engine's numbers of the wrong type or range when it is declared (a string
    from the environment would fail only at startup, or when the pool is full)."""
    check_number(max_waiting, "max_waiting", where, integer=True, none=True, example="20")
    check_number(pool_size, "pool_size", where, integer=True, least=1, example="5")
    check_number(max_overflow, "max_overflow", where, integer=True, least=None, example="0")
    check_number(pool_timeout, "pool_timeout", where, above=True, example="5")
    check_number(connect_timeout, "connect_timeout", where, above=True, none=True, example="10")
    check_number(reserved, "reserved", where, integer=True, example="3")
    check_number(workers, "workers", where, integer=True, least=1, none=True, example="4")


def _check_engine_flags(where: str, check: object, **flags: object) -> None:
    """Refuse an engine's on/off options that are not bools when it is declared (a string
    from the environment, ``"false"``, would count as true)."""
    for option, value in flags.items():
        check_bool(value, option, where)
    check_check(
        check,
        where,
        default="SELECT 1 on a connection of the engine",
        of="engine",
        example="ping, with `async def ping(engine)` running a statement through "
        "`engine.connect()`",
    )


def _check_no_pool(where: str, engine_kwargs: Mapping[str, Any], fn: str) -> None:
    """Refuse ``pool=`` (a pool already built) when the engine is declared: tether builds
    the engine's pool, and SQLAlchemy refuses the pool options beside it."""
    if "pool" in engine_kwargs:
        msg = (
            f"{where}: pool= is not an option of {fn}(): tether builds the engine's pool "
            f"itself, to bound, count and watch its connections. Pass the pool's options "
            f"instead (pool_size=, max_overflow=, pool_timeout=, pool_recycle=), or "
            f"poolclass=NullPool for no pool."
        )
        raise TypeError(msg)


# The keyword arguments ``create_engine`` takes for itself (the others go to the dialect, the
# DBAPI's import, the pool and the ``Engine``), and its names for the pool's.
_CREATE_ENGINE_OWN = frozenset(
    ("connect_args", "creator", "enable_from_linting", "module", "plugins", "pool", "poolclass")
)
_POOL_KWARG_NAMES = {
    "echo": "echo_pool",
    "logging_name": "pool_logging_name",
    "pre_ping": "pool_pre_ping",
    "recycle": "pool_recycle",
    "reset_on_return": "pool_reset_on_return",
    "timeout": "pool_timeout",
    "use_lifo": "pool_use_lifo",
}
_NOT_KWARGS = frozenset(("cls", "compiler_linting", "dbapi", "dialect", "events", "url"))
_INVALID_ARGUMENTS = re.compile(r"Invalid argument\(s\) (.*) sent to create_engine\(\)")


def _engine_kwarg_names(u: URL, options: Mapping[str, Any], *, is_async: bool) -> set[str]:
    """The keyword arguments ``create_engine`` (``create_async_engine``) would take for *u*,
    as it reads them (the close match of one it refused); empty if they cannot be read."""
    from sqlalchemy.util import get_cls_kwargs, get_func_kwargs

    names = set(_CREATE_ENGINE_OWN) | ({"async_creator"} if is_async else set())
    try:
        dialect_cls: Any = u.get_dialect(_is_async=is_async)
        names |= get_cls_kwargs(dialect_cls) | set(get_func_kwargs(dialect_cls.import_dbapi))
        pool_cls = options.get("poolclass") or dialect_cls.get_pool_class(u)
        names |= {_POOL_KWARG_NAMES.get(k, k) for k in get_cls_kwargs(pool_cls)}
        names |= get_cls_kwargs(Engine)
    except Exception:  # pragma: no cover - a dialect or pool class SQLAlchemy cannot read
        return set()
    return {n for n in names if not n.startswith("_") and n not in _NOT_KWARGS}


def _kwargs_refused(
    exc: TypeError,
    u: URL,
    name: str,
    engine_kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    is_async: bool,
) -> TypeError:
    """tether's message for *exc*, the ``TypeError`` of ``create_engine`` for the options
    :func:`engine` (*is_async*) or :func:`sync_engine` gave it: the keyword arguments it
    refused (``pool_recylce=5``), each with its close match."""
    fn = "engine" if is_async else "sync_engine"
    made_by = "create_async_engine" if is_async else "create_engine"
    dialect = f"{u.get_backend_name()}+{u.get_driver_name()}"
    found = _INVALID_ARGUMENTS.match(str(exc))
    refused = re.findall(r"'([^']*)'", found.group(1)) if found else []
    unknown = [k for k in engine_kwargs if k in refused]
    if not unknown or len(unknown) != len(refused):  # not SQLAlchemy's usual refusal
        shown = redact(str(exc)).rstrip(".")
        msg = (
            f"Engine {name!r}: {made_by}() for {dialect} refused the keyword arguments given "
            f"to {fn}(): {shown}."
        )
        return TypeError(msg)
    import sqlalchemy

    from ._common import keyword_names

    own = engine if is_async else sync_engine
    known = _engine_kwarg_names(u, options, is_async=is_async) | keyword_names(own)
    known -= {"lc", "url"}
    busy = [k for k in unknown if "busy" in k or k == "timeout"]
    if u.get_backend_name() == "sqlite" and busy:
        # The aiosqlite integration's busy_timeout=: not pool_timeout=, its close match.
        msg = (
            f"Engine {name!r}: {busy[0]}= is not an option of {fn}(): SQLite's busy timeout "
            f"(how long a statement waits for a lock another connection holds) is the "
            f"driver's, connect_args={{'timeout': 5}} (in seconds: 5 by default). "
            f"pool_timeout= bounds the wait for one of the pool's connections."
        )
        return TypeError(msg)
    listed, verb, them = unknown_keywords(unknown, known)
    msg = (
        f"Engine {name!r}: {listed} {verb} of {fn}() nor of {made_by}() for "
        f"{dialect} (SQLAlchemy {sqlalchemy.__version__}), which {fn}() passes its other "
        f"keyword arguments to. Fix or remove {them}."
    )
    return TypeError(msg)


def _create_engine(
    u: URL,
    name: str,
    options: dict[str, Any],
    engine_kwargs: Mapping[str, Any],
    *,
    is_async: bool,
) -> Any:
    """``create_async_engine(u, **options)`` (*is_async*) or ``create_engine``: it does not
    connect. A keyword argument SQLAlchemy does not take is a ``TypeError`` naming it and its
    close match (`_kwargs_refused`), at the declaration or, for a URL from a function, as the
    app starts (not retried: a mistake in the configuration, as SQLAlchemy's ``ArgumentError``
    for an option's value)."""
    try:
        if is_async:
            return create_async_engine(u, **options)
        return create_engine(u, **options)
    except TypeError as exc:
        raise _kwargs_refused(exc, u, name, engine_kwargs, options, is_async=is_async) from None
    except sa_exc.ArgumentError as exc:  # an option's value SQLAlchemy refuses: no retry mends
        for_good(exc)
        raise


def _check_engine_kwargs(
    u: URL,
    name: str,
    engine_kwargs: dict[str, Any],
    options_for: Callable[[URL], dict[str, Any]],
    *,
    is_async: bool,
) -> None:
    """Refuse a keyword argument of :func:`engine` or :func:`sync_engine` that SQLAlchemy
    does not take for *u*'s dialect and driver (``pool_recylce=5``) when it is declared: it
    would fail only as the app starts. SQLAlchemy itself checks them: the engine is built with
    the options the startup gives it (*options_for*), which opens no connection and starts
    no thread, then dropped (about 0.1 ms, once the driver is imported). Not checked here,
    and left to the startup as before: a driver not installed, an option of tether's that
    the startup refuses (``pgbouncer=True`` for another database), ``plugins``."""
    if not engine_kwargs or "plugins" in engine_kwargs or "plugin" in u.query:
        return  # a plugin may take keyword arguments, and is not started for a check
    try:
        options = options_for(u)
    except Exception:  # said as the app starts, as before
        return
    if "pool_size" in options and "poolclass" not in options:
        # The startup's class is a subclass of it, taking the same keyword arguments.
        options["poolclass"] = AsyncAdaptedQueuePool if is_async else QueuePool
    for key in ("echo", "echo_pool"):
        if options.get(key):  # taken whatever its value; a check adds no log handler
            options[key] = False
    try:
        eng = _create_engine(u, name, options, engine_kwargs, is_async=is_async)
    except TypeError:  # tether's message (`_kwargs_refused`)
        raise
    except Exception:  # a driver not installed, a URL not understood: said as the app starts
        return
    getattr(eng, "sync_engine", eng).pool.dispose()  # it holds no connection


def engine(
    lc: Lifecycle,
    url: Url,
    *,
    name: str = "engine",
    pool_size: int = 5,
    max_overflow: int = 0,
    pool_timeout: float = 5.0,
    max_waiting: int | None = None,
    pool_pre_ping: bool = True,
    reset_session: bool = True,
    pgbouncer: bool = False,
    application_name: str | None = None,
    connect_timeout: float | None = 10.0,
    budget: BudgetPolicy = "warn",
    workers: int | None = None,
    reserved: int = 3,
    check: bool | Check = True,
    retries: int = 0,
    backoff: float = 0.5,
    required: bool = True,
    **engine_kwargs: Any,
) -> Resource[AsyncEngine]:
    """Register an app resource holding an ``AsyncEngine``; return it.

    Args:
        url: the database URL (``postgresql+asyncpg://...``, ``postgresql+psycopg://...``,
            ``sqlite+aiosqlite:///path.db``), or a callable returning it, called when the
            app starts (read secrets there, not at import).
        name: the resource's name (what dependents use as a parameter name).
        pool_size, max_overflow, pool_timeout, pool_pre_ping: the pool (SQLAlchemy's own
            ``AsyncAdaptedQueuePool``). A unit of work that waits ``pool_timeout`` seconds
            for a connection gets a :class:`~tether.ResourceUnavailable` (503).
        max_waiting: the most units of work waiting for a connection at once (default: no
            limit). With every connection in use and that many waiting, the next one is
            refused at once (503) instead of waiting ``pool_timeout``.
        reset_session: on PostgreSQL, when a connection goes back to the pool, undo what
            the unit of work left on its session (``SET``, ``SET ROLE``, cursors, ``LISTEN``,
            advisory locks, temporary tables), as asyncpg's pool does: one round trip. The
            callbacks the unit added on the driver's connection (listeners, loggers, notice
            and notify handlers) are dropped too, and a transaction it began itself and left
            open (a raw ``BEGIN`` in autocommit) is rolled back, with a warning; psycopg's and
            psycopg2's transaction settings on the connection object (``autocommit``,
            ``read_only``, ...) go back as the pool's setup left them.
            ``False`` skips it, for code that never changes the session (the next unit of work
            would inherit it).
        pgbouncer: the URL points at PgBouncer in transaction mode: configure the driver
            so it never relies on named prepared statements surviving a transaction
            (asyncpg: no statement caches and unique statement names; psycopg:
            ``prepare_threshold=None``; psycopg2 prepares nothing). The budget check is then
            skipped, and so is the reset of the server's session (``reset_session``): what the
            driver keeps on its connection object is still put back.
        application_name: shown in ``pg_stat_activity`` (PostgreSQL drivers).
        connect_timeout: seconds to establish one connection (PostgreSQL drivers).
        budget, workers, reserved: on PostgreSQL, at startup, check that
            ``workers x (pool_size + max_overflow) + reserved`` fits the server's
            ``max_connections``: ``"warn"`` (default) logs a warning, ``"error"`` fails
            startup, ``"off"`` skips it. ``workers`` defaults to the server's
            ``-w``/``--workers`` (gunicorn, uvicorn), else ``$WEB_CONCURRENCY``, else 1.
        check: ``True`` (default) runs ``SELECT 1`` as the health check; ``False`` none;
            or your own check, given the engine.
        retries, backoff: retry opening at startup (see ``lc.resource``).
        required: ``False`` starts the app without it when it cannot open (see
            ``lc.resource``): what needs it answers 503 until a background retry opens it.
        **engine_kwargs: passed to ``create_async_engine`` (``echo``, ``connect_args``,
            ``pool_recycle``, ``poolclass``, ...).
    """
    _check_pool_numbers(
        f"Engine {name!r}",
        pool_size,
        max_overflow,
        pool_timeout,
        connect_timeout,
        max_waiting,
        reserved,
        workers,
    )
    _check_engine_flags(
        f"Engine {name!r}",
        check,
        pool_pre_ping=pool_pre_ping,
        reset_session=reset_session,
        pgbouncer=pgbouncer,
        required=required,
    )
    check_budget_policy(budget, f"Engine {name!r}")
    _check_no_pool(f"Engine {name!r}", engine_kwargs, "engine")
    # What create_engine is given (the URL aside): checked at declaration, used at startup.
    options_for = functools.partial(
        _options,
        name=name,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=pool_pre_ping,
        pgbouncer=pgbouncer,
        application_name=application_name,
        connect_timeout=connect_timeout,
        engine_kwargs=engine_kwargs,
    )
    from ._common import check_dsn

    example = "lambda: os.environ['DATABASE_URL']"
    check_dsn(url, f"Engine {name!r}", what="URL", example=example, strings=False)
    if isinstance(url, str | URL):  # a function's URL is checked when the app starts
        given = _read_url(url, name)
        _check_dialect(given, name, is_async=True)
        _check_async_driver(given, name)
        _check_engine_kwargs(given, name, engine_kwargs, options_for, is_async=True)
    info = _PoolInfo(name, pool_size, max_overflow, pool_timeout)
    info.pgbouncer = pgbouncer
    info.max_waiting = max_waiting
    info.open_within = pool_timeout + (pool_timeout if connect_timeout is None else connect_timeout)

    async def open_engine() -> AsyncIterator[AsyncEngine]:
        asyncio_only(f"Engine {name!r}", "SQLAlchemy's async engine")
        u = _resolve_url(url, name)
        _check_dialect(u, name, is_async=True, returned=callable(url))
        _check_async_driver(u, name)
        info.shown_url = u.render_as_string(hide_password=True)
        options = options_for(u)
        if "pool_size" in options and "poolclass" not in options:
            options["poolclass"] = _loop_bound_pool(LoopBound(name), info)
        eng = cast("AsyncEngine", _create_engine(u, name, options, engine_kwargs, is_async=True))
        _keep_pool_on_hang_up(eng.sync_engine)
        threads_ended: Callable[[], Awaitable[None]] = _no_threads
        if u.get_backend_name() == "postgresql":
            _refuse_failed_commits(eng.sync_engine, name)
            _close_streams_on_return(eng.sync_engine, name)
            if u.get_driver_name() == "asyncpg":
                _cancel_before_hang_up(eng.sync_engine, name)
            elif u.get_driver_name() == "psycopg" and not pgbouncer:
                _end_after_psycopg_hang_up(eng, name)
        elif u.get_backend_name() == "sqlite":
            _interrupt_cancelled(eng.sync_engine)
            threads_ended = _stopped_once(eng.sync_engine)
        _count_connections(eng.sync_engine, info)
        if reset_session and u.get_backend_name() == "postgresql":
            _reset_sessions(eng.sync_engine, name, server=not pgbouncer)
        try:
            server_max: tuple[int | None, str | None] = (None, None)
            try:
                async with eng.connect() as conn:
                    try:
                        await conn.execute(_check_query(eng.sync_engine))  # (SQLite: read)
                    except sa_exc.OperationalError as exc:
                        if not _locked_at_startup(name, u, exc):
                            raise
                    if _wants_budget(u, pgbouncer, budget, name):
                        server_max = await read_budget(
                            name, budget, functools.partial(_first_row, conn), conn.rollback
                        )
            except Exception as exc:
                if isinstance(exc, sa_exc.ArgumentError):  # an option's value: a mistake
                    for_good(exc)
                failure = _sqlite_path_error(name, u, exc) or _open_failure(info, exc)
                if failure is None:
                    raise
                raise failure from exc
            _budget(lc, info, server_max, budget=budget, workers=workers, reserved=reserved)
        except BaseException:
            forget_budget(lc, name)
            with anyio.CancelScope(shield=True):
                await eng.dispose()
            raise
        _note_sqlite_file(eng.sync_engine, u)
        res.check_late = _sqlite_check_late(u, options)
        info.engine = eng.sync_engine
        log.info("tether: engine %r open on %s", name, redact(info.shown_url))
        _said_in_memory(u, name, options)
        try:
            yield eng
        finally:
            forget_budget(lc, name)
            info.engine = None
            await _cancels_sent()
            await eng.dispose()
            await threads_ended()

    res = _register_engine(
        lc,
        open_engine,
        name=name,
        check=_check_of(check, _select_one),
        retries=retries,
        backoff=backoff,
        required=required,
        info=info,
    )
    res.async_api = "an AsyncEngine"
    return cast("Resource[AsyncEngine]", res)


# --------------------------------------------------------------------------- use after close


class _Guarded:
    """Mixed into the sessions tether hands out: once tether has closed one, starting a
    transaction on it again (what any use of a closed ``Session`` does: it would check a
    connection out of the pool, outside any unit of work, until the garbage collector
    finds it) raises :class:`ResourceClosedError` instead, and counts a leak."""

    _tether_closed: tuple[str, Resource[Any]] | None = None
    _tether_counted = False  # a session used after close is one leak, however often used
    # A transaction of the session committed (`_note_commit`): the endpoint's own commit(),
    # as tether's comes last.
    _tether_committed = False
    # The endpoint began a commit (`_note_committing`), which a lost connection may have
    # cut short before or after the server committed.
    _tether_committing = False
    # Its resource's name; tether's own close at the end of the unit of work (`_end`).
    _tether_name = "session"
    _tether_ending = False

    def close(self) -> None:
        """Refuse the endpoint's own ``close()`` (or ``with session:``) of a session with
        writes not committed: it would roll them back while the request goes on, and
        tether's commit at the end would then commit nothing, or only what came after
        (a 200 for writes lost; trial 13). tether's own close, and a close with nothing
        to lose, go through."""
        if not self._tether_ending and self._tether_closed is None and _loses_writes(self):
            raise ScopeError(_closed_by_the_endpoint(self._tether_name))
        super().close()  # type: ignore[misc]

    def _autobegin_t(self, begin: bool = False) -> Any:
        closed = self._tether_closed
        if closed is not None:
            message, res = closed
            if not self._tether_counted:
                self._tether_counted = True
                res.counters.leaks += 1
            raise ResourceClosedError(message, resource=res.name)
        return super()._autobegin_t(begin)  # type: ignore[misc]

    # With connect=True, the transaction tether began when the session opened, while it is
    # the session's, and what to say to a `begin()` then; and the execution options the
    # session's connections take (``execution_options=``).
    _tether_begun: tuple[Any, _Opened] | None = None

    def _tether_fresh(self) -> _Opened | None:
        """What tether said the session opened with, while its transaction is still the one
        tether began (None otherwise: one the endpoint began after a commit, or none)."""
        begun = self._tether_begun
        if begun is None or begun[0] is not self.get_transaction():  # type: ignore[attr-defined]
            return None
        return begun[1]

    def begin(self, nested: bool = False) -> Any:
        opened = None if nested else self._tether_fresh()
        if opened is not None:
            raise sa_exc.InvalidRequestError(opened.begun)
        return super().begin(nested)  # type: ignore[misc]

    def connection(self, bind_arguments: Any = None, execution_options: Any = None) -> Any:
        opened = self._tether_fresh() if execution_options else None
        if opened is not None:
            # SQLAlchemy would only warn (once) and ignore them: the transaction, at the
            # engine's isolation level, has begun.
            if any(opened.options.get(k, _MISSING) != v for k, v in execution_options.items()):
                raise sa_exc.InvalidRequestError(opened.ignored)
            execution_options = None  # the session's own: in force already
        return super().connection(bind_arguments, execution_options)  # type: ignore[misc]


_MISSING = object()


def _loses_writes(session: Any) -> bool:
    """Whether closing *session* now would lose writes: objects added, changed or deleted
    and not flushed, or a transaction that wrote on the server (PostgreSQL: it has a
    transaction id; SQLite: its connection is in a transaction). Only on a close by the
    endpoint: a query, on PostgreSQL."""
    if session.new or session.deleted or session.dirty:
        return True
    transaction = session.get_transaction()
    if transaction is None:
        return False
    for conn, *_ in list(getattr(transaction, "_connections", {}).values()):
        if conn.closed or conn.invalidated:
            continue
        dialect = conn.dialect.name
        try:
            if dialect == "postgresql":
                if conn.exec_driver_sql(_WROTE).scalar():
                    return True
            elif dialect != "sqlite" or conn.connection.driver_connection.in_transaction:
                return True
        except Exception:  # its transaction failed already: nothing of it can be committed
            continue
    return False


#: Whether the transaction wrote anything on the server: it has a transaction id.
_WROTE = "SELECT txid_current_if_assigned() IS NOT NULL"


def _closed_by_the_endpoint(name: str) -> str:
    return (
        f"Session {name!r} has writes not committed, and the endpoint closed it "
        f"(session.close(), or `with session:`): that would roll them back while the request "
        f"goes on, and answer 200 for writes that were lost. tether commits the session when "
        f"the unit of work succeeds, and closes it: do not close it yourself. Call "
        f"session.commit() to keep the writes now, or session.rollback() to discard them."
    )


@dataclasses.dataclass(frozen=True)
class _Opened:
    """What a session opened with ``connect=True`` says to a ``begin()`` (*begun*) and to
    ``connection(execution_options=...)`` (*ignored*), and its own *options*."""

    begun: str
    ignored: str
    options: dict[str, Any]


def _opened(name: str, fn: str, options: dict[str, Any]) -> _Opened:
    declare = f"{fn}(lc, engine, execution_options={{'isolation_level': 'SERIALIZABLE'}})"
    begun = (
        f"Session {name!r} is in a transaction already: tether began it when the session "
        f"opened (connect=True), and commits it when the unit of work succeeds (rolls it back "
        f"on a failure), so session.begin() cannot begin one. Leave the begin() block out "
        f"(run a part that may fail in session.begin_nested()), or declare the session with "
        f"connect=False to begin its transaction yourself. For the transaction's isolation "
        f"level, declare it: {declare}."
    )
    ignored = (
        f"Session {name!r}: the execution options given to session.connection() would be "
        f"ignored: tether took the session's connection when it opened (connect=True), so its "
        f"transaction has begun with the session's own options (SQLAlchemy only warns, once, "
        f"and the transaction runs at the engine's isolation level). Declare them with the "
        f"session: {declare}; or declare it with connect=False."
    )
    return _Opened(begun, ignored, options)


#: The isolation levels SQLAlchemy knows (PostgreSQL's, MySQL's, SQLite's): a typo fails the
#: declaration. AUTOCOMMIT is refused: a unit of work that commits each statement as it runs
#: cannot be rolled back.
_ISOLATION_LEVELS = ("READ COMMITTED", "READ UNCOMMITTED", "REPEATABLE READ", "SERIALIZABLE")


def _check_execution_options(options: object, where: str) -> dict[str, Any]:
    """Refuse ``execution_options=`` that is not a dict of option names, or whose isolation
    level is not one, when the session is declared; return a copy."""
    example = "execution_options={'isolation_level': 'SERIALIZABLE'}"
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        msg = (
            f"{where}: execution_options must be a dict of SQLAlchemy execution options "
            f"({example}), not a {type(options).__name__}."
        )
        raise TypeError(msg)
    options = dict(options)
    level = options.get("isolation_level")
    if level is not None:
        shown = level.replace("_", " ").upper() if isinstance(level, str) else None
        if shown == "AUTOCOMMIT":
            with_ = "with" if where.startswith("sync_") else "async with"
            msg = (
                f"{where}: isolation_level='AUTOCOMMIT' would commit each statement as it "
                f"runs, so a failing unit of work could not be rolled back. Use the engine "
                f"for that work (`{with_} engine.connect()` with "
                f"`execution_options(isolation_level='AUTOCOMMIT')`), or another level."
            )
            raise ValueError(msg)
        if shown not in _ISOLATION_LEVELS:
            levels = ", ".join(repr(lv) for lv in _ISOLATION_LEVELS)
            msg = f"{where}: isolation_level={level!r} is not an isolation level: use {levels}."
            raise ValueError(msg)
    return options


_guarded_classes: dict[type[Any], type[Any]] = {}


def _guarded(cls: type[Any]) -> type[Any]:
    """*cls* (``Session`` or the user's ``sync_session_class``) with the guard mixed in."""
    guarded = _guarded_classes.get(cls)
    if guarded is None:
        guarded = _guarded_classes[cls] = type(f"Guarded{cls.__name__}", (_Guarded, cls), {})
        event.listen(guarded, "before_commit", _note_committing)
        event.listen(guarded, "after_commit", _note_commit)
    return guarded


def _note_committing(session: Any) -> None:
    """A session's transaction is about to commit (``before_commit``): a connection lost
    from here on may have lost the answer to a ``COMMIT`` the server ran (`_use_failure`)."""
    if not session.in_nested_transaction():
        session._tether_committing = True


def _note_commit(session: Any) -> None:
    """A session's transaction committed (SQLAlchemy's ``after_commit``, which a savepoint's
    release fires too): noted, for a connection lost after it (`_use_failure`). A class
    listener: no cost per session, and one call per commit."""
    if not session.in_nested_transaction():
        session._tether_committed = True


def _closed_message(name: str, release: str) -> str:
    return closed_by_tether("Session", name, release, "it would take a connection outside any")


def _mark_closed(session: Any, message: str, res: Resource[Any]) -> None:
    sync = getattr(session, "sync_session", session)
    if isinstance(sync, _Guarded):
        sync._tether_closed = (message, res)


# --------------------------------------------------------------------------- async session


#: Seconds a rollback or close waits for an operation another task runs on the session.
_BUSY_WAIT = 5.0


def _busy(exc: BaseException) -> bool:
    """Whether *exc* says another task is using the session right now (SQLAlchemy refuses
    a second operation while one is in progress: "concurrent operations are not permitted",
    or a state change while a method is "already in progress"); or a task group's error with
    one such (trial 35)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_busy(inner) for inner in exc.exceptions)
    return isinstance(exc, sa_exc.IllegalStateChangeError) or (
        isinstance(exc, sa_exc.InvalidRequestError)
        and "concurrent operations are not permitted" in str(exc)
    )


_HUNG_UP = "the connection was hung up under that task and discarded"
_CANCELLED = "that task, still waiting for a connection for the session, was cancelled"


#: The fix for a thread still using a `sync_session` as its unit of work ended.
_JOIN = (
    "Join every thread using the session before its unit of work ends: before the endpoint "
    "returns; in a job, `await unit.run_sync(fn, session)` waits for its thread, even when "
    "cancelled."
)


def _still_in_use(name: str, done: str = _HUNG_UP, *, thread: bool = False) -> str:
    """The error of a unit of work that succeeded while a task it started still used its
    session (`_let_go`): *done*, what became of that task (its connection hung up under it,
    or, still waiting for one, the task cancelled). With *thread*, the same for a thread a
    ``def`` endpoint started on a `sync_session` and did not join (`_let_go_sync`)."""
    if thread:
        return (
            f"Session {name!r} was still in use by another thread when its unit of work "
            f"ended (a thread started with it and not joined), so its transaction could not "
            f"be committed: {done}, and the unit of work rolled back. {_JOIN}"
        )
    return still_in_use("Session", name, done)


def _hung_up_at_commit(name: str) -> str:
    """The error of a unit of work whose session a thread the ``def`` endpoint started (and
    did not join) was still committing when tether's wait for it ended (`_let_go_sync`)."""
    return (
        f"Session {name!r} was still in use by another thread when its unit of work ended (a "
        f"thread started with it and not joined), in its own COMMIT of the session after "
        f"{_LET_GO + _BUSY_WAIT:g} s; its connection was hung up under that COMMIT, so "
        f"whether the transaction was committed is not known (the server may have committed "
        f"it). {_JOIN}"
    )


def _used_concurrently(name: str) -> ScopeError:
    done = "The unit of work was rolled back."
    return used_concurrently("Session", name, "SQLAlchemy", done)


async def _when_free(op: Callable[[], Awaitable[Any]]) -> Any:
    """Run a session operation (rollback, close); while another task still runs one on the
    session (concurrent use), wait for it to finish, up to ``_BUSY_WAIT`` seconds: closing
    under it would leave its connection checked out for good."""
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        try:
            return await op()
        except sa_exc.InvalidRequestError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.005)


#: Seconds the end of a unit of work gives an operation another task still runs on its
#: session (the other query of an ``asyncio.gather`` that failed) to end, before it hangs the
#: connection up under that task (`_let_go`); then the seconds that task has to fail and let
#: go of it, before the connection is discarded all the same.
_LET_GO = 0.5


#: In `_held`'s answer: another task is getting the session's transaction a connection (it
#: waits for the pool, or connects).
_CONNECTING = object()
_PROVISIONING = SessionTransactionState.PROVISIONING_CONNECTION


def _held(s: AsyncSession) -> list[Any]:
    """The pool's connections (``PoolProxiedConnection``) of *s* that another task runs an
    operation on now: SQLAlchemy's adapted connection holds its execute lock (asyncpg,
    aiosqlite), or psycopg's connection its own; and `_CONNECTING` if another task is getting
    the session a connection. A few attribute reads; none without a transaction."""
    tx = s.sync_session.get_transaction()
    if tx is None:
        return []
    held: list[Any] = [_CONNECTING] if tx._state is _PROVISIONING else []
    for entry in getattr(tx, "_connections", _NO_CONNECTIONS).values():
        fairy = getattr(entry[0], "_dbapi_connection", None)
        if fairy is None:
            continue
        adapted = fairy.dbapi_connection
        mutex = getattr(adapted, "_execute_mutex", None)
        if not (isinstance(mutex, asyncio.Lock) and mutex.locked()):
            mutex = getattr(getattr(adapted, "driver_connection", None), "lock", None)  # psycopg
            if not (isinstance(mutex, asyncio.Lock) and mutex.locked()):
                continue
        if not any(fairy is h for h in held):
            held.append(fairy)
    return held


_NO_CONNECTIONS: dict[Any, Any] = {}


_LetGo = Literal["free", "discarded", "cancelled"]


async def _let_go(s: AsyncSession, name: str, eng: Any, info: _PoolInfo) -> _LetGo:
    """Whether the session is free for the commit, the rollback or the close ("free"): no
    other task runs an operation on it (a task started with it and not awaited, or the other
    query of an ``asyncio.gather`` that failed). One that ends within `_LET_GO` s is waited
    for. One still running would hold the unit's end until ``close_timeout`` (psycopg waits
    for its lock; a pool connection abandoned), or make it fail (asyncpg refuses): its
    connection is hung up under it (`_hang_up`), so its operation fails with a connection
    error at once, and is discarded ("discarded": what the unit did is lost with it); on
    PostgreSQL its backend, still running the query, is ended (`_end_backends`). A task
    still waiting for a connection for the session (the pool's wait, or a connect) would
    make the rollback and the close fail, then take the connection after the unit's end and
    keep it checked out for good: it is cancelled (`_cancel_connecting`; "cancelled": the
    session is left to roll back). A few attribute reads when nothing holds it."""
    if not _held(s):
        return "free"
    deadline = time.monotonic() + _LET_GO
    while True:
        await asyncio.sleep(0.005)
        held = _held(s)
        if not held:
            return "free"
        if time.monotonic() > deadline:
            break
    if held[0] is _CONNECTING:
        held = held[1:]
        _cancel_connecting(s.sync_session, name)
    if not held:  # no connection taken: nothing to hang up or discard
        deadline = time.monotonic() + _LET_GO
        while _held(s) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # the task wakes, is cancelled, and lets go
        return "cancelled"
    log.warning(
        "tether: session %r: its connection is still in use at the end of its unit of work, "
        "by a task still using the session after its unit of work ended (a task started with "
        "it and not awaited, or the other operation of an `asyncio.gather` that failed); hung "
        "up under that task (its operation fails with a connection error) and discarded (the "
        "pool replaces it), the unit of work rolled back. Await every task using the session "
        "before the unit of work ends, or give each task a session of its own (`async with "
        "lc.scope() as s: await s.get(%s)` in the task).",
        name,
        name,
    )
    pids = []
    own = _pool_of(eng)
    for fairy in held:
        driver = fairy.driver_connection
        # Read first, with no round trip; ended through this engine only if it is this
        # engine's (a session with `binds=` holds other engines' too, maybe on other hosts).
        pid = _pid_of(driver) if getattr(fairy, "_pool", None) is own else None
        with contextlib.suppress(TypeError):  # not weakly referable: the pool is replaced
            _hung_up.add(driver)
        await _hang_up(driver)
        if pid is not None:
            pids.append(pid)
    deadline = time.monotonic() + _LET_GO
    while _held(s) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)  # the task wakes, fails, and lets go
    try:
        await _when_free(s.invalidate)  # counted discarded by the pool's event
    except Exception as exc:  # pragma: no cover - invalidation is best effort
        log.warning("tether: invalidating session %r failed: %s", name, describe(exc))
    if pids and eng.dialect.name == "postgresql" and not info.pgbouncer:
        await _end_backends(eng, pids, name)
    return "discarded"


def _cancel_connecting(sync: Session, name: str) -> None:
    """Cancel the tasks (not this one) getting *sync* a connection: SQLAlchemy's greenlet of
    the task is inside the session's ``_connection_for_bind`` (the pool's wait, or a
    connect). Found by walking each task's awaits (only when the unit of work ends with one)."""
    log.warning(
        "tether: session %r: a task still using the session after its unit of work ended (a "
        "task started with it and not awaited, or the other operation of an `asyncio.gather` "
        "that failed) is still waiting for a connection for it (the pool's wait, or a "
        "connect); that task is cancelled, so that it never takes a connection outside the "
        "unit of work, and the unit of work rolled back. Await every task using the session "
        "before the unit of work ends, or give each task a session of its own (`async with "
        "lc.scope() as s: await s.get(%s)` in the task).",
        name,
        name,
    )
    me = asyncio.current_task()
    found = False
    for task in asyncio.all_tasks():
        if task is not me and not task.done() and _connecting_for(task, sync):
            task.cancel(f"tether: session {name!r}: its unit of work ended")
            found = True
    if not found:  # pragma: no cover - a greenlet not run by a task's greenlet_spawn
        log.warning("tether: session %r: the task waiting for a connection was not found", name)


def _connecting_for(task: asyncio.Task[Any], sync: Session) -> bool:
    """Whether *task* awaits SQLAlchemy's ``greenlet_spawn`` whose greenlet is inside
    *sync*'s ``_connection_for_bind``."""
    awaited: Any = task.get_coro()
    for _ in range(200):  # (a bound: the chain of awaits is short)
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            return False
        if frame.f_code.co_name == "greenlet_spawn":
            inner = getattr(frame.f_locals.get("context"), "gr_frame", None)
            while inner is not None:
                if inner.f_code.co_name == "_connection_for_bind":
                    owner = inner.f_locals.get("self")
                    if owner is sync or getattr(owner, "session", None) is sync:
                        return True
                inner = inner.f_back
            return False
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return False


def _pid_of(driver: Any) -> int | None:
    """The server pid of a psycopg or asyncpg connection, without a query (None: neither)."""
    try:
        info = getattr(driver, "info", None)  # psycopg
        if info is not None:
            return int(info.backend_pid)
        get_pid = getattr(driver, "get_server_pid", None)  # asyncpg
        return int(get_pid()) if get_pid is not None else None
    except Exception:
        return None


#: Seconds `_end_backends` may take (a connection of the pool, one statement per pid).
_STOP_WITHIN = 1.0


async def _end_backends(eng: Any, pids: list[int], name: str) -> None:
    """End on the server the backends of connections hung up mid-query (`_let_go`): a
    backend notices that its client left only when it next writes to it, so the query would
    run to its end (holding its transaction's locks and a connection slot). Through a
    connection of the engine's pool: the one discarded left a slot free. Not behind PgBouncer
    (its pids are PgBouncer's, which drops the server side itself)."""
    try:
        async with asyncio.timeout(_STOP_WITHIN), eng.connect() as other:
            for pid in pids:
                await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await other.commit()
    except Exception as exc:
        log.warning(
            "tether: session %r: could not end backend %s on the server (%s); the query it "
            "was running may run to its end",
            name,
            ", ".join(map(str, pids)),
            describe(exc),
        )


async def _hang_up(driver: Any) -> None:
    """Make the operation another task runs on the driver connection *driver* fail at once,
    without freeing what it waits on: psycopg's socket is shut down (through a copy of its
    descriptor: its C code keeps the connection's pointer across the wait, so closing it
    there would read freed memory; the wait wakes on the shut socket, fails and lets go, and
    the pool's invalidation closes it after); asyncpg's is terminated (its waiting query fails
    with ``ConnectionDoesNotExistError``); aiosqlite's query is interrupted. Best effort."""
    packages = {c.__module__.partition(".")[0] for c in type(driver).__mro__}
    package = next((p for p in ("psycopg", "asyncpg", "aiosqlite") if p in packages), "")
    try:
        if package == "psycopg":
            shut_down_socket(driver.pgconn.socket)
        elif package == "asyncpg":
            driver.terminate()
        elif package == "aiosqlite":
            await driver.interrupt()
    except Exception as exc:  # no socket any more: nothing waits on it
        log.debug("tether: hanging up a connection in use failed: %s", describe(exc))


async def _rollback(s: AsyncSession, name: str, own: AsyncEngine | None, info: _PoolInfo) -> None:
    """Roll back; if that fails (a connection lost or mid-query), invalidate it instead. A
    connection still in use by another task is hung up under it first (`_let_go`), if the
    session's connection is its own, of engine *own* (None: `rolled_back`'s block's)."""
    if own is not None and await _let_go(s, name, own, info) == "discarded":
        return  # discarded, its transaction with it
    try:
        await _when_free(s.rollback)
    except Exception as exc:
        log.warning(
            "tether: rolling back session %r failed (%s); its connection is discarded",
            name,
            _describe_db(exc),
        )
        try:
            await s.invalidate()
        except Exception as again:  # pragma: no cover - invalidation is best effort
            log.warning("tether: invalidating session %r failed: %s", name, describe(again))


def _made_async(engine: object) -> bool | None:
    """Whether *engine*, a resource made by :func:`engine` (an async generator) or
    :func:`sync_engine`, is an async engine; None for any other resource or value."""
    if isinstance(engine, Resource) and _pools.get(engine) is not None:
        return inspect.isasyncgenfunction(engine.factory)
    return None


def _check_engine(lc: Lifecycle, engine: Any, what: str) -> None:
    if isinstance(engine, Resource) and engine.lifecycle is not lc:
        msg = (
            f"{what}: the engine resource {engine.name!r} was declared on another Lifecycle "
            f"than this session. Declare the engine and its sessions on the same Lifecycle "
            f"(the one the app's lifespan runs)."
        )
        raise TypeError(msg)
    if not isinstance(engine, Resource):
        shown = redact(repr(engine))  # a URL given by mistake: never its password
        msg = (
            f"{what}: `engine` must be the resource returned by engine()/sync_engine() (or "
            f"another resource) on this Lifecycle, not {shown}."
        )
        raise TypeError(msg)
    maker = "sync_engine" if what.startswith("sync_") else "engine"
    check_resource(  # a pool of another integration's (an asyncpg pool)
        lc,
        engine,
        where=what,
        param="engine",
        maker=f"tether.integrations.sqlalchemy.{maker}()",
        example=f"tether.integrations.sqlalchemy.{maker}(lc, url)",
    )
    made_async = _made_async(engine)
    if made_async is not None and made_async == what.startswith("sync_"):
        made, use, other = (
            ("engine()", "session()", "an async")
            if made_async
            else ("sync_engine()", "sync_session()", "a sync")
        )
        msg = (
            f"{what}: the engine resource {engine.name!r} is {other} engine, made by "
            f"{made}, and {what} needs the other kind. Use {use} with it, or declare the "
            f"engine with {'sync_engine()' if made_async else 'engine()'}."
        )
        raise TypeError(msg)


def _session_class(class_: object, where: str, *, is_async: bool) -> type[Any]:
    """Refuse a ``class_=`` that is not a session class of the kind *where* makes (an
    ``AsyncSession`` subclass for :func:`session`, a ``Session`` one for :func:`sync_session`),
    when it is declared; return it."""
    base: type[Any] = AsyncSession if is_async else Session
    if isinstance(class_, type) and issubclass(class_, base):
        return class_
    shown = (
        f"{class_.__module__}.{class_.__qualname__}" if isinstance(class_, type) else repr(class_)
    )
    other: type[Any]
    if is_async:
        want = (
            "a subclass of sqlalchemy.ext.asyncio.AsyncSession (SQLModel's is "
            "sqlmodel.ext.asyncio.session.AsyncSession)"
        )
        other, other_kind, use = Session, "a sync Session class", "sync_session()"
    else:
        want = "a subclass of sqlalchemy.orm.Session (SQLModel's is sqlmodel.Session)"
        other, other_kind, use = AsyncSession, "an AsyncSession class", "session()"
    if isinstance(class_, type) and issubclass(class_, other):
        kind = "async" if is_async else "sync"
        reason = f"is {other_kind}, and {where.partition('(')[0]}() makes {kind} sessions"
        msg = f"{where}: class_={shown} {reason}. Pass {want}, or declare it with {use}."
    else:
        msg = f"{where}: class_={shown} is not a session class. Pass {want}."
    raise TypeError(msg)


def _accepted(*classes: type[Any]) -> set[str] | None:
    """The keyword arguments the ``__init__`` of *classes* take (None: any, or not known):
    each passes the ones it does not take (``**kw``) to the next (an ``AsyncSession`` to its
    sync session class)."""
    names: set[str] = set()
    for i, cls in enumerate(classes):
        try:
            parameters = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - a signature Python cannot read
            return None
        for p in parameters:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                if i == len(classes) - 1:
                    return None
            else:
                names.add(p.name)
    return names


def _check_session_kwargs(
    where: str, make: Callable[[], Any], kwargs: dict[str, Any], *classes: type[Any]
) -> None:
    """Build the session once, with no engine (no connection), so a keyword argument the
    session class does not take (``autoflsuh=False``) fails the declaration, not every
    request while readiness says 200."""
    shown = classes[0].__name__
    fn = where.partition("(")[0]
    if "bind" in kwargs:
        msg = (
            f"{where}: bind= is not an option here: tether binds the session to the engine "
            f"resource given to {fn}(). Leave it out."
        )
        raise TypeError(msg)
    try:
        made = make()
    except TypeError as exc:
        accepted = _accepted(*classes)
        unknown = [k for k in kwargs if accepted is not None and k not in accepted]
        if not unknown:
            msg = f"{where}: {shown}() refused the keyword arguments given to {fn}(): {exc}."
            raise TypeError(msg) from None
        options, verb, them = unknown_keywords(unknown, accepted or ())
        msg = (
            f"{where}: {options} {verb} of {shown}, which {fn}() passes its keyword arguments "
            f"to. Fix or remove {them}."
        )
        raise TypeError(msg) from None
    except Exception as exc:
        msg = f"{where}: {shown}() refused the keyword arguments given to {fn}(): {describe(exc)}."
        raise ValueError(msg) from exc
    sync = getattr(made, "sync_session", made)
    sync.close()  # it holds nothing: no engine, no connection


def _with_options(
    options: dict[str, Any], *classes: type[Any]
) -> Callable[[Any, dict[str, Any], bool], tuple[Any, dict[str, Any]]]:
    """How a session declared with *options* (``execution_options=``) is made: given the
    engine (or, under :func:`rolled_back`, the block's connection: *joined*) and the session
    class's keyword arguments, what to bind it to, and those arguments.

    SQLAlchemy 2.1's session (*classes* take ``execution_options``) applies them itself, to
    every connection it takes and every statement it runs; SQLAlchemy 2.0's is bound to
    ``engine.execution_options(**options)`` (made once per engine, sharing its pool). Under
    ``rolled_back`` the block's transaction has begun: its isolation level and the other
    connection characteristics cannot change, and are left out."""
    accepted = _accepted(*classes)
    takes = accepted is not None and "execution_options" in accepted
    made: list[tuple[Any, Any]] = []  # (the engine, its copy with the options)

    def bound(eng: Any, kwargs: dict[str, Any], joined: bool) -> tuple[Any, dict[str, Any]]:
        if not options:
            return eng, kwargs
        if takes:
            given = options
            if joined:
                kept = eng.dialect.connection_characteristics
                given = {k: v for k, v in options.items() if k not in kept}
            return eng, {**kwargs, "execution_options": given}
        if joined:
            return eng, kwargs
        pair = made[0] if made else None
        if pair is None or pair[0] is not eng:  # first, or the engine opened again
            pair = (eng, eng.execution_options(**options))
            made[:] = [pair]
        return pair[1], kwargs

    return bound


def session(
    lc: Lifecycle,
    engine: Resource[AsyncEngine],
    *,
    name: str = "session",
    release: Release = "handler",
    error_status: Callable[[int], bool] | None = None,
    expire_on_commit: bool = False,
    connect: bool = True,
    execution_options: Mapping[str, Any] | None = None,
    class_: type[AsyncSession] = AsyncSession,
    **session_kwargs: Any,
) -> Resource[AsyncSession]:
    """Register a request resource: one ``AsyncSession`` in a transaction per unit of work.

    The session commits when the unit of work succeeded, before the response starts
    (``release="handler"``), or after its last byte is produced (``release="response"``:
    a streaming body uses it); it rolls back on any failure, and always closes.

    Args:
        engine: the resource returned by :func:`engine` (or any app resource whose value
            is an ``AsyncEngine``).
        name: the resource's name.
        release: ``"handler"`` (default) or ``"response"`` (see ``lc.resource``).
        error_status: which response statuses roll back (given the status, true for a
            failure); default: every status of 400 or more. ``lambda status: status >= 500``
            commits on a 4xx (see ``lc.resource``).
        expire_on_commit: ``False`` by default: objects stay loaded after the commit.
        connect: take the connection when the session opens (default), so a pool that
            times out or a database that is down is a 503 before the endpoint runs (the
            checkout, a connect and the pre-ping together bounded by ``pool_timeout +
            connect_timeout`` of an engine from :func:`engine`); with
            ``False`` the session connects on first use, as SQLAlchemy does. With
            ``True`` the session's transaction has begun when the endpoint gets it:
            ``session.begin()`` raises (saying so), and so does
            ``session.connection(execution_options=...)`` with options other than the
            session's own (SQLAlchemy would ignore them); use ``execution_options=``.
        execution_options: the execution options of every transaction of the session
            (``{"isolation_level": "SERIALIZABLE"}``, ``postgresql_readonly``, ...), the first
            one too: SQLAlchemy 2.1's session applies them itself (to its statements too); on
            2.0 the session is bound to ``engine.execution_options(...)``, which shares the
            engine's pool. Checked when declared (a dict; an isolation level SQLAlchemy
            knows, not ``"AUTOCOMMIT"``). Under :func:`rolled_back` the units of work run in
            the block's transaction: its isolation level and read-only setting hold.
        class_: the session class, a subclass of ``AsyncSession``: SQLModel's
            (``sqlmodel.ext.asyncio.session.AsyncSession``) for ``session.exec()``. Its sync
            session (``sync_session_class=``, or the class's own) is the one guarded after
            the release.
        **session_kwargs: passed to the session class (``autoflush``, ``info``, ...),
            checked when declared: an option it does not take is a ``TypeError`` then.
    """
    where = f"session({name!r})"
    check_bool(expire_on_commit, "expire_on_commit", where)
    check_bool(connect, "connect", where)
    options = _check_execution_options(execution_options, where)
    opened = _opened(name, "session", options)
    _check_engine(lc, engine, "session()")
    session_class = _session_class(class_, where, is_async=True)
    info = _info_for(engine)
    bound = _with_options(
        options,
        session_class,
        session_kwargs.get("sync_session_class") or session_class.sync_session_class,
    )

    def sync_class_of(extra: dict[str, Any]) -> type[Any]:
        return _guarded(extra.get("sync_session_class") or session_class.sync_session_class)

    _check_session_kwargs(
        where,
        lambda: session_class(
            None,
            expire_on_commit=expire_on_commit,
            **{**session_kwargs, "sync_session_class": sync_class_of(session_kwargs)},
        ),
        session_kwargs,
        session_class,
        session_kwargs.get("sync_session_class") or session_class.sync_session_class,
    )

    async def open_session(
        eng: AsyncEngine | AsyncConnection, join: str | None = None
    ) -> AsyncIterator[AsyncSession]:
        if info.engine is None:
            info.engine = eng.sync_engine
        extra = session_kwargs if join is None else {**session_kwargs, _JOIN_MODE: join}
        extra = {**extra, "sync_session_class": sync_class_of(extra)}
        bind, extra = bound(eng, extra, join is not None)
        s = session_class(bind, expire_on_commit=expire_on_commit, **extra)
        cast("_Guarded", s.sync_session)._tether_name = name
        if join is None and (info.rolled_back or _BLOCKED):  # tests only: outside the block open
            _outside_the_block(info, None if connect else s.sync_session)
        if connect:
            ticket, own = _ask(info)
            within = info.open_within
            try:
                if within is None:
                    await s.connection()
                else:
                    # Bounded: a pre-ping on a connection that stopped answering (packets
                    # dropped, no reset) would wait for ever without a command timeout.
                    deadline = asyncio.timeout(within)
                    try:
                        async with deadline:
                            await s.connection()
                    except TimeoutError as exc:
                        if not deadline.expired():
                            raise  # the driver's own (connect_timeout): mapped below
                        raise info.no_answer(within) from exc
                # Readiness: handed out once it passed its pre-ping (noted as the pool
                # handed it out, a frozen network's checkouts, each failing its pre-ping
                # seconds later, kept a full pool "busy", so ready: trial 22).
                info.served = time.monotonic()
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await _rollback(
                        s, name, cast("AsyncEngine", eng) if join is None else None, info
                    )
                    await s.close()
                if isinstance(exc, ResourceUnavailable):
                    raise
                failure = _open_failure(info, exc) if isinstance(exc, Exception) else None
                if failure is None:
                    raise
                raise failure from exc
            finally:
                if own:
                    ticket.leave()
                else:
                    ticket.took()
        # The engine of the session's own connection (None: `rolled_back`'s block's, never
        # hung up under another task).
        own_engine = cast("AsyncEngine", eng) if join is None else None
        try:
            if connect:
                began = cast("_Guarded", s.sync_session)
                began._tether_begun = (s.sync_session.get_transaction(), opened)
            yield s
        except BaseException as exc:
            await _rollback(s, name, own_engine, info)
            note_pgbouncer(exc, info.pgbouncer)
            if _busy(exc):
                raise _used_concurrently(name) from exc
            if not isinstance(exc, Exception):
                raise
            if read_only(exc) and not await _read_only_server(eng, exc):
                raise  # the unit's own read-only transaction: its error, not a failover
            held = cast("_Guarded", s.sync_session)
            answer = _use_failure(info, exc, held._tether_committed, held._tether_committing)
            if answer is None:
                raise
            raise answer from exc
        else:
            went = "free" if own_engine is None else await _let_go(s, name, own_engine, info)
            if went == "discarded":
                # A task the endpoint started still ran an operation on the session: hung
                # up under it, the transaction lost with the connection.
                raise ScopeError(_still_in_use(name))
            if went == "cancelled":
                # A task the endpoint started still waited for a connection for the
                # session: cancelled, what the session did rolled back.
                await _rollback(s, name, None, info)
                raise ScopeError(_still_in_use(name, _CANCELLED))
            try:
                await s.commit()
            except sa_exc.InvalidRequestError as exc:
                if not _busy(exc):
                    raise
                # A task the endpoint started still runs an operation on the session.
                await _rollback(s, name, own_engine, info)
                raise _used_concurrently(name) from exc
            except sa_exc.DBAPIError as exc:
                if not _refused_to_send(exc):
                    # The commit may have happened: not a 503. Rolled back all the same:
                    # SQLite keeps its transaction open when COMMIT fails (a deferred
                    # foreign key), and SQLAlchemy's return to the pool then leaves it so,
                    # holding the write lock for every later unit of work.
                    await _rollback(s, name, own_engine, info)
                    locked = _commit_locked(info, exc, s.sync_session)
                    if locked is not None:
                        raise locked from exc
                    raise
                # asyncpg refused to send COMMIT (the server ended the session, and its
                # error or the close arrived first): nothing was committed since the
                # endpoint's own commit(), if it made one.
                await s.invalidate()
                if cast("_Guarded", s.sync_session)._tether_committed:
                    raise lost_after_commit(info.name, describe(exc.orig or exc)) from exc
                raise commit_not_sent(info.name, exc.orig or exc) from exc
        finally:
            try:
                cast("_Guarded", s.sync_session)._tether_ending = True
                await _when_free(s.close)
                _mark_closed(s, closed_message, res)
            finally:
                if _ENDING_FOR:
                    await _backends_ended()

    closed_message = _closed_message(name, release)
    res: Resource[AsyncSession] = lc.resource(
        name=name, release=release, error_status=error_status
    )(depends_on(open_session, engine))
    _sessions[res] = _SessionOf(engine, open_session, is_async=True)
    res.async_api = "an AsyncSession"
    return res


# --------------------------------------------------------------------------- sync engine


def sync_engine(
    lc: Lifecycle,
    url: Url,
    *,
    name: str = "engine",
    pool_size: int = 5,
    max_overflow: int = 0,
    pool_timeout: float = 5.0,
    max_waiting: int | None = None,
    pool_pre_ping: bool = True,
    reset_session: bool = True,
    pgbouncer: bool = False,
    application_name: str | None = None,
    connect_timeout: float | None = 10.0,
    budget: BudgetPolicy = "warn",
    workers: int | None = None,
    reserved: int = 3,
    check: bool | Check = True,
    retries: int = 0,
    backoff: float = 0.5,
    required: bool = True,
    **engine_kwargs: Any,
) -> Resource[Engine]:
    """Register an app resource holding a (sync) ``Engine``; return it.

    The same options as :func:`engine`, for sync drivers (``postgresql+psycopg``,
    ``sqlite``, ...). It opens and closes in a thread; its default check runs
    ``SELECT 1`` in a thread too.
    """
    _check_pool_numbers(
        f"Engine {name!r}",
        pool_size,
        max_overflow,
        pool_timeout,
        connect_timeout,
        max_waiting,
        reserved,
        workers,
    )
    _check_engine_flags(
        f"Engine {name!r}",
        check,
        pool_pre_ping=pool_pre_ping,
        reset_session=reset_session,
        pgbouncer=pgbouncer,
        required=required,
    )
    check_budget_policy(budget, f"Engine {name!r}")
    _check_no_pool(f"Engine {name!r}", engine_kwargs, "sync_engine")
    # What create_engine is given (the URL aside): checked at declaration, used at startup.
    options_for = functools.partial(
        _options,
        name=name,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=pool_pre_ping,
        pgbouncer=pgbouncer,
        application_name=application_name,
        connect_timeout=connect_timeout,
        engine_kwargs=engine_kwargs,
    )
    if isinstance(url, str | URL):  # a function's URL is checked when the app starts
        given = _read_url(url, name)
        _check_dialect(given, name, is_async=False)
        _check_sync_driver(given, name)
        _check_engine_kwargs(given, name, engine_kwargs, options_for, is_async=False)
    info = _PoolInfo(name, pool_size, max_overflow, pool_timeout)
    info.pgbouncer = pgbouncer
    info.max_waiting = max_waiting

    def open_engine() -> Iterator[Engine]:
        u = _resolve_url(url, name)
        _check_dialect(u, name, is_async=False, returned=callable(url))
        _check_sync_driver(u, name)  # a function's URL: a mistake, not retried
        info.shown_url = u.render_as_string(hide_password=True)
        options = options_for(u)
        if "pool_size" in options and "poolclass" not in options:
            options["poolclass"] = _sync_pool(info)
        eng = cast("Engine", _create_engine(u, name, options, engine_kwargs, is_async=False))
        if u.get_backend_name() == "postgresql":
            _refuse_failed_commits(eng, name, "`with session.begin_nested():`")
            _close_streams_on_return(eng, name)
            _note_executions_once(eng)
        _count_connections(eng, info)
        _note_checkouts(eng, info)
        _warn_on_the_loop(eng, lc, name)
        if reset_session and u.get_backend_name() == "postgresql":
            _reset_sessions(eng, name, server=not pgbouncer)
        try:
            server_max: tuple[int | None, str | None] = (None, None)
            try:
                with eng.connect() as conn:
                    try:
                        conn.execute(_check_query(eng))  # (SQLite: read)
                    except sa_exc.OperationalError as exc:
                        if not _locked_at_startup(name, u, exc):
                            raise
                    if _wants_budget(u, pgbouncer, budget, name):
                        server_max = _read_budget_sync(conn, name, budget)
            except Exception as exc:
                if isinstance(exc, sa_exc.ArgumentError):  # an option's value: a mistake
                    for_good(exc)
                failure = _sqlite_path_error(name, u, exc) or _open_failure(info, exc)
                if failure is None:
                    raise
                raise failure from exc
            _budget(lc, info, server_max, budget=budget, workers=workers, reserved=reserved)
        except BaseException:
            forget_budget(lc, name)
            eng.dispose()
            raise
        _note_sqlite_file(eng, u)
        res.check_late = _sqlite_check_late(u, options)
        info.engine = eng
        log.info("tether: engine %r open on %s", name, redact(info.shown_url))
        _said_in_memory(u, name, options)
        try:
            yield eng
        finally:
            forget_budget(lc, name)
            info.engine = None
            eng.dispose()

    def select_one(eng: Engine) -> None:
        _same_sqlite_file(eng)
        with eng.connect() as conn:
            conn.execute(_check_query(eng))

    async def default_check(eng: Engine) -> None:
        await anyio.to_thread.run_sync(select_one, eng, abandon_on_cancel=True)

    res = _register_engine(
        lc,
        open_engine,
        name=name,
        check=_check_of(check, default_check),
        retries=retries,
        backoff=backoff,
        required=required,
        info=info,
    )
    return cast("Resource[Engine]", res)


# --------------------------------------------------------------------------- sync session


def _sync_rollback(s: Session, name: str) -> None:
    try:
        s.rollback()
    except Exception as exc:
        log.warning(
            "tether: rolling back session %r failed (%s); its connection is discarded",
            name,
            _describe_db(exc),
        )
        try:
            s.invalidate()
        except Exception as again:  # pragma: no cover - invalidation is best effort
            log.warning("tether: invalidating session %r failed: %s", name, describe(again))


# A thread a `def` endpoint started on its `sync_session` and did not join, still using the
# session when the unit of work ends (`_let_go_sync`).

_THREAD_HUNG_UP = (
    "the connection was hung up under that thread (its statement fails with a connection "
    "error, and SQLAlchemy discards the connection in that thread)"
)
_THREAD_REFUSED = (
    "that thread, still waiting for a connection for the session, is refused it when it "
    "comes (tether.ResourceClosedError)"
)

#: `_let_go_sync`'s answer: the session is free for the commit, the rollback and the close;
#: or a thread still uses it: its connections were hung up under it ("hung up"), or it waits
#: for one, which it will be refused ("refused"). Then the session is the thread's: tether
#: does not touch it again (SQLAlchemy's own handling, in that thread, gives its connections
#: back to the pool).
_SyncLetGo = Literal["free", "hung up", "hung up at commit", "refused"]


#: On a ``Connection``: SQLAlchemy runs a statement on it now, between
#: ``before_cursor_execute`` and ``after_cursor_execute`` (or ``handle_error``). On the
#: ``Connection``, which lives for one checkout, not on the pool's connection: a statement
#: that ends past both (a ``BaseException`` inside the driver) leaves no mark on a later one.
_EXECUTING = "_tether_executing"

#: The engines `_note_executions_once` registered on.
_noting: weakref.WeakSet[Any] = weakref.WeakSet()


def _warn_on_the_loop(eng: Engine, lc: Lifecycle, name: str) -> None:
    """Warn, once per engine opened, when a sync engine runs a statement in the thread of
    the app's event loop: a job's ``lc.scope()`` calling a ``sync_session`` from its
    ``async def`` (the ``async def`` endpoint that takes one is warned about at startup):
    the loop, and every other request, waits for the database meanwhile. One thread-id
    comparison per statement (none once warned)."""
    loop_thread = lc._loop_thread
    if loop_thread is None:  # opened outside `lc.run()` (by hand): no loop to watch
        return
    warned = False

    def before(
        conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any
    ) -> None:
        nonlocal warned
        if warned or threading.get_ident() != loop_thread:
            return
        warned = True
        log.warning(
            "tether: sync engine %r ran a statement in the event loop's thread (%s): the "
            "loop, and every other request with it, waits for the database meanwhile. Run "
            "sync code in a worker thread: a `def` endpoint, or `await unit.run_sync(fn, "
            "session)` in an `lc.scope()` job.",
            name,
            caller_outside(_SQLALCHEMY_DIR),
        )

    event.listen(eng, "before_cursor_execute", before)


_SQLALCHEMY_DIR = os.path.dirname(os.path.dirname(sa_exc.__file__)) + os.sep


def _note_executions_once(eng: Any) -> None:
    """Mark *eng*'s connections (psycopg's and psycopg2's only) while SQLAlchemy runs a
    statement on them (`_EXECUTING`), once per engine: at the end of a `sync_session`'s unit
    of work, libpq's "a command is in progress" alone is no sign of a thread the endpoint did
    not join. The endpoint's own thread leaves it so after a ``COPY`` through
    ``session.execute()`` (which fails), or a driver's ``copy()`` or ``stream()`` left early,
    and the unit's end then hung up a connection nobody used (a 500 after 1 s, and the
    connection never given back). About 0.5 µs per statement where the engine has listeners
    already (tether's own engines), about 5 µs where it had none."""
    driver = getattr(getattr(eng, "dialect", None), "driver", None)
    if driver not in ("psycopg", "psycopg2"):
        return
    with _keeping_lock:
        try:
            if eng in _noting:
                return
            _noting.add(eng)
        except TypeError:  # pragma: no cover - not weakly referable: never read as running
            return

    def before(
        conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any
    ) -> None:
        setattr(conn, _EXECUTING, True)

    def after(conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any) -> None:
        setattr(conn, _EXECUTING, False)

    def failed(context: Any) -> None:
        if context.connection is not None:
            setattr(context.connection, _EXECUTING, False)

    event.listen(eng, "before_cursor_execute", before)
    event.listen(eng, "after_cursor_execute", after)
    event.listen(eng, "handle_error", failed)


def _statement_running(conn: Any, fairy: Any) -> bool:
    """Whether a statement runs now on *conn* (its pool connection *fairy*) through
    SQLAlchemy, so in another thread than the unit of work's end (its endpoint has
    returned): its execution began and has not ended (`_note_executions_once`), and libpq
    says a command is in progress (`_query_running`)."""
    return getattr(conn, _EXECUTING, False) and _query_running(fairy.dbapi_connection)


def _query_running(driver: Any) -> bool:
    """Whether the psycopg or psycopg2 connection *driver* runs a statement now: libpq's
    transaction status is ``PQTRANS_ACTIVE`` (1), read without the driver's lock, so from
    another thread while the statement runs. False for other drivers, which have no such
    status (nothing else read)."""
    try:
        return getattr(getattr(driver, "info", None), "transaction_status", None) == 1
    except Exception:  # closed
        return False


def _in_use_by_thread(tx: Any) -> tuple[bool, list[tuple[Any, Any]]]:
    """Whether another thread is getting the session's transaction *tx* a connection (the
    pool's wait, or a connect) or is inside another of its state changes (its own commit,
    rollback or close: SQLAlchemy's ``_current_fn``), and the (engine, pool connection) of
    *tx* that run a statement. A few attribute reads and one libpq status read per
    connection."""
    running: list[tuple[Any, Any]] = []
    last = None
    # A copy, taken at once: the other thread may add a connection meanwhile.
    for entry in tuple(getattr(tx, "_connections", _NO_CONNECTIONS).values()):
        if entry is last:  # (each entry is there twice: by connection, then by engine)
            continue
        last = entry
        fairy = getattr(entry[0], "_dbapi_connection", None)
        if fairy is not None and _statement_running(entry[0], fairy):
            running.append((entry[0].engine, fairy))
    return tx._state is _PROVISIONING or _changing(tx), running


def _changing(tx: Any) -> bool:
    """Whether a thread is inside one of *tx*'s state changes (commit, rollback, close,
    getting a connection): SQLAlchemy refuses another then (``IllegalStateChangeError``)."""
    return getattr(tx, "_current_fn", None) is not None


def _committing(tx: Any) -> bool:
    """Whether a thread is inside *tx*'s ``commit()`` past its flush: its ``COMMIT`` may
    be on its way, which hanging up would not stop (the thread would get an error for work
    the server committed)."""
    return getattr(getattr(tx, "_current_fn", None), "__name__", "") == "commit"


def _open_connections(tx: Any) -> list[tuple[Any, Any]]:
    """The (``Connection``, pool connection) of *tx* still checked out by its connections."""
    found: list[tuple[Any, Any]] = []
    for entry in tuple(getattr(tx, "_connections", _NO_CONNECTIONS).values()):
        fairy = getattr(entry[0], "_dbapi_connection", None)
        ours = fairy is not None and fairy.dbapi_connection is not None
        if ours and not any(fairy is f for _, f in found):
            found.append((entry[0], fairy))
    return found


def _socket_of(driver: Any) -> int:
    pgconn = getattr(driver, "pgconn", None)  # psycopg
    return int(pgconn.socket if pgconn is not None else driver.fileno())  # psycopg2


def _still_ours(fairy: Any, record: Any) -> bool:
    """Whether the pool connection *record* is still checked out by *fairy*: the pool's
    check-in clears ``fairy_ref`` before it gives the record back, and a later checkout
    makes a new fairy."""
    ref = getattr(record, "fairy_ref", None)
    return ref is not None and ref() is fairy and fairy.dbapi_connection is not None


def _hang_up_thread(conn: Any, fairy: Any, record: Any, *, running: bool) -> bool:
    """Shut down the socket of the pool connection *fairy* (*conn*'s; psycopg's or psycopg2's),
    which another thread uses: its statement fails at once with a connection error, and
    SQLAlchemy, in that thread, discards the connection and checks it in. With *running*,
    only if a statement runs on it, checked last, just before the shutdown (one that ended
    meanwhile is left alone: the thread may never use the connection again, and then
    nothing would check it in). Done only while the connection is still the session's,
    under the pool's own lock, so that it cannot be checked in and handed to another
    request meanwhile (its check-in waits for that lock); through a copy of the descriptor,
    checked to be still the driver's after the copy was made (a socket closed meanwhile
    may have given its number to another). Whether it was shut down."""
    queue = getattr(getattr(fairy, "_pool", None), "_pool", None)
    mutex = getattr(queue, "mutex", None)  # QueuePool's
    with mutex if mutex is not None else contextlib.nullcontext():
        if not _still_ours(fairy, record):
            return False
        driver = fairy.dbapi_connection
        try:
            fd = _socket_of(driver)
            copy = os.dup(fd)
        except Exception:  # closed, or no socket: nothing waits on it
            return False
        try:
            sock = socket.socket(fileno=copy)
        except OSError:  # pragma: no cover - not a socket
            os.close(copy)
            return False
        try:
            if _socket_of(driver) != fd:  # pragma: no cover - closed between the reads
                return False
            if running and not _statement_running(conn, fairy):
                return False  # it ended: the unit's end waited for it, in effect
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except Exception:  # pragma: no cover - closed between the reads
            return False
        finally:
            sock.close()


#: The dialects `_let_go_sync` registered `_keep_pool_on_hang_up` on (once each).
_keeping_pool: weakref.WeakSet[Any] = weakref.WeakSet()
_keeping_lock = threading.Lock()


def _keep_pool_once(eng: Any) -> None:
    """`_keep_pool_on_hang_up` on *eng*'s dialect, once (``handle_error`` is the dialect's),
    before the first hang-up under a thread on it: that connection is discarded, not the
    whole pool."""
    try:
        with _keeping_lock:
            if eng.dialect in _keeping_pool:
                return
            _keeping_pool.add(eng.dialect)
    except TypeError:  # pragma: no cover - not weakly referable: the pool is replaced
        return
    _keep_pool_on_hang_up(eng)


def _refuse_connections(s: Session, message: str, res: Resource[Any]) -> Callable[..., None]:
    """Make the thread still waiting for a connection for *s* give it back as it comes
    (SQLAlchemy's ``after_begin``, in that thread, on this session only) and raise
    :class:`ResourceClosedError` (*message*, the closed session's) there. The listener."""

    def after_begin(session: Any, transaction: Any, connection: Any) -> None:
        with contextlib.suppress(Exception):  # a hung-up socket: invalidated instead
            connection.close()  # rolled back, and checked in
        guarded = cast("_Guarded", session)
        if not guarded._tether_counted:
            guarded._tether_counted = True
            res.counters.leaks += 1
        raise ResourceClosedError(message, resource=res.name)

    event.listen(s, "after_begin", after_begin)
    return after_begin


#: Seconds a thread the endpoint did not join must leave the session alone (no statement, no
#: state change) before the end of the unit of work takes it as done with it.
_IDLE_FOR = 0.02

#: Times the end of a `sync_session`'s unit of work checks for a thread using it and
#: commits, when a thread's own commit began between the two.
_COMMIT_TRIES = 3


def _let_go_sync(s: Session, name: str, message: str, res: Resource[Any]) -> _SyncLetGo:
    """Whether the session is free for the commit, the rollback or the close ("free"): no
    thread the endpoint started and did not join still uses it. A statement such a thread
    runs would hold the commit (psycopg's lock) until ``close_timeout``, and the abandoned
    commit then commit the unit's work after its 500; a thread waiting for the pool would
    make the close fail, then take the connection and keep it checked out. One that ends
    within `_LET_GO` s (and leaves the session alone for `_IDLE_FOR` s after) is waited for;
    one that commits and goes on in a new transaction is followed into it. Then the session
    is marked closed (no new transaction for that thread), a thread waiting for a connection
    is refused it when it comes (`_refuse_connections`), and every connection of the
    session's transaction is hung up under it (`_hang_up_thread`), which SQLAlchemy then
    discards in that thread; nothing is committed. tether does not touch the session after
    that: a sync ``Session`` has no lock, and a rollback or close from here while the thread
    runs SQLAlchemy's disconnect handling could check a connection in twice. psycopg and
    psycopg2 only (the drivers whose statement in progress can be read from another thread);
    a few attribute reads when no thread holds it."""
    tx = s.get_transaction()
    if tx is None:
        return "free"
    connecting, running = _in_use_by_thread(tx)
    if not connecting and not running:
        return "free"
    deadline = time.monotonic() + _LET_GO
    last = deadline + _BUSY_WAIT  # for a thread's own COMMIT (`_committing`)
    idle_since: float | None = None
    while True:
        time.sleep(0.005)
        now = time.monotonic()
        current = s.get_transaction()
        if current is not None and current is not tx:
            # It committed and went on in a new transaction (a batch loop: a statement, a
            # commit, the next statement): followed, with a grace of its own.
            tx = current
            deadline = min(now + _LET_GO, last)
        if current is None:  # it committed or rolled back
            idle = True
        else:
            connecting, running = _in_use_by_thread(tx)
            idle = not connecting and not running
        if idle:
            # Free once it stays so for `_IDLE_FOR` s: a thread between two statements (or
            # between its commit and its next statement) is not done with the session.
            if idle_since is None:
                idle_since = now
            elif now - idle_since >= _IDLE_FOR:
                return "free"
            continue
        idle_since = None
        if now > deadline and (now > last or not _committing(tx)):
            break
    _mark_closed(s, message, res)  # from here on the thread begins no transaction
    before = [conn for conn, _ in _open_connections(tx)]
    armed = tx._state is _PROVISIONING
    if armed:
        # Registered before the connections are read below: a connection the thread got
        # before the listener was in place is in the transaction by then.
        _refuse_connections(s, message, res)
    hung: list[tuple[Any, Any]] = []
    at_commit = False  # one was hung up under the thread's own COMMIT
    deadline = time.monotonic() + _LET_GO
    while True:
        for conn, fairy in _open_connections(tx):
            if any(fairy is f for f, _ in hung):
                continue
            # A connection the thread got as the listener was registered: hung up before
            # the thread's statement, which is about to run. One it had before: only if
            # its statement still runs.
            new = not any(conn is c for c in before)
            # One the thread is committing, rolling back or closing with: hung up too (the
            # thread uses it now; a COMMIT already sent may have committed all the same).
            only_running = not new and not _changing(tx)
            if only_running and not _statement_running(conn, fairy):
                continue
            record = getattr(fairy, "_connection_record", None)
            _keep_pool_once(conn.engine)
            driver = fairy.dbapi_connection
            # Marked before the shutdown, which the thread's error may follow at once; and
            # unmarked if nothing was shut down: a later real disconnect on it still renews
            # the whole pool, as SQLAlchemy does.
            with contextlib.suppress(TypeError):  # not weakly referable: the pool is replaced
                _hung_up.add(driver)
            committing = _committing(tx)
            if _hang_up_thread(conn, fairy, record, running=only_running):
                hung.append((fairy, record))
                at_commit = at_commit or committing
            else:
                with contextlib.suppress(TypeError):
                    _hung_up.discard(driver)
        if all(not _still_ours(f, r) for f, r in hung) or time.monotonic() > deadline:
            break
        time.sleep(0.005)  # the thread wakes, fails, and lets go
    if not hung and not armed:
        # Its statement ended just now: as if within the wait. Unmarked, so that the commit
        # may begin a transaction, as it does when the thread's own commit ended its own.
        cast("_Guarded", s)._tether_closed = None
        return "free"
    if at_commit:
        log.warning(
            "tether: session %r: a thread started with it and not joined (by a `def` endpoint, "
            "or a job's `to_thread`) was still in its own COMMIT of the session %g s after its "
            "unit of work ended; its connection is hung up under it, so whether that "
            "transaction was committed is not known (the server may have committed it: it "
            "learns of the hang-up only when it answers). %s",
            name,
            _LET_GO + _BUSY_WAIT,
            _JOIN,
        )
    else:
        log.warning(
            "tether: session %r: a thread started with it and not joined (by a `def` "
            "endpoint, or a job's `to_thread`) still uses the session at the end of its unit "
            "of work (it runs a statement, or waits for a connection); its connection is hung "
            "up under it (its statement fails with a connection error), a connection it waits "
            "for is refused it when it comes (tether.ResourceClosedError), and nothing is "
            "committed. %s",
            name,
            _JOIN,
        )
    for fairy, record in hung:
        _discard_idle(fairy, record, name)
    if at_commit:
        return "hung up at commit"
    return "hung up" if hung else "refused"


def _discard_idle(fairy: Any, record: Any, name: str) -> None:
    """A connection hung up under a thread that has not let go of it: its statement ended
    in the moment between the last read of it and the shutdown (psycopg2 ends it without
    the GIL), so the thread, which may never use the session again, did not see the
    shutdown, and the connection would stay checked out for as long as the session lives.
    Discarded from here, under the pool's lock, if no statement runs on it (one that runs
    fails on the shut socket, and the thread lets go itself)."""
    queue = getattr(getattr(fairy, "_pool", None), "_pool", None)
    mutex = getattr(queue, "mutex", None)
    with mutex if mutex is not None else contextlib.nullcontext():
        if not _still_ours(fairy, record) or _query_running(fairy.dbapi_connection):
            return
        log.warning(
            "tether: session %r: the thread's statement ended as its connection was hung "
            "up; the connection is discarded",
            name,
        )
        with contextlib.suppress(Exception):
            fairy.invalidate()


def _token_wait(info: _PoolInfo) -> _Ticket:
    """A sync session's open, on the event loop, before it waits for a token of its
    limiter (``concurrency``, the pool's size): the unit starts its ask for a connection
    there, so it counts as waiting for the pool (``max_waiting``, the pool's figures), and
    its wait for the token is bounded by ``pool_timeout``, as the pool's own wait is."""
    if info.users is not None:
        _users_engine(info, info.users)
    ticket = info.enter_wait()
    ticket.reset = _ASKING.set(ticket)
    return ticket


def _users_engine(info: _PoolInfo, engine: Resource[Any]) -> None:
    """Point *info* at the engine of the user's engine resource, open since startup: its
    pool's ``pool_timeout`` bounds the wait for a token, and its figures are the pool's, from
    the first unit of work on (else only once a session had opened, in its thread: the
    first burst's units all waited for a token without bound)."""
    lc = engine.lifecycle
    res = lc._overrides.get(engine, engine) if lc._overrides else engine
    value = lc._app_values.get(res)
    if isinstance(value, Connection):
        value = value.engine
    if isinstance(value, Engine):
        info.engine = value  # (a new one for each run of the app)


def sync_session(
    lc: Lifecycle,
    engine: Resource[Engine],
    *,
    name: str = "session",
    release: Release = "handler",
    error_status: Callable[[int], bool] | None = None,
    expire_on_commit: bool = False,
    connect: bool = True,
    execution_options: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
    class_: type[Session] = Session,
    **session_kwargs: Any,
) -> Resource[Session]:
    """Register a request resource: one sync ``Session`` in a transaction per unit of work.

    For ``def`` endpoints. The session opens (and takes its connection) in one of
    tether's threads, at most *concurrency* at once — by default the engine's
    ``pool_size + max_overflow`` — never in the threadpool the endpoints run in: a pool
    smaller than that threadpool cannot deadlock it. Commit, rollback and close are as
    for :func:`session`, run in tether's closing threads.

    Args:
        engine: the resource returned by :func:`sync_engine`.
        error_status: which response statuses roll back, as for :func:`session`.
        connect, execution_options: as for :func:`session`.
        concurrency: most sessions opening at once; needed when *engine* is not one
            made by :func:`sync_engine` with a bounded ``max_overflow``.
        class_: the session class, a subclass of ``Session``: SQLModel's
            (``sqlmodel.Session``) for ``session.exec()``.
        **session_kwargs: passed to the session class, checked when declared, as for
            :func:`session`.
    """
    where = f"sync_session({name!r})"
    check_bool(expire_on_commit, "expire_on_commit", where)
    check_bool(connect, "connect", where)
    options = _check_execution_options(execution_options, where)
    opened = _opened(name, "sync_session", options)
    _check_engine(lc, engine, "sync_session()")
    guarded_class = _guarded(_session_class(class_, where, is_async=False))
    bound = _with_options(options, class_)
    _check_session_kwargs(
        where,
        lambda: guarded_class(None, expire_on_commit=expire_on_commit, **session_kwargs),
        session_kwargs,
        class_,
    )
    if concurrency is not None:
        check_number(concurrency, "concurrency", where, integer=True, least=1, example="4")
    info = _info_for(engine)
    limit = concurrency if concurrency is not None else info.limit
    if limit is None:
        msg = (
            f"sync_session({name!r}): cannot tell how many connections the pool of "
            f"{engine.name!r} gives at once; pass concurrency= (its pool_size + max_overflow)."
        )
        raise ValueError(msg)

    def open_session(eng: Engine | Connection, join: str | None = None) -> Iterator[Session]:
        if info.engine is None:
            info.engine = eng if isinstance(eng, Engine) else eng.engine
            _note_executions_once(info.engine)  # an engine not made by sync_engine()
        extra = session_kwargs if join is None else {**session_kwargs, _JOIN_MODE: join}
        bind, extra = bound(eng, extra, join is not None)
        s = guarded_class(bind, expire_on_commit=expire_on_commit, **extra)
        s._tether_name = name
        if join is None and (info.rolled_back or _BLOCKED):  # tests only: outside the block open
            _outside_the_block(info, None if connect else s)
        if connect:
            ticket, own = _ask(info)  # started on the loop, by the wait for a token
            try:
                s.connection()
            except BaseException as exc:
                _sync_rollback(s, name)
                s.close()
                failure = _open_failure(info, exc) if isinstance(exc, Exception) else None
                if failure is None:
                    raise
                raise failure from exc
            finally:
                if own:
                    ticket.leave()
                else:
                    ticket.took()  # the wait is over: what remains is the open's
        # A thread the endpoint started and did not join may still use the session (not
        # under `rolled_back`, whose connection is the block's): "free" unless one does.
        went: _SyncLetGo = "free"
        try:
            if connect:
                cast("_Guarded", s)._tether_begun = (s.get_transaction(), opened)
            yield s
        except BaseException as exc:
            if join is None:
                went = _let_go_sync(s, name, closed_message, res)
            if went == "free":
                _sync_rollback(s, name)  # (else nothing was committed, and it is the thread's)
            note_pgbouncer(exc, info.pgbouncer)
            if not isinstance(exc, Exception):
                raise
            if read_only(exc) and not _sync_read_only_server(eng, exc):
                raise  # the unit's own read-only transaction: its error, not a failover
            held_s = cast("_Guarded", s)
            answer = _use_failure(info, exc, held_s._tether_committed, held_s._tether_committing)
            if answer is None:
                raise
            raise answer from exc
        else:
            for attempt in range(_COMMIT_TRIES):
                if join is None:
                    went = _let_go_sync(s, name, closed_message, res)
                if went == "hung up at commit":
                    raise ScopeError(_hung_up_at_commit(name))
                if went != "free":
                    done = _THREAD_HUNG_UP if went == "hung up" else _THREAD_REFUSED
                    raise ScopeError(_still_in_use(name, done, thread=True))
                try:
                    s.commit()
                except sa_exc.IllegalStateChangeError:
                    # A thread the endpoint started began its own commit (rollback, close)
                    # between the check and this one, which did nothing: checked again.
                    if join is not None or attempt == _COMMIT_TRIES - 1:
                        raise
                    continue
                except sa_exc.DBAPIError as exc:
                    _sync_rollback(s, name)  # as in `session`: SQLite keeps a failed commit's
                    locked = _commit_locked(info, exc, s)  # transaction open, past the
                    if locked is not None:  # pool's return
                        raise locked from exc
                    raise
                break
        finally:
            # Marked first: a thread still using the session begins no new transaction
            # (taking a connection for good) between the close and the mark.
            _mark_closed(s, closed_message, res)
            if went == "free":
                s._tether_ending = True
                s.close()

    closed_message = _closed_message(name, release)
    res: Resource[Session] = lc.resource(
        name=name, release=release, error_status=error_status, concurrency=max(1, limit)
    )(depends_on(open_session, engine))
    if connect:
        set_token_wait(res, partial(_token_wait, info))
    _sessions[res] = _SessionOf(engine, open_session, is_async=False)
    return res


# --------------------------------------------------------------------------- tests


_JOIN_MODE = "join_transaction_mode"  # Session's, for `rolled_back`
_SETTLE = 10.0  # seconds `rolled_back` waits, at its end, for a session still open


class _SessionOf:
    """How a session resource made here opens a session: for :func:`rolled_back`."""

    __slots__ = ("engine", "is_async", "open")

    def __init__(self, engine: Resource[Any], open: Callable[..., Any], *, is_async: bool) -> None:
        self.engine = engine
        self.open = open  # (engine or connection, join_transaction_mode) -> generator
        self.is_async = is_async


_sessions: PerResource[_SessionOf] = PerResource("sqlalchemy_sessions")


def _as_in_production(ss: Session) -> None:
    """`rolled_back`: the session's commit (its savepoint's release) first checks the deferred
    constraints, as ``COMMIT`` checks them (``RELEASE SAVEPOINT`` checks none): a violation
    is raised by the commit, as in production, and the unit of work rolls back to its
    savepoint. Checked in a savepoint rolled back at once, so they stay deferred after it."""
    from ..testing import _CHECK_DEFERRED

    commit = ss.commit

    def checked_commit() -> None:
        if ss.in_transaction():
            ss.flush()
            c = ss.connection()
            if c.dialect.name == "postgresql":
                check = c.begin_nested()
                try:
                    c.exec_driver_sql(_CHECK_DEFERRED[1])
                finally:
                    check.rollback()
        commit()

    ss.commit = checked_commit  # type: ignore[method-assign]


def _found_settings(sync_conn: Connection) -> str:
    """`rolled_back`: the settings a unit of work finds as it starts (what the engine's own
    setup and the test set on the block's connection), as SQL that sets them again."""
    return _read_settings(sync_conn.connection.dbapi_connection)


def _reset_unit(sync_conn: Connection, found: str) -> None:
    """`rolled_back`: after each unit of work, undo what production's reset on release undoes
    (``SET``, ``SET LOCAL``, the role...), inside the block's transaction, and set again what
    the unit found (*found*): one round trip."""
    sql = IN_BLOCK_RESET + found
    driver: Any = sync_conn.connection.driver_connection
    package = type(driver).__module__.partition(".")[0]
    # Never prepared: several statements (psycopg's prepare_threshold=0 would try).
    options: dict[str, Any] = {"prepare": False} if package == "psycopg" else {}
    if package == "asyncpg" or inspect.iscoroutinefunction(getattr(driver, "execute", None)):
        await_only(driver.execute(sql, **options))
    else:
        cursor = driver.cursor()
        try:
            cursor.execute(sql, **options)
        finally:
            cursor.close()


def _turn_timeout(eng: Any) -> float:
    """The engine's pool timeout: how long a unit of work of `rolled_back` waits its turn."""
    pool = getattr(getattr(eng, "sync_engine", eng), "pool", None)
    timeout = getattr(pool, "timeout", None)
    return float(timeout()) if callable(timeout) else 30.0


@async_block
@asynccontextmanager
async def rolled_back(session: Resource[Any]) -> AsyncIterator[Any]:
    """Roll back, when the block ends, everything the app writes through *session* in it.

    For tests. While the block runs, every unit of work that asks for *session* gets a
    session bound to one connection, inside one transaction that the block opened, joined
    with ``join_transaction_mode="create_savepoint"``: the session's own commit (tether's
    at the release point, or the endpoint's) releases a savepoint, its rollback goes back
    to one, and the outer transaction is rolled back at the end. So tests that write the
    same rows pass in any order, and the database is left as it was.

    On PostgreSQL, as in production, the session's commit checks the deferred constraints,
    and the session's settings are reset after each unit of work, as on release.

    Only the units of work that ask for *session* are in the block: a session of another
    resource of the same engine (an ``audit_session``, a read-only one) still gets a
    connection of its own, so it does not see what the block wrote, and what it writes is
    committed and stays after the test. Such a session is warned of (a ``RuntimeWarning``
    naming the block's resource, as it takes its connection): give ``rolled_back`` the
    resource the code under test uses, or open one block per resource.

    The sessions take turns on the one connection: a unit of work that asks for *session*
    while another holds it waits for it, up to the engine's pool timeout, then raises a
    ``RuntimeError`` saying why (at once if its own task holds it: a nested ``lc.scope()``).
    The block yields the connection (an ``AsyncConnection``, or a ``Connection`` for
    :func:`sync_session`): query it between requests to see what the app wrote. The app
    scope must be running, on this event loop (with ``TestClient``:
    ``client.portal.wrap_async_context_manager(...)``).
    """
    spec = registered(
        _sessions, session, "sqlalchemy", kind="session",
        made_by="tether.integrations.sqlalchemy.session() or sync_session()",
    )  # fmt: skip
    lc = session.lifecycle
    eng = lc.get(spec.engine)  # a ScopeError naming the fix if the app scope is not running
    info = _info_for(spec.engine)
    # As production's reset on release: PostgreSQL, not behind PgBouncer.
    reset = eng.dialect.name == "postgresql" and not info.pgbouncer
    info.rolled_back.append(session.name)  # another session resource of the engine: warned
    _BLOCKED.append(info)  # and one of another engine of the same database
    try:
        async with _rolled_back(session, spec, eng, reset) as conn:
            yield conn
    finally:
        info.rolled_back.remove(session.name)
        _BLOCKED.remove(info)


def _streams_of(conn: Any) -> set[Any]:
    """The server-side cursors open on the block's connection now (the test's own)."""
    return set(conn.info.get(_STREAMS, ()))


def _end_unit_streams(conn: Any, before: set[Any], message: str) -> None:
    """`rolled_back`: the server-side cursors a unit of work opened on the block's connection
    end with the unit, as production's checkin ends them (the test's own stay)."""
    streams = conn.info.get(_STREAMS)
    if streams:
        its = [c for c in streams if c not in before]
        _end_streams(its, message)
        for context in its:
            streams.discard(context)


@asynccontextmanager
async def _rolled_back(
    session: Resource[Any], spec: _SessionOf, eng: Any, reset: bool
) -> AsyncIterator[Any]:
    """`rolled_back` itself, once the block is recorded on its engine."""
    from ..testing import _aborted as _block_aborted
    from ..testing import _Turns

    lc = session.lifecycle
    ended = _stream_closed_message(spec.engine.name)
    if spec.is_async:
        async with eng.connect() as conn:
            outer = await conn.begin()
            if conn.dialect.name == "sqlite":
                # sqlite3 (and aiosqlite) begin a transaction only before a write, so the
                # first session's SAVEPOINT would start one and its RELEASE commit it.
                await conn.exec_driver_sql("BEGIN")
            turns = _Turns(session.name, _turn_timeout(eng))
            lock = turns.lock
            open_joined = asynccontextmanager(spec.open)

            async def joined() -> AsyncIterator[AsyncSession]:
                async with turns.turn():
                    try:  # the test's own statement on the block's connection failed?
                        aborted = await conn.run_sync(_aborted)  # psycopg: no round trip
                        found = await conn.run_sync(_found_settings) if reset else ""
                    except Exception as exc:  # asyncpg says so at the first query
                        if _IN_FAILED_TRANSACTION not in sqlstates(exc):
                            raise
                        aborted = True
                    if aborted:
                        nested = "`async with conn.begin_nested():`"
                        raise RuntimeError(_block_aborted(session.name, nested))
                    streams_before = _streams_of(conn.sync_connection)
                    try:
                        async with open_joined(conn, "create_savepoint") as s:
                            _as_in_production(s.sync_session)
                            yield s
                    finally:
                        # As production's checkin: the unit's server-side cursors end.
                        _end_unit_streams(conn.sync_connection, streams_before, ended)
                        if reset:
                            with anyio.CancelScope(shield=True):
                                await conn.run_sync(_reset_unit, found)

            try:
                with block_override(lc, session, joined):
                    yield conn
            finally:
                with anyio.CancelScope(shield=True):
                    # A session still open ends first (noted for the pytest plugin).
                    held = await turns.settle(session, _SETTLE)
                    try:
                        if outer.is_active:
                            await outer.rollback()
                    finally:
                        if held:  # one still waiting fails on the closed connection
                            lock.release()
        return
    conn = await anyio.to_thread.run_sync(eng.connect)
    try:
        sync_outer = await anyio.to_thread.run_sync(conn.begin)
        if conn.dialect.name == "sqlite":
            await anyio.to_thread.run_sync(conn.exec_driver_sql, "BEGIN")  # as above
        # Taken in an opening thread, given back in a closing one.
        sync_turns = _Turns(session.name, _turn_timeout(eng))
        open_sync = contextmanager(spec.open)

        def sync_joined() -> Iterator[Session]:
            with sync_turns.sync_turn():
                try:  # the test's own statement on the block's connection failed?
                    aborted = _aborted(conn)  # psycopg: no round trip
                    found = _found_settings(conn) if reset else ""
                except Exception as exc:  # asyncpg says so at the first query
                    if _IN_FAILED_TRANSACTION not in sqlstates(exc):
                        raise
                    aborted = True
                if aborted:
                    raise RuntimeError(_block_aborted(session.name, "`with conn.begin_nested():`"))
                streams_before = _streams_of(conn)
                try:
                    with open_sync(conn, "create_savepoint") as s:
                        _as_in_production(s)
                        yield s
                finally:
                    _end_unit_streams(conn, streams_before, ended)  # as production's checkin
                    if reset:
                        _reset_unit(conn, found)

        try:
            with block_override(lc, session, sync_joined):
                yield conn
        finally:
            with anyio.CancelScope(shield=True):
                # A session still open ends first (noted for the pytest plugin).
                held = await sync_turns.sync_settled(session, _SETTLE)
                try:
                    if sync_outer.is_active:
                        await anyio.to_thread.run_sync(sync_outer.rollback)
                finally:
                    if held:
                        sync_turns.sync_release()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(conn.close)


# --------------------------------------------------------------------------- once


class _OnceSession(_once.RowSession):
    """One ``AsyncConnection`` of the engine, for :func:`tether.integrations._once.run`."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.connection = conn
        self._tx: Any = None

    async def begin(self) -> None:
        self._tx = await self.connection.begin()

    async def commit(self) -> None:
        await self._tx.commit()

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        params = {f"p{i}": arg for i, arg in enumerate(args, 1)}
        result = await self.connection.execute(text(_PARAM.sub(r":p\1", sql)), params)
        if not result.returns_rows:
            return None
        row = result.first()
        return None if row is None else tuple(row)

    def in_transaction(self) -> bool:
        return bool(self._tx.is_active)


_PARAM = re.compile(r"\$(\d+)")


def once(
    lc: Lifecycle,
    engine: Resource[AsyncEngine],
    fn: Callable[[AsyncConnection], Awaitable[Any]],
    *,
    key: str,
    name: str | None = None,
    record: bool = True,
    table: str = "tether_once",
    timeout: float | None = None,
) -> Resource[bool]:
    _check_once_engine(engine, fn, key)

    async def run_once(eng: AsyncEngine, job: _once.Job) -> bool:
        if not isinstance(eng, AsyncEngine):  # a resource of the app's own giving a sync one
            raise TypeError(_once_sync_engine(engine.name, getattr(fn, "__name__", "fn"), key))
        if eng.dialect.name != "postgresql":
            fn_name = getattr(fn, "__name__", "fn")
            msg = (
                f"once {job.name!r}: engine {engine.name!r} is {eng.dialect.name}, and once() "
                f"needs PostgreSQL's advisory locks. For a {eng.dialect.name} database (a test "
                f"run, the demo), declare in its place an app resource of your own that runs "
                f'it at every start: `@lc.resource(scope="app") async def run_{fn_name}(engine: '
                f"AsyncEngine) -> None: async with engine.begin() as conn: await "
                f"{fn_name}(conn)`, choosing between the two by the URL."
            )
            raise TypeError(msg)
        conn = await eng.connect()
        # A transaction of its own whatever the engine's isolation_level (AUTOCOMMIT held the
        # lock for no transaction at all: every worker ran the work, trial 28).
        await conn.execution_options(isolation_level="READ COMMITTED")
        pid = await _backend_pid(conn)  # now: a cancelled query may leave it unreadable
        try:
            ran = await _once.run(_OnceSession(conn), job)
        except BaseException:
            # The server ends the transaction, and frees the lock, with the connection.
            with anyio.CancelScope(shield=True):
                await conn.invalidate()
                await conn.close()
                if pid is not None:
                    await _stop_waiting(eng, pid, job.locks, job.name)
            raise
        with anyio.CancelScope(shield=True):
            await conn.close()
        return ran

    return _once.declare(
        lc, engine, fn, key=key, name=name, record=record, table=table, timeout=timeout,
        run_with=run_once,
    )  # fmt: skip


once.__doc__ = _once.DOC.format(
    dep="engine", conn="an ``AsyncConnection`` (PostgreSQL)",
    nested="``conn.begin_nested()``",
    extra="\n            Alembic runs on it with ``await conn.run_sync(upgrade)`` (see the docs).",
)  # fmt: skip


def _check_once_engine(engine: Resource[Any], fn: object, key: str) -> None:
    """Refuse, at declaration, a sync engine (``sync_engine()``) given to :func:`once`: it
    ran ``await eng.connect()``, which checked out a connection (on the event loop), then
    failed to await it, the connection never given back."""
    if _made_async(engine) is False:  # made by sync_engine()
        raise TypeError(_once_sync_engine(engine.name, getattr(fn, "__name__", "fn"), key))


def _once_sync_engine(engine: str, fn: str, key: str) -> str:
    return (
        f"once({fn}): the engine resource {engine!r} is a sync engine (sync_engine()), and "
        f"once() runs on an async one, engine(). Declare one on the same URL for it (with "
        f"psycopg, postgresql+psycopg:// serves both): migrations = tsa.engine(lc, url, "
        f"name='migrations', pool_size=1), then tsa.once(lc, migrations, {fn}, key={key!r}) "
        f"with `async def {fn}(conn): await conn.run_sync(...)` (run_sync calls your sync "
        f"code, metadata.create_all or Alembic's upgrade, with a sync connection)."
    )


async def _backend_pid(conn: AsyncConnection) -> int | None:
    """The server pid of *conn*'s driver connection (asyncpg or psycopg), without a query."""
    try:
        driver = (await conn.get_raw_connection()).driver_connection
    except Exception:
        return None
    info = getattr(driver, "info", None)  # psycopg
    if info is not None:
        return int(info.backend_pid)
    get_pid = getattr(driver, "get_server_pid", None)  # asyncpg
    return int(get_pid()) if get_pid is not None else None


async def _stop_waiting(eng: AsyncEngine, pid: int, locks: list[int], name: str) -> None:
    """End *pid* on the server if it still waits for (or holds) one of *locks*."""
    try:
        async with asyncio.timeout(1.0), eng.connect() as other:
            sql = text(_PARAM.sub(r":p\1", _once.STOP_WAITING))
            await other.execute(sql, {"p1": pid, "p2": locks})
            await other.commit()
    except Exception as exc:
        log.warning("tether: %r: could not end backend %d on the server (%s)", name, pid, exc)
