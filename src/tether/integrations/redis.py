"""redis-py's asyncio client with tether: one client (and its pool) for the app.

::

    from typing import Annotated

    import redis.asyncio as aioredis
    from fastapi import Depends, FastAPI

    import tether
    from tether.integrations import redis as tredis

    lc = tether.Lifecycle()
    cache = tredis.client(lc, lambda: os.environ["REDIS_URL"], max_connections=20)

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/hits")
    async def hits(r: Annotated[aioredis.Redis, Depends(cache)]) -> dict[str, int]:
        return {"hits": await r.incr("hits")}

* :func:`client` is an app resource: a ``redis.asyncio.Redis`` over redis-py's own
  connection pool, made when the app starts (never at import), which answers ``PING``
  before the app serves (so an unreachable server is a :class:`~tether.StartupError`),
  checked with ``PING``, closed (``aclose()``) at shutdown.
* The client is shared, and redis-py's pool gives each command any free connection: a
  command that would change the state of the connection it runs on (``SELECT`` of another
  database, ``MULTI``, ``WATCH``, ``AUTH``, ``CLIENT SETNAME``, ``SUBSCRIBE``, ...) would
  reach later commands of any request, so it is refused (:class:`~tether.ScopeError`, before
  anything is sent), naming what to use (a client per database or user, a pipeline, PubSub).
  ``r.client()`` (a connection of its own until closed) runs ``MULTI`` and ``WATCH`` by hand:
  a connection it gives back inside a transaction, or watching keys, is disconnected first.
* ``health_check_interval`` makes redis-py ping a connection idle for that long before
  using it, so a server restart or an idle timeout costs no failed command.
* A server that cannot be reached (taking a connection, or reconnecting one inside a
  command), or no connection free (with ``max_connections``, within ``pool_timeout``:
  counted in the resource's ``timeouts``), raises an error that is both redis-py's
  (``ConnectionError`` or ``TimeoutError``, so ``except redis.ConnectionError`` still
  works) and a :class:`~tether.ResourceUnavailable`: left uncaught, the request is
  answered 503 with ``Retry-After``, naming the client and its pool's size and
  connections in use.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import anyio

try:
    import redis
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.redis needs redis-py: pip install 'tether[redis]'"
    raise ImportError(msg) from exc

from .._errors import (
    ClientDisconnected,
    ResourceUnavailable,
    ScopeError,
    check_bool,
    check_number,
    describe,
    for_good,
)
from .._resource import Resource
from .._stats import PoolStats
from ._common import (
    LOSES_CANCEL,
    Dsn,
    asyncio_only,
    caller_outside,
    check_check,
    check_dsn,
    did_you_mean,
    dropped_cancellation,
    keyword_names,
    not_an_option,
    per_unit,
    redact,
    resolve_dsn,
    saturation,
    unavailable,
    unit_now,
)

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check, Resource

__all__ = ["RedisTimeout", "RedisUnavailable", "client"]

log = logging.getLogger("tether")


class RedisUnavailable(ResourceUnavailable, redis_errors.ConnectionError):
    """The Redis server cannot be reached, or the pool had no connection free in time.

    A ``redis.exceptions.ConnectionError`` and a :class:`~tether.ResourceUnavailable`.
    """

    def __repr__(self) -> str:  # redis-py's is "network:ConnectionError", the message lost
        return f"{type(self).__name__}({str(self)!r})"


class RedisTimeout(ResourceUnavailable, redis_errors.TimeoutError):
    """Connecting to the Redis server timed out.

    A ``redis.exceptions.TimeoutError`` and a :class:`~tether.ResourceUnavailable`.
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


# Options of the user's that replace tether's retry.
_RETRY_OPTIONS = frozenset({"retry", "retry_on_error", "retry_on_timeout"})

# Refusals are the server answering "no": retrying later will not help.
_REFUSALS = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)


class _Refusal(Exception):
    """A refusal of the server's, carried past redis-py's retry (`_Retry`)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


class _Retry(Retry):
    """redis-py's retry on a connection error, but for the server's refusals (a wrong or
    missing password, an ACL's): ``AuthenticationError`` is a ``ConnectionError``, so it was
    retried; and redis-py 5.0's health check, retrying its PING within each reconnect,
    recursed until Python's limit ("maximum recursion depth exceeded") on a missing
    password."""

    async def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            try:
                return await do()
            except _REFUSALS as exc:
                raise _Refusal(exc) from None

        try:
            return await super().call_with_retry(once, fail, *args, **kwargs)
        except _Refusal as refused:
            raise refused.exc from None


class _PoolMixin:
    """Turns "cannot connect" and "no connection free" into ResourceUnavailable errors."""

    tether_name = "redis"
    tether_shown = "redis"
    tether_waiting = 0  # tasks in get_connection now (the pool's figures)
    tether_served = 0.0  # time.monotonic() when it last handed out a connection (readiness)
    tether_timed_out_at = -math.inf  # ... and when a wait for one last timed out (readiness)
    tether_resource: Any = None  # the app resource, whose counters count the pool's timeouts

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.tether_waiting += 1
        try:
            conn = await super().get_connection(*args, **kwargs)  # type: ignore[misc]
            self.tether_served = time.monotonic()
            return conn
        except _REFUSALS:
            raise
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            if isinstance(exc, ResourceUnavailable):
                raise
            raise self._unavailable(exc) from exc
        finally:
            self.tether_waiting -= 1

    def make_connection(self) -> Any:
        conn = super().make_connection()  # type: ignore[misc]
        # redis-py reconnects a connection that went away inside the command itself (its
        # retry), past get_connection: its connect failures are this pool's too.
        for method in ("connect", "connect_check_health"):  # the latter: redis-py 8, not 5.0
            if hasattr(conn, method):
                _mapping_connect_failures(self, conn, method)
        if LOSES_CANCEL:  # redis-py sends each command under asyncio.wait_for
            _delivering_cancellations(conn)
        _closed_transport_is_lost(conn)
        return conn

    def _unavailable(self, exc: BaseException, failed: Any = None) -> ResourceUnavailable:
        """The 503 for *exc*; *failed*: the connection that could not connect, not counted
        as in use (as it is not once get_connection gave it back)."""
        pool: Any = self
        taken = getattr(pool, "_in_use_connections", ())
        in_use = len(taken) - (failed is not None and failed in taken)
        limit = pool.max_connections
        size = limit if isinstance(limit, int) and limit < _UNBOUNDED else None
        unreachable = False
        said = str(exc)
        if isinstance(self, aioredis.BlockingConnectionPool) and "No connection available" in said:
            reason = "no connection came free in time (max_connections reached)"
            cls: type[ResourceUnavailable] = RedisUnavailable
            timed_out = True
            self.tether_timed_out_at = time.monotonic()
            counters = getattr(self.tether_resource, "counters", None)
            if counters is not None:  # db.client.connection.timeouts
                counters.timeouts += 1
        elif isinstance(exc, redis_errors.MaxConnectionsError) or "Too many connections" in said:
            reason = (
                f"every connection is in use (max_connections={limit}), and this pool does "
                f"not wait for one: pass max_connections= to wait up to pool_timeout"
            )
            cls = RedisUnavailable
            timed_out = False
        else:
            said = str(exc).rstrip(". ")
            reason = f"cannot reach {self.tether_shown}: {type(exc).__name__}: {said}"
            unreachable = True
            cls = RedisTimeout if isinstance(exc, redis_errors.TimeoutError) else RedisUnavailable
            timed_out = False
        plain = unavailable(
            self.tether_name, reason, size=size, in_use=in_use, backend="the Redis server",
            unreachable=unreachable,
        )  # fmt: skip
        return cls(
            str(plain), resource=self.tether_name, retry_after=plain.retry_after,
            timed_out=timed_out,
        )  # fmt: skip


def _mapping_connect_failures(pool: _PoolMixin, conn: Any, method: str) -> None:
    """Make *conn*'s failures to (re)connect, in its *method*, the pool's 503 errors.

    They stay redis-py's ``ConnectionError`` and ``TimeoutError``, so its retry still sees
    them; refusals (a wrong password) stay as they are."""
    connect = getattr(conn, method)

    async def connecting(*args: Any, **kwargs: Any) -> None:
        try:
            await connect(*args, **kwargs)
        except _REFUSALS:
            raise
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            if isinstance(exc, ResourceUnavailable):
                raise
            raise pool._unavailable(exc, conn) from exc

    setattr(conn, method, connecting)


def _closed_transport_is_lost(conn: Any) -> None:
    """A write on a connection the network reset (an RST) is redis-py's ``ConnectionError``,
    as on asyncio's own loop, so that its retry reconnects (and a reconnect that fails is
    the pool's 503). On uvloop (uvicorn's default) it was a ``RuntimeError`` ("unable to
    perform operation on <TCPTransport closed=True ...>; the handler is closed"), a 500 for
    the first command on each connection reset (trial 22)."""
    send = conn.send_packed_command

    async def send_packed_command(command: Any, check_health: bool = True) -> None:
        try:
            await send(command, check_health)
        except RuntimeError as exc:
            if "handler is closed" not in str(exc):
                raise
            msg = f"Error writing to the connection: it was reset ({exc})"
            raise redis_errors.ConnectionError(msg) from exc

    conn.send_packed_command = send_packed_command


def _delivering_cancellations(conn: Any) -> None:
    """Raise the cancellation Python 3.11 dropped in *conn*'s send, as Python 3.12 does."""
    send = conn.send_packed_command

    async def send_packed_command(command: Any, check_health: bool = True) -> None:
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        await send(command, check_health)
        if task is not None and task.cancelling() > cancels:
            # The command went out, its reply is on its way: drop the connection, as
            # redis-py does for a send that is cancelled, so the reply reaches no one.
            await conn.disconnect(nowait=True)
            raise dropped_cancellation(task)

    conn.send_packed_command = send_packed_command


#: Commands that change the state of the connection they run on: redis-py's pool hands that
#: connection to any later command, another request's too (redis-py resets nothing). By
#: kind: what the command would leave the connection (``{sub}``: its argument), and the form
#: that changes nothing.
_CONNECTION_STATE = {
    "SELECT": (
        "using database {sub}, not the client's",
        "A client's database is fixed: use a client of its own for database {sub}, its number "
        "in the URL (tredis.client(lc, 'redis://host:6379/{sub}', name=...)), or "
        "redis.asyncio.Redis(db={sub}) in a script.",
    ),
    "MULTI": (
        "inside a transaction, where every later command is queued, not run, until EXEC",
        "Run a transaction in a pipeline, which holds one connection for it: async with "
        "r.pipeline(transaction=True) as pipe: pipe.incr(key); ...; await pipe.execute(). "
        "Or by hand on a connection of its own: async with r.client() as c: await "
        "c.execute_command('MULTI'); ...",
    ),
    "WATCH": (
        "watching keys until an EXEC",
        "WATCH in a pipeline, which holds one connection until it ends: async with "
        "r.pipeline() as pipe: await pipe.watch(key); ...; pipe.multi(); ...; "
        "await pipe.execute(). Or by hand on a connection of its own: async with r.client() "
        "as c: await c.execute_command('WATCH', key); ...",
    ),
    "AUTH": (
        "authenticated as another user",
        "Use a client of its own for each ACL user: the user and password in its URL "
        "(redis://user:password@host/0), or username= and password=.",
    ),
    "HELLO": (
        "speaking another protocol than redis-py expects on it",
        "Set the protocol for every connection of the client: protocol=2 or protocol=3.",
    ),
    "RESET": (
        "reset to the server's defaults (database 0, the default user)",
        "Leave the connections' state to the pool.",
    ),
    "CLIENT": (
        "with a setting of its own",
        "Give every connection of the client the setting (client_name=, ...), or use a client "
        "of its own for it.",
    ),
    "SUBSCRIBE": (
        "in subscribed mode, where it answers nothing else",
        "Subscribe through a PubSub object, which holds a connection of its own: "
        "async with r.pubsub() as ps: await ps.subscribe(channel).",
    ),
}

#: ``CLIENT`` subcommands that change the connection's own settings.
_CLIENT_SETTINGS = frozenset({"REPLY", "SETNAME", "TRACKING", "CACHING", "NO-EVICT", "NO-TOUCH"})
_SUBSCRIBE = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"})


def _word(value: Any) -> str:
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).upper()


def _changes_connection(args: tuple[Any, ...], db: Any) -> tuple[str, str, str] | None:
    """(kind, command as shown, its first argument) if the command *args* changes the state
    of the connection it runs on (*db*: the client's database, which a SELECT of leaves as it
    is), else None. Only a command's name, and SELECT's and CLIENT's first argument, are
    shown: AUTH's arguments hold a password."""
    words = [*_word(args[0]).split(), *(_word(arg) for arg in args[1:2])]
    name = words[0] if words else ""
    sub = words[1] if len(words) > 1 else ""
    if name == "SELECT":
        return None if sub == _word(db) else ("SELECT", f"SELECT {sub}", sub)
    if name in ("MULTI", "WATCH", "AUTH", "RESET"):
        return name, name, ""
    if name == "HELLO" and sub:  # a protocol, or AUTH: HELLO alone only reads
        if "AUTH" in map(_word, args):
            return "AUTH", "HELLO ... AUTH", ""
        return "HELLO", "HELLO", ""
    if name == "CLIENT" and sub in _CLIENT_SETTINGS:
        return "CLIENT", f"CLIENT {sub}", sub
    if name in _SUBSCRIBE:
        return "SUBSCRIBE", name, ""
    return None


#: The commands `_changes_connection` looks at further, by their name.
_WATCHED = frozenset({"SELECT", "MULTI", "WATCH", "AUTH", "RESET", "HELLO", "CLIENT", *_SUBSCRIBE})
#: Whether a command's first argument (redis-py passes a constant: ``"GET"``, ``"CLIENT
#: SETNAME"``) names one of them: one dict lookup per command instead of parsing it.
_watched: dict[Any, bool] = {}


def _is_watched(first: Any) -> bool:
    words = _word(first).split()
    watched = bool(words) and words[0] in _WATCHED
    if isinstance(first, str | bytes) and len(_watched) < 4096:
        _watched[first] = watched
    return watched


class _Client(aioredis.Redis):
    """The client tether hands out: redis-py's, but for the commands that would change the
    state of the pooled connection they run on (`_CONNECTION_STATE`), refused before
    anything is sent. Pipelines and PubSub objects hold a connection of their own, and run
    them as redis-py does; so does :meth:`client` for a transaction (`_Dedicated`)."""

    tether_name = "redis"
    # The Lifecycle and its request resource of the connections `client()` clones hold
    # (`_Held`); None on a client tether did not open.
    tether_held: tuple[Lifecycle, Resource[_Held]] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            seen = _watched.get(args[0]) if args else False
        except TypeError:  # an unhashable first argument: not one of redis-py's names
            seen = None
        if seen is not False and _is_watched(args[0]):
            pool: Any = self.connection_pool
            changes = _changes_connection(args, pool.connection_kwargs.get("db", 0))
            if changes is not None:
                raise self._refusal(*changes)
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def _refusal(self, kind: str, command: str, sub: str) -> ScopeError:
        what, fix = (text.format(sub=sub) for text in _CONNECTION_STATE[kind])
        msg = (
            f"Redis client {self.tether_name!r}: {command} would leave the pooled "
            f"connection it runs on {what}, and redis-py hands that connection to any "
            f"later command, another request's too: refused, nothing was sent. {fix}"
        )
        return ScopeError(msg)

    def client(self) -> _Dedicated:
        """redis-py's client holding one connection of the pool until it is closed (as
        ``Redis.client()``), named as this one, where a transaction may run by hand."""
        dedicated = _Dedicated(connection_pool=self.connection_pool, single_connection_client=True)
        dedicated.tether_name = self.tether_name
        dedicated.tether_held = self.tether_held
        return dedicated

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
        """redis-py's pipeline; the connection it takes on ``watch()`` (and holds until
        ``execute()`` or ``reset()``) is noted in the unit of work, given back at its end if
        still held. Its ``execute()`` without ``watch()`` gives its connection back itself,
        and passes by none of this."""
        pipe: Any = super().pipeline(transaction, shard_hint)
        if self.tether_held is not None:
            _noting(pipe, "immediate_execute_command", self._tether_hold, "pipeline")
        _checking(pipe, self)
        return pipe

    def pubsub(self, **kwargs: Any) -> Any:
        """redis-py's PubSub; the connection it takes on its first command (``subscribe()``)
        is noted in the unit of work, given back (closed) at its end if still held."""
        ps: Any = super().pubsub(**kwargs)
        if self.tether_held is not None:
            _noting(ps, "execute_command", self._tether_hold, "pubsub")
        return ps

    async def _tether_hold(self, holder: Any, kind: str) -> None:
        """Note *holder* (taking a connection of the pool) in the unit of work this runs in."""
        if self.tether_held is None:
            return
        lc, held = self.tether_held
        unit = unit_now(lc)
        if unit is not None:
            holders = await unit.get(held)
            holders.label = unit.label
            holders.add(holder, caller_outside(_REDIS_DIR), kind)


def _checking(pipe: Any, client: _Client) -> None:
    """Refuse the commands of *pipe* that would change the state of the connection it runs
    on (`_CONNECTION_STATE`), before anything is sent: it goes back to the pool, and to any
    later command, another request's too. Those it buffers are checked at ``execute()``,
    those it sends at once (after ``watch()``) as they are sent; the pipeline's own
    ``WATCH`` passes (its ``reset()`` unwatches). A ``SELECT 3`` in a pipeline had every later
    request of that connection read database 3, and a ``MULTI`` in one that is not a
    transaction had them answered ``QUEUED``, their writes lost, with 200s (trials 27, 28).
    The pipeline is reset (its commands dropped), as redis-py's own errors leave it. And its
    connection lost while it watched keys is the 503 `r.client()` gives for it. Through a
    weak reference, as `_noting`."""
    ref = weakref.ref(pipe)
    run = type(pipe).execute
    noted = pipe.__dict__.get("immediate_execute_command")  # `_noting`'s, if it is there
    run_now = type(pipe).immediate_execute_command
    db = client.connection_pool.connection_kwargs.get("db", 0)

    async def refuse_if_changing(it: Any, command: tuple[Any, ...]) -> None:
        if command and _is_watched(command[0]) and _word(command[0]) != "WATCH":
            changes = _changes_connection(command, db)
            if changes is not None:
                await it.reset()
                raise client._refusal(*changes)

    async def execute(*args: Any, **kwargs: Any) -> Any:
        it: Any = ref()  # alive: this runs as its method
        for command, _options in it.command_stack:
            await refuse_if_changing(it, command)
        try:
            return await run(it, *args, **kwargs)
        except redis_errors.WatchError as exc:
            lost = _lost_while_watching(client, exc)
            if lost is exc:
                raise
            raise lost from exc

    async def immediate_execute_command(*args: Any, **options: Any) -> Any:
        it: Any = ref()
        await refuse_if_changing(it, args)
        try:
            if noted is not None:
                return await noted(*args, **options)
            return await run_now(it, *args, **options)
        except redis_errors.WatchError as exc:
            lost = _lost_while_watching(client, exc)
            if lost is exc:
                raise
            raise lost from exc

    pipe.execute = execute
    pipe.immediate_execute_command = immediate_execute_command


def _lost_while_watching(client: _Client, exc: redis_errors.WatchError) -> Exception:
    """*exc* as it is (a key it watched changed: the optimistic lock's "run it again"), or,
    for redis-py's "A ConnectionError (or TimeoutError) occurred while watching one or more
    keys", the 503 `r.client()` gives for its connection lost (``lost``): a 500 before, and
    `@idempotent` said "a key it watched changed" (trial 27)."""
    said = str(exc)
    # (redis-py 5.0 says "A ConnectionError occurred on while watching ...")
    if "while watching" not in said or not ("ConnectionError" in said or "TimeoutError" in said):
        return exc
    msg = (
        f"Redis client {client.tether_name!r}: the connection of a pipeline was lost while "
        f"watching keys (after WATCH): the server forgot the watched keys with it, and ran "
        f"none of the transaction's commands: run the transaction again, from WATCH. Retry "
        f"shortly; if it persists, check the Redis server."
    )
    return RedisUnavailable(msg, resource=client.tether_name, lost=True)


def _noting(holder: Any, method: str, hold: Any, kind: str) -> None:
    """Make *holder*'s *method* (where it takes a connection of the pool when it holds none)
    note it first with *hold*. Through a weak reference: no cycle keeps a pipeline or a
    PubSub (and its connection) alive until the garbage collector runs."""
    ref = weakref.ref(holder)
    run = getattr(type(holder), method)

    async def noting(*args: Any, **kwargs: Any) -> Any:
        it: Any = ref()  # alive: this runs as its method
        if it.connection is None:  # taking one
            await hold(it, kind)
        return await run(it, *args, **kwargs)

    setattr(holder, method, noting)


#: The commands that end a transaction (and unwatch every key) on a dedicated connection.
_ENDS_TRANSACTION = frozenset({"EXEC", "DISCARD"})
#: A connection's methods that (re)connect it: redis-py 5's, and 8's.
_RECONNECTS = ("connect", "connect_check_health")


class _Dedicated(_Client):
    """``r.client()``: one connection of the pool, held until ``aclose()`` gives it back
    (redis-py's ``single_connection_client``). ``MULTI``, ``WATCH``, ``EXEC``, ``DISCARD``
    and ``UNWATCH`` run on it, as on a pipeline's connection:

    * redis-py's pool resets nothing on release: a connection given back inside a
      transaction or with keys watched (a request that failed between ``MULTI`` and
      ``EXEC``) is disconnected first, and the pool reconnects it, clean, when next used.
    * redis-py's retry reconnects a connection that went away and sends the command again,
      and its health check does when its PING, queued inside MULTI, is not answered: on the
      new connection, without the transaction, the commands after MULTI ran at once and
      EXEC ran unguarded by the watched keys. While the server holds a transaction or
      watched keys on it, the connection is not reconnected (the command fails: `_lost`, a
      503; the transaction is run again), and inside MULTI it is not health-checked.

    The other commands that change a connection's state stay refused: they would outlive
    the transaction, into the pool."""

    tether_multi = False  # MULTI was sent, and no EXEC or DISCARD answered since
    tether_watching = False  # WATCH was sent, and no EXEC, DISCARD or UNWATCH answered since
    tether_saved: dict[str, Any] | None = None  # the reconnecting methods `_pin` replaced
    tether_lost = False  # a reconnect was refused in the command under way

    async def initialize(self) -> _Dedicated:
        # redis-py takes the connection here (`async with`, or the first command): noted
        # in the unit of work this runs in, which gives it back at its end if still held.
        if self.connection is None and self.tether_held is not None:
            await self._tether_hold(self, "client")
        await super().initialize()
        return self

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            seen = _watched.get(args[0]) if args else False
        except TypeError:  # an unhashable first argument: not one of redis-py's names
            seen = None
        if seen is False and not (self.tether_multi or self.tether_watching):
            return await aioredis.Redis.execute_command(self, *args, **options)  # type: ignore[no-untyped-call]
        words = _word(args[0]).split() if args else []
        name = words[0] if words else ""
        if name in _WATCHED:
            pool: Any = self.connection_pool
            changes = _changes_connection(args, pool.connection_kwargs.get("db", 0))
            if changes is not None and changes[0] not in ("MULTI", "WATCH"):
                raise self._refusal(*changes)
        conn = self.connection
        if self.tether_multi and conn is not None:
            # No health check: its PING would be queued, not answered, and redis-py would
            # take the connection for dead. A dead one fails the command itself (`_lost`).
            conn.next_health_check = math.inf
        # Marked before it is sent: one cancelled or failed on its way may have reached the
        # server, and the connection is then released disconnected.
        if name == "MULTI":
            self.tether_multi = True
        elif name == "WATCH":
            self.tether_watching = True
        try:
            result = await aioredis.Redis.execute_command(self, *args, **options)  # type: ignore[no-untyped-call]
        except BaseException:
            if self.tether_lost:  # the server ended the transaction with the connection
                self.tether_lost = self.tether_multi = self.tether_watching = False
                self._unpin()
            elif self.tether_multi or self.tether_watching:  # a MULTI or WATCH that failed
                self._pin()  # may have been run all the same
            raise
        # Cleared only once answered: an EXEC that failed (EXECABORT, a lost connection)
        # leaves the connection to be disconnected at release, whatever the server kept.
        if name in _ENDS_TRANSACTION:
            self.tether_multi = self.tether_watching = False
        elif name == "UNWATCH" and not self.tether_multi:  # inside MULTI it is only queued
            self.tether_watching = False
        if self.tether_multi or self.tether_watching:
            self._pin()
        else:
            self._unpin()
        return result

    def _pin(self) -> None:
        """Refuse to reconnect the connection (redis-py's retry, its health check) while the
        server holds a transaction or watched keys on it."""
        conn = self.connection
        if conn is None or self.tether_saved is not None:
            return

        async def refusing(*args: Any, **kwargs: Any) -> None:
            if conn.is_connected:  # nothing to do, as redis-py's own
                return
            self.tether_lost = True
            raise self._lost()

        saved: dict[str, Any] = {}
        for method in _RECONNECTS:
            if hasattr(conn, method):
                saved[method] = vars(conn).get(method)  # tether's wrapper, or None: the class's
                setattr(conn, method, refusing)
        self.tether_saved = saved

    def _unpin(self) -> None:
        saved, self.tether_saved = self.tether_saved, None
        conn = self.connection
        if saved is None or conn is None:
            return
        for method, previous in saved.items():
            if previous is None:
                delattr(conn, method)
            else:
                setattr(conn, method, previous)

    def _lost(self) -> RedisUnavailable:
        if self.tether_multi:
            where, ended, outside, start = (
                "inside a transaction (after MULTI)",
                "dropped the transaction with it, and ran none of its queued commands",
                "outside the transaction",
                "MULTI (or WATCH)",
            )
        else:
            where, ended, outside, start = (
                "while watching keys (after WATCH)",
                "forgot the watched keys with it",
                "unguarded by the watched keys",
                "WATCH",
            )
        msg = (
            f"Redis client {self.tether_name!r}: the connection of r.client() was lost "
            f"{where}: the server {ended}. It was not reconnected, which would run the next "
            f"commands {outside}: run the transaction again, from {start}. Retry shortly; if "
            f"it persists, check the Redis server."
        )
        return RedisUnavailable(msg, resource=self.tether_name, lost=True)

    async def __aexit__(self, *exc_info: Any) -> None:
        # redis-py shields its close with asyncio.shield, which an anyio cancel scope (a
        # request whose client went away, a move_on_after) cancels again at once: it never
        # gave the connection back, and the pool was a connection short for good.
        with anyio.CancelScope(shield=True):
            await super().__aexit__(*exc_info)  # type: ignore[no-untyped-call]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        conn = self.connection
        if conn is not None and (self.tether_multi or self.tether_watching):
            # The server keeps the transaction and the watched keys with the connection,
            # and redis-py's pool would hand it on as it is, to any later command: close
            # it (no round trip, nothing to fail or wait for) before it goes back.
            self.tether_multi = self.tether_watching = False
            await conn.disconnect(nowait=True)
        self._unpin()  # the pool reconnects it as any other
        await super().aclose(close_connection_pool)


_REDIS_DIR = os.path.dirname(os.path.abspath(aioredis.__file__)).rsplit(os.sep, 1)[0] + os.sep


#: What `_Held` says of a connection still held at the end of a unit of work, by what
#: held it: the holder, what tether did, and how to close it.
_HOLDERS = {
    "client": (
        "r.client() (taken at {where})",
        "gave it back to the pool",
        "Close it: `async with r.client() as c:`, or `await c.aclose()`.",
    ),
    "pipeline": (
        "a pipeline watching keys (r.pipeline(), watch() at {where})",
        "disconnected it (the server forgot the watched keys) and gave it back to the pool",
        "End the pipeline on every way out, an early return or raise too: `async with "
        "r.pipeline() as pipe:`, or `await pipe.reset()` in a `finally`.",
    ),
    "pubsub": (
        "a PubSub (r.pubsub(), first used at {where})",
        "closed it (its subscriptions with it) and gave it back to the pool",
        "Close it: `async with r.pubsub() as ps:`, or `await ps.aclose()`.",
    ),
}


class _Held:
    """The connections ``r.client()`` clones, pipelines (after ``watch()``) and PubSub
    objects took in one unit of work, given back at its end if still held: redis-py keeps
    one out of the pool for good when its holder is never closed (its garbage collection
    closes the socket, and never gives the connection back)."""

    __slots__ = ("held", "label")

    def __init__(self) -> None:
        self.label = "the unit of work"
        self.held: list[tuple[Any, str, str]] = []

    def add(self, holder: Any, where: str, kind: str = "client") -> None:
        held = self.held
        if len(held) >= 16:  # a long unit (a WebSocket) taking many: forget those given back
            held[:] = [entry for entry in held if entry[0].connection is not None]
        held.append((holder, where, kind))

    async def close(self, name: str, res: Resource[Any], failure: BaseException | None) -> None:
        held, self.held = self.held, []
        for holder, where, kind in held:
            if holder.connection is None:
                continue  # closed by the app (or never taken)
            with anyio.CancelScope(shield=True):
                try:
                    await _give_back(holder, kind)
                except Exception as exc:  # pragma: no cover - redis-py releases it anyway
                    log.debug("tether: giving back a connection of %s failed: %r", kind, exc)
            if isinstance(failure, ClientDisconnected):
                continue  # its client went away mid-way: nothing to fix in the code
            res.counters.leaks += 1
            by, done, fix = _HOLDERS[kind]
            log.warning(
                "tether: %s ended with a connection of redis client %r still held by %s: "
                "tether %s. %s",
                self.label, name, by.format(where=where), done, fix,
            )  # fmt: skip


async def _give_back(holder: Any, kind: str) -> None:
    """Give *holder*'s connection back to the pool, leaving nothing of the unit's on it."""
    if kind == "client":
        await holder.aclose()  # disconnected first if inside a transaction
        return
    conn = holder.connection
    # Disconnected, not reset with a round trip (UNWATCH, UNSUBSCRIBE): nothing to wait for
    # or to fail; the server forgets the watched keys and subscriptions with it.
    await conn.disconnect(nowait=True)
    if kind == "pipeline":
        holder.watching = False  # or reset() would send UNWATCH, reconnecting it
        await holder.reset()
    else:
        await (holder.aclose if hasattr(holder, "aclose") else holder.reset)()


class _Pool(_PoolMixin, aioredis.ConnectionPool):
    pass


class _BlockingPool(_PoolMixin, aioredis.BlockingConnectionPool):
    pass


@functools.cache
def _pool_options(blocking: bool) -> tuple[frozenset[str], frozenset[str]] | None:
    """The keyword arguments this redis-py's pool (a ``BlockingConnectionPool`` if
    *blocking*) and its connections (TCP, TLS, Unix socket: the URL picks one) take besides
    those client() sets itself, and those with client()'s own (for a suggestion); ``None``
    if a signature cannot be read."""
    base = getattr(aioredis.connection, "AbstractConnection", None)
    classes = (
        aioredis.Connection, aioredis.SSLConnection, aioredis.UnixDomainSocketConnection
    )  # fmt: skip
    try:
        taken = set(keyword_names(aioredis.ConnectionPool.__init__))
        if blocking:
            taken |= keyword_names(aioredis.BlockingConnectionPool.__init__)
        for cls in classes:
            for part in cls.__mro__:
                if "__init__" in vars(part) and (base is None or issubclass(part, base)):
                    taken |= keyword_names(vars(part)["__init__"])
        own = keyword_names(client) - {"lc", "url"}
    except (TypeError, ValueError):  # pragma: no cover - a signature inspect cannot read
        return None
    taken -= {"self", "timeout", "max_connections"}  # client()'s: pool_timeout=, max_connections=
    return frozenset(taken - own), frozenset(taken | own)


def _check_options(kw: dict[str, Any], blocking: bool, where: str) -> None:
    """Refuse a keyword argument neither client() nor this redis-py's pool and connections
    take (``decode_respones=True``) at the declaration: redis-py would refuse it only when
    the app starts. Not with ``connection_class=``, whose class may take other ones. And
    ``connection_pool=``: client() makes the pool (redis-py passed it on to each connection,
    which refused it at startup)."""
    if "connection_pool" in kw:
        msg = (
            f"{where}: connection_pool= cannot be given: client() makes the connection pool "
            f"from the URL and owns it (it closes it at shutdown), and redis-py would pass "
            f"connection_pool= on to each connection, which refuses it at startup. Give the "
            f"pool's options as keywords instead (max_connections=, pool_timeout=, "
            f"connection_class=, ...), or declare an app resource of your own returning "
            f"redis.asyncio.Redis(connection_pool=...) to use a pool you make."
        )
        raise TypeError(msg)
    if "connection_class" in kw:
        return
    options = _pool_options(blocking)
    if options is None:
        return  # pragma: no cover - a signature inspect cannot read
    accepted, known = options
    for key in kw:
        if key in accepted:
            continue
        in_blocking = _pool_options(True) or (accepted, known)
        if key in in_blocking[0]:  # queue_class=: BlockingConnectionPool's
            msg = (
                f"{where}: {key}= is an option of redis-py's BlockingConnectionPool, which "
                f"client() makes only given max_connections=. Give max_connections= (the "
                f"pool's size), or remove it."
            )
            raise TypeError(msg)
        if key == "ssl":  # redis.asyncio.Redis(ssl=True): a URL's scheme here
            fix = (
                "TLS is asked for by the URL's scheme: use rediss://... (the ssl_* options, "
                "such as ssl_ca_certs=, go with it)."
            )
        elif key in _CLIENT_ONLY:
            fix = (
                "It is an option of redis.asyncio.Redis itself, which client() makes with "
                "its own settings: remove it."
            )
        else:
            fix = did_you_mean(key, known)
        of = f"redis-py's connection pool or its connections (redis {redis.__version__})"
        raise not_an_option(where, key, "client()", of, fix)


#: Options of ``redis.asyncio.Redis`` that are neither the pool's nor its connections'.
_CLIENT_ONLY = frozenset(
    {"single_connection_client", "auto_close_connection_pool", "cache", "cache_config"}
)


def client(
    lc: Lifecycle,
    url: Dsn,
    *,
    name: str = "redis",
    health_check_interval: int = 30,
    socket_timeout: float = 5.0,
    socket_connect_timeout: float = 5.0,
    max_connections: int | None = None,
    pool_timeout: float = 5.0,
    check: Check | bool = True,
    retries: int = 0,
    backoff: float = 0.5,
    required: bool = True,
    **kw: Any,
) -> Resource[aioredis.Redis]:
    """Register a ``redis.asyncio.Redis`` client as an app resource of *lc*; return it.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``), or a
            function returning it (called when the app starts, not at import).
        health_check_interval: seconds a connection may sit idle before redis-py pings it
            on its next use.
        socket_timeout, socket_connect_timeout: seconds a command, and a connect, may take.
        max_connections: the pool's size. With a number, a command waits up to
            *pool_timeout* for a free connection (a ``BlockingConnectionPool``). ``None``:
            redis-py's default pool (100 connections in redis-py 8, no cap in redis-py 5),
            where a command that finds none free fails at once.
        check: the health check: ``True`` sends ``PING``, ``False`` none, or a function
            given the client.
        retries, backoff: retry the first ``PING`` at startup.
        required: ``False`` starts the app without it when it cannot open (see
            ``lc.resource``): what needs it answers 503 until a background retry opens it.
        kw: passed to the connection pool and its connections (``decode_responses``,
            ``client_name``, ``ssl_*``, ...; ``retry``, ``retry_on_error`` or
            ``retry_on_timeout`` replace the default of one immediate retry on connection
            errors).
    """

    where = f"Redis client {name!r}"
    example = "lambda: os.environ['REDIS_URL']"
    check_dsn(url, where, what="URL", example=example)
    check_number(health_check_interval, "health_check_interval", where, example="30")
    check_number(socket_timeout, "socket_timeout", where, above=True, none=True)
    check_number(socket_connect_timeout, "socket_connect_timeout", where, above=True, none=True)
    check_number(max_connections, "max_connections", where, integer=True, least=1, none=True)
    check_number(pool_timeout, "pool_timeout", where, above=True)
    _check_options(kw, max_connections is not None, where)
    for option in ("decode_responses", "retry_on_timeout"):  # redis-py's on/off options
        if option in kw:
            check_bool(kw[option], option, where)
    check_check(
        check,
        where,
        default="PING",
        of="client",
        example='lambda r: r.get("health")',
    )

    async def open_client() -> AsyncIterator[aioredis.Redis]:
        asyncio_only(where, "redis-py's asyncio client")
        target = resolve_dsn(url, where, what="URL", example=example)
        shown = redact(target)
        options: dict[str, Any] = {
            "health_check_interval": health_check_interval,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **kw,
        }
        if not _RETRY_OPTIONS.intersection(kw):
            # One immediate retry on a connection error: a connection that went stale (a
            # server restart) is reconnected at once; a server that is down fails fast, not
            # after backoffs. Not on a timeout (redis-py 6+ retries those by default): a
            # command whose reply is late may have run, and would run twice (an INCR, an
            # EVAL). ``retry_on_error`` makes redis-py 5 retry the command itself too, as 6+
            # does; it is one list for every connection of the pool, which redis-py does
            # not change without ``retry_on_timeout``. Your own retry options replace these.
            options["retry"] = _Retry(
                NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)
            )
            options["retry_on_error"] = [redis_errors.ConnectionError]
        pool: _Pool | _BlockingPool
        if max_connections is None:
            pool = _Pool.from_url(target, **options)
        else:
            pool = _BlockingPool.from_url(
                target, max_connections=max_connections, timeout=pool_timeout, **options
            )
        pool.tether_name = name
        pool.tether_shown = shown
        pool.tether_resource = res
        pool.tether_served = time.monotonic()
        r = _Client.from_pool(pool)  # the client owns the pool: aclose() closes it
        r.tether_name = name  # type: ignore[attr-defined]  # a _Client: from_pool is cls(...)
        r.tether_held = (lc, held)  # type: ignore[attr-defined]
        try:
            await r.ping()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):  # also when a cancellation ends the open
                await r.aclose()
            if isinstance(exc, _REFUSALS):
                # A wrong or missing password, an ACL user without the right: each retry is
                # refused again (and counts as a failed login), so none is made.
                msg = (
                    f"Redis client {name!r}: the server at {shown} refused the credentials "
                    f"({describe(exc).rstrip('.')}). Fix the user and password in its URL, or "
                    f"the server's ACL."
                )
                raise for_good(type(exc)(msg)) from exc
            raise
        try:
            log.info("tether: redis client %r open on %s", name, shown)
            yield r
        finally:
            await r.aclose()

    res: Resource[aioredis.Redis] = lc.resource(
        scope="app",
        name=name,
        check=_client_check(check),
        retries=retries,
        backoff=backoff,
        required=required,
    )(open_client)
    res.pool_stats = lambda r: _figures(name, r)
    res.counts_waits = True
    res.async_api = "a redis.asyncio client"

    # The connections `r.client()` clones hold in a unit of work, given back at its end.
    held = per_unit(
        lc,
        f"{name} dedicated connections",
        _Held,
        lambda holders, f: holders.close(name, res, f),
        owner=res,
        held="its dedicated connections: pubsub(), a pipeline after watch(), client()",
    )
    # Readiness reads a full pool instead of queueing a PING behind it (or, in a pool that
    # does not wait, failing it at once). No figures for a pool without a cap: PING.
    res.saturation = lambda r: saturation(
        _figures(name, r),
        r.connection_pool.tether_served,
        pool_timeout,
        "pool_timeout",
        timed_out_at=r.connection_pool.tether_timed_out_at,
        holders="the commands holding them",
        backend="the Redis server",
    )
    res.aside_check = _aside_check
    return res


def _aside_check(r: Any, within: float) -> Awaitable[None] | None:
    """A busy pool's check (``Resource.aside_check``): a PING on a connection of its own,
    outside the pool, once none has been handed out for longer than *within* (the check's
    timeout, which bounds it). A frozen server (``SIGSTOP``, a network partition that
    drops packets) fills the pool with commands waiting on it, and read as busy, so ready,
    until a wait for a connection timed out: ``pool_timeout`` and more (trial 14)."""
    pool = r.connection_pool
    if time.monotonic() - pool.tether_served <= within:
        return None
    return _ping_aside(pool)


async def _ping_aside(pool: Any) -> None:
    conn = pool.connection_class(**pool.connection_kwargs)
    try:
        await conn.connect()
        await conn.send_command("PING")
        await conn.read_response()
    finally:
        await conn.disconnect(nowait=True)


# redis-py's pool without max_connections: 2**31 in redis-py 5, as good as none (redis-py 8
# caps it at 100, and refuses a command at once when all 100 are in use).
_UNBOUNDED = 2**31


def _figures(name: str, r: Any) -> PoolStats:
    """redis-py's pool: its idle (connected) and in-use connections (redis-py 5 to 8 keep
    them in these two attributes), and the tasks tether sees taking one."""
    pool = r.connection_pool
    # A connection back in the pool may have been disconnected (a cancelled command, a
    # server that went away): a mere object then, which reconnects when next used.
    idle = sum(1 for conn in pool._available_connections if conn.is_connected)
    in_use = len(pool._in_use_connections)
    limit = pool.max_connections
    return PoolStats(
        name=name,
        max=limit if isinstance(limit, int) and limit < _UNBOUNDED else None,
        open=idle + in_use,
        in_use=in_use,
        idle=idle,
        waiting=getattr(pool, "tether_waiting", None),
    )


def _client_check(check: Check | bool) -> Check | None:
    if check is True:
        return _ping
    if check is False:
        return None
    return check


async def _ping(r: Any) -> None:
    if not await r.ping():
        msg = "PING got no PONG"
        raise RuntimeError(msg)
