"""tether.integrations.aiosqlite against real SQLite files: a review's findings.

``executescript`` in a unit of work stays in its transaction; the mistakes made in a
database's configuration are told apart from a busy database at startup; ``file:`` URIs
(their directory, ``vfs=memdb``) and ``synchronous=``.
"""

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException

import tether
from tether.integrations import aiosqlite as tsqlite

Conn = aiosqlite.Connection


def rows(path: Path | str, table: str = "notes") -> list[Any]:
    """What another connection sees, right now."""
    other = sqlite3.connect(path)
    try:
        return [row[0] for row in other.execute(f"SELECT text FROM {table} ORDER BY id")]
    finally:
        other.close()


def triggers(path: Path) -> list[Any]:
    other = sqlite3.connect(path)
    try:
        return other.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    finally:
        other.close()


def make_file(path: Path) -> None:
    other = sqlite3.connect(path)
    try:
        other.executescript(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);"
            "CREATE TABLE log (id INTEGER PRIMARY KEY, text TEXT NOT NULL);"
        )
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


async def start_error(lc: tether.Lifecycle) -> str:
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover - the start fails
    return str(caught.value)


# --------------------------------------------------------------------------- executescript


def script_app(path: Path, begin: str = "immediate") -> FastAPI:
    lc = tether.Lifecycle()
    db = tsqlite.database(lc, path)
    writer = tsqlite.connection(lc, db, name="writer", begin=begin)  # type: ignore[arg-type]
    app = FastAPI(lifespan=lc.lifespan)
    W = Annotated[Conn, Depends(writer)]

    @app.post("/script")
    async def script(c: W, fail: bool = False, script: str = "") -> dict[str, Any]:
        await c.execute("INSERT INTO notes (text) VALUES ('before-script')")
        cur = await c.executescript(
            script
            or "INSERT INTO notes (text) VALUES ('in-script; with a semicolon');"
            "-- a comment; with one too\n"
            "INSERT INTO log (text) VALUES ('in-script')"
        )
        assert await cur.fetchall() == []
        await c.execute("INSERT INTO notes (text) VALUES ('after-script')")
        if fail:
            raise HTTPException(409, "conflict: should roll back everything")
        return {"in_transaction": c.in_transaction}

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("begin", ["immediate", "deferred"])
async def test_executescript_in_a_unit_of_work_stays_in_its_transaction(
    tmp_path: Path, begin: str
) -> None:
    """sqlite3's executescript commits the open transaction first: a request that failed
    after it kept the writes before it and the script's (the review's scenario)."""
    path = tmp_path / "app.db"
    make_file(path)
    async with running(script_app(path, begin)) as client:
        failed = await client.post("/script", params={"fail": True})
        assert failed.status_code == 409
        assert rows(path) == []  # nothing committed: before, in and after the script
        assert rows(path, "log") == []

        ok = await client.post("/script")
        assert ok.status_code == 200
        assert ok.json() == {"in_transaction": True}  # the script did not commit
        assert rows(path) == ["before-script", "in-script; with a semicolon", "after-script"]
        assert rows(path, "log") == ["in-script"]


@pytest.mark.anyio
async def test_executescript_in_a_unit_of_work_runs_triggers_and_fails_whole(
    tmp_path: Path,
) -> None:
    """A ``CREATE TRIGGER ... END;`` (statements in its body) is one statement; a script
    failing half-way fails the unit of work, which rolls back the statements before."""
    path = tmp_path / "app.db"
    make_file(path)
    trigger = (
        "CREATE TRIGGER logged AFTER INSERT ON notes BEGIN\n"
        "  INSERT INTO log (text) VALUES ('logged ' || new.text);\n"
        "  INSERT INTO log (text) VALUES ('twice; ' || new.text);\n"
        "END;\n"
        "INSERT INTO notes (text) VALUES ('x');\n"
        "/* a last statement without its semicolon */ INSERT INTO notes (text) VALUES ('y')"
    )
    async with running(script_app(path)) as client:
        failing = trigger + ";\nINSERT INTO notes (text) VALUES ('x');"  # UNIQUE fails it
        assert (await client.post("/script", params={"script": failing})).status_code == 500
        assert rows(path) == []
        assert rows(path, "log") == []
        assert triggers(path) == []  # the DDL rolled back too

        assert (await client.post("/script", params={"script": trigger})).status_code == 200
        assert rows(path) == ["before-script", "x", "y", "after-script"]
        assert rows(path, "log") == [  # the trigger was made after 'before-script'
            "logged x",
            "twice; x",
            "logged y",
            "twice; y",
            "logged after-script",
            "twice; after-script",
        ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("script", "keyword"),
    [
        ("INSERT INTO notes (text) VALUES ('s'); COMMIT;", "COMMIT"),
        ("BEGIN; INSERT INTO notes (text) VALUES ('s'); COMMIT;", "BEGIN"),
        ("INSERT INTO notes (text) VALUES ('s');\n-- done\nend transaction;", "END"),
        ("INSERT INTO notes (text) VALUES ('s'); /* undo */ rollback;", "ROLLBACK"),
    ],
)
async def test_executescript_with_its_own_transaction_is_refused_in_a_unit_of_work(
    tmp_path: Path, script: str, keyword: str
) -> None:
    path = tmp_path / "app.db"
    make_file(path)
    lc = tether.Lifecycle()
    writer = tsqlite.connection(lc, path, name="writer", begin="immediate")
    async with lc.run():
        with pytest.raises(sqlite3.ProgrammingError) as caught:
            async with lc.scope() as scope:
                c = await scope.get(writer)
                await c.execute("INSERT INTO notes (text) VALUES ('before')")
                await c.executescript(script)
    assert str(caught.value) == (
        f"executescript() on connection 'writer': the script has its own {keyword} "
        f"statement, and the connection is in its unit of work's transaction (committed when "
        f"the unit of work succeeds, rolled back when it fails), which {keyword} would end "
        f"early; nothing of the script ran. Remove the BEGIN/COMMIT/ROLLBACK statements (the "
        f"script's statements run in the unit of work's transaction), or run the script "
        f"outside a unit of work: `async with db.connect() as conn: await "
        f"conn.executescript(...)` (db: the tether.integrations.aiosqlite.database() value)."
    )
    assert rows(path) == []


@pytest.mark.anyio
async def test_executescript_with_savepoints_runs_in_a_unit_of_work(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    make_file(path)
    lc = tether.Lifecycle()
    writer = tsqlite.connection(lc, path, name="writer")
    async with lc.run():
        async with lc.scope() as scope:
            c = await scope.get(writer)
            await c.executescript(
                "SAVEPOINT s; INSERT INTO notes (text) VALUES ('gone'); ROLLBACK TO s;"
                "INSERT INTO notes (text) VALUES ('kept'); RELEASE s;"
            )
            assert c.in_transaction
    assert rows(path) == ["kept"]


@pytest.mark.anyio
async def test_executescript_outside_a_unit_of_work_is_sqlite3s(tmp_path: Path) -> None:
    """``Database.connect()``'s connection is not in a unit of work: its script is run by
    sqlite3 (its own COMMIT included)."""
    path = tmp_path / "app.db"
    make_file(path)
    lc = tether.Lifecycle()
    db = tsqlite.database(lc, path)
    async with lc.run():
        async with lc.get(db).connect() as conn:
            await conn.executescript("BEGIN; INSERT INTO notes (text) VALUES ('scripted'); COMMIT;")
    assert rows(path) == ["scripted"]


# --------------------------------------------------------------------------- startup errors

NO_RETRY = (
    "The resources already open were closed. Fix the cause above: a mistake in the "
    "configuration or the code, which no retry mends."
)


@pytest.mark.anyio
async def test_a_directory_as_the_path_is_a_configuration_error(tmp_path: Path) -> None:
    lc = tether.Lifecycle()
    tsqlite.database(lc, tmp_path)
    assert await start_error(lc) == (
        f"App resource 'database' failed to open: OperationalError: Database 'database': "
        f"cannot open {str(tmp_path)!r}: it is a directory, not a file (OperationalError: "
        f"unable to open database file). Pass the path of the database file, e.g. "
        f"{str(tmp_path / 'app.db')!r}. {NO_RETRY}"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "options",
    [{}, {"foreign_keys": False, "synchronous": None}, {"wal": False, "foreign_keys": False}],
)
async def test_a_file_that_is_not_a_database_is_a_configuration_error(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """Found by the first statement: setting the connection up, the WAL switch, the read."""
    path = tmp_path / "notes.txt"
    path.write_text("my notes, not a database\n" * 100)
    lc = tether.Lifecycle()
    tsqlite.database(lc, path, **options)
    assert await start_error(lc) == (
        f"App resource 'database' failed to open: DatabaseError: Database 'database': "
        f"cannot open {str(path)!r}: the file is not an SQLite database (DatabaseError: file "
        f"is not a database). Pass the path of the database file (is it the right file?), or "
        f"move this one aside to have a new, empty database created there. {NO_RETRY}"
    )
    assert path.read_text() == "my notes, not a database\n" * 100


@pytest.mark.anyio
async def test_a_missing_directory_without_create_dirs_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nodir" / "app.db"
    lc = tether.Lifecycle()
    tsqlite.database(lc, path, create_dirs=False)
    assert await start_error(lc) == (
        f"App resource 'database' failed to open: OperationalError: Database 'database': "
        f"cannot open {str(path)!r}: its directory {str(path.parent)!r} does not exist "
        f"(OperationalError: unable to open database file): create it, or pass "
        f"create_dirs=True (the default) to have it created at startup. {NO_RETRY}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["ro", "rw"])
async def test_a_missing_file_a_uri_may_not_create_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.chdir(tmp_path)  # (create_dirs made a "file:" directory here of a URI)
    path = tmp_path / "app.db"
    uri = f"file:{path}?mode={mode}"
    lc = tether.Lifecycle()
    tsqlite.database(lc, uri)
    assert await start_error(lc) == (
        f"App resource 'database' failed to open: OperationalError: Database 'database': "
        f"cannot open {uri!r}: the file {str(path)!r} does not exist, and the URI's mode= "
        f"does not let SQLite create it (OperationalError: unable to open database file). "
        f"Pass the path of an existing database, or drop mode= (or use mode=rwc) to have it "
        f"created. {NO_RETRY}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_a_directory_that_cannot_be_created_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "data" / "app.db"
    lc = tether.Lifecycle()
    tsqlite.database(lc, path)
    message = await start_error(lc)
    assert message.startswith(
        f"App resource 'database' failed to open: OSError: Database 'database': cannot "
        f"create the directory {str(path.parent)!r} of {str(path)!r} (create_dirs=True): "
    )
    # (A file in the way: said as such since trial 34, where it said "create the directory".)
    assert f"{str(tmp_path / 'a-file')!r}, a part of its path, is a file, not a directory" in (
        message
    )
    assert message.endswith(f"). Fix the path. {NO_RETRY}")


@pytest.mark.anyio
async def test_a_read_only_database_with_wal_names_wal_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # (create_dirs made a "file:" directory here of a URI)
    path = tmp_path / "app.db"
    make_file(path)  # in journal_mode=delete
    uri = f"file:{path}?mode=ro"
    lc = tether.Lifecycle()
    tsqlite.database(lc, uri)
    assert await start_error(lc) == (
        f"App resource 'database' failed to open: OperationalError: Database 'database': "
        f"{uri!r} is read-only (OperationalError: attempt to write a readonly database), and "
        f"switching it to WAL mode (wal=True, the default) writes to it. Pass wal=False for a "
        f"read-only database, or make the file and its directory writable by the app's user. "
        f"{NO_RETRY}"
    )

    lc = tether.Lifecycle()
    conn = tsqlite.connection(lc, uri, wal=False)
    async with lc.run(), lc.scope() as scope:
        c = await scope.get(conn)
        assert [tuple(r) for r in await c.execute_fetchall("SELECT count(*) FROM notes")] == [(0,)]


@pytest.mark.anyio
async def test_a_locked_database_at_startup_starts_all_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process's exclusive lock at startup (a migration, a backup): the app starts,
    and says why its units of work wait (it failed the start, worded as a pool that "could
    not give a connection", trial 34; tests/integration/test_sa_sqlite_locked.py has the
    rest)."""
    path = tmp_path / "app.db"
    make_file(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        lc = tether.Lifecycle()
        tsqlite.database(lc, path, busy_timeout=0.1)
        async with lc.run():
            assert lc.state is tether.State.RUNNING
    finally:
        other.close()
    assert any("is locked by another connection as the app starts" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# --------------------------------------------------------------------------- file: URIs


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["file:{}", "file://{}", "file://localhost{}"])
async def test_a_file_uri_with_create_dirs_creates_the_uris_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Not a directory named ``file:`` in the working directory, made of the whole URI."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = tmp_path / "da ta" / "app.db"
    uri = form.format(str(path).replace(" ", "%20")) + "?cache=private"
    lc = tether.Lifecycle()
    conn = tsqlite.connection(lc, uri)
    async with lc.run(), lc.scope() as scope:
        c = await scope.get(conn)
        await c.execute("CREATE TABLE t (x)")
    assert list(work.iterdir()) == []
    assert path.exists()
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]
    finally:
        other.close()


@pytest.mark.anyio
async def test_a_relative_file_uri_with_create_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    lc = tether.Lifecycle()
    tsqlite.database(lc, "file:data/app.db?mode=rwc")
    async with lc.run():
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert (tmp_path / "data" / "app.db").exists()


@pytest.mark.anyio
@pytest.mark.parametrize("uri", ["file:/notes?vfs=memdb", "file:notes?cache=shared&vfs=memdb"])
async def test_a_memdb_database_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    monkeypatch.chdir(tmp_path)
    lc = tether.Lifecycle()
    tsqlite.database(lc, uri)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover - the start fails
    assert str(caught.value.__cause__) == (
        f"An in-memory SQLite database ({uri!r}) lives only while a connection has it open "
        f"(none does between units of work), so each unit of work would find it empty, and "
        f"tether opens one connection per unit of work: use a file (a temporary one in tests)."
    )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- synchronous


@pytest.mark.parametrize("value", ["FULLL", "DURABLE", "ON", "FULL; PRAGMA x", 4, -1, True, 2.0])
def test_synchronous_is_checked_at_declaration(value: object) -> None:
    lc = tether.Lifecycle()
    with pytest.raises(ValueError) as caught:
        tsqlite.database(lc, "app.db", synchronous=value)  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"database('database'): synchronous={value!r} is not one of OFF, NORMAL, FULL, EXTRA "
        f"(any case) or 0-3, and SQLite would silently use NORMAL for it. Pass e.g. "
        f'synchronous="FULL", or None for SQLite\'s default.'
    )
    assert lc.resources == {}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "pragma"),
    [("full", 2), ("Extra", 3), ("OFF", 0), (2, 2), (0, 0), ("NORMAL", 1), (None, 2)],
)
async def test_synchronous_is_set_on_every_connection(
    tmp_path: Path, value: object, pragma: int
) -> None:
    lc = tether.Lifecycle()
    conn = tsqlite.connection(lc, tmp_path / "app.db", synchronous=value)
    async with lc.run(), lc.scope() as scope:
        c = await scope.get(conn)
        assert [tuple(r) for r in await c.execute_fetchall("PRAGMA synchronous")] == [(pragma,)]


REBUILD = (
    "PRAGMA foreign_keys=OFF;"
    "CREATE TABLE author_new (id INTEGER PRIMARY KEY, name TEXT NOT NULL, born INTEGER);"
    "INSERT INTO author_new (id, name) SELECT id, name FROM author;"
    "DROP TABLE author;"
    "ALTER TABLE author_new RENAME TO author;"
    "PRAGMA foreign_keys=ON;"
)


def test_a_script_that_sets_foreign_keys_is_refused_in_a_unit_of_work(tmp_path: Path) -> None:
    """SQLite's table rebuild turns foreign keys off around `DROP TABLE`; inside a
    transaction SQLite ignores that pragma, so in a unit of work the drop cascaded and
    deleted every row that referenced the table, then the unit committed. Refused before any
    of it runs; the same script through `db.connect()` rebuilds the table and keeps them."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as setup:
        setup.executescript(
            "CREATE TABLE author (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
            "CREATE TABLE book (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL "
            "REFERENCES author (id) ON DELETE CASCADE, title TEXT);"
            "INSERT INTO author VALUES (1, 'Le Guin');"
            "INSERT INTO book VALUES (1, 1, 'The Dispossessed'), (2, 1, 'Lathe of Heaven');"
        )
    setup.close()
    lc = tether.Lifecycle()
    db = tsqlite.database(lc, path)
    writer = tsqlite.connection(lc, db, name="writer")

    async def main() -> None:
        async with lc.run():
            with pytest.raises(sqlite3.ProgrammingError) as caught:
                async with lc.scope() as s:
                    await (await s.get(writer)).executescript(REBUILD)
            assert str(caught.value) == (
                "executescript() on connection 'writer': the script sets PRAGMA foreign_keys, "
                "which SQLite ignores inside a transaction, and the connection is in its unit "
                "of work's transaction: a DROP TABLE after it (a table rebuild) would still "
                "delete, through ON DELETE CASCADE, the rows that reference the table; nothing "
                "of the script ran. Run such a script outside a unit of work, as startup work "
                "or a migration: `async with db.connect() as conn: await "
                "conn.executescript(...)` (db: the tether.integrations.aiosqlite.database() "
                "value)."
            )
            assert rows_of(path, "book") == 2
            async with lc.get(db).connect() as conn:  # the form the message names
                await conn.executescript(REBUILD)
            assert rows_of(path, "book") == 2

    anyio.run(main)


def rows_of(path: Path, table: str) -> int:
    other = sqlite3.connect(path)
    try:
        return int(other.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        other.close()


@pytest.mark.anyio
async def test_a_long_script_in_a_unit_of_work_leaves_the_event_loop_free(
    tmp_path: Path,
) -> None:
    """A seed script of 16,000 rows whose strings hold ";": splitting it tried every ";"
    from the statement's start (quadratic), on the event loop: every other request of the
    worker froze for 6 s. It is split in aiosqlite's thread, in one pass; the rows are all
    there, quotes doubled inside strings and all."""
    import anyio

    path = tmp_path / "app.db"
    make_file(path)
    values = ",".join(f"('row {i}; it''s [{i}] -- not a comment')" for i in range(16_000))
    script = f"/* seed; */ INSERT INTO log (text) VALUES {values};\n-- done;\n"
    lc = tether.Lifecycle()
    writer = tsqlite.connection(lc, tsqlite.database(lc, path), name="writer")
    longest = 0.0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = anyio.current_time()
        while not done.is_set():
            await anyio.sleep(0.01)
            now = anyio.current_time()
            longest = max(longest, now - last)
            last = now

    async with lc.run(), anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with lc.scope() as s:
            await (await s.get(writer)).executescript(script)
        done.set()
    assert rows_of(path, "log") == 16_000
    assert rows(path, "log")[1] == "row 1; it's [1] -- not a comment"
    assert longest < 2.0  # 6 s on the event loop before; well under a second in its thread
