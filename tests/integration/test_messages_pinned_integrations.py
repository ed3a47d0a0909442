"""Messages of the aiosqlite, httpx and Redis integrations that no test pinned before, each
triggered as a user meets it, and its text (the thing it names, the cause, the fix)
asserted. None needs a server: every one is refused before a connection is made."""

import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

import tether
from tests.unit._messages import exactly, misconfigured
from tether.integrations import aiosqlite as tsqlite
from tether.integrations import httpx as thttpx
from tether.integrations import redis as tredis

pytestmark = pytest.mark.anyio

SQLITE_NONE = (
    "database({name!r}): the path is None: is the setting it is read from (an environment "
    'variable) set? Pass the file\'s path, e.g. "notes.db", or a function returning it.'
)


# ------------------------------------------------------------------ aiosqlite: an unset path


@pytest.mark.parametrize(
    ("declare", "name"),
    [
        (lambda lc: tsqlite.database(lc, None), "database"),  # type: ignore[arg-type]
        (lambda lc: tsqlite.connection(lc, None), "connection_database"),  # type: ignore[arg-type]
    ],
    ids=["database", "connection"],
)
def test_aiosqlite_path_that_is_none_is_refused_where_it_is_declared(
    declare: Callable[[tether.Lifecycle], Any], name: str
) -> None:
    """`database(lc, os.environ.get("DB_PATH"))` with the variable unset: refused at once,
    naming the resource and the likely cause (before SQLite could make a file of it)."""
    lc = tether.Lifecycle()
    with pytest.raises(ValueError, match=exactly(SQLITE_NONE.format(name=name))):
        declare(lc)
    assert lc.resources == {}


async def test_aiosqlite_path_function_returning_none_fails_the_start() -> None:
    """The same None, returned by the function given for the path, fails the start naming
    the resource, as a mistake no retry mends."""
    lc = tether.Lifecycle()
    tsqlite.database(lc, lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(
        tether.StartupError,
        match=misconfigured(
            "database", "ValueError: " + SQLITE_NONE.format(name="database").removesuffix(".")
        ),
    ):
        async with lc.run():
            pass  # pragma: no cover


async def test_aiosqlite_database_that_cannot_use_wal_says_what_that_costs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database where SQLite cannot switch to WAL (a VFS without shared memory, as on
    some network filesystems) opens, and the log names it, the mode it stays in, the likely
    cause and the cost."""
    lc = tether.Lifecycle()
    path = f"file:{tmp_path}/notes.db?vfs=unix-none"
    conn = tsqlite.connection(lc, path)
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            async with lc.scope() as s:
                await (await s.get(conn)).execute("SELECT 1")
    said = [r.getMessage() for r in caplog.records if "journal_mode" in r.getMessage()]
    assert said == [
        f"tether: database 'connection_database' ({path}) stays in journal_mode=delete, not "
        f"WAL (a filesystem without shared memory?); writers block readers."
    ]


# ------------------------------------------------------------------ httpx: an unset base_url


def test_httpx_base_url_that_is_none_is_refused_where_it_is_declared() -> None:
    """`client(lc, base_url=os.environ.get("API_URL"))` with the variable unset: refused,
    naming the client, the likely cause and both fixes."""
    lc = tether.Lifecycle()
    with pytest.raises(
        ValueError,
        match=exactly(
            "HTTP client 'billing': base_url is None: is the setting it is read from (an "
            'environment variable) set? Pass the URL, e.g. base_url="https://api.example.com", '
            "or a function returning it, or leave base_url out for absolute request URLs."
        ),
    ):
        thttpx.client(lc, name="billing", base_url=None)  # type: ignore[arg-type]
    assert lc.resources == {}


# ------------------------------------------------------------------ Redis: a URL not a string


def test_redis_url_that_is_a_mapping_is_refused_where_it_is_declared() -> None:
    """A mapping of connection settings where the URL goes: refused naming the type only
    (a mapping holds the password), with the fix."""
    lc = tether.Lifecycle()
    with pytest.raises(
        TypeError,
        match=exactly(
            "Redis client 'cache': the URL must be a string or a function returning one, not "
            "a dict; build the URL string from it, or pass e.g. "
            "lambda: os.environ['REDIS_URL']."
        ),
    ) as info:
        tredis.client(lc, {"host": "cache", "password": "hunter2-secret"}, name="cache")  # type: ignore[arg-type]
    assert "hunter2" not in str(info.value)


async def test_redis_url_function_returning_a_mapping_fails_the_start() -> None:
    """The function given for the URL returns a mapping: the start fails naming the client,
    what the function returned (its type, never its value) and the fix, with no retry
    advice."""
    lc = tether.Lifecycle()
    settings = {"host": "cache", "password": "hunter2-secret"}
    tredis.client(lc, lambda: settings, name="cache")  # type: ignore[arg-type,return-value]
    with pytest.raises(
        tether.StartupError,
        match=misconfigured(
            "cache",
            "TypeError: Redis client 'cache': the function given for the URL returned a dict, "
            "not a string: return the URL string, e.g. lambda: os.environ['REDIS_URL']",
        ),
    ) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert "hunter2" not in str(info.value)


async def test_an_optional_client_refused_for_good_says_it_is_tried_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`required=False`: a refusal no retry mends (a SecretStr where the URL goes) lets the
    app start, and the log says, once, that it is retried only once a minute, until the
    cause named is fixed."""
    lc = tether.Lifecycle()
    secret = SecretStr("redis://:pw@cache")
    tredis.client(lc, lambda: secret, required=False, backoff=0.05)  # type: ignore[arg-type,return-value]
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            await anyio.sleep(0.3)  # several backoffs: the refusal is said once
    refused = [r.getMessage() for r in caplog.records if "no retry mends" in r.getMessage()]
    assert refused == [
        "tether: app resource 'redis': TypeError: Redis client 'redis': the function given "
        "for the URL returned a SecretStr, not a string: return its get_secret_value(), e.g. "
        "lambda: settings.redis_url.get_secret_value() (str() of a SecretStr is the mask "
        "'**********', not the URL); no retry mends that: tried again once a minute, until "
        "it is fixed"
    ]


# ------------------------------------------------------------------ an integration without its extra


@pytest.mark.parametrize(
    ("module", "needs", "message"),
    [
        (
            "tether.integrations.aiosqlite",
            "aiosqlite",
            "tether.integrations.aiosqlite needs aiosqlite: pip install 'tether[aiosqlite]'",
        ),
        (
            "tether.integrations.httpx",
            "httpx",
            "tether.integrations.httpx needs httpx: pip install 'tether[httpx]'",
        ),
        (
            "tether.integrations.redis",
            "redis",
            "tether.integrations.redis needs redis-py: pip install 'tether[redis]'",
        ),
    ],
    ids=["aiosqlite", "httpx", "redis"],
)
def test_an_integration_without_its_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch, module: str, needs: str, message: str
) -> None:
    """Importing an integration whose driver is not installed names the package and the pip
    command (the driver's ImportError is chained)."""
    for name in list(sys.modules):
        if name == needs or name.startswith(f"{needs}."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, needs, None)  # what Python does for a missing package
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=exactly(message)) as info:
        importlib.import_module(module)
    assert isinstance(info.value.__cause__, ImportError)


# ----------------------------------------------------- check= neither True, False nor a function

_CHECK = (
    "{where}: check={given!r} is {a}, not True, False or a function. Pass True ({default}), "
    "False (no health check), or a function of the {of} that raises when it is unhealthy (sync "
    "or async), e.g. check={example}{hint}."
)
_FROM_ENV = (
    " (a setting read from the environment is a string, and 'false' would count as true: "
    'convert it, e.g. check=os.environ.get(...) == "1")'
)


@pytest.mark.parametrize(
    ("integration", "where", "default", "of", "example"),
    [
        ("asyncpg", "Pool 'pool'", "SELECT 1 on a connection of the pool", "pool",
         'lambda pool: pool.fetchval("SELECT 1")'),
        ("psycopg", "Pool 'pool'", "SELECT 1 on a connection of the pool", "pool",
         "lambda pool: pool.check() (psycopg_pool's own check of its idle connections)"),
        ("redis", "Redis client 'redis'", "PING", "client", 'lambda r: r.get("health")'),
        ("httpx", "HTTP client 'http'", "the client is open, and health_url answers if given",
         "client", 'lambda client: client.get("/health")'),
        ("aiosqlite", "database('database')",
         "reads the file's schema version on a new connection", "Database",
         "lambda db: os.stat(db.path)"),
        ("sqlalchemy", "Engine 'engine'", "SELECT 1 on a connection of the engine", "engine",
         "ping, with `async def ping(engine)` running a statement through `engine.connect()`"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("given", [5, "false"])
def test_a_check_that_is_no_choice_is_refused_with_this_integrations_example(
    integration: str, where: str, default: str, of: str, example: str, given: Any
) -> None:
    """Each integration's ``check=`` takes True (its own check), False or a function: anything
    else is refused when declared, with the choices and an example for that integration
    (before: lc.resource's "is not callable" with an asyncpg example for every integration,
    and SQLAlchemy's "not a bool", which left the function out)."""
    from tether.integrations import aiosqlite, asyncpg, httpx, psycopg, redis, sqlalchemy

    declare = {
        "asyncpg": lambda lc: asyncpg.pool(lc, "postgresql://u@h/d", check=given),
        "psycopg": lambda lc: psycopg.pool(lc, "postgresql://u@h/d", check=given),
        "redis": lambda lc: redis.client(lc, "redis://h", check=given),
        "httpx": lambda lc: httpx.client(lc, check=given),
        "aiosqlite": lambda lc: aiosqlite.database(lc, "x.db", check=given),
        "sqlalchemy": lambda lc: sqlalchemy.engine(lc, "sqlite+aiosqlite:///x", check=given),
    }[integration]
    lc = tether.Lifecycle()
    with pytest.raises(TypeError) as caught:
        declare(lc)
    assert str(caught.value) == _CHECK.format(
        where=where,
        given=given,
        a="an int" if given == 5 else "a str",
        default=default,
        of=of,
        example=example,
        hint="" if given == 5 else _FROM_ENV,
    )
    assert not lc.resources


async def test_a_base_url_function_returning_no_string_is_named_whole_in_the_startup_error() -> (
    None
):
    """The example in a cause ending a sentence inside StartupError's is kept whole (before:
    its trailing dots stripped, "e.g. https://."), and "an int" is said so (not "a int")."""
    lc = tether.Lifecycle()
    thttpx.client(lc, base_url=lambda: 5)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover
    assert str(caught.value).startswith(
        "App resource 'http' failed to open: TypeError: HTTP client 'http': the function given "
        "for the base_url returned an int, not a string: return the base_url string, e.g. "
        '"https://api.example.com". The resources already open were closed.'
    )


def test_unstopped_drops_one_full_stop_not_an_ellipsis() -> None:
    from tether._errors import unstopped

    assert unstopped("refused.") == "refused"
    assert unstopped("e.g. https://...") == "e.g. https://..."
    assert unstopped("no stop") == "no stop"


@pytest.mark.parametrize(
    ("declare", "error", "message"),
    [
        (
            lambda lc: thttpx.client(lc, base_url="https://api.example.com", health_url=5),
            TypeError,
            "HTTP client 'http': health_url=5 is an int, not a URL: pass the path (relative to "
            'base_url) or the URL the check GETs, e.g. health_url="/health".',
        ),
        (
            lambda lc: tsqlite.connection(lc, "x.db", row_factory=5),
            TypeError,
            "connection('connection'): row_factory=5 is not callable: pass a function of the "
            "cursor and the row, as sqlite3 takes it (e.g. row_factory=sqlite3.Row, the "
            "default), or None for tuples.",
        ),
        (
            lambda lc: tsqlite.database(lc, 5),
            TypeError,
            "database('database'): the path is an int (5), not a path: pass the file's path (a "
            'str or a pathlib.Path), e.g. "notes.db", or a function returning it.',
        ),
    ],
    ids=["httpx-health_url", "aiosqlite-row_factory", "aiosqlite-path"],
)
def test_an_option_of_the_wrong_kind_is_refused_when_declared(
    declare: Callable[[tether.Lifecycle], object], error: type[Exception], message: str
) -> None:
    """Before: accepted, and failing later (every readiness check; the first query)."""
    lc = tether.Lifecycle()
    with pytest.raises(error) as caught:
        declare(lc)
    assert str(caught.value) == message


def test_check_none_means_no_health_check_for_every_integration() -> None:
    """``check=None`` is accepted as ``False`` is (lc.resource's own default: no check), as it
    was before the choices were checked."""
    from tether.integrations import aiosqlite, asyncpg, httpx, psycopg, redis, sqlalchemy

    lc = tether.Lifecycle()
    declared = [
        asyncpg.pool(lc, "postgresql://u@h/d", check=None, name="a"),
        psycopg.pool(lc, "postgresql://u@h/d", check=None, name="p"),
        redis.client(lc, "redis://h", check=None, name="r"),
        httpx.client(lc, check=None, name="h"),
        aiosqlite.database(lc, "x.db", check=None, name="q"),
        sqlalchemy.engine(lc, "sqlite+aiosqlite:///x", check=None, name="s"),
    ]
    assert [res.check for res in declared] == [None] * 6


# ------------------------------------------------------------- lc.stats().pools: a wrong name


async def test_a_pool_name_stats_has_not_names_the_open_pools(tmp_path: Path) -> None:
    """`lc.stats().pools["db"]` for a pool named `database` was a bare `KeyError: 'db'`."""
    lc = tether.Lifecycle()
    tsqlite.database(lc, tmp_path / "app.db")
    async with lc.run():
        with pytest.raises(KeyError) as info:
            lc.stats().pools["databse"]
    assert info.value.args == (
        "No pool named 'databse' in lc.stats().pools, which lists the open driver pools of "
        "tether's integrations, by resource name: 'database'. Did you mean 'database'?",
    )
