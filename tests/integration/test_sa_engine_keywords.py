"""A keyword argument of SQLAlchemy's `engine()` or `sync_engine()` that SQLAlchemy does not
take for the URL's dialect and driver (`pool_recylce=3600`) is refused where it is declared,
naming it and its close match, instead of SQLAlchemy's "Invalid argument(s) ... sent to
create_engine()" when the app starts. SQLAlchemy itself checks them, building the engine with
the options the startup would give it: nothing connects (a PostgreSQL URL points at a socket
that listens and is never contacted), no thread starts, no log handler is added. A URL given
as a function is read at startup, where the same message fails the start, not retried.

Needs the drivers (asyncpg, psycopg, psycopg2, aiosqlite), no server: it runs on the extras'
lower bounds too (SQLAlchemy 2.0)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

import tether
from tests.unit._messages import exactly
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.anyio, pytest.mark.fastapi_free]

Declare = Callable[..., Any]


def refused(fn: str, dialect: str, keys: str, *, them: bool = False) -> str:
    """The declaration's TypeError for *keys* (``pool_recylce= (did you mean ...)``)."""
    made_by = "create_async_engine" if fn == "engine" else "create_engine"
    return (
        f"Engine 'engine': {keys} {'are not options' if them else 'is not an option'} of "
        f"{fn}() nor of {made_by}() for {dialect} (SQLAlchemy {sqlalchemy.__version__}), which "
        f"{fn}() passes its other keyword arguments to. Fix or remove {'them' if them else 'it'}."
    )


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on 127.0.0.1 that never answers: a connection to it would wait in
    its accept queue (seen by `contacted`), and a driver's connect would hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def contacted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def url_for(template: str, tmp_path: Path, sock: socket.socket) -> str:
    return template.format(db=tmp_path / "app.db", port=sock.getsockname()[1])


SQL_LOGGERS = ("sqlalchemy.engine.Engine", "sqlalchemy.pool", "sqlalchemy.pool.impl")

# (declare, URL, the dialect+driver the message names)
URLS = [
    (tsa.engine, "sqlite+aiosqlite:///{db}", "sqlite+aiosqlite"),
    (tsa.engine, "sqlite+aiosqlite://", "sqlite+aiosqlite"),  # in memory: a StaticPool
    (tsa.sync_engine, "sqlite:///{db}", "sqlite+pysqlite"),
    (tsa.engine, "postgresql+asyncpg://app:secret@127.0.0.1:{port}/app", "postgresql+asyncpg"),
    (tsa.engine, "postgresql+psycopg://app:secret@127.0.0.1:{port}/app", "postgresql+psycopg"),
    (tsa.sync_engine, "postgresql+psycopg://app:secret@127.0.0.1:{port}/app", "postgresql+psycopg"),
    (tsa.sync_engine, "postgresql+psycopg2://app@127.0.0.1:{port}/app", "postgresql+psycopg2"),
]
URL_IDS = [
    "aiosqlite", "aiosqlite-memory", "sqlite", "asyncpg", "psycopg-async", "psycopg", "psycopg2",
]  # fmt: skip


@pytest.mark.parametrize(("declare", "template", "dialect"), URLS, ids=URL_IDS)
def test_a_misspelt_option_is_refused_at_declaration_without_connecting(
    declare: Declare, template: str, dialect: str, tmp_path: Path, listener: socket.socket
) -> None:
    lc = tether.Lifecycle()
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(TypeError, match=exactly(refused(
        declare.__name__, dialect, "pool_recylce= (did you mean pool_recycle=?)"
    ))) as caught:  # fmt: skip
        declare(lc, url_for(template, tmp_path, listener), pool_recylce=3600)
    assert time.monotonic() - started < 2.0  # no connect (psycopg's would wait 10 s here)
    assert not contacted(listener)
    assert threading.active_count() == threads
    assert caught.value.__cause__ is None  # SQLAlchemy's own error is not chained
    assert caught.value.__suppress_context__
    assert "engine" not in lc.resources  # nothing half-declared
    assert not (tmp_path / "app.db").exists()  # SQLite's file is not made either


@pytest.mark.parametrize(
    ("declare", "given", "message"),
    [
        (
            tsa.engine, {"conect_timeout": 3},
            refused("engine", "sqlite+aiosqlite", "conect_timeout= (did you mean connect_timeout=?)"),
        ),
        (
            tsa.sync_engine, {"pool_recylce": 3600, "ehco": True},
            refused(
                "sync_engine", "sqlite+pysqlite",
                "pool_recylce= (did you mean pool_recycle=?) and ehco= (did you mean echo=?)",
                them=True,
            ),
        ),
        (
            tsa.engine, {"xyzzy": 1, "echo": True},
            refused("engine", "sqlite+aiosqlite", "xyzzy="),
        ),
        (
            tsa.sync_engine, {"async_creator": object},
            refused("sync_engine", "sqlite+pysqlite", "async_creator= (did you mean creator=?)"),
        ),
    ],
    ids=["tethers-own-option", "two-at-once", "no-close-match", "async-only-option"],
)  # fmt: skip
def test_what_the_message_names(
    declare: Declare, given: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """A misspelt option of tether's own gets its close match too; several are named at once;
    only the ones given that SQLAlchemy refused (not ``echo=True`` beside them)."""
    scheme = "sqlite+aiosqlite" if declare is tsa.engine else "sqlite"
    with pytest.raises(TypeError, match=exactly(message)):
        declare(tether.Lifecycle(), f"{scheme}:///{tmp_path / 'app.db'}", **given)


@pytest.mark.parametrize(
    ("declare", "template", "option", "others"),
    [
        (tsa.sync_engine, "postgresql+psycopg2://app@127.0.0.1:{port}/app",
         {"executemany_mode": "values_plus_batch"},
         (tsa.sync_engine, "postgresql+psycopg://app@127.0.0.1:{port}/app", "postgresql+psycopg",
          "executemany_mode=")),
        (tsa.engine, "postgresql+psycopg://app@127.0.0.1:{port}/app",
         {"use_native_hstore": False},
         (tsa.engine, "postgresql+asyncpg://app@127.0.0.1:{port}/app", "postgresql+asyncpg",
          "use_native_hstore=")),
        (tsa.sync_engine, "sqlite:///{db}",
         {"native_datetime": True},
         (tsa.sync_engine, "postgresql+psycopg://app@127.0.0.1:{port}/app", "postgresql+psycopg",
          "native_datetime= (did you mean native_inet_types=?)")),
    ],
    ids=["executemany_mode", "use_native_hstore", "native_datetime"],
)  # fmt: skip
def test_the_options_are_the_drivers(
    declare: Declare,
    template: str,
    option: dict[str, Any],
    others: tuple[Declare, str, str, str],
    tmp_path: Path,
    listener: socket.socket,
) -> None:
    """An option of one driver's dialect passes with that driver, and is refused with another
    (psycopg2's ``executemany_mode=`` for psycopg)."""
    declare(tether.Lifecycle(), url_for(template, tmp_path, listener), **option)
    other, other_template, dialect, keys = others
    with pytest.raises(TypeError, match=exactly(refused(other.__name__, dialect, keys))):
        other(tether.Lifecycle(), url_for(other_template, tmp_path, listener), **option)
    assert not contacted(listener)


PG_OPTIONS: dict[str, Any] = {
    "echo": True,
    "echo_pool": "debug",
    "pool_recycle": 3600,
    "pool_use_lifo": True,
    "pool_reset_on_return": "rollback",
    "pool_logging_name": "app_pool",
    "logging_name": "app",
    "hide_parameters": True,
    "query_cache_size": 100,
    "isolation_level": "REPEATABLE READ",
    "json_serializer": json.dumps,
    "json_deserializer": json.loads,
    "execution_options": {"logging_token": "app"},
    "insertmanyvalues_page_size": 500,
}


@pytest.mark.parametrize(
    ("declare", "template", "given", "dialect"),
    [
        (tsa.engine, "postgresql+asyncpg://app:secret@127.0.0.1:{port}/app",
         {**PG_OPTIONS, "connect_args": {"server_settings": {"jit": "off"}}},
         "postgresql+asyncpg"),
        (tsa.engine, "postgresql+psycopg://app:secret@127.0.0.1:{port}/app",
         {**PG_OPTIONS, "connect_args": {"options": "-c jit=off"}, "client_encoding": "utf8"},
         "postgresql+psycopg"),
        (tsa.sync_engine, "postgresql+psycopg://app:secret@127.0.0.1:{port}/app",
         {**PG_OPTIONS, "connect_args": {"options": "-c jit=off"}, "use_native_hstore": False},
         "postgresql+psycopg"),
        (tsa.engine, "sqlite+aiosqlite:///{db}",
         {"connect_args": {"timeout": 5}, "echo": True, "pool_recycle": 60,
          "isolation_level": "SERIALIZABLE", "json_serializer": json.dumps,
          "execution_options": {"logging_token": "app"}, "native_datetime": True},
         "sqlite+aiosqlite"),
        (tsa.engine, "sqlite+aiosqlite://",
         {"echo": True, "pool_recycle": 60, "execution_options": {"logging_token": "app"}},
         "sqlite+aiosqlite"),
        (tsa.sync_engine, "sqlite:///{db}",
         {"poolclass": NullPool, "pool_recycle": 60, "connect_args": {"timeout": 5}},
         "sqlite+pysqlite"),
    ],
    ids=["asyncpg", "psycopg-async", "psycopg", "aiosqlite", "aiosqlite-memory", "sqlite-nullpool"],
)  # fmt: skip
def test_the_options_sqlalchemy_takes_pass(
    declare: Declare,
    template: str,
    given: dict[str, Any],
    dialect: str,
    tmp_path: Path,
    listener: socket.socket,
) -> None:
    """Every option SQLAlchemy takes for the dialect passes the declaration (and, given with
    a misspelt one, only that one is named); the check adds no handler to SQLAlchemy's loggers
    for ``echo=True`` (the startup's engine does)."""
    url = url_for(template, tmp_path, listener)
    handlers = {name: list(logging.getLogger(name).handlers) for name in SQL_LOGGERS}
    lc = tether.Lifecycle()
    res = declare(lc, url, **given)
    assert lc.resources["engine"] is res
    with pytest.raises(TypeError, match=exactly(refused(
        declare.__name__, dialect, "pool_recylce= (did you mean pool_recycle=?)"
    ))):  # fmt: skip
        declare(tether.Lifecycle(), url, **given, pool_recylce=3600)
    assert not contacted(listener)
    assert {name: logging.getLogger(name).handlers for name in SQL_LOGGERS} == handlers


@pytest.mark.parametrize(
    ("declare", "scheme", "dialect"),
    [(tsa.engine, "sqlite+aiosqlite", "sqlite+aiosqlite"),
     (tsa.sync_engine, "sqlite", "sqlite+pysqlite")],
    ids=["engine", "sync_engine"],
)  # fmt: skip
async def test_a_url_from_a_function_fails_the_start_not_retried(
    declare: Declare, scheme: str, dialect: str, tmp_path: Path
) -> None:
    """The function is not called at the declaration (it reads secrets at startup); the
    start fails with the same message, once: a mistake, not retried (retries=2)."""
    calls: list[int] = []

    def url() -> str:
        calls.append(1)
        return f"{scheme}:///{tmp_path / 'app.db'}"

    lc = tether.Lifecycle()
    declare(lc, url, pool_recylce=3600, retries=2, backoff=0.01)
    assert calls == []
    message = refused(declare.__name__, dialect, "pool_recylce= (did you mean pool_recycle=?)")
    expected = (
        f"App resource 'engine' failed to open: TypeError: {message.rstrip('.')}. The resources "
        f"already open were closed. It was not retried (retries=2). Fix the cause above: a "
        f"mistake in the configuration or the code, which no retry mends."
    )
    with pytest.raises(tether.StartupError, match=exactly(expected)):
        async with lc.run():
            pass  # pragma: no cover - it fails to start
    assert calls == [1]


def test_a_driver_not_installed_is_left_to_the_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the driver SQLAlchemy cannot say which options it takes: the declaration
    passes, and the startup says what is missing, as before."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # `import asyncpg` fails
    lc = tether.Lifecycle()
    tsa.engine(lc, "postgresql+asyncpg://app@127.0.0.1:1/app", pool_recylce=3600)
    assert "engine" in lc.resources


@pytest.mark.parametrize("fn", ["engine", "sync_engine"])
def test_a_pool_built_beforehand_is_refused_naming_the_options_to_pass(fn: str) -> None:
    from sqlalchemy.pool import QueuePool

    declare = getattr(tsa, fn)
    url = "sqlite+aiosqlite://" if fn == "engine" else "sqlite://"
    for given in (url, lambda: url):  # a URL from a function too: nothing needs it
        with pytest.raises(TypeError) as caught:
            declare(tether.Lifecycle(), given, pool=QueuePool(lambda: None))
        assert str(caught.value) == (
            f"Engine 'engine': pool= is not an option of {fn}(): tether builds the engine's "
            "pool itself, to bound, count and watch its connections. Pass the pool's options "
            "instead (pool_size=, max_overflow=, pool_timeout=, pool_recycle=), or "
            "poolclass=NullPool for no pool."
        )


@pytest.mark.parametrize("fn", ["session", "sync_session"])
def test_a_session_on_an_engine_of_another_lifecycle_says_so(fn: str) -> None:
    other = tether.Lifecycle()
    made = tsa.engine if fn == "session" else tsa.sync_engine
    engine = made(other, "sqlite+aiosqlite://" if fn == "session" else "sqlite://")
    with pytest.raises(TypeError) as caught:
        getattr(tsa, fn)(tether.Lifecycle(), engine)
    assert str(caught.value) == (
        f"{fn}(): the engine resource 'engine' was declared on another Lifecycle than this "
        "session. Declare the engine and its sessions on the same Lifecycle (the one the app's "
        "lifespan runs)."
    )


def test_two_engines_named_alike_are_refused_naming_the_integrations_name() -> None:
    lc = tether.Lifecycle()
    tsa.engine(lc, "sqlite+aiosqlite://")
    with pytest.raises(tether.DuplicateResourceError) as caught:
        tsa.sync_engine(lc, "sqlite://")
    assert "tsa.sync_engine(lc, url, name='sync_engine')" in str(caught.value)
    tsa.sync_engine(lc, "sqlite://", name="sync_engine")  # the fix it names


def test_two_sessions_named_alike_are_refused_naming_the_sessions_name() -> None:
    """Before, the message named the engines' fix (sync_engine(name=...)) for sessions too."""
    lc = tether.Lifecycle()
    tsa.session(lc, tsa.engine(lc, "sqlite+aiosqlite://"))
    sync_engine = tsa.sync_engine(lc, "sqlite://", name="sync_engine")
    with pytest.raises(tether.DuplicateResourceError) as caught:
        tsa.sync_session(lc, sync_engine)
    assert str(caught.value) == (
        "A resource named 'session' is already registered on this Lifecycle. Give one of them "
        "another name: @lc.resource(name=...), or name= of the integration that declared it "
        "(e.g. tsa.sync_session(lc, sync_engine, name='sync_session') beside tsa.session(), "
        "both named 'session' by default)."
    )
    tsa.sync_session(lc, sync_engine, name="sync_session")  # the fix it names


@pytest.mark.parametrize("option", ["busy_timeout", "timeout"])
@pytest.mark.parametrize("fn", ["engine", "sync_engine"])
def test_sqlite_s_busy_timeout_given_as_an_option_names_the_driver_s(fn: str, option: str) -> None:
    """`busy_timeout=` (the aiosqlite integration's option) on an SQLite engine was "did you
    mean pool_timeout=?", which bounds another wait (trial 30)."""
    url = "sqlite+aiosqlite:///x.db" if fn == "engine" else "sqlite:///x.db"
    with pytest.raises(TypeError) as caught:
        getattr(tsa, fn)(tether.Lifecycle(), url, **{option: 5})
    assert str(caught.value) == (
        f"Engine 'engine': {option}= is not an option of {fn}(): SQLite's busy timeout (how "
        f"long a statement waits for a lock another connection holds) is the driver's, "
        f"connect_args={{'timeout': 5}} (in seconds: 5 by default). pool_timeout= bounds the "
        f"wait for one of the pool's connections."
    )
