"""tether.integrations.aiosqlite against real SQLite files: transactions, WAL, writers."""

import asyncio
import importlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

import tether
from tether.fastapi import health_router
from tether.integrations import aiosqlite as tsqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS books (
    id INTEGER PRIMARY KEY,
    author_id INTEGER NOT NULL REFERENCES authors (id),
    title TEXT NOT NULL
);
"""

Conn = aiosqlite.Connection


def rows(path: Path, table: str = "authors") -> list[tuple[Any, ...]]:
    """What another connection sees, right now."""
    with sqlite3.connect(path) as other:
        result = other.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    other.close()
    return result


def make(
    path: Path, **db_kw: Any
) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[tsqlite.Database]]:
    lc = tether.Lifecycle()
    db = tsqlite.database(lc, path, **db_kw)
    app = FastAPI(lifespan=lc.lifespan)
    with sqlite3.connect(path) as setup:
        setup.executescript(SCHEMA)
    setup.close()
    return app, lc, db


class AtResponseStart:
    def __init__(self, app: Any, probe: Callable[[], Any]) -> None:
        self.app = app
        self.probe = probe
        self.seen: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def observed(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.seen.append(self.probe())
            await send(message)

        await self.app(scope, receive, observed)


@contextmanager
def holding_the_lock(path: Path, begin: str, *, exclusive_mode: bool = False) -> Iterator[None]:
    """Another connection (another process, as far as SQLite knows) holds *path*'s lock."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if exclusive_mode:
            other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute(begin)
        other.execute("INSERT INTO authors (name) VALUES ('other')")  # a lock on WAL too
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        yield client


# --------------------------------------------------------------------------- transactions


def test_commit_before_the_response_and_rollback_on_every_failure(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    app, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    C = Annotated[Conn, Depends(conn)]

    @app.post("/authors/{name}")
    async def create(name: str, c: C, fail: str = "") -> dict[str, Any]:
        cur = await c.execute("INSERT INTO authors (name) VALUES (?)", (name,))
        if fail == "http":
            raise HTTPException(409, "taken")
        if fail == "status":
            return JSONResponse({"detail": "no"}, status_code=422)  # type: ignore[return-value]
        if fail == "error":
            raise RuntimeError("boom")
        return {"id": cur.lastrowid}

    probe = AtResponseStart(app, lambda: rows(path))
    with TestClient(probe, raise_server_exceptions=False) as client:  # type: ignore[arg-type]
        assert client.post("/authors/ann").json() == {"id": 1}
        assert probe.seen == [[(1, "ann")]]  # committed when the response started
        assert client.post("/authors/bob?fail=http").status_code == 409
        assert client.post("/authors/bob?fail=status").status_code == 422
        assert client.post("/authors/bob?fail=error").status_code == 500
        assert client.post("/authors/ann").status_code == 500  # UNIQUE fails the INSERT
        assert rows(path) == [(1, "ann")]
        stats = lc.stats().resources["connection"]
        assert (stats.opened, stats.closed, stats.in_use) == (5, 5, 0)


def test_one_connection_per_unit_of_work_with_its_settings(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    app, lc, db = make(path, busy_timeout=2.5)
    conn = tsqlite.connection(lc, db)
    C = Annotated[Conn, Depends(conn)]

    async def dep(c: C) -> int:
        return id(c)

    @app.get("/settings")
    async def settings(c: C, other: Annotated[int, Depends(dep)]) -> dict[str, Any]:
        async def one(sql: str) -> Any:
            async with c.execute(sql) as cur:
                row = await cur.fetchone()
            assert row is not None
            return row[0]

        return {
            "same": id(c) == other,
            "journal_mode": await one("PRAGMA journal_mode"),
            "foreign_keys": await one("PRAGMA foreign_keys"),
            "busy_timeout": await one("PRAGMA busy_timeout"),
            "synchronous": await one("PRAGMA synchronous"),
            "in_transaction": c.in_transaction,
            "row": dict((await c.execute_fetchall("SELECT 1 AS one, 'x' AS two"))[0]),  # type: ignore[index]
        }

    with TestClient(app) as client:
        assert client.get("/settings").json() == {
            "same": True,
            "journal_mode": "wal",
            "foreign_keys": 1,
            "busy_timeout": 2500,
            "synchronous": 1,  # NORMAL
            "in_transaction": True,
            "row": {"one": 1, "two": "x"},  # sqlite3.Row
        }
    # WAL is a property of the file: any other connection sees it too.
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()


def test_foreign_keys_are_enforced(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    app, lc, db = make(path)
    conn = tsqlite.connection(lc, db)

    @app.post("/books")
    async def add(c: Annotated[Conn, Depends(conn)]) -> None:
        await c.execute("INSERT INTO authors (id, name) VALUES (1, 'ann')")
        await c.execute("INSERT INTO books (author_id, title) VALUES (42, 'orphan')")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/books").status_code == 500
    assert rows(path) == []  # the author written first was rolled back too


CLOSED_BY_USER = (
    "Connection 'connection' was closed by the code using it (`await conn.close()`) before its "
    "unit of work ended: its transaction ended with it, rolled back, so nothing it wrote since "
    "its last commit is kept. Do not close it: tether commits (or rolls back) and closes it "
    "when the unit of work ends."
)


@pytest.mark.anyio
async def test_a_connection_the_code_closed_is_said_and_the_units_own_error_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The code using the connection closes it (tether's to close): a unit that succeeded
    fails saying so, not with aiosqlite's "no active connection" from the commit; one that
    failed keeps its own error, and the misuse is logged (before: aiosqlite's ValueError
    replaced the unit's error). Nothing it wrote is kept, the pool's slot is freed."""
    path = tmp_path / "app.db"
    _, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    async with lc.run():
        with pytest.raises(tether.ScopeError) as caught:
            async with lc.scope() as unit:
                c = await unit.get(conn)
                await c.execute("INSERT INTO authors (name) VALUES ('lost')")
                await c.close()
        assert str(caught.value) == CLOSED_BY_USER
        caplog.clear()
        with caplog.at_level("WARNING", logger="tether"):
            with pytest.raises(RuntimeError, match="^the endpoint failed$"):
                async with lc.scope() as unit:
                    c = await unit.get(conn)
                    await c.close()
                    raise RuntimeError("the endpoint failed")
        assert [r.getMessage() for r in caplog.records] == [f"tether: {CLOSED_BY_USER}"]
        assert rows(path) == []
        assert lc.stats().resources["connection"].in_use == 0
        async with lc.scope() as unit:  # the next unit gets a connection of its own
            c = await unit.get(conn)
            await c.execute("INSERT INTO authors (name) VALUES ('kept')")
        assert [row[-1] for row in rows(path)] == ["kept"]


@pytest.mark.anyio
async def test_cancelled_unit_of_work_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    _, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    async with lc.run():
        with anyio.move_on_after(0.2):
            async with lc.scope() as unit:
                c = await unit.get(conn)
                await c.execute("INSERT INTO authors (name) VALUES ('ghost')")
                await anyio.sleep(5)
        assert rows(path) == []
        assert lc.stats().resources["connection"].in_use == 0


@pytest.mark.anyio
async def test_a_failed_unit_of_work_with_a_half_read_cursor_frees_the_write_lock(
    tmp_path: Path,
) -> None:
    """A unit of work fails with a ``SELECT`` read in part (its statement still active, the
    cursor kept alive, as a traceback or a log record keeps it): it is rolled back, and the
    next writer gets the write lock at once. (Interrupting the connection before the
    rollback failed the rollback itself, and the lock stayed for as long as the cursor.)"""
    path = tmp_path / "app.db"
    _, lc, db = make(path)
    conn = tsqlite.connection(lc, db, begin="immediate")
    kept: list[Any] = []
    async with lc.run():
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.executemany("INSERT INTO authors (name) VALUES (?)", [("a",), ("b",)])
        with pytest.raises(RuntimeError, match="failed"):
            async with lc.scope() as unit:
                c = await unit.get(conn)
                await c.execute("INSERT INTO authors (name) VALUES ('ghost')")
                cur = await c.execute("SELECT name FROM authors ORDER BY id")
                assert (await cur.fetchone())[0] == "a"  # one row of three read
                kept.append(cur)
                raise RuntimeError("failed")
        t0 = time.monotonic()
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.execute("INSERT INTO authors (name) VALUES ('next')")
        assert time.monotonic() - t0 < 3.0  # busy_timeout is 5 s (room for a loaded machine)
    assert [name for _, name in rows(path)] == ["a", "b", "next"]
    assert kept


@pytest.mark.anyio
async def test_a_statement_still_running_when_its_unit_of_work_is_cancelled_is_interrupted(
    tmp_path: Path,
) -> None:
    """A unit of work cancelled while a long statement runs in the connection's thread: the
    close interrupts it (it would run for many seconds), rolls back, and frees the lock."""
    path = tmp_path / "app.db"
    _, lc, db = make(path)
    conn = tsqlite.connection(lc, db, begin="immediate")
    slow = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
        "SELECT count(*) FROM c"
    )
    async with lc.run():
        t0 = time.monotonic()
        with anyio.move_on_after(0.3) as scope:
            async with lc.scope() as unit:
                c = await unit.get(conn)
                await c.execute("INSERT INTO authors (name) VALUES ('ghost')")
                await c.execute(slow)
        assert scope.cancelled_caught
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.execute("INSERT INTO authors (name) VALUES ('next')")
        assert time.monotonic() - t0 < 2.5
    assert [name for _, name in rows(path)] == ["next"]


@pytest.mark.anyio
async def test_a_unit_of_work_cancelled_in_a_statement_with_a_half_read_cursor_frees_the_lock(
    tmp_path: Path,
) -> None:
    """The two above at once: a unit of work that wrote and left a ``SELECT`` read in part
    (the cursor kept alive, as a traceback keeps it, so the garbage collector cannot help)
    is cancelled while a long statement runs. The interrupt stays in force while the
    half-read cursor's statement is active and fails the rollback too: tether closes the
    unit's cursors and rolls back again, so the next writer gets the write lock at once.
    (The connection was closed with its transaction open, and every other writer waited
    ``busy_timeout`` for a 503 until the cursor was collected.)"""
    path = tmp_path / "app.db"
    _, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    slow = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
        "SELECT count(*) FROM c"
    )
    kept: list[Any] = []
    async with lc.run():
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.executemany("INSERT INTO authors (name) VALUES (?)", [("a",), ("b",)])
        with anyio.move_on_after(0.3) as scope:
            async with lc.scope() as unit:
                c = await unit.get(conn)
                cur = await c.execute("SELECT name FROM authors ORDER BY id")
                assert (await cur.fetchone())[0] == "a"  # one row of two read
                kept.append(cur)
                await c.execute("INSERT INTO authors (name) VALUES ('ghost')")  # the lock
                await c.execute(slow)
        assert scope.cancelled_caught
        assert lc.stats().resources["connection"].in_use == 0
        t0 = time.monotonic()
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.execute("INSERT INTO authors (name) VALUES ('next')")
        assert time.monotonic() - t0 < 3.0  # busy_timeout is 5 s (room for a loaded machine)
    assert [name for _, name in rows(path)] == ["a", "b", "next"]
    assert kept


# --------------------------------------------------------------------------- writers


@pytest.mark.anyio
async def test_two_concurrent_writers_take_turns(tmp_path: Path) -> None:
    """begin="immediate": the second writer waits for the first, then both commit; a
    reader is never blocked (WAL) and sees the last committed state."""
    path = tmp_path / "app.db"
    app, lc, db = make(path)
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")
    reader = tsqlite.connection(lc, db, name="reader")
    holding, release = asyncio.Event(), asyncio.Event()

    @app.post("/write/{name}")
    async def write(name: str, c: Annotated[Conn, Depends(writer)], hold: bool = False) -> float:
        async with c.execute("SELECT count(*) FROM authors") as cur:
            row = await cur.fetchone()
        assert row is not None
        await c.execute("INSERT INTO authors (name) VALUES (?)", (f"{name}{row[0]}",))
        if hold:  # its transaction open, with the write lock, until the test releases it
            holding.set()
            await release.wait()
        return time.monotonic()

    @app.get("/read")
    async def read(c: Annotated[Conn, Depends(reader)]) -> list[str]:
        return [r[0] for r in await c.execute_fetchall("SELECT name FROM authors ORDER BY id")]

    async with running(app) as client:
        first = asyncio.create_task(client.post("/write/a?hold=true"))
        await holding.wait()
        # The first writer holds the lock until released, after this read: a reader that it
        # blocked waits busy_timeout (5 s) for an error, or for good (the 10 s bound), and
        # reads nothing uncommitted. Ordering, not a stopwatch: no stall can fail it.
        read = await asyncio.wait_for(client.get("/read"), 10)
        assert read.status_code == 200, read.text
        assert read.json() == []  # the first write is not committed yet
        assert not first.done()
        second_task = asyncio.create_task(client.post("/write/b"))
        await asyncio.sleep(0.2)
        assert not second_task.done()  # it waits for the first writer's lock
        release.set()
        second = await second_task
        done_first = (await first).json()
        assert second.status_code == 200
        assert done_first < second.json()  # strictly one after the other
        assert (await client.get("/read")).json() == ["a0", "b1"]  # b saw a's row
    assert rows(path) == [(1, "a0"), (2, "b1")]


@pytest.mark.anyio
async def test_writer_waiting_past_busy_timeout_is_a_503(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    app, lc, db = make(path, busy_timeout=0.2)
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")
    holding = asyncio.Event()

    @app.post("/write/{name}")
    async def write(name: str, c: Annotated[Conn, Depends(writer)], hold: float = 0) -> str:
        await c.execute("INSERT INTO authors (name) VALUES (?)", (name,))
        if hold:
            holding.set()
            await asyncio.sleep(hold)
        return name

    async with running(app) as client:
        first = asyncio.create_task(client.post("/write/a?hold=1"))
        await holding.wait()
        second = await client.post("/write/b")
        assert (await first).status_code == 200
    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert second.json()["detail"] == (
        f"Pool 'database' (size 32, in use 1, waiting 0) could not give a connection: the "
        f"database {str(path)!r} is locked by another writer (this app's writers take turns, "
        f"and this one waited busy_timeout=0.2 s for its turn); nothing was written. Retry "
        f"shortly; if it persists, keep the transactions short, or raise busy_timeout (now "
        f"0.2 s)."
    )
    assert rows(path) == [(1, "a")]
    # A wait of busy_timeout that ran out: a timeout of the writer, and of its pool, as the
    # metrics docs say (it counted as an error only: trial 30).
    assert lc.stats().resources["writer"].timeouts == 1


@pytest.mark.anyio
async def test_a_lock_held_by_another_writer_is_no_outage_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer refused for the lock another one held, then the database serving again: the
    log said "'database' opens again: 1 unit of work refused ...", as of an outage, of a
    healthy file (trial 29). The lock is the database busy, not down."""
    import logging

    path = tmp_path / "app.db"
    app, lc, db = make(path, busy_timeout=0.2)
    lc.sweep_interval = 0.05
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")
    holding = asyncio.Event()

    @app.post("/write/{name}")
    async def write(name: str, c: Annotated[Conn, Depends(writer)], hold: float = 0) -> str:
        await c.execute("INSERT INTO authors (name) VALUES (?)", (name,))
        if hold:
            holding.set()
            await asyncio.sleep(hold)
        return name

    caplog.set_level(logging.WARNING, logger="tether")
    async with running(app) as client:
        first = asyncio.create_task(client.post("/write/a?hold=1"))
        await holding.wait()
        assert (await client.post("/write/b")).status_code == 503
        assert (await first).status_code == 200
        assert (await client.post("/write/c")).status_code == 200
        await asyncio.sleep(0.3)  # the sweeper's turns
    assert [m for m in caplog.messages if "opens again" in m] == []


@pytest.mark.anyio
async def test_writer_waiting_past_busy_timeout_for_another_process_is_a_503(
    tmp_path: Path,
) -> None:
    """Another process's writer holds the lock: SQLite's busy handler waits, then 503."""
    path = tmp_path / "app.db"
    app, lc, db = make(path, busy_timeout=0.2)
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")

    @app.post("/write/{name}")
    async def write(name: str, c: Annotated[Conn, Depends(writer)]) -> str:
        await c.execute("INSERT INTO authors (name) VALUES (?)", (name,))
        return name

    async with running(app) as client:
        with holding_the_lock(path, "BEGIN IMMEDIATE"):
            r = await client.post("/write/b")
        assert (await client.post("/write/c")).status_code == 200
    assert r.status_code == 503
    assert r.json()["detail"] == (
        f"Pool 'database' (size 32, in use 1) could not give a connection: the database "
        f"{str(path)!r} is locked by another writer (BEGIN IMMEDIATE; OperationalError: "
        f"database is locked; busy_timeout=0.2 s); nothing was written. Retry shortly; if it "
        f"persists, keep the transactions short, or raise busy_timeout (now 0.2 s)."
    )
    assert rows(path) == [(1, "c")]


@pytest.mark.anyio
@pytest.mark.parametrize("begin", ["deferred", "immediate"])
async def test_a_lock_after_the_endpoints_own_commit_is_no_503(tmp_path: Path, begin: str) -> None:
    """The endpoint committed a row itself, then waited out the lock for the next one: a 503
    would say "nothing was written" and have the client write the first row again; it is
    sqlite3's error (a 500), and the first row stays (before: the 503)."""
    path = tmp_path / "app.db"
    app, lc, db = make(path, busy_timeout=0.2)
    writer = tsqlite.connection(lc, db, name="writer", begin=begin)

    @app.post("/write")
    async def write(c: Annotated[Conn, Depends(writer)]) -> str:
        await c.execute("INSERT INTO authors (name) VALUES ('first')")
        await c.commit()
        with holding_the_lock(path, "BEGIN IMMEDIATE"):
            await c.execute("INSERT INTO authors (name) VALUES ('second')")
        return "both"  # pragma: no cover - the lock is held

    async with running(app) as client:
        r = await client.post("/write")
        assert r.status_code == 500, r.text
        assert rows(path) == [(1, "first")]
        assert (await client.get("/docs")).status_code == 200


@pytest.mark.anyio
async def test_a_table_locked_by_the_units_own_cursor_is_an_error_not_a_503(
    tmp_path: Path,
) -> None:
    """SQLITE_LOCKED ("database table is locked") comes from the unit of work's own
    connection: a `DROP TABLE` while its own cursor still reads the table. No other writer
    is involved and no retry mends it: a 500 that says so, not a 503 blaming "another
    writer" with a Retry-After the client would obey for ever."""
    path = tmp_path / "app.db"
    app, lc, db = make(path)
    conn = tsqlite.connection(lc, db, name="own")

    @app.post("/rebuild")
    async def rebuild(c: Annotated[Conn, Depends(conn)]) -> str:
        await c.execute("CREATE TABLE IF NOT EXISTS t (x)")
        await c.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(10)])
        cursor = await c.execute("SELECT x FROM t")
        await cursor.fetchone()  # left half-read
        await c.execute("DROP TABLE t")  # SQLITE_LOCKED: its own cursor reads t
        return "rebuilt"

    async with running(app) as client:
        r = await client.post("/rebuild")
        assert lc.stats().pools["database"].in_use == 0
    assert r.status_code == 500
    assert "retry-after" not in r.headers


@pytest.mark.anyio
async def test_deferred_read_then_write_after_another_commit_is_a_503(tmp_path: Path) -> None:
    """A deferred transaction cannot upgrade a stale read snapshot: 503, nothing written."""
    path = tmp_path / "app.db"
    app, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    have_read = asyncio.Event()
    other_committed = asyncio.Event()

    @app.post("/slow")
    async def slow(c: Annotated[Conn, Depends(conn)]) -> None:
        await c.execute_fetchall("SELECT count(*) FROM authors")  # the snapshot starts
        have_read.set()
        await other_committed.wait()
        await c.execute("INSERT INTO authors (name) VALUES ('slow')")

    @app.post("/fast")
    async def fast(c: Annotated[Conn, Depends(conn)]) -> None:
        await c.execute("INSERT INTO authors (name) VALUES ('fast')")

    async with running(app) as client:
        slow_task = asyncio.create_task(client.post("/slow"))
        await have_read.wait()
        assert (await client.post("/fast")).status_code == 200
        other_committed.set()
        started = time.monotonic()
        response = await slow_task
        assert time.monotonic() - started < 3  # at once, not after busy_timeout (5 s)
    assert response.status_code == 503
    assert response.json()["detail"] == (
        f"Pool 'database' (size 32, in use 1) could not write: another writer "
        f"committed to {str(path)!r} after this unit of work first read it, so it cannot "
        f"write from that read (OperationalError: database is locked: SQLITE_BUSY_SNAPSHOT, "
        f"refused at once); nothing was written. For endpoints that read, then write, declare "
        f'the connection begin="immediate". Retry: the next unit of work reads from that '
        f"commit."
    )
    assert rows(path) == [(1, "fast")]


@pytest.mark.anyio
async def test_max_connections_bounds_open_connections(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    app, lc, db = make(path, max_connections=1, busy_timeout=0.3)
    conn = tsqlite.connection(lc, db)
    holding = asyncio.Event()

    @app.get("/hold")
    async def hold(c: Annotated[Conn, Depends(conn)], seconds: float = 0) -> str:
        holding.set()
        await asyncio.sleep(seconds)
        return "ok"

    async with running(app) as client:
        first = asyncio.create_task(client.get("/hold?seconds=1"))
        await holding.wait()
        waiting = asyncio.create_task(client.get("/hold"))
        while lc.stats().pools["database"].waiting == 0:
            await asyncio.sleep(0.01)
        # The pool's figures: one connection open and in use, one request waiting.
        assert lc.stats().pools["database"] == tether.PoolStats(
            name="database", max=1, open=1, in_use=1, idle=0, waiting=1
        )
        second = await waiting
        assert (await first).status_code == 200
        assert (await client.get("/hold")).status_code == 200  # the slot came back
        figures = lc.stats().pools["database"]
        assert (figures.in_use, figures.waiting) == (0, 0)
    assert second.status_code == 503
    assert second.json()["detail"] == (
        "Pool 'database' (size 1, in use 1, waiting 0) could not give a connection: all 1 "
        "connections (max_connections) stayed in use for busy_timeout=0.3 s. Retry shortly; "
        "if it persists, check the database and the pool size."
    )


@pytest.mark.anyio
async def test_readers_keep_their_slots_while_writers_wait_for_the_write_lock(
    tmp_path: Path,
) -> None:
    """A writer holds the write lock while more writers arrive: they wait for their turn
    without taking the connection slots, so a reader is served at once (each waiting writer
    held a slot, and a reader waited for one: seconds, then a 503)."""
    path = tmp_path / "app.db"
    app, lc, db = make(path, max_connections=4, busy_timeout=5.0)
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")
    reader = tsqlite.connection(lc, db, name="reader")
    holding = asyncio.Event()
    release = asyncio.Event()

    @app.post("/write/{name}")
    async def write(name: str, c: Annotated[Conn, Depends(writer)], hold: bool = False) -> str:
        await c.execute("INSERT INTO authors (name) VALUES (?)", (name,))
        if hold:
            holding.set()
            await asyncio.wait_for(release.wait(), 30)  # the test lets go
        return name

    @app.get("/read")
    async def read(c: Annotated[Conn, Depends(reader)]) -> int:
        return len(await c.execute_fetchall("SELECT * FROM authors"))

    async with running(app) as client:
        first = asyncio.create_task(client.post("/write/first?hold=true"))
        await holding.wait()
        burst = [asyncio.create_task(client.post(f"/write/w{i}")) for i in range(10)]
        deadline = time.monotonic() + 10.0
        while lc.stats().pools["database"].waiting < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        figures = lc.stats().pools["database"]
        # Served while the first writer still holds the lock: order, not a stopwatch (had the
        # waiting writers held the slots, the read would wait for one until the release,
        # which comes only after it, and fail its acquire timeout: a 503).
        read = await asyncio.wait_for(client.get("/read"), 10)
        assert not first.done()
        release.set()
        assert (read.status_code, read.json()) == (200, 0)
        assert (figures.in_use, figures.waiting) == (1, 10)  # the writers wait their turn
        done = await asyncio.gather(first, *burst)
    assert [r.status_code for r in done] == [200] * 11
    assert len(rows(path)) == 11


@pytest.mark.anyio
async def test_a_read_another_process_blocks_says_a_statement_not_a_write(tmp_path: Path) -> None:
    """A `SELECT` blocked past busy_timeout by another process's exclusive lock was answered
    "could not write ... (a statement waited for the write lock ...)" (trial 33)."""
    path = tmp_path / "app.db"
    _, lc, db = make(path, wal=False, busy_timeout=0.2)
    reader = tsqlite.connection(lc, db, name="reader")
    async with lc.run():
        with pytest.raises(tether.ResourceUnavailable) as caught:
            async with lc.scope() as s:
                c = await s.get(reader)
                with holding_the_lock(path, "BEGIN EXCLUSIVE"):
                    await c.execute_fetchall("SELECT * FROM authors")
    assert str(caught.value).startswith(
        f"Pool 'database' (size 32, in use 1) could not run a statement: the database "
        f"{str(path)!r} is locked by another connection, a writer or, with wal=False (a "
        f"rollback journal), a reader in a transaction (a statement waited for the lock; "
        f"OperationalError: database is locked; busy_timeout=0.2 s); nothing was written."
    ), str(caught.value)


@pytest.mark.anyio
async def test_a_commit_a_reader_blocks_past_busy_timeout_says_the_commit_failed(
    tmp_path: Path,
) -> None:
    """A rollback journal: another process's read transaction blocks the writer's COMMIT.
    The 503 said the pool "could not give a connection", of a unit that had its connection
    and wrote with it (trial 30)."""
    path = tmp_path / "app.db"
    app, lc, db = make(path, wal=False, busy_timeout=0.3)
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")

    @app.post("/write")
    async def write(c: Annotated[Conn, Depends(writer)]) -> str:
        await c.execute("INSERT INTO authors (name) VALUES ('w')")
        return "ok"

    async with running(app) as client:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN")
            other.execute("SELECT * FROM authors").fetchall()  # a read lock, held
            r = await client.post("/write")
        finally:
            other.close()
        assert (await client.post("/write")).status_code == 200
    assert (r.status_code, r.headers.get("retry-after")) == (503, "1")
    assert r.json()["detail"].startswith(
        f"Pool 'database' (size 32, in use 1) could not commit: the database {str(path)!r} is "
        f"locked by another connection, a writer or, with wal=False (a rollback journal), a "
        f"reader in a transaction (COMMIT; OperationalError: database is locked; "
        f"busy_timeout=0.3 s); nothing was written."
    ), r.json()["detail"]
    assert rows(path) == [(1, "w")]


@pytest.mark.anyio
@pytest.mark.parametrize("wal", [False, True])
async def test_a_database_locked_while_a_connection_is_set_up_is_a_503(
    tmp_path: Path, wal: bool
) -> None:
    """Another process holds an exclusive lock (a rollback journal; or locking_mode=EXCLUSIVE
    on a WAL file) longer than busy_timeout: setting a connection up reads the schema and
    waits for it; readers and writers get the 503 with Retry-After, not a 500."""
    path = tmp_path / "app.db"
    app, lc, db = make(path, wal=wal, busy_timeout=0.3)
    reader = tsqlite.connection(lc, db, name="reader")
    writer = tsqlite.connection(lc, db, name="writer", begin="immediate")

    @app.get("/read")
    async def read(c: Annotated[Conn, Depends(reader)]) -> int:
        return len(await c.execute_fetchall("SELECT * FROM authors"))

    @app.post("/write")
    async def write(c: Annotated[Conn, Depends(writer)]) -> str:
        await c.execute("INSERT INTO authors (name) VALUES ('w')")
        return "ok"

    async with running(app) as client:
        with holding_the_lock(path, "BEGIN EXCLUSIVE", exclusive_mode=wal):
            got = [await client.get("/read"), await client.post("/write")]
        assert (await client.get("/read")).json() == 0
        assert (await client.post("/write")).status_code == 200
        assert lc.stats().pools["database"].in_use == 0
    for r in got:
        assert (r.status_code, r.headers.get("retry-after")) == (503, "1")
        held_by = (
            "another writer"
            if wal
            else "another connection, a writer or, with wal=False (a rollback journal), a "
            "reader in a transaction"
        )
        journal = (
            ""
            if wal
            else "use WAL mode (wal=True, the default: its readers never block the writer), "
        )
        assert r.json()["detail"] == (
            f"Pool 'database' (size 32, in use 1) could not give a connection: the database "
            f"{str(path)!r} is locked by {held_by} (setting up the connection; "
            f"OperationalError: database is locked; busy_timeout=0.3 s); nothing was written. "
            f"Retry shortly; if it persists, keep the transactions short, {journal}or raise "
            f"busy_timeout (now 0.3 s)."
        )
    assert rows(path) == [(1, "w")]


# --------------------------------------------------------------------------- app resource


def test_database_resource_creates_the_file_and_checks_it(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "app.db"
    lc = tether.Lifecycle()
    tsqlite.connection(lc, lambda: str(path), name="conn", busy_timeout=1.0)
    assert list(lc.resources) == ["conn_database", "conn"]
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc))
    with TestClient(app) as client:
        assert path.exists()
        report = client.get("/health/ready").json()
        assert report["checks"]["conn_database"]["status"] == "ok"
        db = lc.get(lc.resources["conn_database"])
        assert repr(db) == f"<tether aiosqlite Database 'conn_database' {str(path)!r} (wal)>"
        assert db.busy_timeout == 1.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "why"),
    [
        (":memory:", "is private to one connection"),
        ("", "is private to one connection"),
        ("file::memory:?cache=shared", "is private to one connection"),
        ("file:?mode=rwc", "is private to one connection"),  # a temporary database
        # SQLite built with SQLITE_USE_URI (Debian's) opens these as URIs without uri=True:
        # a shared in-memory database, empty again whenever no connection has it open.
        (
            "file:notes?mode=memory&cache=shared",
            "lives only while a connection has it open (none does between units of work), "
            "so each unit of work would find it empty",
        ),
        (
            "file:notes?cache=shared&mode=memory#x",
            "lives only while a connection has it open (none does between units of work), "
            "so each unit of work would find it empty",
        ),
    ],
)
async def test_in_memory_database_is_refused(
    path: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    lc = tether.Lifecycle()
    tsqlite.database(lc, path)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass
    assert str(caught.value.__cause__) == (
        f"An in-memory SQLite database ({path!r}) {why}, and tether opens one connection per "
        f"unit of work: use a file (a temporary one in tests)."
    )
    assert list(tmp_path.iterdir()) == []  # no file made of the URI either


def test_a_database_file_deleted_while_serving_fails_readiness_and_is_not_recreated(
    tmp_path: Path,
) -> None:
    """The file is deleted (or its volume unmounted) while the app serves: no connection
    creates it again, empty (every request then failed on a missing table while readiness
    said 200); readiness fails, naming the file and what happened. A path with characters
    that mean something in a URI (``?``, ``#``, ``%``, a space, non-ASCII) works as any other."""
    path = tmp_path / "we?ird #dir %41 é" / "app.db"
    path.parent.mkdir()
    app, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    app.include_router(health_router(lc, cache=0))

    @app.post("/authors/{name}")
    async def create(name: str, c: Annotated[Conn, Depends(conn)]) -> int | None:
        cur = await c.execute("INSERT INTO authors (name) VALUES (?)", (name,))
        return cur.lastrowid

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/authors/ann").json() == 1
        assert client.get("/health/ready").status_code == 200
        assert [p.name for p in path.parent.iterdir()] == ["app.db"]  # none made elsewhere
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        ready = client.get("/health/ready")
        gone = (
            f"Database 'database': the file {str(path)!r} is gone (deleted, or its volume "
            f"unmounted, after the app started; OperationalError: unable to open database "
            f"file). tether does not create it again, empty, while the app serves: put the "
            f"same file back (moved back, not a copy), or restart the app to open the one at "
            f"its path then (a copy restored from a backup), or to create a new one."
        )
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"]["error"] == f"ResourceUnavailable: {gone}"
        r = client.post("/authors/bob")
        assert (r.status_code, r.json()["detail"]) == (503, gone)
        assert not path.exists()
        assert lc.stats().pools["database"].in_use == 0


def test_a_database_file_another_library_made_anew_is_not_the_apps(tmp_path: Path) -> None:
    """The file deleted, then made anew at its path (SQLAlchemy, on the same file, creates it
    for its next connection): every request then failed with "no such table" (a 500) and
    readiness said ok on the empty file (trial 11). It is a 503 saying that another file is
    at its path now, and that a restart opens it (it said "gone ... FileNotFoundError" of a
    copy restored from a backup, and "restore the file", which that was: trial 30)."""
    path = tmp_path / "app.db"
    app, lc, db = make(path)
    conn = tsqlite.connection(lc, db)
    app.include_router(health_router(lc, cache=0))

    @app.get("/authors")
    async def authors(c: Annotated[Conn, Depends(conn)]) -> int:
        return len(await c.execute_fetchall("SELECT * FROM authors"))

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/authors").json() == 0
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        sqlite3.connect(path).close()  # an empty file, made anew
        gone = (
            f"Database 'database': another file is at {str(path)!r} now, not the one the app "
            f"opened at startup (replaced, or restored from a copy, after the app started). "
            f"tether serves only the file it opened while the app runs: restart the app to "
            f"open the one at its path now."
        )
        r = client.get("/authors")
        assert (r.status_code, r.json()["detail"]) == (503, gone)
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"]["error"] == f"ResourceUnavailable: {gone}"


def test_options_belong_to_the_database_resource(tmp_path: Path) -> None:
    lc = tether.Lifecycle()
    db = tsqlite.database(lc, tmp_path / "x.db")
    with pytest.raises(TypeError, match="pass them to database"):
        tsqlite.connection(lc, db, wal=False)
    with pytest.raises(ValueError, match="begin='later'"):
        tsqlite.connection(lc, db, begin="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError) as refused:  # (create_dirs made a directory named '~')
        tsqlite.database(lc, "~/notes.db", name="home")
    assert str(refused.value) == (
        "database('home'): '~/notes.db' begins with '~', which is not expanded to a home "
        "directory: SQLite (and create_dirs=True) would make a directory named '~' here. Pass "
        "the full path: os.path.expanduser('~/notes.db')."
    )
    # A Path and a URI too (trial 34: both made './~'); '~backup.db' is a file's name.
    for home in [Path("~/notes.db"), "file:~/notes.db?mode=rwc", "file://localhost/~/notes.db"]:
        with pytest.raises(ValueError, match="os.path.expanduser\\('~/notes.db'\\)"):
            tsqlite.database(lc, home, name=f"home{len(lc.resources)}")
    tsqlite.database(lc, "~backup.db", name="tilde_named")
    with pytest.raises(TypeError) as caught:
        tsqlite.database(lc, tmp_path / "y.db", name="y", busy_timout=2)  # type: ignore[call-arg]
    assert str(caught.value) == (  # Python's bare "unexpected keyword argument" (trial 30)
        "busy_timout= (did you mean busy_timeout=?) is not an option of "
        "tether.integrations.aiosqlite.database(). Fix or remove it."
    )


# ------------------------------------------------------------- the reference service (tether.demo)


def test_docs_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's complete service, `tether.demo` (what `tether demo` serves)."""
    path = tmp_path / "data" / "notes.db"
    monkeypatch.setenv("NOTES_DB", str(path))
    module = importlib.import_module("tether.demo")
    with TestClient(module.app) as client:
        assert client.get("/health/ready").status_code == 200
        assert client.post("/notes", json={"text": "first"}).json() == {"id": 1, "text": "first"}
        assert client.post("/notes", json={"text": "second"}).status_code == 201
        assert client.delete("/notes/1").status_code == 204
        assert client.delete("/notes/1").status_code == 404
        assert client.get("/notes").json() == [{"id": 2, "text": "second"}]
    assert rows(path, "notes") == [(2, "second")]
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["execute", "execute_fetchall", "cursor"])
async def test_a_stream_reading_a_connection_closed_at_the_handler_names_the_fix(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A StreamingResponse body reading a release="handler" connection (the recipe's
    warning): tether's `ResourceClosedError` naming release="response", as SQLAlchemy's
    session gives; before, aiosqlite's bare "ValueError: no active connection" (trial 11)."""
    from fastapi.responses import StreamingResponse

    path = tmp_path / "app.db"
    app, lc, db = make(path)
    reader = tsqlite.connection(lc, db, name="reader")
    raised: list[BaseException] = []

    @app.get("/export")
    async def export(c: Annotated[Conn, Depends(reader)]) -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield b"id,name\n"
            try:
                if method == "cursor":
                    await c.cursor()
                else:
                    await getattr(c, method)("SELECT * FROM authors")
            except BaseException as exc:
                raised.append(exc)
                raise

        return StreamingResponse(body())

    async with running(app) as client:
        response = await client.get("/export")
    assert (response.status_code, response.content) == (200, b"id,name\n")  # cut short
    (error,) = raised
    assert isinstance(error, tether.ResourceClosedError)
    assert str(error) == (
        "Connection 'reader' was closed by tether at the end of its unit of work (in a "
        "request, release='handler' closes it when the endpoint returns, before the "
        "response), and cannot be used again. A StreamingResponse body that queries needs "
        "release='response'; a background task, a connection of its own (`async with "
        "lc.scope() as s: await s.get(reader)`)."
    )


@pytest.mark.anyio
@pytest.mark.parametrize("under", ["afile/app.db", "afile/sub/app.db"])
async def test_a_path_through_a_file_says_so_with_create_dirs(tmp_path: Path, under: str) -> None:
    """create_dirs=True (the default) and a file where the path needs a directory: it said
    "create the directory" (trial 34), and named 'afile/sub' for the deeper path."""
    (tmp_path / "afile").write_text("")
    path = str(tmp_path / under)
    lc = tether.Lifecycle()
    tsqlite.database(lc, path)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover
    said = str(caught.value)
    assert f"{str(tmp_path / 'afile')!r}, a part of its path, is a file, not a directory (" in said
    assert said.endswith(". Fix the path. The resources already open were closed. Fix the cause "
                         "above: a mistake in the configuration or the code, which no retry "
                         "mends."), said  # fmt: skip
