"""SQLAlchemy on an SQLite path that cannot be a database: the app does not start, and the
error says what is wrong with the path and how to fix it, as the aiosqlite integration's do,
with no retry (no retry mends it).

Before (trial 30), each read as a server that cannot be reached: "cannot connect to
sqlite+aiosqlite:///...: OperationalError: unable to open database file. Retry shortly; if it
persists, check that the database runs and is reachable ... give 'engine' retries= or a longer
connect_timeout=", and `retries=` retried it; a file of something else (a few bytes of text)
even started, its `SELECT 1` reading nothing of it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import tether
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.anyio

NO_RETRY = (
    " The resources already open were closed. Fix the cause above: a mistake in the "
    "configuration or the code, which no retry mends."
)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize(
    "case", ["missing_directory", "directory", "not_a_database", "tilde", "through_a_file"]
)
async def test_a_path_that_cannot_be_a_database_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool, case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    # A relative path is said with the directory it is relative to (a service started from
    # another directory than its code's).
    relative = f" (relative to the working directory, {os.getcwd()!r})"
    if case == "missing_directory":
        path = "data/sub/app.db"
        said = (
            f"OperationalError: Engine 'engine': cannot open {path!r}{relative}: its directory "
            f"'data/sub' does not exist (OperationalError: unable to open database file): "
            f"create it (SQLAlchemy creates the database file, not its directory)."
        )
    elif case == "directory":
        path = "data"
        Path(path).mkdir()
        said = (
            f"OperationalError: Engine 'engine': cannot open {path!r}{relative}: it is a directory, not "
            f"a file (OperationalError: unable to open database file). Pass the path of the "
            f"database file, e.g. 'data/app.db'."
        )
    elif case == "tilde":  # (trial 33: it said "create the directory '~'")
        path = "~/app.db"
        said = (
            f"OperationalError: Engine 'engine': cannot open {path!r}: a path that begins "
            f"with '~' is not expanded to a home directory (OperationalError: unable to open "
            f"database file). Pass the full path (os.path.expanduser() makes it)."
        )
    elif case == "through_a_file":  # (it said "its directory ... does not exist")
        Path("data").write_text("")
        path = "data/app.db"
        said = (
            f"OperationalError: Engine 'engine': cannot open {path!r}{relative}: 'data', a part of its "
            f"path, is a file, not a directory (OperationalError: unable to open database "
            f"file). Fix the path."
        )
    else:
        path = "notes.txt"
        Path(path).write_text("hello\n")
        said = (
            f"DatabaseError: Engine 'engine': cannot open {path!r}{relative}: the file is not an SQLite "
            f"database (DatabaseError: file is not a database). Pass the path of the database "
            f"file (is it the right file?), or move this one aside to have a new, empty "
            f"database created there."
        )
    lc = tether.Lifecycle()
    if sync:
        tsa.sync_engine(lc, f"sqlite:///{path}", retries=3, backoff=5)
    else:
        tsa.engine(lc, f"sqlite+aiosqlite:///{path}", retries=3, backoff=5)
    before = set(threading.enumerate())
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover
    # aiosqlite stops the thread of a connection that failed to open without waiting for it
    # (omnilib/aiosqlite#389): its end must reach this loop before the test closes it.
    for thread in set(threading.enumerate()) - before:
        if thread.name.endswith("(_connection_worker_thread)"):
            await anyio.to_thread.run_sync(thread.join, 10)
    # No retry: three of them, 5 s apart, would have the test time out first.
    assert str(caught.value) == f"App resource 'engine' failed to open: {said}{NO_RETRY}"
    if case == "not_a_database":
        assert Path(path).read_text() == "hello\n"  # left as it was
    assert not Path("data/sub").exists()  # nothing made


@pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:", "file", "sqlite://"]
)
async def test_an_in_memory_database_says_what_its_units_of_work_share(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request answered 201 whose write another request's failure rolled back, on
    `:memory:`, with nothing in the log (trial 30): its engine says, as it opens, what the
    units of work share. A file says nothing."""
    in_memory = url != "file"
    if not in_memory:
        url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    lc = tether.Lifecycle()
    if url == "sqlite://":  # a sync engine: its advice names its own driver (trial 34)
        tsa.sync_engine(lc, url)
    else:
        tsa.engine(lc, url)
    with caplog.at_level("WARNING", logger="tether"):
        async with lc.run():
            pass
    said = [r.getMessage() for r in caplog.records if "in-memory" in r.getMessage()]
    if not in_memory:
        assert said == []
    else:
        assert said == [
            "tether: engine 'engine' is an in-memory SQLite database: one connection, whose "
            "one transaction the units of work that run at the same time share, so one that "
            "fails rolls back the writes of the others (answered 2xx), or has its own "
            "committed by another. Fine for a test that sends one request at a time; where "
            f"requests run at once, use a file ({url.partition(':')[0]}:///./app.db), or "
            "rolled_back(session) in tests, which serialises them."
        ]


async def test_a_uri_that_cannot_open_says_why(tmp_path: Path) -> None:
    """`sqlite+aiosqlite:///file:...?mode=ro&uri=true` of a file that does not exist: worded
    as a server that cannot be reached, and retried (trial 33)."""
    path = tmp_path / "none.db"
    lc = tether.Lifecycle()
    tsa.engine(lc, f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true", retries=3, backoff=5)
    before = set(threading.enumerate())
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover
    # aiosqlite stops the thread of a connection that failed to open without waiting for it
    # (omnilib/aiosqlite#389): its end must reach this loop before the test closes it (it
    # reached a closed loop in CI: "Event loop is closed" in a later test).
    for thread in set(threading.enumerate()) - before:
        if thread.name.endswith("(_connection_worker_thread)"):
            await anyio.to_thread.run_sync(thread.join, 10)
    assert str(caught.value) == (
        f"App resource 'engine' failed to open: OperationalError: Engine 'engine': cannot open "
        f"'file:{path}': the file {str(path)!r} does not exist, and the URI's mode= does not "
        f"let SQLite create it (OperationalError: unable to open database file). Pass the path "
        f"of an existing database, or drop mode= (or use mode=rwc) to have it created."
        f"{NO_RETRY}"
    )
