"""The integrations given the wrong thing: refused at declaration (or, for a function's
value, at startup), with what was passed (its password hidden) and what to pass. None of
these needs a server: each is refused before anything connects."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import tether
from tests.unit._messages import exactly
from tether._errors import redact
from tether.integrations import aiosqlite as tsqlite
from tether.integrations import asyncpg as tpg
from tether.integrations import httpx as thttpx
from tether.integrations import psycopg as tpsycopg
from tether.integrations import redis as tredis
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.anyio

_UNSET = (
    "{where}: the {what} is None: is the setting it is read from (an environment variable) "
    "set? Set it, or pass the {what} itself; a function, e.g. {example}, reads it when the "
    "app starts."
)


@pytest.mark.parametrize(
    ("make", "where", "what", "example"),
    [
        (tpg.pool, "Pool 'pool'", "DSN", "lambda: os.environ['DATABASE_URL']"),
        (tpsycopg.pool, "Pool 'pool'", "conninfo", "lambda: os.environ['DATABASE_URL']"),
        (tredis.client, "Redis client 'redis'", "URL", "lambda: os.environ['REDIS_URL']"),
        (tsa.engine, "Engine 'engine'", "URL", "lambda: os.environ['DATABASE_URL']"),
    ],
    ids=["asyncpg", "psycopg", "redis", "sqlalchemy"],
)
def test_an_unset_dsn_is_refused_at_declaration(
    make: Callable[..., Any], where: str, what: str, example: str
) -> None:
    lc = tether.Lifecycle()
    message = _UNSET.format(where=where, what=what, example=example)
    with pytest.raises(ValueError, match=exactly(message)):
        make(lc, None)
    assert lc.resources == {}


async def test_a_dsn_function_returning_none_fails_startup_saying_so() -> None:
    lc = tether.Lifecycle()
    tpg.pool(lc, lambda: None, retries=2, backoff=0)  # type: ignore[arg-type, return-value]
    cause = (
        "ValueError: Pool 'pool': the function given for the DSN returned None: is the "
        "setting it is read from (an environment variable) set? Set it, or pass the DSN "
        "itself; a function, e.g. lambda: os.environ['DATABASE_URL'], reads it when the app "
        "starts"
    )
    with pytest.raises(
        tether.StartupError,
        match=exactly(
            f"App resource 'pool' failed to open: {cause}. The resources already open were "
            f"closed. It was not retried (retries=2). Fix the cause above: a mistake in the "
            f"configuration or the code, which no retry mends."
        ),
    ):
        async with lc.run():
            pass  # pragma: no cover


def test_redact_takes_anything() -> None:
    assert redact(None) == "None"
    assert redact(b"x") == "b'x'"


@pytest.mark.parametrize(
    ("declare", "error", "message"),
    [
        (
            lambda lc: tpg.pool(lc, "postgresql://h/db", acquire_timeout="5"),
            TypeError,
            "Pool 'pool': acquire_timeout='5' is a str, not a number of seconds. Pass a "
            "positive number, e.g. acquire_timeout=5 (a setting read from the environment is "
            "a string: convert it with float()).",
        ),
        (
            lambda lc: tpg.pool(lc, "postgresql://h/db", max_size="10"),
            TypeError,
            "Pool 'pool': max_size='10' is a str, not a whole number. Pass a whole number, "
            "e.g. max_size=10 (a setting read from the environment is a string: convert it "
            "with int()).",
        ),
        (
            lambda lc: tpsycopg.pool(lc, "postgresql://h/db", timeout="5"),
            TypeError,
            "Pool 'pool': timeout='5' is a str, not a number of seconds. Pass a positive "
            "number of seconds, e.g. timeout=5 (a setting read from the environment is a "
            "string: convert it with float()).",
        ),
        (
            lambda lc: thttpx.client(lc, timeout=-1),
            ValueError,
            "HTTP client 'http': timeout=-1 must be a positive number of seconds (or None).",
        ),
        (
            lambda lc: thttpx.client(lc, timeout="10"),
            TypeError,
            "HTTP client 'http': timeout='10' is a str, not a number of seconds. Pass a "
            "positive number of seconds (or None), e.g. timeout=10 (a setting read from the "
            "environment is a string: convert it with float()).",
        ),
        (
            lambda lc: tredis.client(lc, "redis://h", max_connections=0),
            ValueError,
            "Redis client 'redis': max_connections=0 must be 1 or more (or None).",
        ),
        (
            lambda lc: tsqlite.database(lc, "x.db", busy_timeout="5"),
            TypeError,
            "database('database'): busy_timeout='5' is a str, not a number of seconds. Pass a "
            "number of seconds >= 0, e.g. busy_timeout=5 (a setting read from the environment "
            "is a string: convert it with float()).",
        ),
    ],
    ids=[
        "asyncpg-acquire_timeout",
        "asyncpg-max_size",
        "psycopg-timeout",
        "httpx-negative",
        "httpx-str",
        "redis",
        "aiosqlite",
    ],
)
def test_integration_numbers_are_checked_at_declaration(
    declare: Callable[[tether.Lifecycle], Any], error: type[Exception], message: str
) -> None:
    lc = tether.Lifecycle()
    with pytest.raises(error, match=exactly(message)):
        declare(lc)
    assert lc.resources == {}


@pytest.mark.parametrize(
    ("module", "param", "example"),
    [
        (tpg, "pool", "tether.integrations.asyncpg.pool(lc, dsn)"),
        (tpsycopg, "pool", "tether.integrations.psycopg.pool(lc, conninfo)"),
    ],
    ids=["asyncpg", "psycopg"],
)
def test_a_connection_given_a_dsn_instead_of_its_pool(
    module: Any, param: str, example: str
) -> None:
    driver = module.__name__.rsplit(".", 1)[1]
    with pytest.raises(
        TypeError,
        match=exactly(
            f"tether.integrations.{driver}.connection(name='conn'): "
            f"pool='postgresql://u:***@h/db' is not a resource but a string. Declare the pool "
            f"first and pass the resource tether.integrations.{driver}.pool() returns: "
            f"`pool = {example}`, then pass pool."
        ),
    ):
        module.connection(tether.Lifecycle(), "postgresql://u:hunter2@h/db")


def test_a_connection_given_the_database_of_another_lifecycle(tmp_path: Path) -> None:
    lc1, lc2 = tether.Lifecycle(), tether.Lifecycle()
    db1 = tsqlite.database(lc1, tmp_path / "one.db")
    tsqlite.database(lc2, tmp_path / "two.db")  # the same name, on lc2
    with pytest.raises(
        TypeError,
        match=exactly(
            "tether.integrations.aiosqlite.connection(name='conn'): the database resource "
            "'database' is registered on another Lifecycle than the one given. Pass a "
            "database of this Lifecycle: declare it on the Lifecycle its dependents use "
            '(`database = tether.integrations.aiosqlite.database(lc, "notes.db")`).'
        ),
    ):
        tsqlite.connection(lc2, db1, name="conn")


def test_a_pool_of_another_lifecycle() -> None:
    lc1, lc2 = tether.Lifecycle(), tether.Lifecycle()
    pool = tpg.pool(lc1, "postgresql://h/db")
    with pytest.raises(TypeError, match="registered on another Lifecycle than the one given"):
        tpg.connection(lc2, pool)


def test_an_aiosqlite_connection_of_a_sqlalchemy_engine(tmp_path: Path) -> None:
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(
        TypeError,
        match=exactly(
            "tether.integrations.aiosqlite.connection(name='connection'): the database "
            "resource 'engine' is a SQLAlchemy resource of tether.integrations.sqlalchemy, not "
            "a database made by tether.integrations.aiosqlite.database(). Pass one made by "
            "tether.integrations.aiosqlite.database() (`database = "
            'tether.integrations.aiosqlite.database(lc, "notes.db")`), or use the integration '
            "that made 'engine' to use it."
        ),
    ):
        tsqlite.connection(lc, engine)  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", ["session", "sync_session"])
def test_a_session_of_an_asyncpg_pool(fn: str) -> None:
    """A session given another integration's pool was accepted, to fail at its first use
    with `AttributeError: 'Pool' object has no attribute 'sync_engine'`; a sync_session
    asked for concurrency=, which moved the failure to the first request (trial 16)."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, "postgresql://u:pw@h/db")
    maker = "engine" if fn == "session" else "sync_engine"
    with pytest.raises(
        TypeError,
        match=exactly(
            f"{fn}(): the engine resource 'pool' is an asyncpg resource of "
            f"tether.integrations.asyncpg, not an engine made by "
            f"tether.integrations.sqlalchemy.{maker}(). Pass one made by "
            f"tether.integrations.sqlalchemy.{maker}() (`engine = "
            f"tether.integrations.sqlalchemy.{maker}(lc, url)`), or use the integration that "
            f"made 'pool' to use it."
        ),
    ):
        getattr(tsa, fn)(lc, pool)
    assert list(lc.resources) == ["pool"]


def test_a_session_given_a_url_hides_its_password() -> None:
    with pytest.raises(
        TypeError,
        match=exactly(
            "session(): `engine` must be the resource returned by engine()/sync_engine() (or "
            "another resource) on this Lifecycle, not 'postgresql+asyncpg://u:***@h/db'."
        ),
    ):
        tsa.session(tether.Lifecycle(), "postgresql+asyncpg://u:hunter2@h/db")  # type: ignore[arg-type]


def test_a_sync_session_of_an_async_engine(tmp_path: Path) -> None:
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(
        TypeError,
        match=exactly(
            "sync_session(): the engine resource 'engine' is an async engine, made by "
            "engine(), and sync_session() needs the other kind. Use session() with it, or "
            "declare the engine with sync_engine()."
        ),
    ):
        tsa.sync_session(lc, engine)  # type: ignore[arg-type]


def test_an_async_engine_of_a_sync_driver() -> None:
    with pytest.raises(
        ValueError,
        match=exactly(
            "Engine 'engine': 'sqlite' is a sync driver, and engine() makes an async engine, "
            "which needs an async driver: use 'sqlite+aiosqlite' in the URL (e.g. "
            "'sqlite+aiosqlite:///x.db'), or declare a sync engine with sync_engine()."
        ),
    ):
        tsa.engine(tether.Lifecycle(), "sqlite:///x.db")


async def test_an_async_engine_of_a_sync_driver_from_a_function() -> None:
    lc = tether.Lifecycle()
    tsa.engine(lc, lambda: "postgresql+pg8000://u:hunter2@h/db")
    with pytest.raises(tether.StartupError) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert str(info.value) == (
        "App resource 'engine' failed to open: ValueError: Engine 'engine': "
        "'postgresql+pg8000' is a sync driver, and engine() makes an async engine, which "
        "needs an async driver: use 'postgresql+asyncpg' or 'postgresql+psycopg' in the URL "
        "(e.g. 'postgresql+asyncpg://u:***@h/db'), or declare a sync engine with "
        "sync_engine(). The resources already open were closed. Fix the cause above: a "
        "mistake in the configuration or the code, which no retry mends."
    )


@pytest.mark.parametrize(
    ("url", "path"),
    [("sqlite:///notes.db", "notes.db"), ("sqlite+aiosqlite:////srv/x.db", "/srv/x.db")],
)
def test_an_aiosqlite_database_given_a_sqlalchemy_url(url: str, path: str) -> None:
    with pytest.raises(
        ValueError,
        match=exactly(
            f"database('database'): {url!r} is a SQLAlchemy URL, not a path: SQLite would "
            f"create a file named after it. Pass the file's path, e.g. {path!r} (or use "
            f"tether.integrations.sqlalchemy.engine() for a URL)."
        ),
    ):
        tsqlite.database(tether.Lifecycle(), url)


@pytest.mark.parametrize("declare", [tsa.engine, tsa.sync_engine], ids=["engine", "sync_engine"])
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"pool_size": "5"},
            TypeError,
            "Engine 'engine': pool_size='5' is a str, not a whole number. Pass 1 or more, e.g. "
            "pool_size=5 (a setting read from the environment is a string: convert it with "
            "int()).",
        ),
        (
            {"pool_timeout": 0},
            ValueError,
            "Engine 'engine': pool_timeout=0 must be a positive number of seconds.",
        ),
        (
            {"max_waiting": -1},
            ValueError,
            "Engine 'engine': max_waiting=-1 must be 0 or more (or None).",
        ),
    ],
    ids=["pool_size-str", "pool_timeout-0", "max_waiting-negative"],
)
def test_sqlalchemy_engine_numbers_are_checked_at_declaration(
    declare: Callable[..., Any], options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Before, a string `pool_size` from the environment failed only at startup, inside
    SQLAlchemy's pool, and a zero `pool_timeout` made every busy moment a 503."""
    lc = tether.Lifecycle()
    url = "sqlite+aiosqlite:///x.db" if declare is tsa.engine else "sqlite:///x.db"
    with pytest.raises(error, match=exactly(message)):
        declare(lc, url, **options)
    assert lc.resources == {}


# ------------------------------------------------- URLs SQLAlchemy cannot read or has no dialect

_NO_DIALECT = (
    "Engine 'engine': SQLAlchemy has no dialect {driver!r} (NoSuchModuleError: Can't load "
    "plugin: sqlalchemy.dialects:{plugin}), so no engine can be made, and no retry mends "
    "that. {fix}"
)


def _postgres_fix(wanted: str) -> str:
    return (
        "SQLAlchemy names PostgreSQL's dialect 'postgresql' (a postgres:// URL, as hosting "
        "platforms give it, is read by libpq and asyncpg, not SQLAlchemy): use "
        f"{wanted}://..., e.g. lambda: os.environ['DATABASE_URL'].replace('postgres://', "
        f"'{wanted}://', 1)."
    )


@pytest.mark.parametrize(
    ("make", "url", "driver", "plugin", "fix"),
    [
        (tsa.engine, "postgres://u:hunter2@h/db", "postgres", "postgres", _postgres_fix("postgresql+asyncpg")),
        (tsa.sync_engine, "postgres://u:hunter2@h/db", "postgres", "postgres", _postgres_fix("postgresql+psycopg")),
        (tsa.engine, "postgresql+asyncpgg://u:hunter2@h/db", "postgresql+asyncpgg", "postgresql.asyncpgg", "Did you mean 'postgresql+asyncpg'?"),
        (tsa.sync_engine, "postgresq://u:hunter2@h/db", "postgresq", "postgresq", "Did you mean 'postgresql'?"),
        (tsa.engine, "foo+bar://h/db", "foo+bar", "foo.bar", "SQLAlchemy's own are 'mariadb', 'mssql', 'mysql', 'oracle', 'postgresql', 'sqlite'; another needs its package installed."),
    ],
)  # fmt: skip
def test_a_dialect_sqlalchemy_has_not_is_refused_at_declaration(
    make: Callable[..., Any], url: str, driver: str, plugin: str, fix: str
) -> None:
    """It was retried as the app started (retries=3: 7 s), then blamed on a database "slow
    to come up"."""
    with pytest.raises(ValueError) as info:
        make(tether.Lifecycle(), url)
    assert str(info.value) == _NO_DIALECT.format(driver=driver, plugin=plugin, fix=fix)
    assert "hunter2" not in str(info.value)


async def test_a_dialect_sqlalchemy_has_not_from_a_function_is_not_retried() -> None:
    lc = tether.Lifecycle()
    calls: list[int] = []

    def url() -> str:
        calls.append(1)
        return "postgres://u:hunter2@h/db"

    tsa.engine(lc, url, retries=3, backoff=5)
    with pytest.raises(tether.StartupError) as info:
        async with lc.run():
            pass  # pragma: no cover
    fix = _postgres_fix("postgresql+asyncpg")
    said = _NO_DIALECT.format(driver="postgres", plugin="postgres", fix=fix)
    assert str(info.value) == (
        f"App resource 'engine' failed to open: ValueError: {said[:-1]}. The resources "
        f"already open were closed. Fix the cause above: a mistake in the configuration or "
        f"the code, which no retry mends."
    )
    assert calls == [1]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (
            "postgresql+asyncpg://u:hunter2@h:54x/db",
            "its port is not a number, or a password holding '/', '?', '#' or '@' is not "
            "URL-encoded (%2F, %3F, %23, %40)",
        ),
        (
            "not a url",
            "ArgumentError: Could not parse SQLAlchemy URL from given URL string",
        ),
    ],
)
def test_a_url_sqlalchemy_cannot_read_is_refused_at_declaration(url: str, why: str) -> None:
    """SQLAlchemy's own error (which quotes the port) came as the app started."""
    with pytest.raises(ValueError) as info:
        tsa.engine(tether.Lifecycle(), url)
    assert str(info.value) == (
        f"Engine 'engine': the URL is one SQLAlchemy cannot read: {why}. No engine can be "
        f"made with it, and no retry mends that. Pass dialect+driver://user:password@host:"
        f"port/database, e.g. 'postgresql+asyncpg://app:pw@db:5432/app' (or build one from "
        f"its parts with sqlalchemy.engine.URL.create, which encodes the password)."
    )
    assert "hun" not in str(info.value)


@pytest.mark.parametrize("make", [tsa.engine, tsa.sync_engine])
async def test_an_option_value_sqlalchemy_refuses_as_it_connects_is_not_retried(
    make: Callable[..., Any], tmp_path: Path
) -> None:
    """SQLAlchemy's ArgumentError for an option's value, raised as the first connection is
    made: it was retried, and blamed on a database slow to come up."""
    lc = tether.Lifecycle()
    driver = "sqlite+aiosqlite" if make is tsa.engine else "sqlite"
    url = f"{driver}:///{tmp_path / 'x.db'}"
    make(lc, lambda: url, retries=3, backoff=5, isolation_level="BOGUS")
    with pytest.raises(tether.StartupError) as info:
        with anyio.fail_after(4):  # no backoff of 5 s
            async with lc.run():
                pass  # pragma: no cover
    assert str(info.value).startswith(
        "App resource 'engine' failed to open: ArgumentError: Invalid value 'BOGUS' for "
        "isolation_level."
    )
    assert str(info.value).endswith(
        "Fix the cause above: a mistake in the configuration or the code, which no retry mends."
    )


@pytest.mark.parametrize(
    ("module", "make"),
    [
        (tsa, lambda lc: tsa.session(lc, tsa.engine(lc, "sqlite+aiosqlite:///x.db"))),
        (tpg, lambda lc: tpg.connection(lc, tpg.pool(lc, "postgresql://h/db"))),
        (tpsycopg, lambda lc: tpsycopg.connection(lc, tpsycopg.pool(lc, "postgresql://h/db"))),
    ],
    ids=["sqlalchemy", "asyncpg", "psycopg"],
)
def test_rolled_back_entered_with_a_plain_with_says_how_from_a_sync_test(
    module: Any, make: Callable[[tether.Lifecycle], Any]
) -> None:
    """`with tsa.rolled_back(session):` in a sync test, the natural spelling beside
    TestClient, was "'_AsyncGeneratorContextManager' object does not support the context
    manager protocol"."""
    res = make(tether.Lifecycle())
    with pytest.raises(TypeError) as caught:
        with module.rolled_back(res):
            pass  # pragma: no cover
    what = f"rolled_back({res.name})"
    assert str(caught.value) == (
        f"{what} is an async context manager: `async with {what} as conn:` in an async test. "
        f"Beside TestClient, in a sync test, enter it through the client's portal, inside "
        f"`with TestClient(app) as client:`: `with "
        f"client.portal.wrap_async_context_manager({what}) as conn:`."
    )


def test_redis_errors_of_tethers_keep_their_message_in_repr() -> None:
    """redis-py's errors repr as "network:ConnectionError": a `log.warning("%r", exc)` of
    tether's RedisUnavailable printed "network:RedisUnavailable", the message lost."""
    gone = tredis.RedisUnavailable("'redis' is unavailable now. Retry later.", resource="redis")
    said = "'redis' is unavailable now. Retry later."
    assert repr(gone) == f"RedisUnavailable({said!r})"
    slow = tredis.RedisTimeout("connecting timed out", resource="redis")
    assert repr(slow) == "RedisTimeout('connecting timed out')"
