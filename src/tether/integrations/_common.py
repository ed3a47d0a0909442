"""What every integration shares: DSNs, connection budgets, loop affinity, 503 messages."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload
from urllib.parse import unquote

from .._errors import (
    LOST_NOTE,
    ResourceUnavailable,
    ScopeError,
    StartupError,
    TetherError,
    _a_type,
    closest,
    describe,
    for_good,
    redact,
    remember_secrets,
    sqlstates,
    unstopped,
)
from .._lifecycle import AsyncOnly
from .._resource import current_unit
from .._scope import anyio_cancellation

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle, Override
    from .._resource import Resource
    from .._scope import Unit
    from .._stats import PoolStats

log = logging.getLogger("tether")

Dsn = str | Callable[[], str]
BudgetPolicy = Literal["warn", "error", "off"]

__all__ = [
    "LOSES_CANCEL",
    "LOST_NOTE",
    "SAVEPOINT",
    "SETTLE",
    "ConnectionOf",
    "PGBOUNCER_NOTE",
    "failed_transaction",
    "block_override",
    "terminate_backend",
    "cancel_request_of",
    "sqlite_lock_hint",
    "sqlite_file_of",
    "STOP_WITHIN",
    "RESET_SESSION",
    "SESSION_SETTINGS",
    "IN_BLOCK_RESET",
    "BudgetPolicy",
    "connect_or_close",
    "Dsn",
    "LoopBound",
    "BUDGET_QUERY",
    "BUDGET_FALLBACK",
    "budget_refused",
    "budget_unread",
    "read_budget",
    "check_budget",
    "check_budget_policy",
    "forget_budget",
    "check_dsn",
    "check_dsn_value",
    "check_driver_scheme",
    "commit_not_sent",
    "note_pgbouncer",
    "plain_dsn",
    "pooler_never_sent",
    "connection_lost",
    "saturation",
    "depends_on",
    "dropped_cancellation",
    "read_only",
    "queue_full",
    "read_only_failure",
    "redact",
    "registered",
    "remember_secrets",
    "resolve_dsn",
    "scrub_secrets",
    "sqlite_cannot_open",
    "sqlite_error_name",
    "server_of",
    "sqlstates",
    "unavailable",
    "unreachable",
    "workers",
]


#: Python 3.11's ``asyncio.wait_for`` can return a result and drop a cancellation that came
#: with it (CPython gh-86296, fixed in 3.12). psycopg's pool waits with it, redis-py sends
#: with it: their callers check ``task.cancelling()`` around those calls.
LOSES_CANCEL = sys.version_info < (3, 12)


def dropped_cancellation(task: asyncio.Task[Any]) -> asyncio.CancelledError:
    """The cancellation asked of *task* that a call it awaited dropped, to raise again with
    its message: anyio knows its own cancellations by their message, and one it does not
    know escapes its cancel scope.

    The message is the cancelled anyio scope's, if the task is in one. Else the task's own,
    which it keeps only for a cancellation that arrived after what it awaited was done;
    one that cancelled what it awaited went to that (``asyncio.wait_for``'s waiter, which
    dropped it). Else that of a scope around a task awaiting *task*: a child of
    ``asyncio.gather`` is in no scope of its own, and the scope's cancellation of the task
    awaiting the gather reached it through the gather, message and all, and was dropped."""
    message = anyio_cancellation(task)
    if message is None:
        message = getattr(task, "_cancel_message", None)
    if message is None:
        for awaiting in _awaiting(task):
            message = anyio_cancellation(awaiting)
            if message is not None:
                break
    return asyncio.CancelledError() if message is None else asyncio.CancelledError(message)


def _awaiting(task: asyncio.Future[Any], depth: int = 4) -> Iterator[asyncio.Task[Any]]:
    """The tasks awaiting *task*: through its done callbacks, a task's own wakeup (``await
    task``) or a future a callback holds (``asyncio.gather``'s outer future, which its
    ``_done_callback`` closes over), up to *depth* futures away. Only on the rare path of a
    dropped cancellation: it reads asyncio's private ``_callbacks``, and finds none if they
    change."""
    if depth <= 0:
        return
    for entry in getattr(task, "_callbacks", None) or ():
        callback = entry[0] if isinstance(entry, tuple) else entry
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, asyncio.Task) and owner is not task:
            yield owner
            continue
        for cell in getattr(callback, "__closure__", None) or ():
            try:
                held = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(held, asyncio.Future) and held is not task:
                yield from _awaiting(held, depth - 1)


#: What a unit of work may leave on a PostgreSQL session, undone before the next one gets the
#: connection: ``SET SESSION AUTHORIZATION`` and ``SET ROLE`` (which ``RESET ALL`` leaves; the
#: role goes back to the one the connection was opened with), ``SET`` (``RESET ALL``), cursors,
#: ``LISTEN``, session advisory locks and temporary tables (one request's rows would be the next
#: one's to read). That is ``DISCARD ALL`` but for three parts: ``DEALLOCATE ALL`` and
#: ``DISCARD PLANS`` would drop the drivers' prepared statements, and ``DISCARD SEQUENCES``
#: would throw away the values a sequence with ``CACHE`` > 1 set aside for the session, a gap
#: in its numbers on every release (``DISCARD ALL`` also cannot run in one message with
#: others). One round trip: the simple query protocol runs the statements in one message.
#: asyncpg's own reset is ``RESET ALL``, ``CLOSE ALL``, ``UNLISTEN *`` and the advisory locks.
RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL; CLOSE ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD TEMP"
)

#: `rolled_back`: what production's reset undoes after each unit of work in a block, but for
#: ``DISCARD TEMP``: a temporary table the test made on the block's connection (a fixture)
#: stays. The settings the unit found are set again after it (``SESSION_SETTINGS``, read as
#: it starts), so what the test set on the block's connection stays too.
IN_BLOCK_RESET = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL; CLOSE ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all()"
)

#: SQL that sets again what ``SET`` made of the session's settings (``pg_settings`` from the
#: source ``session``: not those of the server, the database, the role or the connection
#: string, which ``RESET ALL`` keeps), and its ``SET ROLE`` (not in ``pg_settings``: read
#: from ``current_user`` against ``session_user``; a ``SET SESSION AUTHORIZATION`` there is
#: not kept: the user who logged in is known only to ``pg_stat_activity``, which hardened
#: servers do not let every role read), or NULL: read once per connection, after the pool's
#: own setup (asyncpg's ``init``, psycopg's ``configure``; SQLAlchemy's ``connect`` events,
#: at the first checkout), so that the reset puts back what that setup set: a pool that
#: drops to a role of least privilege there keeps it for every unit of work.
SESSION_SETTINGS = (
    "SELECT nullif(concat("
    "(SELECT string_agg(format('; SELECT set_config(%L, %L, false)', name, setting), '') "
    "FROM pg_settings WHERE source = 'session'), "
    "CASE WHEN current_user <> session_user THEN format('; SET ROLE %I', current_user) END"
    "), '')"
)


#: Whether the server itself refuses writes for every session: a replica (in recovery), or
#: ``default_transaction_read_only`` set by its configuration (``ALTER SYSTEM``, the
#: configuration file, ``ALTER DATABASE``). Asked on a write refused as read-only (SQLSTATE
#: 25006) only: a read-only default the app asked for (a connection's options or server
#: settings, source ``client``; a role's, ``ALTER ROLE ... SET``; a ``SET``) or the unit's own
#: read-only transaction is read-only on purpose, the endpoint's error, not a failover.
SERVER_READ_ONLY = (
    "SELECT pg_is_in_recovery() OR EXISTS (SELECT FROM pg_settings"
    " WHERE name = 'default_transaction_read_only' AND setting = 'on'"
    " AND source NOT IN ('client', 'session', 'user', 'database user'))"
)


V = TypeVar("V")
D = TypeVar("D")


#: `rolled_back`: seconds it waits, at its end, for a connection a unit of work still holds;
#: and the savepoint each unit of work runs in.
SETTLE = 10.0
SAVEPOINT = "tether_unit"
#: After a read-only unit of work's savepoint: undone when it is rolled back to.
READ_ONLY_UNIT = "; SET LOCAL transaction_read_only = on"


class PerResource(Generic[V]):
    """What an integration records about each resource it made (for ``rolled_back()``, its
    pool's figures), kept on the resource's Lifecycle. A module-level ``WeakKeyDictionary``
    kept every Lifecycle alive for good, an app built per test included: its values lead back
    to their key (a pool resource, a closure over the resource). On the Lifecycle they are a
    cycle the collector frees with it."""

    __slots__ = ("_attr",)

    def __init__(self, name: str) -> None:
        self._attr = f"_tether_{name}"

    def _table(self, res: object, *, create: bool = False) -> dict[Any, V] | None:
        lc = getattr(res, "lifecycle", None)
        owned = getattr(lc, "__dict__", None)
        if owned is None:
            return None
        table: dict[Any, V] | None = owned.get(self._attr)
        if table is None and create:
            table = owned[self._attr] = {}
        return table

    def __setitem__(self, res: Resource[Any], value: V) -> None:
        table = self._table(res, create=True)
        assert table is not None
        table[res] = value

    @overload
    def get(self, res: object) -> V | None: ...
    @overload
    def get(self, res: object, default: D) -> V | D: ...
    def get(self, res: object, default: Any = None) -> Any:
        table = self._table(res)
        if table is None:
            return default
        try:
            return table.get(res, default)
        except TypeError:  # not hashable: not a resource at all
            return default


class ConnectionOf:
    """How a connection resource of a driver's integration was registered, for its
    ``rolled_back()``: the pool resource it takes connections from, whether each unit of
    work is a transaction, and that transaction's isolation level and read-only flag."""

    __slots__ = ("isolation", "pool", "readonly", "transaction")

    def __init__(
        self,
        pool: Resource[Any],
        transaction: bool,
        isolation: Any = None,
        readonly: bool = False,
    ) -> None:
        self.pool = pool
        self.transaction = transaction
        self.isolation = isolation  # of the transaction (the driver's value), None: the server's
        self.readonly = readonly


#: The isolation levels ``connection(isolation=...)`` takes, in asyncpg's spelling (psycopg's
#: integration takes the same names, and psycopg's ``IsolationLevel``).
ISOLATIONS = ("read_committed", "read_uncommitted", "repeatable_read", "serializable")


def check_transaction_options(
    name: str,
    transaction: bool,
    isolation: object,
    readonly: bool,
    *,
    known: str,
    also: Iterable[object] = (),
) -> None:
    """Refuse, as a connection resource is registered, what would fail (or be ignored) on
    every request: an isolation level not in :data:`ISOLATIONS` or *also* (SQL's spelling,
    ``"repeatable read"``, a typo; *known* names who knows them), and ``isolation=`` or
    ``readonly=`` without ``transaction=True``."""
    if isolation is not None and isolation not in ISOLATIONS and isolation not in also:
        spelled = str(isolation).strip().lower().replace(" ", "_").replace("-", "_")
        fix = f"isolation={spelled!r}" if spelled in ISOLATIONS else "one of them"
        msg = (
            f"Connection {name!r}: isolation={isolation!r} is not an isolation level {known} "
            f"knows ({', '.join(map(repr, ISOLATIONS))}), so every request would fail as it "
            f"begins its transaction. Pass {fix}, or None for the server's default."
        )
        raise ValueError(msg)
    if transaction:
        return
    given = [f"isolation={isolation!r}"] * (isolation is not None) + ["readonly=True"] * readonly
    if given:
        what, them = (given[0], given[0]) if len(given) == 1 else (" and ".join(given), "them")
        need = "needs" if len(given) == 1 else "need"
        msg = (
            f"Connection {name!r}: {what} {need} transaction=True: "
            f"{'it is' if len(given) == 1 else 'they are'} of the unit of work's transaction, "
            f"and transaction=False runs none (each statement commits on its own), so "
            f"{'it' if len(given) == 1 else 'they'} would be ignored"
            f"{' and writes committed' if readonly else ''}. Pass transaction=True, or drop "
            f"{them}."
        )
        raise ValueError(msg)


class AsyncBlock(AsyncOnly[V]):
    """A test helper's async context manager (``rolled_back(...)``) that, entered with a
    plain ``with`` (a sync test, beside ``TestClient``), says how to enter it from sync code."""

    __slots__ = ()

    def __init__(self, cm: AbstractAsyncContextManager[V], what: str) -> None:
        advice = (
            f"`async with {what} as conn:` in an async test. Beside TestClient, in a sync "
            f"test, enter it through the client's portal, inside `with TestClient(app) as "
            f"client:`: `with client.portal.wrap_async_context_manager({what}) as conn:`."
        )
        super().__init__(cm, what, advice)


def async_block(
    fn: Callable[[Resource[Any]], AbstractAsyncContextManager[V]],
) -> Callable[[Resource[Any]], AsyncBlock[V]]:
    """*fn* (a ``rolled_back``), its context manager an :class:`AsyncBlock`."""

    @functools.wraps(fn)
    def block(resource: Resource[Any]) -> AsyncBlock[V]:
        what = f"{fn.__name__}({getattr(resource, 'name', 'resource')})"
        return AsyncBlock(fn(resource), what)

    return block


def registered(
    registry: PerResource[V],
    connection: object,
    driver: str,
    *,
    kind: str = "connection",
    made_by: str | None = None,
) -> V:
    """What *registry* holds for *connection*, a *kind* resource of the *driver*
    integration (``rolled_back()``'s argument; *made_by*: the functions that make one), or
    the ``TypeError`` naming the fix."""
    spec = registry.get(connection)
    if spec is None:
        made_by = made_by or f"tether.integrations.{driver}.connection()"
        msg = (
            f"rolled_back(): {connection!r} is not a {kind} made by {made_by}; pass that "
            f"resource (the one endpoints depend on)."
        )
        raise TypeError(msg)
    return spec


def _unset_dsn(value: object, where: str, what: str, example: str, returned: bool) -> str:
    got = "None" if value is None else "empty"
    given = (
        f"the function given for the {what} returned {got}"
        if returned
        else (f"the {what} is {got}")
    )
    return (
        f"{_at(where)}{given}: is the setting it is read from (an environment variable) set? "
        f"Set it, or pass the {what} itself; a function, e.g. {example}, reads it when the "
        f"app starts."
    )


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _is_secret(value: object) -> bool:
    """A secret kept out of sight (pydantic's ``SecretStr``): its value is
    ``get_secret_value()``, its ``str()`` a mask."""
    return callable(getattr(value, "get_secret_value", None))


def _is_pydantic_url(value: object) -> bool:
    """A URL of pydantic's (``PostgresDsn``, ``RedisDsn``, ``AnyUrl``, pydantic-core's
    ``Url``): its ``str()`` is the URL, password and all, as it was given (normalised)."""
    return callable(getattr(value, "unicode_string", None)) and any(
        cls.__module__.partition(".")[0] in ("pydantic", "pydantic_core")
        for cls in type(value).__mro__
    )


def plain_dsn(value: object) -> object:
    """*value* as a driver takes it: a URL of pydantic's (``PostgresDsn``) as its ``str()``,
    which keeps the password; anything else as it is (`check_dsn_value` judges it)."""
    return str(value) if _is_pydantic_url(value) else value


#: A SQLAlchemy URL's scheme: ``postgresql+psycopg://``, ``postgres+asyncpg://`` (the
#: ``+driver`` names SQLAlchemy's dialect driver), where the drivers take ``postgresql://``.
_DRIVER_SCHEME = re.compile(r"\s*(?P<scheme>postgres(?:ql)?)(?P<driver>\+[^:/?#@\s]*)://", re.I)


def check_driver_scheme(
    value: object, where: str, *, what: str, reader: str, returned: bool = False
) -> None:
    """Refuse a SQLAlchemy URL (``postgresql+psycopg://...``, easy to pass when one
    ``DATABASE_URL`` feeds SQLAlchemy too) given to a driver's own pool, which *reader*
    (``libpq``, ``asyncpg``) does not read: a ``ValueError`` naming *where*, the cause and
    the fix, the password redacted (*returned*: by the function given for the *what*, marked
    for good: its next call returns the same)."""
    value = plain_dsn(value)
    if not isinstance(value, str):
        return
    found = _DRIVER_SCHEME.match(value)
    if found is None:
        return
    remember_secrets(value)  # a password redact's patterns do not find whole is hidden too
    driver = found["driver"]
    fixed = (value[: found.end("scheme")] + value[found.end("driver") :]).strip()
    given = f"the function given for the {what} returned" if returned else f"the {what} is"
    msg = redact(
        f"{_at(where)}{given} {value.strip()}, a SQLAlchemy URL: {reader} takes "
        f"postgresql:// or postgres://, not the driver part {driver!r} of its scheme. Drop "
        f"it: {fixed} (where one setting feeds SQLAlchemy too, drop it for this pool, e.g. "
        f"lambda: os.environ['DATABASE_URL'].replace({driver!r}, '', 1))."
    )
    raise (for_good if returned else _same)(ValueError(msg))


def url_ports(url: str) -> list[str]:
    """The ports a ``postgresql://`` URL gives its hosts (``host:port``, several hosts
    separated by commas, ``[::1]:port``) as asyncpg reads them (the authority ends at the
    first ``/``, ``?`` or ``#``, the user at its first ``@``): as written, empty ones (the
    default) left out."""
    if "://" not in url:
        return []
    netloc = _authority(url.split("://", 1)[1])
    ports = []
    for host in netloc.partition("@")[2].split(",") if "@" in netloc else netloc.split(","):
        ipv6 = host.startswith("[")
        port = host.rpartition("]")[2].removeprefix(":") if ipv6 else host.partition(":")[2]
        ports.append(port)
    return [port for port in ports if port.strip()]


def _authority(rest: str) -> str:
    """A URL's authority (*rest*: what follows ``://``), as URL parsers read it: up to the
    first ``/``, ``?`` or ``#``."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def _misread(url: str) -> bool:
    """Whether *url*'s hosts may be read from its password: an ``@`` after the authority's
    end (a password holding ``/``, ``?`` or ``#``, not URL-encoded), or in its hosts."""
    if "://" not in url:
        return False
    rest = url.split("://", 1)[1]
    netloc = _authority(rest)
    return "@" in netloc.partition("@")[2] or ("@" not in netloc and "@" in rest)


def check_ports(
    ports: Iterable[str], dsn: str, where: str, *, what: str, returned: bool = False
) -> None:
    """Refuse a port of *dsn* that is not a number from 1 to 65535 (``port=abc``, a URL's
    ``host:5432x``): libpq and asyncpg read it only as they connect, and every attempt of the
    startup's retries failed the same, reported as a server that cannot be reached. A
    ``ValueError`` naming *where* and the port, never the rest of the *what*: not the port
    either where it may be part of the password (`_misread`), or of the next option (``port=
    password=...``). *returned*: by the function given for it, marked for good."""
    for port in ports:
        text = port.strip()
        if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
            continue
        given = (
            f"the {what} the function given for it returned has" if returned else f"the {what} has"
        )
        key = text.partition("=")[0]
        if _misread(dsn):
            msg = (
                f"{_at(where)}{given} a port that is not a port number where its hosts are "
                f"read, and an '@' after them: a password holding '/', '?', '#' or '@' must be "
                f"URL-encoded (%2F, %3F, %23, %40), or it is read as the host and port. No "
                f"connection can be made so, and no retry mends that: encode the password, "
                f"e.g. with urllib.parse.quote(password, safe='')."
            )
        elif "=" in text and key.isidentifier():
            msg = (
                f"{_at(where)}{given} 'port=' followed by '{key}=': libpq reads the spaces "
                f"around '=' as optional, so the port is '{key}=...' and the {key}= is lost. "
                f"No connection can be made so, and no retry mends that: give the port "
                f"(PostgreSQL's default is 5432), write an empty one port='', or leave it out."
            )
        else:
            msg = (
                f"{_at(where)}{given} port {port!r}, which is not a port number (1 to "
                f"65535): no connection can be made with it, and no retry mends that. Fix "
                f"it (PostgreSQL's default is 5432), or leave the port out for the default."
            )
        raise (for_good if returned else _same)(ValueError(msg))


def scrub_secrets(exc: BaseException) -> BaseException:
    """*exc*, and the exceptions chained to it, with the passwords in their messages
    (``args``) replaced by ``***`` (`redact`), in place: a driver's error that quotes the
    DSN (libpq's parse error of a conninfo) keeps its type, its text and its traceback,
    and what prints the chain (a traceback, uvicorn's log line) shows no password."""
    link: BaseException | None = exc
    for _ in range(8):  # a chain is never this long; stop on anything circular
        if link is None:
            break
        args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in link.args)
        if args != link.args:
            try:
                link.args = args
            except (AttributeError, TypeError):  # pragma: no cover - args it does not let go
                pass
        link = link.__cause__ or link.__context__
    return exc


def _is_mask(value: str) -> bool:
    """Only asterisks: pydantic's mask, what ``str()`` of a ``SecretStr`` gives."""
    shown = value.strip()
    return bool(shown) and not shown.strip("*")


#: pydantic's mask as a password: ``scheme://user:**********@host`` (an f-string of a
#: ``SecretStr``), or ``password=**********`` in a conninfo string or a URL's query.
_MASKED_PASSWORD = re.compile(r"(?::|\bpassword\s*=\s*)\*{10}(?=@|&|\s|$)")


def _same(exc: BaseException) -> BaseException:
    return exc


def _secret_example(example: str) -> str:
    """``lambda: settings.redis_url.get_secret_value()``, after *example*'s variable."""
    found = re.search(r"os\.environ\[['\"](\w+)['\"]\]", example)
    field = found[1].lower() if found else "url"
    return f"lambda: settings.{field}.get_secret_value()"


def shut_down_socket(fileno: int) -> bool:
    """Shut down the socket *fileno* both ways, through a copy of its descriptor (the driver
    still owns, and closes, the original): a task waiting on it wakes and fails at once,
    while the driver's connection object stays whole. False if there is no such socket."""
    try:
        shut = socket.socket(fileno=os.dup(fileno))
    except OSError:  # no such descriptor, or not a socket (its copy closed then)
        return False
    try:
        shut.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        shut.close()
    return True


def check_check(check: object, where: str, *, default: str, of: str, example: str) -> None:
    """Refuse an integration's ``check=`` that is neither ``True``, ``False`` nor a function:
    a TypeError naming *where*, the value and the three choices, with *default* (what
    ``True`` checks) and an *example* function of the value (*of*: the pool, the client)."""
    if check is None or isinstance(check, bool) or callable(check):
        return  # None: no health check, as False (and as lc.resource's own default)
    hint = ""
    if isinstance(check, str):
        hint = (
            f" (a setting read from the environment is a string, and {check!r} would count as "
            f'true: convert it, e.g. check=os.environ.get(...) == "1")'
        )
    msg = (
        f"{where}: check={check!r} is {_a_type(check)}, not True, False or a function. Pass "
        f"True ({default}), False (no health check), or a function of the {of} that raises "
        f"when it is unhealthy (sync or async), e.g. check={example}{hint}."
    )
    raise TypeError(msg)


def check_dsn_value(
    value: object,
    where: str,
    *,
    what: str = "DSN",
    example: str = "...",
    returned: bool = False,
    strings: bool = True,
) -> None:
    """Refuse a DSN *value* (*returned*: by the function given for it) that is a secret
    (pydantic's ``SecretStr``: its ``get_secret_value()`` is the DSN), pydantic's mask of
    one (``'**********'``), or (with *strings*) not a string nor a URL of pydantic's: a
    ``TypeError`` or ``ValueError`` naming *where*, the type (never the value) and the fix."""
    given = f"the function given for the {what} returned" if returned else f"the {what} is"
    fix = "return" if returned else "pass a function returning"
    # A refusal of what a function returned is marked: its next call returns the same.
    mark = for_good if returned else _same
    if _is_secret(value):
        msg = (
            f"{_at(where)}{given} a {type(value).__name__}, not a string: {fix} its "
            f"get_secret_value(), e.g. {_secret_example(example)} (str() of a "
            f"{type(value).__name__} is the mask '**********', not the {what})."
        )
        raise mark(TypeError(msg))
    if isinstance(value, str) and _is_mask(value):
        msg = (
            f"{_at(where)}{given} {value.strip()!r}, the mask pydantic shows for a SecretStr "
            f"(its str(), or an f-string of it), not a {what}: {fix} its get_secret_value() "
            f"instead, e.g. {_secret_example(example)}."
        )
        raise mark(ValueError(msg))
    if isinstance(value, str) and _MASKED_PASSWORD.search(value):
        # Never quoted: the rest of it (user, host) is the user's to show.
        given = (
            f"the function given for the {what} returned one with"
            if returned
            else f"the {what} has"
        )
        msg = (
            f"{_at(where)}{given} pydantic's mask '**********' as its password (an f-string of "
            f"a SecretStr), not the password itself. Build the {what} with the secret's "
            f"get_secret_value(), e.g. "
            f'f"...:{{settings.db_password.get_secret_value()}}@..."'
            f"{'' if returned else ', in a function passed for it'}."
        )
        raise mark(ValueError(msg))
    if strings and not isinstance(value, str) and not _is_pydantic_url(value):
        # The type only: a mapping of connection parameters holds the password.
        if returned:
            msg = (
                f"{_at(where)}{given} {_a_type(value)}, not a string: return the "
                f"{what} string, e.g. {example}."
            )
        else:
            msg = (
                f"{_at(where)}the {what} must be a string or a function returning one, not "
                f"{_a_type(value)}; build the {what} string from it, or pass e.g. "
                f"{example}."
            )
        raise mark(TypeError(msg))


def check_dsn(
    dsn: object, where: str, *, what: str = "DSN", example: str = "...", strings: bool = True
) -> None:
    """Refuse, at declaration, a DSN that is unset: None or an empty string (an
    ``os.environ.get`` of a variable not set); a secret (pydantic's ``SecretStr``) or its
    mask (``'**********'``); or (with *strings*) not a string, a URL of pydantic's
    (``PostgresDsn``: its ``str()`` is used) nor a function."""
    if dsn is None or (isinstance(dsn, str) and not dsn.strip()):
        raise ValueError(_unset_dsn(dsn, where, what, example, returned=False))
    if not callable(dsn):
        check_dsn_value(dsn, where, what=what, example=example, strings=strings)


def unit_now(lc: Lifecycle) -> Unit | None:
    """The unit of work of *lc* this code runs in: the request's (in the context), or the
    ``lc.scope()`` this task entered; ``None`` outside any."""
    ref = current_unit.get()
    unit = ref() if ref is not None else None
    if unit is not None and unit.lc is lc:
        return None if unit.closed else unit
    tasks = lc._unit_tasks  # the tasks of `lc.scope()`s, on asyncio
    if tasks:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # pragma: no cover - not on asyncio
            return None
        for unit, its in list(tasks.items()):
            if its is task and not unit.closed:
                return unit
    return None


def per_unit(
    lc: Lifecycle,
    name: str,
    make: Callable[[], V],
    close: Callable[[V, BaseException | None], Awaitable[None]],
    *,
    owner: Resource[Any],
    held: str,
) -> Resource[V]:
    """A request resource of an integration's own, not registered (it is no resource of the
    app's): *make()*'s collection of what one unit of work opened through a client (httpx's
    streamed responses, Redis's dedicated connections), given to *close* with the unit's
    failure (None: it succeeded). Released after the response's last byte, so a body streamed
    from it has used it by then, in the unit tether runs. Held past the leak threshold, it is
    reported as *owner* (the client's resource) and *held*, and counted on *owner*."""
    from .._resource import Resource

    async def open_collection() -> AsyncIterator[V]:
        made = make()
        failure: BaseException | None = None
        try:
            yield made
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await close(made, failure)

    res: Resource[V] = Resource(
        lc, open_collection, name=name, scope="request", check=None, timeout=None,
        release="response", retries=0, backoff=0.0, concurrency=None, thread=False,
        check_timeout=lc.check_timeout, retry_after=1.0, guard=False,
    )  # fmt: skip
    res.leak_of = (owner, held)
    return res


def caller_outside(*skipped: str) -> str:
    """``FILE:LINE in NAME`` of the first frame outside tether's integrations and the
    *skipped* directories (a driver's): where the app's code called it (cheap enough for
    what only a few calls ask)."""
    f: Any = sys._getframe(2)
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    while f is not None:
        filename = f.f_code.co_filename
        if not filename.startswith((ours, *skipped)) and "/contextlib.py" not in filename:
            return f"{filename}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back
    return "?"  # pragma: no cover - there is always a caller


def asyncio_only(where: str, driver: str) -> None:
    """Refuse to open *driver*'s resource off asyncio (anyio's trio backend), where it
    fails with ``RuntimeError: no running event loop`` or trio's "unrecognized yield
    message", and a StartupError advised retries: a mistake no retry mends."""
    if asyncio._get_running_loop() is not None:
        return
    msg = (
        f"{where}: {driver} runs on asyncio only, and this app runs on another event loop "
        f"(anyio's trio backend: hypercorn -k trio, anyio.run(..., backend='trio'), "
        f"TestClient(backend='trio')). Run the app on asyncio (hypercorn -k asyncio, "
        f"uvicorn), or keep {driver} out of the trio app."
    )
    raise for_good(RuntimeError(msg))


def resolve_dsn(
    dsn: Dsn,
    where: str = "",
    *,
    what: str = "DSN",
    example: str = "...",
    empty: bool = False,
    objects: tuple[type, ...] = (),
) -> str:
    """The DSN, read when the resource opens (never at import): a string or a callable
    returning one. A URL of pydantic's (``PostgresDsn``) is made a string (``str()``), as
    are *objects* (the driver's own URL class, whose ``str()`` keeps the password). One
    unset (None, empty: *empty* makes an empty one valid), a secret (pydantic's
    ``SecretStr``), its mask (``'**********'``) or anything else is refused, naming *where*.
    Its passwords are noted for ``redact`` (``remember_secrets``)."""
    returned = callable(dsn)
    value: object = dsn() if callable(dsn) else dsn
    if value is None or (not empty and isinstance(value, str) and not value.strip()):
        raise ValueError(_unset_dsn(value, where, what, example, returned=returned))
    value = str(value) if objects and isinstance(value, objects) else plain_dsn(value)
    check_dsn_value(value, where, what=what, example=example, returned=returned)
    text = str(value)  # a string by now: check_dsn_value refused the rest
    remember_secrets(text)
    return text


#: What each integration's resources are, by the module of their factory.
_MADE = {
    "tether.integrations.asyncpg": "an asyncpg resource of tether.integrations.asyncpg",
    "tether.integrations.psycopg": "a psycopg resource of tether.integrations.psycopg",
    "tether.integrations.aiosqlite": "an aiosqlite resource of tether.integrations.aiosqlite",
    "tether.integrations.sqlalchemy": "a SQLAlchemy resource of tether.integrations.sqlalchemy",
    "tether.integrations.redis": "a Redis client of tether.integrations.redis",
    "tether.integrations.httpx": "an httpx client of tether.integrations.httpx",
}


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def check_resource(
    lc: Any, value: object, *, where: str, param: str, maker: str, example: str
) -> None:
    """Refuse, at declaration, a *param* of *where* that is not a resource of *lc* made by
    *maker* (``tether.integrations.asyncpg.pool()``), or by another integration: a
    ``TypeError`` naming what was passed (redacted) and what to pass (*example*)."""
    from .._resource import Resource

    declare = f"`{param} = {example}`"
    if not isinstance(value, Resource):
        shown = redact(repr(value))
        kind = " but a string" if isinstance(value, str) else ""
        msg = (
            f"{where}: {param}={shown} is not a resource{kind}. Declare the {param} first and "
            f"pass the resource {maker} returns: {declare}, then pass {param}."
        )
        raise TypeError(msg)
    if value.lifecycle is not lc:
        msg = (
            f"{where}: the {param} resource {value.name!r} is registered on another Lifecycle "
            f"than the one given. Pass a {param} of this Lifecycle: declare it on the "
            f"Lifecycle its dependents use ({declare})."
        )
        raise TypeError(msg)
    module = getattr(value.factory, "__module__", "")
    made = _MADE.get(module)
    if made is not None and not maker.startswith(module + "."):
        msg = (
            f"{where}: the {param} resource {value.name!r} is {made}, not {_a(param)} made by "
            f"{maker}. Pass one made by {maker} ({declare}), or use the integration that "
            f"made {value.name!r} to use it."
        )
        raise TypeError(msg)


def workers(explicit: int | None = None) -> int:
    """How many worker processes share the database: *explicit*; else the count on the
    server's command line (gunicorn's ``-w``/``--workers``, there or in ``GUNICORN_CMD_ARGS``;
    uvicorn's ``--workers``), which the server runs whatever ``WEB_CONCURRENCY`` says; else
    ``WEB_CONCURRENCY`` (the servers' default; neither sets it); else 1.

    Read at startup, never per request. gunicorn forks its workers and uvicorn's spawned
    ones are given the parent's ``sys.argv``, so a worker sees the command line; a gunicorn
    config file's ``workers`` and ``uvicorn.run(workers=)`` are not visible."""
    if explicit is not None:
        return explicit
    counted = _server_workers(getattr(sys, "argv", []), os.environ)  # embedded: none
    if counted is not None:
        return counted
    raw = os.environ.get("WEB_CONCURRENCY", "")
    try:
        return max(1, int(raw))
    except ValueError:
        return 1


def _server_workers(argv: list[str], environ: Mapping[str, str]) -> int | None:
    """The worker count given on *argv* if it is gunicorn's or uvicorn's, else None."""
    import shlex

    parts = argv[0].replace("\\", "/").split("/") if argv else [""]
    program = parts[-2] if parts[-1] == "__main__.py" and len(parts) > 1 else parts[-1]
    program = program.removesuffix(".exe")
    count = None
    if program == "gunicorn":  # the command line over GUNICORN_CMD_ARGS, as gunicorn does
        count = _option_value(argv[1:], "-w", "--workers")
        if count is None:
            try:
                from_env = shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
            except ValueError:  # not parseable: gunicorn itself would not start
                from_env = []
            count = _option_value(from_env, "-w", "--workers")
    elif program == "uvicorn":
        if "--reload" in argv[1:]:  # uvicorn ignores --workers when reloading
            return 1
        count = _option_value(argv[1:], None, "--workers")
    return None if count is None else max(1, count)


def _option_value(args: list[str], short: str | None, long: str) -> int | None:
    """The integer given last to option *short*/*long* in *args* (``-w 3``, ``-w3``,
    ``--workers 3``, ``--workers=3``), or None."""
    value: str | None = None
    found = None
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            break
        if arg in (long, short):
            value = next(rest, None)
        elif arg.startswith(long + "="):
            value = arg[len(long) + 1 :]
        elif short is not None and arg.startswith(short) and not arg.startswith("--"):
            value = arg[len(short) :]
        else:
            continue
        try:
            found = int(value or "")
        except ValueError:
            continue
    return found


#: The server's ``max_connections``, and what tells the server from another: its port and
#: when it started (the same server however it is reached: a host name, an address, a
#: socket). Read by each PostgreSQL pool as it opens, for :func:`check_budget`.
BUDGET_QUERY = (
    "SELECT current_setting('max_connections'),"
    " current_setting('port') || '@'"
    # The start time as microseconds since the epoch: its text would follow each session's
    # TimeZone and DateStyle, and one server be taken for two by pools set differently.
    " || (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint::text"
)


#: The server's ``max_connections`` alone, read where the server refuses
#: :data:`BUDGET_QUERY` (its functions revoked from PUBLIC on a hardened server, or missing on
#: a PostgreSQL-compatible one): a command, which no REVOKE takes away. The pool is then
#: counted alone, as nothing tells its server from another's.
BUDGET_FALLBACK = "SHOW max_connections"


def _refusal(exc: BaseException) -> BaseException | None:
    """The driver's error in *exc*'s chain if the server refused to run a query (SQLSTATE class
    42, a syntax or access rule: permission denied, no such function or setting; class 0A,
    not supported), else None. Not 42P05 (a prepared statement there already: PgBouncer)."""
    found = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and code[:2] in ("42", "0A") and code != "42P05":
            found = current  # the innermost: the driver's own, not an adapter's wrapping
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return found


def budget_refused(name: str, exc: BaseException) -> bool:
    """Whether the server refused :data:`BUDGET_QUERY` for pool *name* (then read
    :data:`BUDGET_FALLBACK`; said at INFO), rather than failed to answer it."""
    refusal = _refusal(exc)
    if refusal is None:
        return False
    log.info(
        "tether: the server refused the query that tells it from other servers (%s): the "
        "connection budget of %r is checked for that pool alone, without the app's other "
        "pools on the same server.",
        describe(refusal),
        name,
    )
    return True


def budget_unread(name: str, exc: BaseException, policy: BudgetPolicy) -> bool:
    """Whether the server refused :data:`BUDGET_FALLBACK` too (one without
    ``max_connections``): then the budget is not checked, said as one that does not fit
    is (a `StartupError` with ``budget="error"``, else a warning)."""
    refusal = _refusal(exc)
    if refusal is None:
        return False
    msg = (
        f"The connection budget of {name!r} cannot be checked: the server did not give its "
        f"max_connections ({describe(refusal)}). Pass budget='off' to {name!r} to not read "
        f"it (a PostgreSQL-compatible server without max_connections)."
    )
    _over_budget(name, msg, policy)
    return True


async def read_budget(
    name: str,
    policy: BudgetPolicy,
    ask: Callable[[str], Awaitable[Any]],
    recover: Callable[[], Awaitable[None]] | None = None,
) -> tuple[int | None, str | None]:
    """The server's max_connections and what tells it from another, asked with *ask* (a
    query's first row): the second is None where the server refuses :data:`BUDGET_QUERY`
    (the pool is then counted alone; *recover* first, where the refusal aborted a
    transaction), and both are where it gives no max_connections at all (said by
    *policy*). A driver's asyncio connection; SQLAlchemy's sync one has its own twin."""
    try:
        row = await ask(BUDGET_QUERY)
        return int(row[0]), str(row[1])
    except Exception as exc:
        note_pgbouncer(exc)
        if not budget_refused(name, exc):
            raise
    if recover is not None:
        await recover()
    try:
        return int((await ask(BUDGET_FALLBACK))[0]), None
    except Exception as exc:
        if budget_unread(name, exc, policy):
            return None, None
        raise


class _Share:
    """A pool's part of a server's connections: ``workers x per_worker``."""

    __slots__ = ("per_worker", "policy", "reserved", "server", "workers")

    def __init__(
        self, server: str, per_worker: int, workers: int, reserved: int, policy: BudgetPolicy
    ) -> None:
        self.server = server
        self.per_worker = per_worker
        self.workers = workers
        self.reserved = reserved
        self.policy = policy


#: The shares of the pools of each lifecycle open now, by resource name: a pool that opens
#: adds those on the same server to its own (an app's engine and asyncpg pool on one
#: server both count against its max_connections).
_shares: weakref.WeakKeyDictionary[Lifecycle, dict[str, _Share]] = weakref.WeakKeyDictionary()
#: Held from reading the shares to noting one: a sync engine opens in a thread of its own.
_shares_lock = threading.Lock()


def forget_budget(lc: Lifecycle, name: str) -> None:
    """Forget pool *name*'s share of its server (it closed): see :func:`check_budget`."""
    with _shares_lock:
        shares = _shares.get(lc)
        if shares is not None:
            shares.pop(name, None)


def check_budget(
    name: str,
    *,
    server_max: int,
    per_worker: int,
    workers: int,
    reserved: int,
    policy: BudgetPolicy,
    lc: Lifecycle | None = None,
    server: str | None = None,
) -> None:
    """Check ``workers x per_worker + reserved <= server_max``; warn or fail by *policy*.

    *server_max* is the server's ``max_connections`` (read from the server);
    *per_worker* a pool's most connections (size + overflow); *reserved* what is kept
    for everything else (superuser_reserved_connections, migrations, psql, other apps).

    With *lc* and *server* (the second column of :data:`BUDGET_QUERY`), the pools of *lc*
    open on the same server count too: ``workers x per_worker`` of each, and the largest
    *reserved*. A pool that fits is noted (until :func:`forget_budget`), so that the next
    one to open counts it.
    """
    if policy == "off":
        return
    if lc is None or server is None:
        _check_alone(name, server_max=server_max, per_worker=per_worker, workers=workers,
                     reserved=reserved, policy=policy)  # fmt: skip
        return
    mine = _Share(server, per_worker, workers, reserved, policy)
    with _shares_lock:
        shares = _shares.setdefault(lc, {})
        others = [(n, s) for n, s in shares.items() if n != name and s.server == server]
        if others:
            _check_shared(name, mine, others, server_max=server_max, policy=policy)
        else:
            _check_alone(name, server_max=server_max, per_worker=per_worker, workers=workers,
                         reserved=reserved, policy=policy)  # fmt: skip
        shares[name] = mine


def _check_shared(
    name: str,
    mine: _Share,
    others: list[tuple[str, _Share]],
    *,
    server_max: int,
    policy: BudgetPolicy,
) -> None:
    pools = [*others, (name, mine)]
    reserved = max(share.reserved for _, share in pools)
    need = sum(share.workers * share.per_worker for _, share in pools) + reserved
    parts = " + ".join(
        f"{share.workers} workers x {share.per_worker} ({n!r})" for n, share in pools
    )
    if need <= server_max:
        log.info(
            "tether: connection budget of %r fits, with the other pools on its server: "
            "%s + %d reserved = %d <= %d",
            name,
            parts,
            reserved,
            need,
            server_max,
        )
        return
    names = ", ".join(repr(n) for n, _ in others)
    # The strictest policy of the pools counted: which of them opens last is chance (they
    # open concurrently), and a pool declared budget="error" fails the start either way.
    if any(share.policy == "error" for _, share in pools):
        policy = "error"
    msg = (
        f"Connection budget of {name!r} does not fit with the other pools of this app on "
        f"the same server ({names}): {parts} connections + {reserved} reserved = {need}, "
        f"but the server allows max_connections={server_max}. Lower the pool sizes or the "
        f"number of workers (-w/--workers, or WEB_CONCURRENCY), put PgBouncer in front, or "
        f"raise max_connections."
    )
    _over_budget(name, msg, policy)


def _over_budget(name: str, msg: str, policy: BudgetPolicy) -> None:
    """A budget that does not fit: a `StartupError` with ``budget="error"``, else a warning."""
    if policy == "error":
        raise for_good(StartupError(msg, resource=name))  # configuration: no retry mends it
    log.warning("tether: %s", msg)


def _check_alone(
    name: str,
    *,
    server_max: int,
    per_worker: int,
    workers: int,
    reserved: int,
    policy: BudgetPolicy,
) -> None:
    need = workers * per_worker + reserved
    if need <= server_max:
        log.info(
            "tether: connection budget of %r fits: %d workers x %d + %d reserved = %d <= %d",
            name,
            workers,
            per_worker,
            reserved,
            need,
            server_max,
        )
        return
    msg = (
        f"Connection budget of {name!r} does not fit: {workers} workers x {per_worker} "
        f"connections + {reserved} reserved = {need}, but the server allows "
        f"max_connections={server_max}. Lower the pool size or the number of workers "
        f"(-w/--workers, or WEB_CONCURRENCY), put PgBouncer in front, or raise "
        f"max_connections."
    )
    _over_budget(name, msg, policy)


def saturation(
    figures: PoolStats,
    served: float,
    within: float | None,
    timeout_name: str,
    *,
    timed_out_at: float,
    holders: str = "the queries holding them",
    backend: str = "the database",
    served_as: tuple[str, str] = ("one was handed out", "none handed out"),
) -> tuple[bool, str] | None:
    """A pool's readiness when every connection is in use (``Resource.saturation``).

    A health check on a saturated pool would queue behind the traffic and fail its timeout
    while the database answers everyone else; a probe that fails under load takes the
    instance out of rotation and moves its load onto the others. So a full pool is ready,
    reported at once ("busy"), while the units of work waiting for it get their connections:
    however long ago the last one was handed out (long queries hold them), a unit that waits
    less than the timeout is served. It is not ready only when they fail: units waiting, a
    wait that timed out since the pool last handed one out (*timed_out_at* > *served*), no
    longer ago than the timeout *within*, and none handed out for longer than that
    (``None``: the pool waits without end, and nothing times out). The pool enforces its
    timeout, so a unit that waited longer than it is one that timed out: the pools' acquire
    wrappers note when a wait timed out (``time.monotonic()``, on that failure only), and
    *served* when one was handed out. *served_as* says what *served* is, as it was and as
    it was not (an httpx client's: when a request last got its response).
    """
    most, in_use = figures.max, figures.in_use
    waiting = figures.waiting or 0
    if most is None or in_use is None or figures.idle:
        return None
    now = time.monotonic()
    ago = now - served
    if in_use < most and not (waiting and in_use and within is not None and ago <= within):
        return None
    # Fewer than all in use, none idle, units waiting, and one handed out within the
    # timeout: the pool is busy too, its other connections being made, checked (psycopg's
    # pre-ping) or given back, and a check would queue behind the units waiting. (With
    # none in use, or none handed out for longer, the check tells whether the database
    # answers at all: connects that fail are no timeouts.)
    if in_use < most:
        held = f"{in_use} of {most} connections (the others being made or checked)"
    else:
        held = f"all {most} connections" if most != 1 else "the one connection"
    # (A wait that timed out long ago, with no traffic since, says nothing of the unit
    # waiting now: it must be recent, within the timeout.)
    recent = served < timed_out_at and now - timed_out_at <= (within or 0.0)
    if waiting and within is not None and recent and ago > within:
        return False, (
            f"saturated: {held} in use, {waiting} waiting, and {served_as[1]} "
            f"for {ago:.1f} s (longer than {timeout_name}={within:g} s): {holders} "
            f"are stuck, or {backend} stopped answering"
        )
    queue = f", {waiting} waiting" if waiting else ""
    return True, f"busy: {held} in use{queue}; {served_as[0]} {ago:.1f} s ago"


class _Forks:
    """How many times this process is a fork away from the one that imported tether: a
    forked child shares its parent's sockets, so its parent's pools are not its own."""

    count = 0


def _forked() -> None:
    _Forks.count += 1


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python
    os.register_at_fork(after_in_child=_forked)


class LoopBound:
    """Remembers the event loop (and the process) a pool was opened on; refuses use from
    another loop, or from a forked child process."""

    __slots__ = ("forks", "loop", "name", "pid")

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.forks = _Forks.count
        self.pid = os.getpid()

    def check(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self.forks != _Forks.count:
            msg = (
                f"Pool {self.name!r} was opened in process {self.pid} and is used in process "
                f"{os.getpid()}, a fork of it: its connections' sockets belong to the parent, "
                f"and sharing them corrupts both. Open pools in each process, after the fork: "
                f"in the lifespan of each worker (tether opens nothing at import, so "
                f"`gunicorn --preload` is fine), or with a Lifecycle of the child's own."
            )
            raise ScopeError(msg)
        if loop is not self.loop:
            msg = (
                f"Pool {self.name!r} was opened on another event loop than the one using it "
                f"now. A pool belongs to the loop (and the process) that opened it: open it "
                f"in the lifespan of each worker, and in tests run the app and the test on "
                f"one loop (`with TestClient(app)` or one anyio/pytest-asyncio loop scope; "
                f"with TestClient, run async code on its loop: `client.portal.call(...)`, "
                f"`client.portal.wrap_async_context_manager(...)`)."
            )
            raise ScopeError(msg)


def commit_not_sent(name: str, exc: BaseException) -> ResourceUnavailable:
    """The 503 for a commit the driver refused to send (asyncpg's ``InternalClientError``, or
    a connection it or psycopg knew was lost): nothing was committed, and the connection, in
    an unknown state, is discarded."""
    reason = (
        f"the connection was lost before COMMIT, which was not sent, so nothing was "
        f"committed ({describe(exc)}; the server ended the session, or the driver closed it "
        f"after a cancelled query)"
    )
    return _lost(name, reason)


#: What PgBouncer says as it drops a client whose statement it never gave a server
#: connection (PostgreSQL down or refusing it behind PgBouncer): the statement did not run.
_POOLER_NEVER_SENT = (
    "query_wait_timeout",
    "server login has been failing",
    "pgbouncer cannot connect to server",
)


def pooler_never_sent(name: str, exc: BaseException) -> ResourceUnavailable | None:
    """The 503 for a statement PgBouncer dropped without running it (it found no server
    connection for it: `_POOLER_NEVER_SENT` in the error's chain), else None. Safe to retry,
    even outside a transaction."""
    current: BaseException | None = exc
    while current is not None:
        said = str(current)
        if any(marker in said for marker in _POOLER_NEVER_SENT):
            reason = (
                f"PgBouncer found no server connection for the statement, so it did not run "
                f"({describe(exc)})"
            )
            msg = redact(
                f"Pool {name!r}: {reason}. Retry shortly; if it persists, check the "
                f"database behind PgBouncer."
            )
            return ResourceUnavailable(msg, resource=name, retry_after=1.0, lost=True)
        current = current.__cause__ or current.__context__
    return None


def connection_lost(name: str, cause: str) -> ResourceUnavailable:
    """The 503 for a unit of work whose connection was lost under it mid-transaction (*cause*:
    the driver's error, described): the server ended the transaction, nothing was committed."""
    return _lost(
        name, f"the connection was lost mid-transaction, so nothing was committed ({cause})"
    )


class LostAfterCommit(TetherError):
    """A unit of work whose connection was lost (or whose last ``COMMIT`` was not sent)
    after the endpoint's own ``commit()`` went through: what it committed stays, what came
    after was rolled back. A 500, not a 503: running the request again (a client's retry,
    an ``idempotent`` route) would repeat what was committed."""

    def __init__(self, message: str, *, resource: str) -> None:
        super().__init__(message)
        self.resource = resource


def lost_after_commit(name: str, cause: str) -> LostAfterCommit:
    """The error for a connection lost, or a last ``COMMIT`` not sent, after the unit's
    endpoint committed part of its work itself (*cause*: the driver's error, described)."""
    msg = redact(
        f"Pool {name!r}: the connection was lost after the endpoint's own commit(), so what "
        f"it committed stays and what came after was rolled back ({cause}). The request is "
        f"not retried: running it again would repeat what was committed. Make the work "
        f"after a commit safe to lose, or commit once, at the end (tether does that)."
    )
    return LostAfterCommit(msg, resource=name)


def lost_at_commit(name: str, cause: str) -> LostAfterCommit:
    """The error for a connection lost *during* the endpoint's own ``commit()``: whether the
    server committed cannot be known from here, so it is no 503 "nothing was committed", and
    the request is not run again (*cause*: the driver's error, described)."""
    msg = redact(
        f"Pool {name!r}: the connection was lost during the endpoint's own commit(), so "
        f"whether the server committed it cannot be known from here; what came after was "
        f"rolled back ({cause}). The request is not retried: running it again could repeat "
        f"what was committed. Check the data, or commit once, at the end (tether does that)."
    )
    return LostAfterCommit(msg, resource=name)


def _lost(name: str, reason: str) -> ResourceUnavailable:
    """A 503 for a lost connection: the pool did give one, so the message does not blame its
    size, as `unavailable` does."""
    msg = redact(f"Pool {name!r}: {reason}. Retry shortly; if it persists, check the database.")
    return ResourceUnavailable(msg, resource=name, retry_after=1.0, lost=True)


def _advice(
    cause: BaseException | str, backend: str, *, refused: str | None, unreachable: bool
) -> str:
    """What to do about a pool that could not give a connection (`unavailable`)."""
    if refused is not None:
        return (
            f"The server refused the credentials or the database (SQLSTATE {refused}): "
            f"check the user, password and database name it connects with."
        )
    if isinstance(cause, BaseException) and _no_slot_left(cause):
        return _NO_SLOT_LEFT
    if unreachable:
        return f"Retry shortly; if it persists, check that {backend} runs and is reachable."
    return f"Retry shortly; if it persists, check {backend} and the pool size."


def unavailable(
    name: str,
    cause: BaseException | str,
    *,
    size: int | None = None,
    in_use: int | None = None,
    waiting: int | None = None,
    retry_after: float = 1.0,
    backend: str = "the database",
    lost: bool = False,
    timed_out: bool = False,
    refused: str | None = None,
    unreachable: bool = False,
    advice: str | None = None,
    failed: str = "could not give a connection",
) -> ResourceUnavailable:
    """A :class:`ResourceUnavailable` naming the pool and its state; passwords redacted.

    *backend* names what to check if it persists (``"the Redis server"``, ...). *refused*:
    the SQLSTATE of a server that refused the credentials or the database, which no retry
    mends. *unreachable*: the backend could not be reached, which the pool's size has
    nothing to do with. *advice*: what to do, where the pool's size is not the point (empty:
    *cause* says it). *failed*: what the pool could not do (a connection already given, its
    ``COMMIT``: "could not commit").
    """
    state = []
    if size is not None:
        state.append(f"size {size}")
    if in_use is not None:
        state.append(f"in use {in_use}")
    if waiting is not None:
        state.append(f"waiting {waiting}")
    shown = f" ({', '.join(state)})" if state else ""
    reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    if advice is None:
        advice = _advice(cause, backend, refused=refused, unreachable=unreachable)
    msg = redact(f"Pool {name!r}{shown} {failed}: {reason}. {advice}".rstrip())
    error = ResourceUnavailable(
        msg, resource=name, retry_after=retry_after, lost=lost, timed_out=timed_out
    )
    # A wait that ran out because the backend is down, not because the pool is busy: an
    # outage, whose end is logged (`tether.fastapi._Refusals`).
    error._unreachable = unreachable  # type: ignore[attr-defined]
    return error


class FileWatch:
    """Whether an SQLite file is still the one an engine or database opened: not deleted,
    and not made anew at its path (SQLite, or another library on the same file, creates an
    empty one for its next connection). A new file is told by its (device, inode), and by its
    size: a filesystem may give the new file the deleted one's inode at once, but an SQLite
    file made anew is empty until something writes to it."""

    __slots__ = ("had_data", "identity", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        found = os.stat(path)
        self.identity = (found.st_dev, found.st_ino)
        self.had_data = found.st_size > 0

    def changed(self) -> str | None:
        """What became of the file (None: it is the one opened); one ``os.stat``."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return "gone"
        if (found.st_dev, found.st_ino) != self.identity or (self.had_data and found.st_size == 0):
            return "replaced"
        if found.st_size > 0:
            self.had_data = True
        return None


def closed_by_tether(what: str, name: str, release: str, why: str = "") -> str:
    """The error of a unit of work's session or connection (*what*) used once tether closed
    it (a StreamingResponse body reading it after the release point); *why*: what using it
    would do, completed by "unit of work"."""
    when = (
        "release='handler' closes it when the endpoint returns, before the response"
        if release == "handler"
        else "release='response' closes it after the response"
    )
    because = f": {why} unit of work" if why else ""
    return (
        f"{what} {name!r} was closed by tether at the end of its unit of work (in a "
        f"request, {when}), and cannot be used again{because}. A StreamingResponse body that "
        f"queries needs release='response'; a background task, a {what.lower()} of its own "
        f"(`async with lc.scope() as s: await s.get({name})`)."
    )


def still_in_use(what: str, name: str, done: str) -> str:
    """The error of a unit of work that succeeded while a task it started still used its
    connection or session (*what*: ``"Connection"``, ``"Session"``), so that its transaction
    could not be committed; *done*: what became of that task."""
    thing = what.lower()
    return (
        f"{what} {name!r} was still in use by another task when its unit of work ended (a "
        f"task started with it and not awaited, or the other operation of an asyncio.gather "
        f"that failed), so its transaction could not be committed: {done}, and the unit of "
        f"work rolled back. Await every task using the {thing} before the unit of work ends, "
        f"or give each task a {thing} of its own (`async with lc.scope() as s: await "
        f"s.get({name})` in the task)."
    )


def used_concurrently(what: str, name: str, driver: str, done: str) -> ScopeError:
    """The error for one unit of work's connection (*what*: ``"Connection"``, ``"Session"``)
    used by two tasks at once, which *driver* refused; *done*: what tether did about it."""
    step, steps = ("query", "queries") if what == "Connection" else ("operation", "operations")
    article = f"a {what.lower()}"
    return ScopeError(
        f"{what} {name!r} was used by two tasks at once (asyncio.gather over its {steps}, or "
        f"a task started with it): {article} runs one {step} at a time, and {driver} refused "
        f"the second. {done} Await its {steps} one after another, or give each task "
        f"{article} of its own (`async with lc.scope() as s: await s.get({name})` in the task)."
    )


def queue_full(
    name: str, *, waiting: int, max_waiting: int, size: int | None, in_use: int | None
) -> ResourceUnavailable:
    """The 503 for a unit of work refused at once by ``max_waiting``."""
    reason = (
        f"no connection is free (each is in use or still being made) and {waiting} "
        f"{'unit of work already waits' if waiting == 1 else 'units of work already wait'} "
        f"for one (max_waiting={max_waiting}); refused at once rather than queued"
    )
    return unavailable(name, reason, size=size, in_use=in_use, waiting=waiting)


F = TypeVar("F", bound=Callable[..., Any])


def depends_on(fn: F, *resources: Resource[Any]) -> F:
    """Name *fn*'s parameters after *resources*, so the Lifecycle passes it their values.

    tether resolves a resource's dependencies by parameter name, and an integration's
    factory only learns the name the user gave the resource it needs when it is
    registered: ``depends_on(open_session, engine)`` makes ``open_session`` take one
    parameter called ``engine.name``. The values are passed positionally, in order.
    """
    from .._resource import Resource

    given: tuple[object, ...] = resources  # checked as what a caller may pass
    for res in given:
        if not isinstance(res, Resource):
            msg = (
                f"depends_on: {redact(repr(res))} is not a resource; pass the resources "
                f"@lc.resource (or an integration) returned."
            )
            raise TypeError(msg)
    names = [res.name for res in resources]
    if len(set(names)) != len(names):
        msg = f"depends_on: resources {names!r} must have distinct names."
        raise ValueError(msg)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kind) for name in names]
    )
    return fn


#: SQLSTATE read_only_sql_transaction: a write refused because the server (or the session)
#: is read-only, as a replica is: after a failover the writer's address can reach one, and
#: every pooled connection to it fails each write until it is replaced.
READ_ONLY_SQLSTATE = "25006"


def failed_transaction(what: str, name: str, savepoint: str) -> str:
    """The message for a unit of work whose transaction had failed before its commit: a
    statement raised an error that the endpoint caught, so PostgreSQL answers ``COMMIT``
    with a rollback. Nothing was committed: an error response, never a 200."""
    return (
        f"{what} {name!r}: a statement of the unit of work's transaction failed and its error was "
        f"caught, so the transaction was aborted and could not commit: nothing was committed "
        f"(it was rolled back). Let the error propagate (tether rolls back and answers it), "
        f"or run what may fail in a savepoint ({savepoint}) and carry on after it."
    )


#: SQLSTATEs of a prepared statement the server does not have (26000) or has already
#: (42P05): what a driver's statement cache meets behind PgBouncer in transaction mode, where
#: each transaction may run on another server connection.
_PREPARED_STATEMENT_SQLSTATES = frozenset({"26000", "42P05"})

PGBOUNCER_NOTE = (
    "tether: the server does not have a prepared statement the driver cached, or has it "
    "already. Behind PgBouncer in transaction (or statement) mode, each transaction may run "
    "on another server connection, which breaks the driver's statement cache: pass "
    "pgbouncer=True to the pool (tether then configures the driver for it)."
)


#: The same, for an engine declared ``pgbouncer=True`` whose own ``connect_args`` turned the
#: driver's preparing back on (which PgBouncer 1.21+ supports with max_prepared_statements).
PREPARING_AGAIN_NOTE = (
    "tether: the server does not have a prepared statement the driver cached, or has it "
    "already, although the engine is declared pgbouncer=True: a connect_args= option of "
    "yours (psycopg's prepare_threshold, asyncpg's statement_cache_size or "
    "prepared_statement_cache_size), or a PREPARE statement, prepares statements again, "
    "which PgBouncer in transaction mode does not keep across transactions (unless its "
    "max_prepared_statements is set). Remove it: pgbouncer=True turns the driver's "
    "preparing off."
)


def note_pgbouncer(exc: BaseException, declared: bool = False) -> bool:
    """Add `PGBOUNCER_NOTE` to *exc* if it is a prepared statement missing, or there twice,
    on the server: its traceback says the fix (for a pool *declared* ``pgbouncer=True``,
    `PREPARING_AGAIN_NOTE`). Returns whether it is."""
    codes = set(sqlstates(exc))
    if not any(code in _PREPARED_STATEMENT_SQLSTATES for code in codes) and not (
        # "bind message supplies 0 parameters, but prepared statement ... requires 1": one
        # name the server has for another statement (a protocol violation, 08P01)
        "08P01" in codes and "prepared statement" in str(exc)
    ):
        return False
    note = PREPARING_AGAIN_NOTE if declared else PGBOUNCER_NOTE
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return True


# SQLite's SQLITE_BUSY (5), and its extended code for a WAL read snapshot too old to write
# from (517). Not SQLITE_LOCKED ("database table is locked"): that comes from the same
# connection (a statement its own cursor still reads from), which no retry mends.
SQLITE_BUSY = 5
SQLITE_BUSY_SNAPSHOT = SQLITE_BUSY | (2 << 8)


def sqlite_busy(exc: BaseException | None) -> bool:
    """Whether *exc* is SQLite's "database is locked" (``SQLITE_BUSY``, any extended code):
    another connection holds the lock, and waiting may end it."""
    sqlite3 = sys.modules.get("sqlite3")  # imported by whoever raised one
    if sqlite3 is None or not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF == SQLITE_BUSY
    return "database is locked" in str(exc)  # pragma: no cover - without sqlite_errorcode


def read_only(exc: BaseException) -> bool:
    """Whether *exc* (a driver's error, or SQLAlchemy's wrapping one) is SQLSTATE 25006."""
    return READ_ONLY_SQLSTATE in sqlstates(exc)


def read_only_failure(name: str) -> ResourceUnavailable:
    """The 503 for a write refused as read-only: retrying is safe (nothing was written),
    and the pool is replacing its connections meanwhile."""
    msg = (
        f"Pool {name!r}: the database refused a write as read-only (SQLSTATE 25006), as a "
        f"replica does; after a failover the address may reach one. Nothing was written, and "
        f"the pool's connections are being replaced. Retry shortly; if it persists, check "
        f"which server the address reaches."
    )
    return ResourceUnavailable(msg, resource=name, retry_after=1.0, lost=True)


def unreachable(
    name: str, target: str, cause: BaseException, *, retry_after: float = 1.0
) -> ResourceUnavailable:
    """A :class:`ResourceUnavailable` for a backend that cannot be reached.

    Names the pool (or client) and where it tried to connect; *target* (a DSN or URL)
    and the cause are shown with their passwords redacted.
    """
    said = unstopped(str(cause).strip())
    reason = f"{type(cause).__name__}: {said}" if said else type(cause).__name__
    if not said and isinstance(cause, TimeoutError):  # (trial 35: a bare "TimeoutError")
        reason += " (no answer within the connect timeout)"
    advice = (
        _NO_SLOT_LEFT
        if _no_slot_left(cause)
        else "Check that the server runs and is reachable from here, and the address and "
        "credentials in its DSN."
    )
    msg = redact(f"{name!r} cannot reach {target}: {reason}. {advice}")
    return ResourceUnavailable(msg, resource=name, retry_after=retry_after)


#: What a connection refused for want of a slot on the server says to do.
_NO_SLOT_LEFT = (
    "The server has no connection slot left (SQLSTATE 53300, max_connections): other clients "
    "hold them (the old workers of a reload, which overlap the new ones; another app; "
    "connections left behind). Retry shortly; if it persists, lower the pools' sizes "
    "(workers x size + reserved must fit max_connections, twice over during a reload) or "
    "raise max_connections."
)


def _no_slot_left(cause: BaseException) -> bool:
    """Whether *cause* is the server refusing a connection for want of a slot (53300),
    which no check of its address mends. libpq keeps that SQLSTATE to itself (psycopg's
    error has none): its message says it."""
    said = str(cause)
    return (
        "53300" in sqlstates(cause)
        or "too many clients already" in said
        or "remaining connection slots are reserved" in said  # (a role not a superuser)
    )


T = TypeVar("T")
_closing: set[asyncio.Future[Any]] = set()  # closes of abandoned connections, running


async def connect_or_close(connecting: Awaitable[T], close: Callable[[T], Any]) -> T:
    """Await a connection attempt without leaving a connection behind if cancelled.

    Some drivers make the connection where a cancellation does not reach (psycopg's
    attempt keeps its socket; aiosqlite makes it in its thread) and drop it, unclosed,
    when the task waiting for it is cancelled. So the attempt runs in a task of its own:
    a cancellation is raised here at once, and a connection the attempt still makes is
    closed with *close* (sync, or returning an awaitable) as soon as it exists.
    """
    attempt = asyncio.ensure_future(connecting)
    try:
        return await asyncio.shield(attempt)
    except BaseException:
        attempt.add_done_callback(lambda done: _close_abandoned(done, close))
        raise


def _close_abandoned(attempt: asyncio.Future[T], close: Callable[[T], Any]) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return  # nothing was made (reading the exception also keeps asyncio quiet)
    closing = close(attempt.result())
    if inspect.isawaitable(closing):
        task = asyncio.ensure_future(closing)
        _closing.add(task)
        task.add_done_callback(_closing.discard)


def keyword_names(func: Callable[..., Any]) -> frozenset[str]:
    """The parameters of *func* a keyword argument can fill (a driver's options, read once
    by each integration to check what it passes on at the declaration)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(func).parameters.values()
    return frozenset(p.name for p in params if p.kind in kinds)


def check_budget_policy(budget: object, where: str) -> None:
    """Refuse a ``budget=`` that is not one of ``"warn"``, ``"error"``, ``"off"``, at the
    declaration: any other value (``"Error"``) would behave as ``"warn"``."""
    if isinstance(budget, str) and budget in _BUDGET_POLICIES:
        return
    fix = 'Pass "warn" (the default), "error" or "off"'
    if isinstance(budget, str) and budget.strip().lower() in _BUDGET_POLICIES:
        fix = f"Did you mean budget={budget.strip().lower()!r}? The values are lower case"
    msg = (
        f"{where}: budget={budget!r} is not one of 'warn', 'error', 'off' (what to do when "
        f"the connection budget exceeds the server's max_connections). {fix}."
    )
    raise ValueError(msg)


_BUDGET_POLICIES = ("warn", "error", "off")


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """The fix for a keyword argument *key* that nothing takes: its close match in *known*."""
    close = closest(key, known)
    return f"Did you mean {close}=? Fix or remove it." if close else "Remove it."


def not_an_option(where: str, key: str, fn: str, of: str, fix: str) -> TypeError:
    """The refusal, at the declaration, of a keyword argument *key* that neither *fn*
    (tether's: ``pool()``) nor *of* (what it passes its other keyword arguments to, with its
    version) takes; the driver would refuse it only when the app starts."""
    return TypeError(
        f"{where}: {key}= is not an option of {fn} nor of {of}, which {fn} passes its other "
        f"keyword arguments to. {fix}"
    )


def block_override(lc: Lifecycle, res: Resource[Any], replacement: Any) -> Override:
    """``lc.override(res, replacement)`` for a ``rolled_back()`` block, marked as the block's:
    `tether.testing.undo_overrides` leaves it to the block."""
    ov = lc.override(res, replacement)
    ov.block = True
    return ov


def server_of(info: Any) -> dict[str, str]:
    """The server a psycopg connection reached (its ``info``), as connection parameters that
    reach it again: host, port, and hostaddr (empty for a unix socket, so that a conninfo's
    list of them does not outnumber the one host)."""
    return {"host": info.host, "port": str(info.port), "hostaddr": info.hostaddr or ""}


#: Seconds `terminate_backend` may take: its connection may be refused for a moment by a
#: server at max_connections (what makes cancels slow), and is tried again within them.
STOP_WITHIN = 2.0


def cancel_request_of(pgconn: Any) -> Any | None:
    """A cancel request for the backend of psycopg's *pgconn* (libpq 17's ``PGcancelConn``),
    made now, while the connection is open, and sent later by `terminate_backend` if need
    be: it needs no connection slot, and it reaches the backend after psycopg has hung up
    (its key is copied now). None where libpq is older, or psycopg has no such object."""
    try:
        return pgconn.cancel_conn()  # no socket until it is started; about 10 KB
    except Exception:
        return None


async def _send_cancel_request(cancel: Any) -> None:
    """Send *cancel* (`cancel_request_of`) without blocking the event loop (libpq's blocking
    ``PQcancel`` keeps the GIL while it waits on the network: it froze the process)."""
    from psycopg import pq

    loop = asyncio.get_running_loop()
    cancel.start()
    try:
        while (status := cancel.poll()) != pq.PollingStatus.OK:
            if status == pq.PollingStatus.FAILED:
                raise OSError(cancel.get_error_message() or "the cancel request failed")
            fd = cancel.socket
            ready = loop.create_future()
            done = functools.partial(_set_once, ready)
            if status == pq.PollingStatus.READING:
                loop.add_reader(fd, done)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
            else:
                loop.add_writer(fd, done)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
    finally:
        cancel.finish()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: What PostgreSQL says of a connection refused for want of a slot (53300): the server's
#: (for a superuser, then for a role without the reserved slots), a role's or a database's
#: CONNECTION LIMIT. psycopg gives such a refusal no sqlstate.
_FULL = re.compile(
    r"too many clients|remaining connection slots are reserved|too many connections for"
)


async def terminate_backend(
    connect: Callable[[], Awaitable[Any]],
    pid: int,
    who: str,
    within: float = 1.0,
    cancel: Any | None = None,
) -> None:
    """End backend *pid* on the server (``pg_terminate_backend``) from a psycopg connection of
    its own, made by *connect()* in autocommit, within *within* seconds; a failure is a
    WARNING naming *who* (the psycopg integration's pool, SQLAlchemy's engine). Its
    connection, not the pool's: the login role's, and no slot of a pool that may have none
    to spare. If that connection is refused (a server with no slot left, a role's connection
    limit, credentials only an ``async_creator`` knows), the backend is sent *cancel* instead
    (`cancel_request_of`, made as the connection was), which needs neither: the query it
    runs (a ``COMMIT`` waiting for a lock) is cancelled, its transaction rolled back."""
    import anyio
    import psycopg

    other: Any = None
    try:
        async with asyncio.timeout(within):
            pause = 0.05
            while True:
                try:
                    other = await connect()
                    break
                except psycopg.OperationalError as exc:
                    if cancel is not None:
                        # Refused (a server full, a role's CONNECTION LIMIT, credentials
                        # only an async_creator knows: trials 33, 34): the cancel request
                        # needs neither a slot nor a login. Its query (a COMMIT waiting for
                        # a lock) is cancelled; the backend then finds its client gone.
                        sending, cancel = cancel, None
                        await _send_cancel_request(sending)
                        log.info(
                            "tether: %s: could not end backend %d on the server (%s): its "
                            "query was cancelled with a cancel request",
                            who,
                            pid,
                            describe(exc),
                        )
                        return
                    if not _FULL.search(str(exc)):
                        raise
                    # Full: a slot frees as a client of the server disconnects (the pool
                    # closing a connection, another app's). Tried again within the bound.
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.4)
            async with psycopg.AsyncCursor(other) as cur:  # whatever the row/cursor factory
                if other.info.server_version >= 140000:
                    # Waits for the backend to exit (its transaction rolled back), not only
                    # signals it: the client's answer follows (PostgreSQL 14+).
                    wait_ms = max(1, int(within * 500))
                    await cur.execute("SELECT pg_terminate_backend(%s, %s)", (pid, wait_ms))
                else:
                    await cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    except Exception as exc:
        log.warning(
            "tether: %s: could not end backend %d on the server (%s); a query it was running "
            "may run to its end",
            who,
            pid,
            describe(exc),
        )
    finally:
        if other is not None:
            with anyio.CancelScope(shield=True):
                await other.close()


def sqlite_lock_hint(busy: str) -> str:
    """What a check of an SQLite file that does not finish in time most likely waits for
    (`Resource.check_late`), *busy* naming the busy timeout's setting and value."""
    return (
        f"SQLite waits for a lock on the file for up to its busy timeout, {busy}: another "
        f"connection or process holding the database (a long write, a backup, BEGIN "
        f"EXCLUSIVE) is the likeliest cause"
    )


def sqlite_error_name(exc: BaseException) -> str | None:
    """SQLite's primary result code name (``SQLITE_CANTOPEN``) of *exc*, if it has one."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int):  # pragma: no cover - Python < 3.11
        return None
    return _SQLITE_PRIMARY_NAMES.get(code & 0xFF)


_SQLITE_PRIMARY_NAMES = {
    sqlite3.SQLITE_CANTOPEN: "SQLITE_CANTOPEN",
    sqlite3.SQLITE_NOTADB: "SQLITE_NOTADB",
    sqlite3.SQLITE_READONLY: "SQLITE_READONLY",
}


def sqlite_file_of(path: str) -> Path:
    """The file *path* names: a ``file:`` URI's path part (percent-decoded), or *path*."""
    if not path.startswith("file:"):
        return Path(path)
    rest = path[len("file:") :].partition("?")[0].partition("#")[0]
    if rest.startswith("//"):  # file://localhost/abs/path, file:///abs/path
        rest = "/" + rest[2:].partition("/")[2]
    return Path(unquote(rest))


def sqlite_cannot_open(
    who: str, path: str, file: Path, exc: BaseException, *, missing_dir: str, wal: bool = False
) -> sqlite3.Error | None:
    """The error, marked as a mistake no retry mends, for a path that cannot be an SQLite
    database (a directory, a file of something else, a directory missing, a read-only file
    switched to WAL mode), *who* (``Database 'db'``, ``Engine 'engine'``) failing to open it;
    *missing_dir*: the fix for a directory that does not exist. None for another failure (a
    lock: a retry may mend it)."""
    error = sqlite_error_name(exc)
    if error == "SQLITE_READONLY" and wal:  # the WAL switch writes to the file
        msg = (
            f"{who}: {path!r} is read-only ({describe(exc)}), and switching it to "
            f"WAL mode (wal=True, the default) writes to it. Pass wal=False for a read-only "
            f"database, or make the file and its directory writable by the app's user."
        )
        return for_good(sqlite3.OperationalError(msg))
    where = f"{who}: cannot open {path!r}"
    if not path.startswith(("file:", "~", "/")):
        # Relative: to the process's working directory, wherever it was started from.
        where += f" (relative to the working directory, {os.getcwd()!r})"
    if error == "SQLITE_NOTADB":
        msg = (
            f"{where}: the file is not an SQLite database ({describe(exc)}). Pass the path of "
            f"the database file (is it the right file?), or move this one aside to have a new, "
            f"empty database created there."
        )
        return for_good(sqlite3.DatabaseError(msg))
    if error != "SQLITE_CANTOPEN":
        return None
    if file.is_dir():
        example = str(file / "app.db")
        msg = (
            f"{where}: it is a directory, not a file ({describe(exc)}). Pass the path of the "
            f"database file, e.g. {example!r}."
        )
    elif path.startswith("~") and not file.parent.is_dir():
        msg = (
            f"{where}: a path that begins with '~' is not expanded to a home directory "
            f"({describe(exc)}). Pass the full path (os.path.expanduser() makes it)."
        )
    elif not file.parent.is_dir():
        parent = next((d for d in file.parents if d.exists()), None)
        if parent is not None and not parent.is_dir():  # a part of the path is a file
            msg = (
                f"{where}: {str(parent)!r}, a part of its path, is a file, not a directory "
                f"({describe(exc)}). Fix the path."
            )
        else:
            msg = (
                f"{where}: its directory {str(file.parent)!r} does not exist "
                f"({describe(exc)}): {missing_dir}"
            )
    elif path.startswith("file:") and not file.exists():
        msg = (
            f"{where}: the file {str(file)!r} does not exist, and the URI's mode= does not let "
            f"SQLite create it ({describe(exc)}). Pass the path of an existing database, or "
            f"drop mode= (or use mode=rwc) to have it created."
        )
    else:
        msg = (
            f"{where} ({describe(exc)}). Check that the app's user may read and write the "
            f"file and its directory (SQLite creates {file.name}-wal and {file.name}-shm next "
            f"to it)."
        )
    return for_good(sqlite3.OperationalError(msg))
