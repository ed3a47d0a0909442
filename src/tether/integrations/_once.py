"""Work done once per deployment at startup (migrations, seeding), whatever the workers.

Every worker process of a deployment opens the same app resources; work that must happen
once (migrate the schema, seed a table) then runs in each of them at the same time. The
PostgreSQL integrations' ``once(...)`` runs it under a transaction-level advisory lock
(``pg_advisory_xact_lock``: it also holds behind PgBouncer in transaction mode, where a
session-level lock would stay on a server connection the next client gets), in the same
transaction that records it done in a table, so the first worker does the work and the
others wait for it and skip it. This module is the driver-independent part; each
integration gives it a :class:`Session` on one connection of its pool.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import _a_type, check_bool
from .._lifecycle import _check_name
from ._common import depends_on, sqlstates

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Resource

log = logging.getLogger("tether")

__all__ = ["DOC", "STOP_WAITING", "Job", "RowSession", "Session", "declare", "lock_id", "run"]

#: The docstring of each integration's ``once``, with what differs filled in.
DOC = """Register an app resource that runs *fn* once per deployment; return the resource.

    For work every worker process would otherwise do at the same time at startup: migrate
    the schema, seed a table. The first worker to start runs ``await fn(conn)`` on a
    connection of *{dep}*, inside a transaction holding a transaction-level advisory lock
    for *key*, and records *key* done in *table* in the same transaction. Workers that
    start meanwhile wait for the lock, then find *key* recorded and skip; so does every
    later start, until *key* changes. If *fn* fails, its transaction rolls back, nothing
    is recorded, the app does not start (:class:`~tether.StartupError`), and the next
    worker tries. The resource's value is ``True`` in the process that ran *fn*.

    Args:
        fn: ``async def migrate(conn)``, given {conn}. It runs inside the transaction: what
            it does on *conn* commits with the record, or not at all. It must not commit or
            roll back that transaction ({nested} inside is a savepoint).{extra}
        key: names the work and its version, e.g. ``f"schema:{{VERSION}}"``: the work runs
            once per key.
        name: the resource's name (default: *fn*'s).
        record: ``False`` records nothing: *fn* runs in every worker, one at a time (for
            work that is safe to repeat, and roles that may not create *table*).
        table: where done keys are recorded; created if missing.
        timeout: seconds to wait for the lock and run *fn* (default: no limit); past it
            the app does not start.
    """


@dataclass(frozen=True, slots=True)
class Job:
    """One ``once(...)`` declaration, checked."""

    name: str
    key: str
    fn: Callable[[Any], Awaitable[Any]]
    record: bool
    table: str

    @property
    def locks(self) -> list[int]:
        """The advisory locks a run may wait for: the key's, and the table's."""
        return [lock_id(self.key), lock_id(f"table:{self.table}")]


def declare(
    lc: Lifecycle,
    dep: Resource[Any],
    fn: Callable[..., Any],
    *,
    key: str,
    name: str | None,
    record: bool,
    table: str,
    timeout: float | None,
    run_with: Callable[[Any, Job], Awaitable[bool]],
) -> Resource[bool]:
    """Check the arguments now (not at the next deployment) and register the app resource,
    which runs ``run_with(value of dep, job)``."""
    if name is not None:
        try:
            _check_name(name)
        except (TypeError, ValueError) as exc:  # said of once(), not of a resource
            raise type(exc)(f"once({getattr(fn, '__name__', '...')}, name=...): {exc}") from None
        label = name
    else:
        label = getattr(fn, "__name__", None) or "once"
    check_bool(record, "record", f"once {label!r}")
    job = Job(label, key, check_arguments(label, fn, key, table), record, table)

    async def run_once(value: Any) -> bool:
        return await run_with(value, job)

    return lc.resource(scope="app", name=label, timeout=timeout)(depends_on(run_once, dep))


class RowSession:
    """``fetchval`` for the sessions whose driver only gives rows."""

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        raise NotImplementedError

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_INSUFFICIENT_PRIVILEGE = "42501"


class Session(Protocol):
    """One connection of a driver's pool, as :func:`run` needs it.

    SQL is written with ``$1``-style parameters; each driver translates. ``begin`` and
    ``commit`` delimit the transaction that holds the lock; ``connection`` is what the
    user's function is given.
    """

    connection: Any

    async def begin(self) -> None: ...

    async def commit(self) -> None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None: ...

    def in_transaction(self) -> bool: ...


def lock_id(text: str) -> int:
    """A stable signed 64-bit advisory lock number for *text* (Python's ``hash()`` is salted
    per process, so two workers would not agree on it)."""
    digest = hashlib.blake2b(f"tether.once:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


#: Run on another connection after a failed run, with the failed connection's backend pid
#: and :attr:`Job.locks`: ends that backend if it still holds or waits for one of the locks.
#: A driver cannot always cancel a query it abandons (psycopg gives up when the task is
#: cancelled during the cancel request), and a backend waiting for a lock does not notice
#: its client is gone: it would take the lock later, and hold it until something reads
#: from its socket. Matching the locks too makes a wrong pid harmless (behind PgBouncer the
#: pid is PgBouncer's own).
STOP_WAITING = (
    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
    "AND pid = $1 AND objsubid = 1 "
    "AND ((classid::bigint << 32) | objid::bigint) = ANY(CAST($2 AS bigint[]))"
)


def check_arguments(
    name: str, fn: Callable[..., Any], key: str, table: str
) -> Callable[[Any], Awaitable[Any]]:
    """Refuse a bad call when the resource is declared, not at the next deployment."""
    if not inspect.iscoroutinefunction(fn):
        msg = (
            f"once {name!r}: {fn!r} is not an async function. Pass `async def {name}(conn): "
            f"...`; it runs on the connection that holds the lock, inside its transaction "
            f"(for sync work such as Alembic, use `await conn.run_sync(...)` with SQLAlchemy, "
            f"or `await anyio.to_thread.run_sync(...)`)."
        )
        raise TypeError(msg)
    given: object = key  # checked at run time too: a caller without a type checker
    if not isinstance(given, str):
        msg = (
            f"once {name!r}: key={key!r} is {_a_type(given)}, not a string. Pass a string that "
            f"changes when the work does, e.g. f'migrations:{{APP_VERSION}}' (the work runs "
            f"once per key)."
        )
        raise TypeError(msg)
    if not given.strip() or len(given) > 200:
        msg = (
            f"once {name!r}: key={key!r} must be a non-empty string of at most 200 "
            f"characters that changes when the work does, e.g. "
            f"f'migrations:{{APP_VERSION}}' (the work runs once per key)."
        )
        raise ValueError(msg)
    named: object = table
    if not isinstance(named, str):
        msg = (
            f"once {name!r}: table={table!r} is {_a_type(named)}, not a string. Pass the name "
            f"of the table that records the work done, e.g. table='tether_once' (the default)."
        )
        raise TypeError(msg)
    if not _IDENTIFIER.fullmatch(table):
        msg = (
            f"once {name!r}: table={table!r} is not a plain SQL name (letters, digits and "
            f"`_`, optionally `schema.table`)."
        )
        raise ValueError(msg)
    return fn


def _create_sql(table: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, "
        f"done_at timestamptz NOT NULL DEFAULT now(), done_by text NOT NULL, "
        f"seconds double precision NOT NULL)"
    )


async def _ensure_table(db: Session, name: str, table: str) -> None:
    await db.begin()
    if await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        await db.commit()
        return
    # Two keys creating the table at once would race in the catalog: one lock for the table.
    await db.fetchval("SELECT pg_advisory_xact_lock(CAST($1 AS bigint))", lock_id(f"table:{table}"))
    try:
        await db.fetchval(_create_sql(table))
    except Exception as exc:
        if _INSUFFICIENT_PRIVILEGE not in sqlstates(exc):
            raise
        msg = (
            f"once {name!r}: cannot create the table {table!r} that records work done "
            f"({type(exc).__name__}: {exc}). Create it once as a role that may:\n"
            f"  {_create_sql(table)};\n  GRANT SELECT, INSERT ON {table} TO <the app's role>;\n"
            f"or pass record=False (the work then runs in every worker, one at a time)."
        )
        raise PermissionError(msg) from exc
    await db.commit()


async def run(db: Session, job: Job) -> bool:
    """Run the job's function once for its key across every process sharing the database.

    Returns whether this process ran it (``False``: found it recorded done). Any failure
    propagates; the caller discards the connection then (so the server ends the
    transaction and frees the lock), and nothing is recorded: the next worker tries.
    """
    name, key, fn, record, table = job.name, job.key, job.fn, job.record, job.table
    if record:
        await _ensure_table(db, name, table)
    await db.begin()
    # Read committed, whatever the database's or the engine's default: under repeatable read
    # or serializable the snapshot is taken by the lock's statement, before the wait for the
    # lock, and the check after it did not see the record of the worker that held it: the
    # function ran again, and the record's INSERT failed that worker's start (trial 24).
    await db.fetchval("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    lock = lock_id(key)
    if not await db.fetchval("SELECT pg_try_advisory_xact_lock(CAST($1 AS bigint))", lock):
        log.info("tether: %r waits: another worker is running %r", name, key)
        await db.fetchval("SELECT pg_advisory_xact_lock(CAST($1 AS bigint))", lock)
    if record:
        row = await db.fetchrow(f"SELECT done_at, done_by FROM {table} WHERE key = $1", key)
        if row is not None:
            await db.commit()
            log.info("tether: %r: %r was done at %s by %s; skipped", name, key, row[0], row[1])
            return False
    started = time.monotonic()
    await fn(db.connection)
    seconds = time.monotonic() - started
    if not db.in_transaction():
        msg = (
            f"once {name!r}: the function ended the transaction that holds the lock "
            f"(a commit or rollback on the connection it was given), so other workers may "
            f"have run {key!r} too. Leave the transaction to tether; use a nested "
            f"transaction (a savepoint) for a block that must roll back on its own."
        )
        raise RuntimeError(msg)
    if record:
        by = f"{socket.gethostname()} pid {os.getpid()}"
        await db.fetchval(
            f"INSERT INTO {table} (key, done_at, done_by, seconds) "
            f"VALUES ($1, clock_timestamp(), $2, $3)",
            key,
            by,
            seconds,
        )
    await db.commit()
    log.info("tether: %r ran %r in %.2f s", name, key, seconds)
    return True
