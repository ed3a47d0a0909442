"""What every benchmark app shares: configuration, the resources' types and the work they do.

Every variant serves the same routes with the same resources; only the way the resources reach
the handler differs. Configuration comes from the environment, set by the harness:

- ``BENCH_PG_DSN``: PostgreSQL DSN; empty means no PostgreSQL (``/pg`` then answers 503).
- ``BENCH_SQLITE_PATH``: the SQLite file made by the harness (see ``make_sqlite_db``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiosqlite
import asyncpg

PG_POOL_SIZE = 10
SQLITE_POOL_SIZE = 2
SQLITE_QUERY = "SELECT v FROM kv WHERE k = ?"
PG_QUERY = "SELECT 1"
ROUTES = ("/none", "/null", "/pg", "/sqlite", "/graph7")
EXPECTED = {
    "/none": {"ok": True},
    "/null": {"ok": True},
    "/pg": {"v": 1},
    "/sqlite": {"v": "one"},
    "/graph7": {"ok": True},
}


def pg_dsn() -> str:
    return os.environ.get("BENCH_PG_DSN", "")


def sqlite_path() -> str:
    return os.environ.get("BENCH_SQLITE_PATH", "")


def make_sqlite_db(path: str) -> None:
    """Creates the tiny table every ``/sqlite`` route reads one row from."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS kv (k INTEGER PRIMARY KEY, v TEXT)")
        db.execute("INSERT OR REPLACE INTO kv VALUES (1, 'one'), (2, 'two')")
        db.commit()


# --- PostgreSQL -----------------------------------------------------------------------------


async def open_pg_pool(size: int = PG_POOL_SIZE, **kwargs: Any) -> asyncpg.Pool | None:
    dsn = pg_dsn()
    if not dsn:
        return None
    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, **kwargs)


async def close_pg_pool(pool: asyncpg.Pool | None) -> None:
    if pool is not None:
        await pool.close()


# --- SQLite: a small pool of aiosqlite connections, the same for every variant --------------


class SqlitePool:
    """A fixed set of aiosqlite connections handed out one request at a time."""

    def __init__(self, conns: list[aiosqlite.Connection]) -> None:
        self._conns = conns
        self._free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in conns:
            self._free.put_nowait(conn)

    @classmethod
    async def open(cls, path: str | None = None, size: int = SQLITE_POOL_SIZE) -> SqlitePool:
        path = path or sqlite_path()
        if not path:
            raise RuntimeError("BENCH_SQLITE_PATH is not set")
        return cls([await aiosqlite.connect(path) for _ in range(size)])

    async def acquire(self) -> aiosqlite.Connection:
        return await self._free.get()

    def release(self, conn: aiosqlite.Connection) -> None:
        self._free.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._conns:
            await conn.close()


async def sqlite_value(conn: aiosqlite.Connection) -> str:
    rows = await conn.execute_fetchall(SQLITE_QUERY, (1,))
    return list(rows)[0][0]


# --- /null: a trivial request resource ------------------------------------------------------


class Null:
    """The request resource of ``/null``: an object that costs nothing to make or drop."""

    __slots__ = ()


async def null_resource() -> AsyncIterator[Null]:
    yield Null()


# --- /graph7: seven request resources, shaped like wireup's cross-library benchmark ----------
# C is the root; D..G each depend on all the ones before them; H (a sync context manager) needs
# C and D; I (an async context manager) needs E and F. The handler asks for C three times and
# D twice: each must be made once per request.


class C:
    __slots__ = ()


class D:
    __slots__ = ("c",)

    def __init__(self, c: C) -> None:
        self.c = c


class E:
    __slots__ = ("c", "d")

    def __init__(self, c: C, d: D) -> None:
        self.c, self.d = c, d


class F:
    __slots__ = ("c", "d", "e")

    def __init__(self, c: C, d: D, e: E) -> None:
        self.c, self.d, self.e = c, d, e


class G:
    __slots__ = ("c", "d", "e", "f")

    def __init__(self, c: C, d: D, e: E, f: F) -> None:
        self.c, self.d, self.e, self.f = c, d, e, f


class H:
    __slots__ = ("c", "closed", "d")

    def __init__(self, c: C, d: D) -> None:
        self.c, self.d, self.closed = c, d, False


class I:  # noqa: E742
    __slots__ = ("closed", "e", "f")

    def __init__(self, e: E, f: F) -> None:
        self.e, self.f, self.closed = e, f, False


def make_h(c: C, d: D) -> Iterator[H]:
    h = H(c, d)
    try:
        yield h
    finally:
        h.closed = True


async def make_i(e: E, f: F) -> AsyncIterator[I]:
    i = I(e, f)
    try:
        yield i
    finally:
        i.closed = True


h_context = contextlib.contextmanager(make_h)
i_context = contextlib.asynccontextmanager(make_i)


def graph_ok(c: C, cc: C, ccc: C, d: D, dd: D, e: E, f: F, g: G, h: H, i: I) -> bool:
    """What every ``/graph7`` handler answers: the graph was shared within the request."""
    return c is cc is ccc and d is dd and g.f is f and h.d is d and i.e is e


# --- the slow-client streaming scenario -----------------------------------------------------

STREAM_POOL_SIZE = 5
STREAM_APP_NAME = "tether-bench-stream"


def stream_config() -> dict[str, float]:
    return {
        "acquire_timeout": float(os.environ.get("BENCH_ACQUIRE_TIMEOUT", "5")),
        "body_bytes": int(os.environ.get("BENCH_STREAM_BYTES", str(256 * 1024))),
        "chunk_bytes": int(os.environ.get("BENCH_STREAM_CHUNK", str(16 * 1024))),
    }


class CheckoutCounter:
    """Connections the app holds right now and at most, as the app itself sees them."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0
        self.acquired = 0

    def take(self) -> None:
        self.now += 1
        self.acquired += 1
        self.max = max(self.max, self.now)

    def give(self) -> None:
        self.now -= 1


async def stream_body(conn: Any | None) -> AsyncIterator[bytes]:
    """The body of a streamed response; with ``conn`` every chunk queries the database."""
    cfg = stream_config()
    chunk = b"x" * int(cfg["chunk_bytes"])
    left = int(cfg["body_bytes"])
    n = 0
    while left > 0:
        if conn is not None:
            await conn.fetchval("SELECT $1::int", n)
        piece = chunk[:left]
        left -= len(piece)
        n += 1
        yield piece
