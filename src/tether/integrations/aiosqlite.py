"""aiosqlite with tether: the embedded database, one connection and transaction per unit of work.

::

    from typing import Annotated

    import aiosqlite
    from fastapi import Depends, FastAPI

    import tether
    from tether.integrations import aiosqlite as tsqlite

    lc = tether.Lifecycle()
    db = tsqlite.database(lc, "data/app.db")             # app: file, WAL, check
    conn = tsqlite.connection(lc, db)                    # request: reads, and simple writes
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")  # read-then-write

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes")
    async def add(text: str, c: Annotated[aiosqlite.Connection, Depends(writer)]) -> dict:
        await c.execute("INSERT INTO notes (text) VALUES (?)", (text,))
        return {"status": "created"}      # committed before the response starts

* :func:`database` is an app resource: it resolves the path when the app starts, creates
  the file (and its directory), switches it to WAL mode once (the mode is stored in the
  file), and reads the file (``PRAGMA schema_version``) as its health check. Once started,
  it never creates the file again: a file deleted while the app serves fails readiness and
  each unit of work (503), instead of a new, empty database. Its value, a
  :class:`Database`, holds the settings every connection gets.
* :func:`connection` is a request resource: one aiosqlite connection per unit of work
  (SQLite connections are cheap to open; there is no pool to go stale), with
  ``busy_timeout``, ``foreign_keys=ON`` and ``synchronous=NORMAL``, in one transaction
  that commits when the unit of work succeeded (before the response starts) and rolls
  back on any failure. At most ``max_connections`` are open at once.

Concurrent writers
------------------
SQLite has one write lock per database. In WAL mode readers never wait for the writer,
nor the writer for readers; writers take turns:

* a ``begin="immediate"`` connection takes the write lock when it opens, waiting up to
  ``busy_timeout`` seconds for the current writer to finish. The app's writers queue for
  their turn (FIFO) before they take one of the ``max_connections``, so the slots stay free
  for readers. Use it for endpoints that read and then write: they serialize cleanly. If
  the lock does not come free in time, the request is answered ``503`` with
  ``Retry-After`` (:class:`~tether.ResourceUnavailable`).
* a ``begin="deferred"`` connection (the default) takes the lock at its first write. That
  suits reads and single-statement writes; but a transaction that read first and then
  writes after another writer committed cannot be upgraded (``SQLITE_BUSY_SNAPSHOT``),
  and SQLite fails it at once rather than wait. tether rolls it back and answers ``503``
  too: the client may retry, nothing was written.
* "database is locked" anywhere else (setting a connection up while another process holds
  an exclusive lock, a write waiting longer than ``busy_timeout``, a ``COMMIT``) is rolled
  back and answered ``503`` as well.

SQLAlchemy users can use the same file through :mod:`tether.integrations.sqlalchemy` with
a ``sqlite+aiosqlite:///path.db`` URL instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Never, cast
from urllib.parse import parse_qs

import anyio

try:
    import aiosqlite
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.aiosqlite needs aiosqlite: pip install 'tether[aiosqlite]'"
    raise ImportError(msg) from exc
from aiosqlite.context import contextmanager

from .._errors import (
    ResourceClosedError,
    ResourceUnavailable,
    ScopeError,
    _a_type,
    check_bool,
    check_number,
    closest,
    describe,
    for_good,
    not_options,
)
from .._resource import Resource
from .._stats import PoolStats
from ._common import (
    SQLITE_BUSY_SNAPSHOT,
    FileWatch,
    asyncio_only,
    check_check,
    check_resource,
    closed_by_tether,
    connect_or_close,
    depends_on,
    did_you_mean,
    keyword_names,
    not_an_option,
    sqlite_busy,
    sqlite_cannot_open,
    sqlite_file_of,
    sqlite_lock_hint,
    unavailable,
)

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check

__all__ = ["Database", "connection", "database"]

log = logging.getLogger("tether")

PathLike = str | os.PathLike[str]
Begin = Literal["deferred", "immediate", "exclusive"]
Release = Literal["handler", "response"]
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_INTERRUPT_AFTER = 0.05  # s: a rollback still waiting then waits behind a running statement


class Database:
    """An SQLite database file and how its connections are set up (:func:`database`'s value)."""

    __slots__ = (
        "_identity",
        "_uri",
        "_writers",
        "busy_timeout",
        "foreign_keys",
        "limiter",
        "max_connections",
        "name",
        "path",
        "synchronous",
        "wal",
    )

    def __init__(
        self,
        path: str,
        *,
        name: str = "database",
        wal: bool = True,
        busy_timeout: float = 5.0,
        foreign_keys: bool = True,
        synchronous: Synchronous | None = "NORMAL",
        max_connections: int = 32,
    ) -> None:
        self.path = path
        self.name = name
        self.wal = wal
        self.busy_timeout = busy_timeout
        self.foreign_keys = foreign_keys
        self.synchronous = synchronous
        self.max_connections = max_connections
        self.limiter: anyio.CapacityLimiter | None = None  # made in the app's event loop
        # The writers' turns (begin="immediate"/"exclusive"): one at a time waits for the
        # write lock, so writers queued for it do not hold the slots readers need.
        self._writers: anyio.CapacityLimiter | None = None
        # Once the app started (the file exists): the file as a URI, opened read-write
        # without creating it (a file deleted while serving is an error, not a new one).
        self._uri: str | None = None
        # The file, once it exists: one made anew at its path since (another library
        # creating it after it was deleted) is not the app's database.
        self._identity: FileWatch | None = None

    def __repr__(self) -> str:
        mode = "wal" if self.wal else "journal"
        return f"<tether aiosqlite Database {self.name!r} {self.path!r} ({mode})>"

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[aiosqlite.Connection]:
        """``async with db.connect() as conn:`` a connection with this database's settings.

        Not in a transaction (Python's sqlite3 begins one before a write; call
        ``await conn.commit()``), closed at the end of the block. For startup work
        (a schema), scripts and migrations; a request uses :func:`connection`.
        """
        conn = await self._open()
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def _open(self) -> _Connection:
        # Shielded from anyio's cancellations (opening a local file is quick); a one-shot
        # `task.cancel()` is handled by `_connect`.
        with anyio.CancelScope(shield=True):
            uri = self._uri
            try:
                conn = await _connect(
                    self.path if uri is None else uri,
                    timeout=self.busy_timeout,
                    isolation_level="DEFERRED",
                    # A `file:` path is a URI on every SQLite build (not only on those built
                    # with SQLITE_USE_URI, Debian's), as its directory is (create_dirs).
                    uri=uri is not None or self.path.startswith("file:"),
                )
            except sqlite3.OperationalError as exc:
                if uri is not None and not await anyio.Path(self.path).exists():
                    raise self._gone(exc) from exc
                raise
            changed = self._identity.changed() if self._identity is not None else None
            if changed is not None:
                await conn.close()
                if changed == "gone":  # (deleted between the open and the look)
                    raise self._gone(FileNotFoundError("the file is gone"))
                raise self._replaced()
            try:
                if self.foreign_keys:
                    await conn.execute("PRAGMA foreign_keys = ON")
                if self.synchronous is not None:
                    await conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            except BaseException:
                await conn.close()
                raise
        return conn

    async def _acquire(self, token: object) -> None:
        limiter = self.limiter
        if limiter is None:  # pragma: no cover - the app resource makes it
            return
        try:
            with anyio.fail_after(self.busy_timeout):
                await limiter.acquire_on_behalf_of(token)
        except TimeoutError:
            raise unavailable(
                self.name,
                f"all {self.max_connections} connections (max_connections) stayed in use "
                f"for busy_timeout={self.busy_timeout:g} s",
                size=self.max_connections,
                in_use=limiter.borrowed_tokens,
                waiting=limiter.statistics().tasks_waiting,
                timed_out=True,
            ) from None

    def _release(self, token: object) -> None:
        if self.limiter is not None:
            self.limiter.release_on_behalf_of(token)

    async def _take_turn(self, token: object) -> None:
        """Wait, up to ``busy_timeout``, until no other writer of this app waits for (or
        holds) the write lock; before taking a connection slot, which readers keep."""
        writers = self._writers
        if writers is None:  # pragma: no cover - the app resource makes it
            return
        try:
            writers.acquire_on_behalf_of_nowait(token)  # no writer: no wait, no cancel scope
        except anyio.WouldBlock:
            pass
        else:
            return
        try:
            with anyio.fail_after(self.busy_timeout):
                await writers.acquire_on_behalf_of(token)
        except TimeoutError:
            raise _busy(
                unavailable(
                    self.name,
                    f"the database {self.path!r} is locked by another writer (this app's writers "
                    f"take turns, and this one waited busy_timeout={self.busy_timeout:g} s for its "
                    f"turn); nothing was written",
                    size=self.max_connections,
                    in_use=self.limiter.borrowed_tokens if self.limiter is not None else None,
                    waiting=writers.statistics().tasks_waiting,
                    advice=self._lock_advice(),
                    timed_out=True,  # a wait of busy_timeout: counted as the pool's timeout
                )
            ) from None

    def _end_turn(self, token: object) -> None:
        if self._writers is not None:
            self._writers.release_on_behalf_of(token)

    def _gone(self, exc: BaseException) -> ResourceUnavailable:
        """The error for a database file deleted (or unmounted) after the app started."""
        msg = (
            f"Database {self.name!r}: the file {self.path!r} is gone (deleted, or its volume "
            f"unmounted, after the app started; {describe(exc)}). tether does not create it "
            f"again, empty, while the app serves: put the same file back (moved back, not a "
            f"copy), or restart the app to open the one at its path then (a copy restored "
            f"from a backup), or to create a new one."
        )
        return ResourceUnavailable(msg, resource=self.name)

    def _replaced(self) -> ResourceUnavailable:
        """The error for another file put at the database's path after the app started (a
        copy restored from a backup, a file renamed over it): not the file it opened."""
        msg = (
            f"Database {self.name!r}: another file is at {self.path!r} now, not the one the "
            f"app opened at startup (replaced, or restored from a copy, after the app "
            f"started). tether serves only the file it opened while the app runs: restart the "
            f"app to open the one at its path now."
        )
        return ResourceUnavailable(msg, resource=self.name)

    def locked(self, exc: BaseException, during: str) -> ResourceUnavailable:
        """The 503 for "database is locked": another writer held the lock too long, or
        committed after this unit of work's first read (a snapshot too old to write from)."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code == SQLITE_BUSY_SNAPSHOT:
            reason = (
                f"another writer committed to {self.path!r} after this unit of work first "
                f"read it, so it cannot write from that read ({describe(exc)}: "
                f"SQLITE_BUSY_SNAPSHOT, refused at once); nothing was written. For endpoints "
                f'that read, then write, declare the connection begin="immediate"'
            )
        elif self.wal:
            reason = (
                f"the database {self.path!r} is locked by another writer ({during}; "
                f"{describe(exc)}; busy_timeout={self.busy_timeout:g} s); nothing was written"
            )
        else:
            # A rollback journal: a reader's open transaction blocks a writer's COMMIT too.
            reason = (
                f"the database {self.path!r} is locked by another connection, a writer or, with "
                f"wal=False (a rollback journal), a reader in a transaction ({during}; "
                f"{describe(exc)}; busy_timeout={self.busy_timeout:g} s); nothing was written"
            )
        return _busy(
            unavailable(
                self.name,
                reason,
                size=self.max_connections,
                in_use=self.limiter.borrowed_tokens if self.limiter is not None else None,
                advice=(
                    "Retry: the next unit of work reads from that commit."
                    if code == SQLITE_BUSY_SNAPSHOT
                    else self._lock_advice()
                ),
                timed_out=code != SQLITE_BUSY_SNAPSHOT,  # SQLite's wait of busy_timeout
                # The unit had its connection: its COMMIT, or a write, failed (it read
                # "could not give a connection": trial 30).
                failed=(
                    "could not commit"
                    if during == "COMMIT"
                    else "could not write"  # (refused a write from an older snapshot)
                    if code == SQLITE_BUSY_SNAPSHOT
                    else "could not run a statement"  # (a read, or a write: not known)
                    if during.startswith("a statement")
                    else "could not give a connection"
                ),
            )
        )

    def _lock_advice(self) -> str:
        """What to do about a lock held too long (not the pool's size)."""
        journal = (
            ""
            if self.wal
            else "use WAL mode (wal=True, the default: its readers never block the writer), "
        )
        return (
            f"Retry shortly; if it persists, keep the transactions short, {journal}or raise "
            f"busy_timeout (now {self.busy_timeout:g} s)."
        )


def _in_memory(text: str) -> str | None:
    """Why SQLite opens *text* as an in-memory (or a temporary) database, if it does.

    As a URI too (``file:name?mode=memory&cache=shared``): an SQLite built with
    ``SQLITE_USE_URI`` (Debian's, for one) reads a ``file:`` path as a URI without ``uri=True``.
    """
    if text in ("", ":memory:") or text.startswith("file::memory:"):
        return "is private to one connection"
    if not text.startswith("file:"):
        return None
    name, _, query = text[len("file:") :].partition("?")
    if name.partition("#")[0] == "":
        return "is private to one connection"
    options = parse_qs(query.partition("#")[0])
    if "memory" in options.get("mode", []) or "memdb" in options.get("vfs", []):
        return (
            "lives only while a connection has it open (none does between units of work), "
            "so each unit of work would find it empty"
        )
    return None


#: The default checks' reads of the file still running (`database`'s `read_the_file`).
_READING: dict[asyncio.Future[None], Database] = {}


async def _read_the_file(db: Database) -> None:
    async with db.connect() as conn:
        await conn.execute("PRAGMA schema_version")


async def _reads_done(db: Database) -> None:
    """Wait for the checks' reads of *db* still running, and for the threads of connections
    closed that still finish their work (shielded, within its busy timeout and a second), as
    the database closes: one left to the loop's end had its connection's thread report to a
    closed loop ("Event loop is closed")."""
    pending = [reading for reading, of in _READING.items() if of is db]
    with anyio.CancelScope(shield=True), anyio.move_on_after(db.busy_timeout + 1):
        if pending:
            await asyncio.wait(pending)
        ending = [t for c, t in list(_THREADS.items()) if not c._running and t.is_alive()]
        while any(thread.is_alive() for thread in ending):
            await anyio.sleep(0.01)


#: The thread of each connection tether made, until that thread ends (`_reads_done`).
_THREADS: dict[Any, Any] = {}


def _read(reading: asyncio.Future[None]) -> None:
    """A check's read ended: forgotten, its error retrieved (the check that gave up on it
    has answered already)."""
    _READING.pop(reading, None)
    if not reading.cancelled():
        reading.exception()


def _locked_at_start(name: str, path: str, exc: sqlite3.Error, wal: bool) -> None:
    """Say that the file is locked by another connection as the app starts (a migration, a
    backup, another process's write): it starts all the same, as SQLAlchemy's engine does;
    its units of work wait for the lock, and get a 503 while it lasts. It failed the start,
    worded as a pool that "could not give a connection" (trial 34)."""
    log.warning(
        "tether: database %r: the SQLite file %r is locked by another connection as the app "
        "starts (%s); starting all the same: units of work wait for the lock (busy_timeout), "
        "and are answered 503 while it lasts%s",
        name,
        path,
        describe(exc),
        "; journal_mode=WAL was not switched on, and is at the next start" if wal else "",
    )


def _check_path(raw: object, name: str) -> None:
    """Refuse what is not a path: None (a setting not set) or a SQLAlchemy URL."""
    if raw is None:
        msg = (
            f"database({name!r}): the path is None: is the setting it is read from (an "
            f'environment variable) set? Pass the file\'s path, e.g. "notes.db", or a '
            f"function returning it."
        )
        raise ValueError(msg)
    if not isinstance(raw, str | bytes | os.PathLike):
        msg = (
            f"database({name!r}): the path is {_a_type(raw)} ({raw!r}), not a path: pass the "
            f'file\'s path (a str or a pathlib.Path), e.g. "notes.db", or a function returning '
            f"it."
        )
        raise TypeError(msg)
    text = raw if isinstance(raw, str) else os.fsdecode(raw)
    scheme = text.partition(":")[0]
    if ":" in text and (scheme == "sqlite" or scheme.startswith("sqlite+")):
        rest = text.partition(":")[2]
        file = rest[3:] if rest.startswith("///") and rest[3:] else "notes.db"
        msg = (
            f"database({name!r}): {text!r} is a SQLAlchemy URL, not a path: SQLite would "
            f"create a file named after it. Pass the file's path, e.g. {file!r} (or use "
            f"tether.integrations.sqlalchemy.engine() for a URL)."
        )
        raise ValueError(msg)
    path = text.removeprefix("file:").partition("?")[0]
    if text.startswith("file:"):  # (file://localhost/~/x.db made '/~': trial 36)
        parts = sqlite_file_of(text).parts
        path = os.path.join(*parts[1:]) if parts[:1] == ("/",) and parts[1:2] == ("~",) else path
    if path.startswith("~") and os.path.expanduser(path) != path:  # ("~backup.db" is a name)
        msg = (
            f"database({name!r}): {text!r} begins with '~', which is not expanded to a home "
            f"directory: SQLite (and create_dirs=True) would make a directory named '~' here. "
            f"Pass the full path: os.path.expanduser({path!r})."
        )
        raise ValueError(msg)


def _resolve_path(path: PathLike | Callable[[], PathLike], name: str = "database") -> str:
    raw = path() if callable(path) else path
    _check_path(raw, name)
    text = os.fspath(raw)
    why = _in_memory(text)
    if why is not None:
        msg = (
            f"An in-memory SQLite database ({text!r}) {why}, and tether opens one "
            f"connection per unit of work: use a file (a temporary one in tests)."
        )
        raise ValueError(msg)
    return text


def _rw_uri(path: str) -> str | None:
    """*path* as a URI that opens it read-write, never creating it; ``None`` for a path that
    is a ``file:`` URI already (opened as given)."""
    if path.startswith("file:"):
        return None
    return f"{Path(path).absolute().as_uri()}?mode=rw"


def database(
    lc: Lifecycle,
    path: PathLike | Callable[[], PathLike],
    *,
    name: str = "database",
    wal: bool = True,
    busy_timeout: float = 5.0,
    foreign_keys: bool = True,
    synchronous: Synchronous | int | None = "NORMAL",
    max_connections: int = 32,
    create_dirs: bool = True,
    check: bool | Check = True,
    **unknown: Never,  # a misspelt option: refused naming the one meant
) -> Resource[Database]:
    """Register the app resource for an SQLite database file; return it.

    Args:
        path: the file, or a callable returning it (called when the app starts).
        wal: switch the file to WAL mode at startup (readers do not block the writer).
        busy_timeout: seconds a connection waits for the write lock (and for one of the
            ``max_connections``; a writer for its turn among the app's writers) before the
            unit of work gets a 503.
        foreign_keys: ``PRAGMA foreign_keys = ON`` on every connection.
        synchronous: ``PRAGMA synchronous`` on every connection: ``OFF``, ``NORMAL`` (safe
            in WAL mode), ``FULL`` or ``EXTRA`` (any case), or 0-3; ``None`` leaves SQLite's
            default. Another value is refused (SQLite would read it as ``NORMAL``).
        max_connections: most connections open at once (each has its own thread).
        create_dirs: create the file's directory if it is missing.
        check: ``True`` reads the file (``PRAGMA schema_version``) on a new connection as
            the health check.
    """
    if unknown:
        raise not_options("tether.integrations.aiosqlite.database()", unknown, database)
    if not callable(path):
        _check_path(path, name)
    where = f"database({name!r})"
    check_number(max_connections, "max_connections", where, integer=True, least=1, example="32")
    check_number(busy_timeout, "busy_timeout", where, example="5")
    check_bool(wal, "wal", where)
    check_bool(foreign_keys, "foreign_keys", where)
    check_bool(create_dirs, "create_dirs", where)
    check_check(
        check,
        where,
        default="reads the file's schema version on a new connection",
        of="Database",
        example="lambda db: os.stat(db.path)",
    )
    synchronous = _check_synchronous(synchronous, where)

    async def open_database() -> AsyncIterator[Database]:
        asyncio_only(where, "aiosqlite")
        db = Database(
            _resolve_path(path, name),
            name=name,
            wal=wal,
            busy_timeout=busy_timeout,
            foreign_keys=foreign_keys,
            synchronous=synchronous,
            max_connections=max_connections,
        )
        file = sqlite_file_of(db.path)
        if create_dirs:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                part = next((d for d in file.parents if d.exists()), None)
                if part is not None and not part.is_dir():  # (trial 34: "create it")
                    msg = (
                        f"Database {name!r}: cannot create the directory "
                        f"{str(file.parent)!r} of {db.path!r} (create_dirs=True): "
                        f"{str(part)!r}, a part of its path, is a file, not a directory "
                        f"({describe(exc)}). Fix the path."
                    )
                else:
                    msg = (
                        f"Database {name!r}: cannot create the directory "
                        f"{str(file.parent)!r} of {db.path!r} (create_dirs=True): "
                        f"{describe(exc)}. Fix the path, or create the directory, writable "
                        f"by the app's user."
                    )
                raise for_good(OSError(msg)) from exc
        conn: aiosqlite.Connection | None = None
        try:
            conn = await db._open()
        except sqlite3.Error as exc:
            misconfigured = _cannot_open(name, db.path, file, exc, create_dirs=create_dirs, wal=wal)
            if misconfigured is not None:
                raise misconfigured from exc
            if not sqlite_busy(exc):
                raise unavailable(name, f"cannot open {db.path!r}: {describe(exc)}") from exc
            _locked_at_start(name, db.path, exc, wal)
        if conn is not None:
            try:
                if wal:
                    async with conn.execute("PRAGMA journal_mode = WAL") as cur:
                        row = await cur.fetchone()
                    mode = str(row[0]) if row else "?"
                    if mode.lower() != "wal":
                        log.warning(
                            "tether: database %r (%s) stays in journal_mode=%s, not WAL "
                            "(a filesystem without shared memory?); writers block readers.",
                            name,
                            db.path,
                            mode,
                        )
                await conn.execute("PRAGMA schema_version")
            except sqlite3.Error as exc:
                # A file of something else is read only now when the connection set nothing
                # up (foreign_keys=False, synchronous=None); a read-only one, by the WAL
                # switch.
                misconfigured = _cannot_open(
                    name, db.path, file, exc, create_dirs=create_dirs, wal=wal
                )
                if misconfigured is not None:
                    raise misconfigured from exc
                if not sqlite_busy(exc):
                    raise
                _locked_at_start(name, db.path, exc, wal)
            finally:
                with anyio.CancelScope(shield=True):  # also when a cancellation ends the open
                    await conn.close()
        db.limiter = anyio.CapacityLimiter(max_connections)
        db._writers = anyio.CapacityLimiter(1)
        db._uri = _rw_uri(db.path)  # the file exists now: never create it again
        db._identity = FileWatch(str(file))
        log.info("tether: database %r open: %s", name, db.path)
        try:
            yield db
        finally:
            await _reads_done(db)

    async def read_the_file(db: Database) -> None:
        # Reads the file's header (``SELECT 1`` reads nothing); a file that is gone fails the
        # open (the connection does not create it again). In a task of its own: the
        # statement runs to its end in the connection's thread (a lock waited for up to
        # busy_timeout), which no cancel reaches, and the connection's close waits for it;
        # the check's bound does not (it answered after busy_timeout: trial 36).
        reading = asyncio.ensure_future(_read_the_file(db))
        _READING[reading] = db
        reading.add_done_callback(_read)
        await asyncio.shield(reading)

    chosen: Check | None
    if check is True:
        chosen = read_the_file
    elif check is False:
        chosen = None
    else:
        chosen = check
    res: Resource[Database] = lc.resource(scope="app", name=name, check=chosen)(open_database)
    res.pool_stats = _figures
    res.async_api = "an aiosqlite database"
    res.check_late = sqlite_lock_hint(f"busy_timeout={busy_timeout:g}")
    return res


def _cannot_open(
    name: str, path: str, file: Path, exc: sqlite3.Error, *, create_dirs: bool, wal: bool
) -> sqlite3.Error | None:
    """`sqlite_cannot_open` for database *name*."""
    missing = (
        "create it, or pass create_dirs=True (the default) to have it created at startup."
        if not create_dirs
        else "is a part of it a file?"
    )
    return sqlite_cannot_open(f"Database {name!r}", path, file, exc, missing_dir=missing, wal=wal)


_SYNCHRONOUS: tuple[Synchronous, ...] = ("OFF", "NORMAL", "FULL", "EXTRA")


def _check_synchronous(value: object, where: str) -> Synchronous | None:
    """*value* as ``PRAGMA synchronous``'s name: one of its names (any case) or 0-3; SQLite
    reads any other word as NORMAL, silently."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return _SYNCHRONOUS[value]
    if isinstance(value, str) and value.strip().upper() in _SYNCHRONOUS:
        return _SYNCHRONOUS[_SYNCHRONOUS.index(value.strip().upper())]
    msg = (
        f"{where}: synchronous={value!r} is not one of OFF, NORMAL, FULL, EXTRA (any case) or "
        f'0-3, and SQLite would silently use NORMAL for it. Pass e.g. synchronous="FULL", or '
        f"None for SQLite's default."
    )
    raise ValueError(msg)


def _figures(db: Database) -> PoolStats:
    """No pool: a unit of work opens its own connection, up to ``max_connections`` at once,
    and closes it; so every open connection is in use, and none idle."""
    limiter = db.limiter
    if limiter is None:  # pragma: no cover - the app resource makes it
        raise RuntimeError("not open")
    in_use = int(limiter.borrowed_tokens)
    waiting = limiter.statistics().tasks_waiting
    if db._writers is not None:  # writers waiting for their turn wait for a connection too
        waiting += db._writers.statistics().tasks_waiting
    return PoolStats(
        name=db.name,
        max=db.max_connections,
        open=in_use,
        in_use=in_use,
        idle=0,
        waiting=waiting,
    )


_database = database


class _Connection(aiosqlite.Connection):
    """An aiosqlite connection that keeps, weakly, the cursors made on it (a set add each).

    So that a rollback an interrupt failed can close them: SQLite keeps an interrupt in
    force while a statement of the connection is active, a half-read cursor's included,
    and closing a cursor resets its statement (see :func:`_rollback`).
    """

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        self._tether_cursors: weakref.WeakSet[aiosqlite.Cursor] = weakref.WeakSet()
        # The connection resource's name, for a unit of work's connection (in its
        # transaction); None for `Database.connect()`'s.
        self._tether_unit: str | None = None
        # The endpoint's own commit() went through: from then on "database is locked" is no
        # 503 ("nothing was written"), whose retry would write that again.
        self._tether_committed = False
        # The release point that closed it at its unit of work's end ("handler",
        # "response"): a use after that is tether's error, naming the fix, not aiosqlite's
        # bare "no active connection" (a StreamingResponse body on a release="handler" one).
        self._tether_closed: str | None = None

    def _used_closed(self, exc: ValueError) -> BaseException:
        release = self._tether_closed
        if release is None or self._tether_unit is None:
            return exc
        msg = closed_by_tether("Connection", self._tether_unit, release)
        return ResourceClosedError(msg, resource=self._tether_unit)

    async def commit(self) -> None:
        await super().commit()
        self._tether_committed = True

    def _kept(self, cursor: aiosqlite.Cursor) -> aiosqlite.Cursor:
        self._tether_cursors.add(cursor)
        return cursor

    @contextmanager
    async def cursor(self) -> aiosqlite.Cursor:
        try:
            return self._kept(await super().cursor())
        except ValueError as exc:
            raise self._used_closed(exc) from None

    @contextmanager
    async def execute(self, sql: str, parameters: Any = None) -> aiosqlite.Cursor:
        try:
            return self._kept(await super().execute(sql, parameters))
        except ValueError as exc:
            raise self._used_closed(exc) from None

    @contextmanager
    async def executemany(self, sql: str, parameters: Any) -> aiosqlite.Cursor:
        try:
            return self._kept(await super().executemany(sql, parameters))
        except ValueError as exc:
            raise self._used_closed(exc) from None

    @contextmanager
    async def execute_fetchall(self, sql: str, parameters: Any = None) -> Any:
        try:
            return await super().execute_fetchall(sql, parameters)
        except ValueError as exc:
            raise self._used_closed(exc) from None

    @contextmanager
    async def execute_insert(self, sql: str, parameters: Any = None) -> Any:
        try:
            return await super().execute_insert(sql, parameters)
        except ValueError as exc:
            raise self._used_closed(exc) from None

    @contextmanager
    async def executescript(self, sql_script: str) -> aiosqlite.Cursor:
        """As ``sqlite3``'s, but in a unit of work's transaction: statement by statement.

        ``sqlite3``'s ``executescript`` commits an open transaction first (legacy
        transaction control, which tether's ``isolation_level`` is), then runs the script
        outside any transaction: a unit of work that failed after it would keep its writes
        so far and the script's. In a unit of work the script's statements run in its
        transaction instead, committed or rolled back with it; a script with its own
        ``BEGIN``/``COMMIT``/``ROLLBACK`` is refused before any of it runs.
        """
        if self._tether_unit is None or not self.in_transaction:
            return self._kept(await super().executescript(sql_script))
        # Split, checked and run in aiosqlite's thread: a long script (a seed) keeps the
        # event loop free meanwhile.
        run = cast("Callable[..., Awaitable[sqlite3.Cursor]]", self._execute)
        cursor = await run(_run_script, self._conn, sql_script, self._tether_unit)
        return self._kept(aiosqlite.Cursor(self, cursor))

    async def _close_cursors(self) -> None:
        """Close the cursors made on this connection (resetting their statements)."""
        for cursor in list(self._tether_cursors):
            try:
                await cursor.close()
            except (sqlite3.Error, ValueError):  # pragma: no cover - the connection is open
                pass


#: Where a statement of a script may end, or something that hides a ";" begins: a string,
#: a quoted name, a comment.
_SCRIPT_MARKS = re.compile(r"['\"`\[;]|--|/\*")


def _statements(script: str) -> list[str]:
    """*script*'s statements, as SQLite splits them: at a ``;`` outside strings, quoted names
    and comments that completes a statement (``sqlite3.complete_statement``: one inside a
    ``CREATE TRIGGER ... END`` body does not). A last statement without its ``;`` is kept,
    as ``executescript`` runs it; whitespace and comments alone are dropped. Linear in the
    script but for trigger bodies (a seed of 16,000 rows whose strings hold ";" took 6 s
    when every ";" was tried)."""
    statements: list[str] = []
    start = at = 0
    end = len(script)
    while (mark := _SCRIPT_MARKS.search(script, at)) is not None:
        token = mark.group()
        at = mark.end()
        if token == ";":
            if sqlite3.complete_statement(script[start:at]):
                statements.append(script[start:at])
                start = at
        elif token == "--":
            newline = script.find("\n", at)
            at = end if newline == -1 else newline + 1
        elif token == "/*":
            close = script.find("*/", at)
            at = end if close == -1 else close + 2
        else:  # a string or a quoted name; SQL doubles a quote inside one
            closing = "]" if token == "[" else token
            while True:
                close = script.find(closing, at)
                if close == -1:
                    at = end
                    break
                at = close + 1
                if closing == "]" or not script.startswith(closing, at):
                    break
                at += 1
    statements.append(script[start:])
    return [statement for statement in statements if _words(statement, 1) not in ([], [";"])]


def _words(statement: str, count: int) -> list[str]:
    """The first *count* words of *statement* (upper case), past whitespace and comments."""
    words: list[str] = []
    at, end = 0, len(statement)
    while at < end and len(words) < count:
        char = statement[at]
        if char.isspace():
            at += 1
        elif statement.startswith("--", at):
            newline = statement.find("\n", at)
            at = end if newline == -1 else newline + 1
        elif statement.startswith("/*", at):
            close = statement.find("*/", at + 2)
            at = end if close == -1 else close + 2
        elif char.isalnum() or char == "_":
            first = at
            while at < end and (statement[at].isalnum() or statement[at] == "_"):
                at += 1
            words.append(statement[first:at].upper())
        else:  # a string, a name in quotes, a ";", an operator: not a keyword
            words.append(char)
            at += 1
    return words


def _transaction_control(statement: str) -> str | None:
    """The statement's keyword if it begins or ends a transaction (``ROLLBACK TO`` a
    savepoint, ``SAVEPOINT`` and ``RELEASE`` do not: they nest in the unit's)."""
    words = _words(statement, 3)
    if not words or words[0] not in ("BEGIN", "COMMIT", "END", "ROLLBACK"):
        return None
    if words[0] == "ROLLBACK" and "TO" in words[1:3]:
        return None
    return words[0]


def _own_transaction(name: str, keyword: str) -> str:
    return (
        f"executescript() on connection {name!r}: the script has its own {keyword} "
        f"statement, and the connection is in its unit of work's transaction (committed when "
        f"the unit of work succeeds, rolled back when it fails), which {keyword} would end "
        f"early; nothing of the script ran. Remove the BEGIN/COMMIT/ROLLBACK statements (the "
        f"script's statements run in the unit of work's transaction), or run the script "
        f"outside a unit of work: `async with db.connect() as conn: await "
        f"conn.executescript(...)` (db: the tether.integrations.aiosqlite.database() value)."
    )


def _sets_foreign_keys(statement: str) -> bool:
    """Whether *statement* sets ``PRAGMA foreign_keys`` (a read of it is harmless)."""
    words = _words(statement, 6)
    return (
        len(words) > 2
        and words[0] == "PRAGMA"
        and "FOREIGN_KEYS" in words[1:4]
        and ("=" in words or "(" in words)
    )


def _foreign_keys_in_transaction(name: str) -> str:
    return (
        f"executescript() on connection {name!r}: the script sets PRAGMA foreign_keys, which "
        f"SQLite ignores inside a transaction, and the connection is in its unit of work's "
        f"transaction: a DROP TABLE after it (a table rebuild) would still delete, through "
        f"ON DELETE CASCADE, the rows that reference the table; nothing of the script ran. "
        f"Run such a script outside a unit of work, as startup work or a migration: `async "
        f"with db.connect() as conn: await conn.executescript(...)` (db: the "
        f"tether.integrations.aiosqlite.database() value)."
    )


def _run_script(conn: sqlite3.Connection, script: str, name: str) -> sqlite3.Cursor:
    """A unit of work's ``executescript`` (in aiosqlite's thread): its statements, refused
    before any runs if one would end the unit's transaction or be ignored inside it, then
    run in the transaction."""
    statements = _statements(script)
    for statement in statements:
        control = _transaction_control(statement)
        if control is not None:
            raise sqlite3.ProgrammingError(_own_transaction(name, control))
        if _sets_foreign_keys(statement):
            raise sqlite3.ProgrammingError(_foreign_keys_in_transaction(name))
    return _run_statements(conn, statements)


def _run_statements(conn: sqlite3.Connection, statements: list[str]) -> sqlite3.Cursor:
    """Run *statements* on *conn*, in its transaction (in aiosqlite's thread)."""
    cursor = conn.cursor()
    try:
        for statement in statements:
            for _row in cursor.execute(statement):  # run to its end, as executescript does
                pass
    except BaseException:
        cursor.close()
        raise
    return cursor


async def _connect(path: str, **kwargs: Any) -> _Connection:
    """``aiosqlite.connect``; a connection made after a cancellation is closed.

    aiosqlite makes the sqlite3 connection in its thread; when the task waiting for it is
    cancelled (a one-shot ``task.cancel()``: anyio's shield does not hold those), it is
    made anyway and dropped unclosed (``ResourceWarning: unclosed database`` on 3.13).
    """
    conn = _Connection(partial(sqlite3.connect, path, **kwargs), 64)  # as aiosqlite.connect
    connecting = cast("Awaitable[_Connection]", conn)  # awaiting it connects, and returns it
    try:
        made = await connect_or_close(connecting, aiosqlite.Connection.close)
        worker = getattr(made, "_thread", made)  # (before aiosqlite 0.21: the connection)
        if isinstance(worker, threading.Thread):
            for ended in [c for c, t in _THREADS.items() if not t.is_alive()]:
                del _THREADS[ended]  # (its thread ended: forgotten)
            _THREADS[made] = worker
        return made
    except sqlite3.Error:
        # aiosqlite stops its thread on a failed connect without waiting for it, and the
        # thread then reports to the event loop: one closed by then (an app whose start
        # failed on it) makes the thread fail ("Event loop is closed"). Wait for it.
        # aiosqlite 0.21+ keeps its thread as `_thread`; before, the connection was it.
        thread: Any = getattr(conn, "_thread", conn)
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            while thread.is_alive():
                await anyio.sleep(0.001)
        raise


async def _begin(db: Database, begin: Begin, name: str) -> _Connection:
    try:
        conn = await db._open()
    except sqlite3.OperationalError as exc:
        # Setting the connection up reads the schema (PRAGMA synchronous), which waits for
        # another process's exclusive lock (a rollback journal, locking_mode=EXCLUSIVE).
        if sqlite_busy(exc):
            raise db.locked(exc, "setting up the connection") from exc
        raise
    try:
        await conn.execute(f"BEGIN {begin.upper()}")
        conn._tether_unit = name
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await conn.close()
        if sqlite_busy(exc):
            raise db.locked(exc, f"BEGIN {begin.upper()}") from exc
        raise
    return conn


def _closed_by_user(conn: aiosqlite.Connection) -> bool:
    """Whether the code using *conn* closed it (aiosqlite: "no active connection")."""
    try:
        conn.in_transaction  # noqa: B018 - raises once closed
    except ValueError:
        return True
    return False


def _closed_by_user_message(name: str) -> str:
    return (
        f"Connection {name!r} was closed by the code using it (`await conn.close()`) before "
        f"its unit of work ended: its transaction ended with it, rolled back, so nothing it "
        f"wrote since its last commit is kept. Do not close it: tether commits (or rolls "
        f"back) and closes it when the unit of work ends."
    )


async def _rollback(conn: _Connection, name: str) -> None:
    """Roll back a unit of work that failed.

    A statement of it may still run in the connection's thread (its task was cancelled while
    it waited): the rollback queues behind it, so a statement still running after
    ``_INTERRUPT_AFTER`` is interrupted. Not at once: SQLite keeps an interrupt in force
    while any statement of the connection is active, a ``SELECT`` whose rows were not all
    read included, so it fails the rollback too, and closing the connection then leaves its
    transaction, and the write lock, in place until that cursor is collected. So when the
    rollback after an interrupt fails, the connection's cursors are closed (which resets
    their statements and ends the interrupt) and it is rolled back once more.
    """
    rollback = asyncio.ensure_future(conn.rollback())
    try:
        done, _ = await asyncio.wait({rollback}, timeout=_INTERRUPT_AFTER)
        if done:
            rollback.result()
            return
        await conn.interrupt()
        try:
            await rollback
        except sqlite3.OperationalError:
            # The interrupt reached the rollback itself, or stays in force (a half-read cursor).
            await conn._close_cursors()
            await conn.rollback()
    except sqlite3.Error as exc:  # the connection is closed right after: nothing is kept
        log.warning("tether: rolling back connection %r failed: %s", name, describe(exc))


#: sqlite3's transaction settings, which tether's connection does not take (it runs each
#: unit of work in a transaction begun as begin= says).
_SQLITE3_TRANSACTIONS = ("isolation_level", "autocommit")


@functools.cache
def _database_options() -> tuple[frozenset[str], frozenset[str]]:
    """The keyword arguments connection() passes to database(), and those with
    connection()'s own (for a suggestion)."""
    taken = keyword_names(database) - {"lc", "path", "name"}
    return taken, taken | (keyword_names(connection) - {"lc", "database"})


def _check_database_options(options: dict[str, Any], where: str) -> None:
    """Refuse a keyword argument neither connection() nor database() takes
    (``isolaton_level=``), naming the fix, instead of Python's bare "unexpected keyword
    argument"."""
    accepted, known = _database_options()
    for key in options:
        if key in accepted:
            continue
        close = closest(key, known | set(_SQLITE3_TRANSACTIONS))
        if close in _SQLITE3_TRANSACTIONS:
            fix = (
                f"tether begins and ends the transaction of each unit of work itself "
                f"(sqlite3's {close} is not taken): choose how it begins with "
                f"begin='deferred', 'immediate' or 'exclusive', or remove it."
            )
        else:
            fix = did_you_mean(key, known)
        raise not_an_option(where, key, "connection()", "database()", fix)


def connection(
    lc: Lifecycle,
    database: Resource[Database] | PathLike | Callable[[], PathLike],
    *,
    name: str = "connection",
    begin: Begin = "deferred",
    release: Release = "handler",
    error_status: Callable[[int], bool] | None = None,
    row_factory: Any = sqlite3.Row,
    **database_options: Any,
) -> Resource[aiosqlite.Connection]:
    """Register a request resource: one aiosqlite connection in a transaction; return it.

    Args:
        database: the resource returned by :func:`database`; or a path (or a callable
            returning one), for which a database resource named ``{name}_database`` is
            registered with *database_options* (``wal``, ``busy_timeout``, ...).
        begin: ``"deferred"`` (default) takes the write lock at the first write;
            ``"immediate"`` when the connection opens (for read-then-write endpoints:
            concurrent writers then wait their turn instead of failing).
        release: ``"handler"`` (default) or ``"response"`` (a streaming body uses it).
        error_status: which response statuses roll back (given the status, true for a
            failure); default: every status of 400 or more. ``lambda status: status >= 500``
            commits on a 4xx (see ``lc.resource``).
        row_factory: rows as ``sqlite3.Row`` (by index and by column name) by default.
    """
    if begin not in ("deferred", "immediate", "exclusive"):
        msg = f"connection({name!r}): begin={begin!r} is not deferred, immediate or exclusive."
        raise ValueError(msg)
    if row_factory is not None and not callable(row_factory):
        msg = (
            f"connection({name!r}): row_factory={row_factory!r} is not callable: pass a "
            f"function of the cursor and the row, as sqlite3 takes it (e.g. "
            f"row_factory=sqlite3.Row, the default), or None for tuples."
        )
        raise TypeError(msg)
    if isinstance(database, Resource):
        check_resource(
            lc,
            database,
            where=f"tether.integrations.aiosqlite.connection(name={name!r})",
            param="database",
            maker="tether.integrations.aiosqlite.database()",
            example='tether.integrations.aiosqlite.database(lc, "notes.db")',
        )
        if database_options:
            # A misspelt one (`begn=`) is named as such first, not sent to database().
            _check_database_options(database_options, f"connection({name!r})")
            msg = (
                f"connection({name!r}): {sorted(database_options)} are settings of the "
                f"database resource {database.name!r}: pass them to database()."
            )
            raise TypeError(msg)
        db_res = database
    else:
        _check_database_options(database_options, f"connection({name!r})")
        db_res = _database(lc, database, name=f"{name}_database", **database_options)

    writes = begin != "deferred"  # it takes the write lock as it opens: a writer's turn

    async def open_connection(db: Database) -> AsyncIterator[aiosqlite.Connection]:
        token = object()
        if writes:
            await db._take_turn(token)
        try:
            await db._acquire(token)
            try:
                conn = await _begin(db, begin, name)
                try:
                    conn.row_factory = row_factory
                    try:
                        yield conn
                    except BaseException as exc:
                        if _closed_by_user(conn):
                            log.warning("tether: %s", _closed_by_user_message(name))
                            raise
                        await _rollback(conn, name)
                        if sqlite_busy(exc) and not conn._tether_committed:
                            raise db.locked(exc, "a statement waited for the lock") from exc
                        raise
                    else:
                        if _closed_by_user(conn):
                            raise ScopeError(_closed_by_user_message(name))
                        try:
                            if conn.in_transaction:
                                await conn.commit()
                        except sqlite3.Error as exc:
                            await _rollback(conn, name)
                            if sqlite_busy(exc) and not conn._tether_committed:
                                raise db.locked(exc, "COMMIT") from exc
                            raise
                finally:
                    conn._tether_closed = release
                    await conn.close()
            finally:
                db._release(token)
        finally:
            if writes:
                db._end_turn(token)

    res: Resource[aiosqlite.Connection] = lc.resource(
        name=name, release=release, error_status=error_status
    )(depends_on(open_connection, db_res))
    res.async_api = "an aiosqlite connection"
    return res


def _busy(error: ResourceUnavailable) -> ResourceUnavailable:
    """Mark *error* (a lock another writer held) as the database busy, not down: the log's
    outage lines leave it out ("opens again" was said of a healthy file: trial 29)."""
    error._busy = True  # type: ignore[attr-defined]
    return error
