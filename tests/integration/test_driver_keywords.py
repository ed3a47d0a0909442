"""A misspelt keyword argument of the drivers' declarations (asyncpg's and psycopg's
`pool()`, psycopg's `kwargs=`, redis' `client()`, aiosqlite's `connection()`) is refused
where it is called, naming it, the driver's version and the close match, not when the app
starts (as the driver's own "unexpected keyword argument", or libpq's "invalid connection
option" retried as an outage); and every option the drivers take still passes. No server
is contacted at the declaration."""

import inspect
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import psycopg_pool
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

import tether
from tests.serving import dead_port
from tests.unit._messages import exactly, misconfigured
from tether.integrations import aiosqlite as taiosqlite
from tether.integrations import asyncpg as tasyncpg
from tether.integrations import psycopg as tpsycopg
from tether.integrations import redis as tredis

pytestmark = pytest.mark.anyio

DSN = "postgresql://app:secret@127.0.0.1:1/app"
POOL = "Pool 'pool'"
LIBPQ = f"libpq {psycopg.pq.version() // 10000}.{psycopg.pq.version() % 10000}"


def keywords(func: Callable[..., Any]) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(func).parameters.values() if p.kind in kinds}


def asyncpg_unknown(key: str, fix: str) -> str:
    return (
        f"{POOL}: {key}= is not an option of pool() nor of asyncpg.create_pool() or "
        f"asyncpg.connect() (asyncpg {asyncpg.__version__}), which pool() passes its other "
        f"keyword arguments to. {fix}"
    )


def psycopg_unknown(key: str, fix: str) -> str:
    return (
        f"{POOL}: {key}= is not an option of pool() nor of psycopg_pool.AsyncConnectionPool "
        f"(psycopg_pool {psycopg_pool.__version__}), which pool() passes its other keyword "
        f"arguments to. {fix}"
    )


def psycopg_kwargs(key: str, fix: str) -> str:
    return (
        f"{POOL}: kwargs has {key!r}, which is not a connection option of libpq ({LIBPQ}) nor "
        f"of psycopg.AsyncConnection.connect() (psycopg {psycopg.__version__}). {fix}"
    )


def redis_unknown(key: str, fix: str) -> str:
    return (
        f"Redis client 'redis': {key}= is not an option of client() nor of redis-py's "
        f"connection pool or its connections (redis {redis.__version__}), which client() "
        f"passes its other keyword arguments to. {fix}"
    )


def sqlite_unknown(key: str, fix: str) -> str:
    return (
        f"connection('connection'): {key}= is not an option of connection() nor of "
        f"database(), which connection() passes its other keyword arguments to. {fix}"
    )


SQLITE_TRANSACTION = (
    "tether begins and ends the transaction of each unit of work itself (sqlite3's "
    "{} is not taken): choose how it begins with begin='deferred', 'immediate' or "
    "'exclusive', or remove it."
)


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        pytest.param(
            lambda lc: tasyncpg.pool(lc, DSN, comand_timeout=5),
            asyncpg_unknown("comand_timeout", "Did you mean command_timeout=? Fix or remove it."),
            id="asyncpg-connect",
        ),
        pytest.param(
            lambda lc: tasyncpg.pool(lc, DSN, max_querys=100),
            asyncpg_unknown("max_querys", "Did you mean max_queries=? Fix or remove it."),
            id="asyncpg-create_pool",
        ),
        pytest.param(
            lambda lc: tasyncpg.pool(lc, DSN, acquire_timout=2),
            asyncpg_unknown("acquire_timout", "Did you mean acquire_timeout=? Fix or remove it."),
            id="asyncpg-own",
        ),
        pytest.param(
            lambda lc: tasyncpg.pool(lc, DSN, zzz=1),
            asyncpg_unknown("zzz", "Remove it."),
            id="asyncpg-no-match",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, max_idel=5),
            psycopg_unknown("max_idel", "Did you mean max_idle=? Fix or remove it."),
            id="psycopg-pool",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, open_timout=5),
            psycopg_unknown("open_timout", "Did you mean open_timeout=? Fix or remove it."),
            id="psycopg-own",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, zzz=1),
            psycopg_unknown("zzz", "Remove it."),
            id="psycopg-no-match",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, open=True),
            f"{POOL}: open= is pool()'s to set: it opens the pool when the app starts and "
            f"closes it at shutdown. Remove it.",
            id="psycopg-open",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, kwargs={"autocomit": True}),
            psycopg_kwargs("autocomit", "Did you mean 'autocommit'? Fix or remove it."),
            id="psycopg-kwargs-psycopg",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, kwargs={"aplication_name": "api"}),
            psycopg_kwargs("aplication_name", "Did you mean 'application_name'? Fix or remove it."),
            id="psycopg-kwargs-libpq",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, kwargs={"database": "app"}),
            psycopg_kwargs("database", "Did you mean 'dbname'? Fix or remove it."),
            id="psycopg-kwargs-database",
        ),
        pytest.param(
            lambda lc: tpsycopg.pool(lc, DSN, kwargs={"zzz": 1}),
            psycopg_kwargs("zzz", "Remove it."),
            id="psycopg-kwargs-no-match",
        ),
        pytest.param(
            lambda lc: tredis.client(lc, "redis://127.0.0.1:1", decode_respones=True),
            redis_unknown("decode_respones", "Did you mean decode_responses=? Fix or remove it."),
            id="redis-connection",
        ),
        pytest.param(
            lambda lc: tredis.client(lc, "redis://127.0.0.1:1", timeout=3),
            redis_unknown("timeout", "Did you mean pool_timeout=? Fix or remove it."),
            id="redis-timeout",
        ),
        pytest.param(
            lambda lc: tredis.client(lc, "redis://127.0.0.1:1", zzz=1),
            redis_unknown("zzz", "Remove it."),
            id="redis-no-match",
        ),
        pytest.param(
            lambda lc: tredis.client(lc, "redis://127.0.0.1:1", queue_class=list),
            "Redis client 'redis': queue_class= is an option of redis-py's "
            "BlockingConnectionPool, which client() makes only given max_connections=. Give "
            "max_connections= (the pool's size), or remove it.",
            id="redis-blocking-only",
        ),
        pytest.param(
            lambda lc: taiosqlite.connection(lc, "app.db", isolaton_level=None),
            sqlite_unknown("isolaton_level", SQLITE_TRANSACTION.format("isolation_level")),
            id="aiosqlite-isolation_level",
        ),
        pytest.param(
            lambda lc: taiosqlite.connection(lc, "app.db", busy_timout=3),
            sqlite_unknown("busy_timout", "Did you mean busy_timeout=? Fix or remove it."),
            id="aiosqlite-database",
        ),
        pytest.param(
            lambda lc: taiosqlite.connection(lc, "app.db", zzz=1),
            sqlite_unknown("zzz", "Remove it."),
            id="aiosqlite-no-match",
        ),
    ],
)
def test_a_misspelt_keyword_is_refused_where_it_is_declared(
    declare: Callable[[tether.Lifecycle], Any], message: str
) -> None:
    with pytest.raises(TypeError, match=exactly(message)):
        declare(tether.Lifecycle())


def test_asyncpg_takes_every_option_of_create_pool_and_connect() -> None:
    """pool()'s other keyword arguments go to create_pool, and from it to each connect:
    each of theirs passes; a custom connect= may take others, so none is refused then."""
    named = keywords(tasyncpg.pool)
    taken = (keywords(asyncpg.create_pool) | keywords(asyncpg.connect)) - {"dsn"} - named
    for option in sorted(taken):
        tasyncpg.pool(tether.Lifecycle(), DSN, **{option: None})
    tasyncpg.pool(tether.Lifecycle(), DSN, connect=asyncpg.connect, custom=1)
    with pytest.raises(TypeError, match=r"^Pool 'pool': comand_timeout= is not an option"):
        tasyncpg.pool(
            tether.Lifecycle(), DSN, connection_class=asyncpg.Connection, comand_timeout=5
        )


def test_psycopg_takes_every_option_of_the_pool_and_of_a_connection() -> None:
    """pool()'s other keyword arguments go to AsyncConnectionPool, and kwargs= to each
    connection: libpq's options and psycopg's connect() own."""
    named = keywords(tpsycopg.pool)
    taken = keywords(psycopg_pool.AsyncConnectionPool.__init__) - {"self", "open"} - named
    for option in sorted(taken):
        tpsycopg.pool(tether.Lifecycle(), DSN, **{option: None})
    libpq = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
    assert {"application_name", "sslmode", "dbname", "options"} <= libpq
    connect = keywords(psycopg.AsyncConnection.connect) - {"conninfo"}
    assert {"autocommit", "prepare_threshold", "row_factory", "cursor_factory"} <= connect
    tpsycopg.pool(tether.Lifecycle(), DSN, kwargs=dict.fromkeys(libpq | connect))
    with pytest.raises(TypeError, match=r"^Pool 'pool': kwargs has 'autocomit', which is not"):
        tpsycopg.pool(tether.Lifecycle(), DSN, kwargs={"autocommit": True, "autocomit": True})


@pytest.mark.parametrize("max_connections", [None, 10])
def test_redis_takes_every_option_of_its_pool_and_connections(max_connections: int | None) -> None:
    """client()'s other keyword arguments go to the pool (a BlockingConnectionPool given
    max_connections) and its connections, TCP, TLS or Unix socket as the URL says; a
    connection_class= may take others, so none is refused then."""
    taken = keywords(aioredis.ConnectionPool.__init__)
    if max_connections is not None:
        taken |= keywords(aioredis.BlockingConnectionPool.__init__)
    for cls in (aioredis.Connection, aioredis.SSLConnection, aioredis.UnixDomainSocketConnection):
        for part in cls.__mro__:  # the connection classes, not their mixins
            if "__init__" in vars(part) and issubclass(part, AbstractConnection):
                taken |= keywords(vars(part)["__init__"])
    taken -= keywords(tredis.client) | {"self", "timeout"}
    assert {"decode_responses", "client_name", "ssl_ca_certs", "path", "username"} <= taken
    values = {"decode_responses": True, "retry_on_timeout": True}
    for option in sorted(taken):
        tredis.client(
            tether.Lifecycle(),
            "redis://x",
            max_connections=max_connections,
            **{option: values.get(option)},
        )
    tredis.client(tether.Lifecycle(), "redis://x", connection_class=aioredis.Connection, custom=1)
    with pytest.raises(TypeError, match=r"^Redis client 'redis': connection_pool= cannot be given"):
        tredis.client(tether.Lifecycle(), "redis://x", connection_pool=None)
    with pytest.raises(TypeError, match=r"^Redis client 'redis': decode_respones= is not an"):
        tredis.client(tether.Lifecycle(), "redis://x", decode_respones=True)


def test_aiosqlite_connection_takes_every_option_of_database() -> None:
    taken = keywords(taiosqlite.database) - {"lc", "path", "name"}
    assert {"wal", "busy_timeout", "synchronous", "max_connections"} <= taken
    values = {"synchronous": "NORMAL", "max_connections": 4, "busy_timeout": 1.0}
    for option in sorted(taken):
        taiosqlite.connection(tether.Lifecycle(), "app.db", **{option: values.get(option, True)})
    with pytest.raises(TypeError, match=r"^connection\('connection'\): busy_timout= is not"):
        taiosqlite.connection(tether.Lifecycle(), "app.db", busy_timout=3)


@pytest.mark.parametrize(
    ("conninfo", "said"),
    [
        ("host=127.0.0.1 port={port} aplication_name=api", 'invalid connection option "aplication_name"'),
        ("postgresql://127.0.0.1:{port}/app?aplication_name=api", 'invalid URI query parameter: "aplication_name"'),
    ],
    ids=["keyword-value", "url-query"],
)  # fmt: skip
async def test_libpq_refusing_an_option_of_the_conninfo_is_a_mistake_not_retried(
    conninfo: str, said: str
) -> None:
    """An option of the conninfo (read when the app starts) libpq does not know is no
    outage: a configuration mistake, not retried (retries=2 would try it 3 times), naming
    the close match; still a psycopg.ProgrammingError."""
    lc = tether.Lifecycle()
    cause = (
        f"ProgrammingError: {POOL}: {LIBPQ} refused the conninfo: {said}. Did you mean "
        f"'application_name'? Fix or remove it"
    )
    with dead_port() as port:  # nothing listens there (libpq refuses it before connecting)
        tpsycopg.pool(lc, lambda: conninfo.format(port=port), retries=2, backoff=0.01)
        with pytest.raises(tether.StartupError, match=misconfigured("pool", cause)) as caught:
            async with lc.run():
                pass
    assert isinstance(caught.value.__cause__, psycopg.ProgrammingError)


@pytest.mark.parametrize(
    ("given", "fix"),
    [
        (
            "ssl",
            "TLS is asked for by the URL's scheme: use rediss://... (the ssl_* options, such "
            "as ssl_ca_certs=, go with it).",
        ),
        (
            "single_connection_client",
            "It is an option of redis.asyncio.Redis itself, which client() makes with its own "
            "settings: remove it.",
        ),
    ],
)
def test_redis_options_of_the_client_say_what_to_do_instead(given: str, fix: str) -> None:
    """``ssl=True`` is how redis-py's ``Redis()`` asks for TLS: "Remove it." would have left
    the connection in plain text (diff15, F2b); ``single_connection_client=`` was offered
    ``connection_class=``."""
    with pytest.raises(TypeError) as info:
        tredis.client(tether.Lifecycle(), "redis://x", **{given: True})
    assert str(info.value) == (
        f"Redis client 'redis': {given}= is not an option of client() nor of redis-py's "
        f"connection pool or its connections (redis {redis.__version__}), which client() "
        f"passes its other keyword arguments to. {fix}"
    )


@pytest.mark.parametrize(
    ("driver", "kwargs", "message"),
    [
        (
            "asyncpg",
            {"transation": True},
            "transation= (did you mean transaction=?) is not an option of "
            "tether.integrations.asyncpg.connection(). Fix or remove it.",
        ),
        (
            "asyncpg",
            {"guard": True},
            "guard= is not an option of tether.integrations.asyncpg.connection() (its options: "
            "name=, transaction=, release=, error_status=, acquire_timeout=, reset_timeout=, "
            "isolation=, readonly=). Fix or remove it.",
        ),
        (
            "psycopg",
            {"transacton": True, "reset_sesion": False},
            "transacton= (did you mean transaction=?) and reset_sesion= (did you mean "
            "reset_session=?) are not options of tether.integrations.psycopg.connection(). Fix "
            "or remove them.",
        ),
    ],
)
def test_a_misspelt_connection_option_names_the_one_meant(
    driver: str, kwargs: dict[str, Any], message: str
) -> None:
    """Before: Python's bare "connection() got an unexpected keyword argument"."""
    module = tasyncpg if driver == "asyncpg" else tpsycopg
    lc = tether.Lifecycle()
    pool = module.pool(lc, DSN)
    with pytest.raises(TypeError, match=exactly(message)):
        module.connection(lc, pool, **kwargs)
    assert "conn" not in lc.resources


def test_pgbouncer_true_says_it_overrides_a_prepare_threshold_given(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """psycopg's pool with pgbouncer=True sets prepare_threshold=None over one given in
    kwargs=: said where it is declared (before: silently, while the SQLAlchemy integration
    keeps a prepare_threshold given in connect_args)."""
    with caplog.at_level("WARNING", logger="tether"):
        tpsycopg.pool(tether.Lifecycle(), DSN, pgbouncer=True, kwargs={"prepare_threshold": 0})
        tpsycopg.pool(tether.Lifecycle(), DSN, pgbouncer=True, kwargs={"prepare_threshold": None})
        tpsycopg.pool(tether.Lifecycle(), DSN, kwargs={"prepare_threshold": 0})
    assert [r.getMessage() for r in caplog.records] == [
        "tether: pool 'pool': pgbouncer=True sets psycopg's prepare_threshold=None (no prepared "
        "statements, which PgBouncer in transaction mode does not keep across transactions), "
        "in place of the prepare_threshold=0 given in kwargs=. Drop it from kwargs=."
    ]
