"""SQLite's "database is locked" through the SQLAlchemy integration: a 503 with
``Retry-After`` naming the lock, as the aiosqlite integration answers it, when nothing was
written; the original error (a 500) once the endpoint committed something itself.

Real SQLite files. The other writer is a plain ``sqlite3`` connection of the test holding the
write lock (``BEGIN IMMEDIATE``), or a read transaction holding its shared lock, which makes a
writer's ``COMMIT`` wait (the rollback journal, SQLite's default)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import tether
import tether.integrations.sqlalchemy as tsa
from tether.fastapi import install

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 0.2  # s: SQLite's busy timeout in these tests (pysqlite's `timeout`)


def make_db(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE t (x INTEGER)")
    raw.commit()
    raw.close()


def rows(path: Path) -> list[int]:
    raw = sqlite3.connect(path)
    try:
        return [x for (x,) in raw.execute("SELECT x FROM t ORDER BY x")]
    finally:
        raw.close()


@contextmanager
def holding(path: Path, how: str) -> Iterator[None]:
    """Another connection holding the write lock (``"write"``) or a read transaction's
    shared lock (``"read"``)."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        if how == "write":
            raw.execute("BEGIN IMMEDIATE")
        else:
            raw.execute("BEGIN")
            raw.execute("SELECT count(*) FROM t").fetchall()
        yield
    finally:
        raw.execute("ROLLBACK")
        raw.close()


def declare(path: Path, sync: bool) -> tuple[tether.Lifecycle, Any]:
    lc = tether.Lifecycle()
    if sync:
        engine = tsa.sync_engine(lc, f"sqlite:///{path}", connect_args={"timeout": WAIT})
        return lc, tsa.sync_session(lc, engine)
    engine = tsa.engine(lc, f"sqlite+aiosqlite:///{path}", connect_args={"timeout": WAIT})
    return lc, tsa.session(lc, engine)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize(
    ("how", "during"),
    [("write", "a statement waited for the write lock"), ("read", "at COMMIT")],
    ids=["statement", "commit"],
)
async def test_a_lock_held_too_long_is_a_503_and_nothing_is_written(
    tmp_path: Path, sync: bool, how: str, during: str
) -> None:
    path = tmp_path / "app.db"
    make_db(path)
    lc, session = declare(path, sync)
    app = FastAPI(lifespan=lc.lifespan)
    install(app, lc)

    if sync:

        @app.post("/write")
        def write_sync(s: Session = Depends(session)) -> dict[str, str]:
            s.execute(text("INSERT INTO t VALUES (1)"))
            return {"ok": "yes"}

    else:

        @app.post("/write")
        async def write(s: AsyncSession = Depends(session)) -> dict[str, str]:
            await s.execute(text("INSERT INTO t VALUES (1)"))
            return {"ok": "yes"}

    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with holding(path, how):
                r = await client.post("/write")
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["detail"] == (
                f"Engine 'engine': the SQLite database {str(path)!r} is locked by another "
                f"writer ({during}; OperationalError: database is locked); nothing was "
                f"written. Retry shortly; if it persists, keep the transactions that write "
                f"short, use WAL mode (its readers never block the writer), or let a writer "
                f"wait longer for the lock: connect_args={{'timeout': 15}} (SQLite's busy "
                f"timeout, in seconds: 5 by default)."
            )
            assert rows(path) == []
            # The lock gone, the same route writes: the connection went back clean.
            r = await client.post("/write")
            assert r.status_code == 200, r.text
            assert rows(path) == [1]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_the_error_is_resource_unavailable_outside_requests(
    tmp_path: Path, sync: bool
) -> None:
    path = tmp_path / "app.db"
    make_db(path)
    lc, session = declare(path, sync)
    async with lc.run():
        with holding(path, "write"), pytest.raises(tether.ResourceUnavailable) as caught:
            async with lc.scope() as sc:
                s = await sc.get(session)
                if sync:
                    s.execute(text("INSERT INTO t VALUES (1)"))
                else:
                    await s.execute(text("INSERT INTO t VALUES (1)"))
        assert caught.value.retry_after == 1.0
        assert caught.value.resource == "engine"
        assert str(caught.value).startswith("Engine 'engine': the SQLite database "), str(
            caught.value
        )
        assert "connect_args={'timeout': " in str(caught.value)
        assert isinstance(caught.value.__cause__, sa_exc.OperationalError)
    assert rows(path) == []


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_after_the_endpoint_s_own_commit_the_lock_is_the_original_error(
    tmp_path: Path, sync: bool
) -> None:
    """A 503 would ask the client to retry, which would write again what the endpoint's
    own ``commit()`` wrote: the error stays SQLAlchemy's (a 500)."""
    path = tmp_path / "app.db"
    make_db(path)
    lc, session = declare(path, sync)
    async with lc.run():
        with pytest.raises(sa_exc.OperationalError, match="database is locked"):
            async with lc.scope() as sc:
                s = await sc.get(session)
                if sync:
                    s.execute(text("INSERT INTO t VALUES (1)"))
                    s.commit()
                    with holding(path, "write"):
                        s.execute(text("INSERT INTO t VALUES (2)"))
                else:
                    await s.execute(text("INSERT INTO t VALUES (1)"))
                    await s.commit()
                    with holding(path, "write"):
                        await s.execute(text("INSERT INTO t VALUES (2)"))
    assert rows(path) == [1]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_read_refused_for_another_process_s_lock_says_so_and_fails_readiness(
    tmp_path: Path, sync: bool
) -> None:
    """Another process holding an exclusive lock (a rollback journal): every read is a 503,
    which said "a statement waited for the write lock" of a `SELECT`; and `/health/ready`
    stayed 200, its `SELECT 1` reading no file, where the aiosqlite integration's check
    fails (trial 30)."""
    path = tmp_path / "app.db"
    make_db(path)
    lc, session = declare(path, sync)
    app = FastAPI(lifespan=lc.lifespan)
    install(app, lc)
    from tether.fastapi import health_router

    app.include_router(health_router(lc, cache=0))  # each call checks

    @app.get("/count")
    async def count(s: Any = Depends(session)) -> int:
        result = s.execute(text("SELECT count(*) FROM t"))
        return int((result if sync else await result).scalar_one())

    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health/ready")).status_code == 200
            raw = sqlite3.connect(path, isolation_level=None)
            try:
                raw.execute("BEGIN EXCLUSIVE")
                r = await client.get("/count")
                assert r.status_code == 503, r.text
                assert "(a read waited for the lock; OperationalError: " in r.json()["detail"]
                ready = await client.get("/health/ready")
                assert ready.status_code == 503, ready.text
                assert "database is locked" in ready.json()["checks"]["engine"]["error"]
            finally:
                raw.execute("ROLLBACK")
                raw.close()
            assert (await client.get("/health/ready")).status_code == 200
            assert (await client.get("/count")).json() == 0


async def test_in_wal_mode_the_advice_is_no_longer_wal_mode(tmp_path: Path) -> None:
    """The 503 of a lock held too long advised "use WAL mode" of a file already in WAL."""
    path = tmp_path / "app.db"
    make_db(path)
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.close()
    lc, session = declare(path, False)
    async with lc.run():
        with holding(path, "write"), pytest.raises(tether.ResourceUnavailable) as caught:
            async with lc.scope() as sc:
                s = await sc.get(session)
                await s.execute(text("INSERT INTO t VALUES (1)"))
    assert str(caught.value) == (
        f"Engine 'engine': the SQLite database {str(path)!r} is locked by another writer (a "
        f"statement waited for the write lock; OperationalError: database is locked); nothing "
        f"was written. Retry shortly; if it persists, keep the transactions that write short, "
        f"or let a writer wait longer for the lock: connect_args={{'timeout': 15}} (SQLite's "
        f"busy timeout, in seconds: 5 by default)."
    )
    assert rows(path) == []


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_file_locked_as_the_app_starts_starts_all_the_same(
    tmp_path: Path, sync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process (a migration, a backup) holds an exclusive lock as the app boots: the
    startup's read of the file waits for it, then the app starts all the same, and says why.
    It failed the start, worded as a server that cannot be reached (trial 33)."""
    path = tmp_path / "app.db"
    make_db(path)
    lc, session = declare(path, sync)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN EXCLUSIVE")
    try:
        async with lc.run():
            said = [r.getMessage() for r in caplog.records if "as the app starts" in r.getMessage()]
            assert said == [
                f"tether: engine 'engine': the SQLite database {str(path)!r} is locked by "
                f"another connection as the app starts (OperationalError: database is locked); "
                f"starting all the same: units of work wait for the lock (the busy timeout), "
                f"and are answered 503 while it lasts"
            ]
            raw.execute("ROLLBACK")
            async with lc.scope() as sc:
                s = await sc.get(session)
                result = s.execute(text("SELECT count(*) FROM t"))
                assert (result if sync else await result).scalar_one() == 0
    finally:
        raw.close()


@pytest.mark.parametrize("kind", ["sqlalchemy", "sqlalchemy-sync", "sqlalchemy-url", "aiosqlite"])
async def test_a_check_outlasted_by_the_busy_timeout_names_the_lock(
    tmp_path: Path, kind: str
) -> None:
    """SQLite's busy timeout (5 s by default) as long as the check's, or longer: a check that
    waits for another process's lock did not finish, and said only "check did not finish
    within 5 s" (trial 33). It now says what it most likely waited for, within the check's
    bound (the aiosqlite integration's answered after the busy timeout: trial 36)."""
    from tether.integrations import aiosqlite as tsq

    path = tmp_path / "app.db"
    make_db(path)
    lc = tether.Lifecycle(check_timeout=0.3)
    if kind == "aiosqlite":
        tsq.database(lc, path, wal=False, busy_timeout=6)
        busy = "busy_timeout=6"
    elif kind == "sqlalchemy":
        tsa.engine(lc, f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 6})
        busy = "connect_args={'timeout': 6}"
    elif kind == "sqlalchemy-url":  # (it named the default, 5: trial 36)
        tsa.sync_engine(lc, f"sqlite:///{path}?timeout=6")
        busy = "timeout=6 in the URL"
    else:
        tsa.sync_engine(lc, f"sqlite:///{path}", connect_args={"timeout": 6})
        busy = "connect_args={'timeout': 6}"
    import aiosqlite

    stops = hasattr(aiosqlite.Connection, "stop")  # (aiosqlite 0.22.1+)
    before = set(threading.enumerate())
    async with lc.run():
        assert (await lc.health()).checks[0].ok
        raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        raw.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        try:
            (check,) = (await lc.health()).checks
            took = time.monotonic() - started
        finally:
            # Freed as the app shuts down (a second later where aiosqlite stops the thread
            # of a connection SQLAlchemy terminates, 0.22.1+): the check's statement, still
            # waiting in its connection's thread, ends then. Before 0.22.1 that thread is
            # never stopped, and is freed here, where this loop still runs.
            if stops:
                threading.Timer(1.0, lambda: (raw.execute("ROLLBACK"), raw.close())).start()
            else:
                raw.execute("ROLLBACK")
                raw.close()
                await anyio.sleep(0.5)
        # (The sync engine's check, left to its thread, gives its connection back then.)
        with anyio.fail_after(10):
            while any(pool.in_use for pool in lc.stats().pools.values()):
                await anyio.sleep(0.05)
    # The check's statement, in its connection's thread, ended once the lock was free, and
    # the engine's (the database's) close waited for that thread: one left running reported
    # to the test's closed loop ("Event loop is closed", CI's Python 3.13 stage). Before,
    # on SQLAlchemy's async engine, a close of it never ended: asyncio.run() hung at exit.
    left = [  # aiosqlite's threads (before 0.21, its connection is one)
        thread
        for thread in set(threading.enumerate()) - before
        if thread.name.endswith("(_connection_worker_thread)")
        or type(thread).__module__.startswith("aiosqlite")
    ]
    with anyio.fail_after(0.3):  # (a thread ends a moment after its last answer)
        while stops and any(thread.is_alive() for thread in left):
            await anyio.sleep(0.01)
    assert not check.ok
    assert took < 3, took  # the check's bound, not the busy timeout (6 s: trial 36)
    assert check.error == (
        "check did not finish within 0.3 s (SQLite waits for a lock on the file for up to its "
        f"busy timeout, {busy}: another connection or process holding the database (a long "
        "write, a backup, BEGIN EXCLUSIVE) is the likeliest cause)"
    )


@pytest.mark.parametrize("wal", [False, True], ids=["journal", "wal"])
async def test_a_file_locked_as_the_app_starts_starts_all_the_same_on_aiosqlite(
    tmp_path: Path, wal: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The same with tether's aiosqlite integration (the embedded default): it failed the
    start, worded as a pool that "could not give a connection ... check the database and
    the pool size" (trial 34). With wal=True the switch waits for the next start."""
    from tether.integrations import aiosqlite as tsq

    path = tmp_path / "app.db"
    make_db(path)
    lc = tether.Lifecycle()
    db = tsq.database(lc, path, wal=wal, busy_timeout=WAIT)
    conn = tsq.connection(lc, db)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN EXCLUSIVE")
    try:
        async with lc.run():
            said = [r.getMessage() for r in caplog.records if "as the app starts" in r.getMessage()]
            assert said == [
                f"tether: database 'database': the SQLite file {str(path)!r} is locked by "
                f"another connection as the app starts (OperationalError: database is locked); "
                f"starting all the same: units of work wait for the lock (busy_timeout), and "
                f"are answered 503 while it lasts"
                + (
                    "; journal_mode=WAL was not switched on, and is at the next start"
                    if wal
                    else ""
                )
            ]
            with pytest.raises(tether.ResourceUnavailable, match="locked"):
                async with lc.scope() as sc:
                    c = await sc.get(conn)
                    await c.execute("SELECT count(*) FROM t")
            raw.execute("ROLLBACK")
            async with lc.scope() as sc:
                c = await sc.get(conn)
                async with c.execute("SELECT count(*) FROM t") as cur:
                    assert tuple(await cur.fetchone()) == (0,)
    finally:
        raw.close()
