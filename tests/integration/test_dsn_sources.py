"""DSNs as settings libraries give them: pydantic's ``SecretStr`` (a password kept out of
sight) and URL types (``PostgresDsn``, ``RedisDsn``, ``HttpUrl``), passed directly or through
the function tether calls when the app starts (``lambda: settings.database_url``).

- A URL type is used as its ``str()``, which keeps the password: the pool opens.
- A ``SecretStr`` is refused naming ``.get_secret_value()``, at declaration or at startup,
  before any driver sees it (the drivers failed with ``'SecretStr' object has no attribute
  'decode'``).
- ``'**********'``, what ``str()`` of a ``SecretStr`` gives, is refused as pydantic's mask,
  not tried on the server.

No message shows the secret.

And the on/off options of the Redis, httpx and aiosqlite integrations, which a setting read
from the environment would give as a string (``"false"``, true to ``if``): refused at
declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import HttpUrl, PostgresDsn, RedisDsn, SecretStr, TypeAdapter

import tether
from tests.servers import Postgres, Redis
from tests.unit._messages import exactly, misconfigured
from tether.integrations import aiosqlite as tsqlite
from tether.integrations import asyncpg as tpg
from tether.integrations import httpx as thttpx
from tether.integrations import psycopg as tpsycopg
from tether.integrations import redis as tredis
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.anyio

SECRET = "hunter2-secret"
PG_URL = f"postgresql://app:{SECRET}@127.0.0.1:9/db"
MASK = "**********"
PG = "lambda: settings.database_url.get_secret_value()"
REDIS = "lambda: settings.redis_url.get_secret_value()"
HTTP = "lambda: settings.url.get_secret_value()"

Make = Callable[[tether.Lifecycle, Any], Any]

# (declare, its where, what it calls the DSN, the get_secret_value() example)
DECLARE = [
    (tpg.pool, "Pool 'pool'", "DSN", PG),
    (tpsycopg.pool, "Pool 'pool'", "conninfo", PG),
    (tredis.client, "Redis client 'redis'", "URL", REDIS),
    (lambda lc, url: thttpx.client(lc, base_url=url), "HTTP client 'http'", "base_url", HTTP),
]
IDS = ["asyncpg", "psycopg", "redis", "httpx"]


@pytest.mark.parametrize(("make", "where", "what", "fix"), DECLARE, ids=IDS)
def test_a_secret_str_is_refused_at_declaration_naming_get_secret_value(
    make: Make, where: str, what: str, fix: str
) -> None:
    lc = tether.Lifecycle()
    message = (
        f"{where}: the {what} is a SecretStr, not a string: pass a function returning its "
        f"get_secret_value(), e.g. {fix} (str() of a SecretStr is the mask '**********', not "
        f"the {what})."
    )
    with pytest.raises(TypeError, match=exactly(message)):
        make(lc, SecretStr(PG_URL))
    assert lc.resources == {}


def test_sqlalchemy_refuses_a_secret_str_at_declaration_too() -> None:
    lc = tether.Lifecycle()
    message = (
        "Engine 'engine': the URL is a SecretStr, not a string: pass a function returning its "
        f"get_secret_value(), e.g. {PG} (str() of a SecretStr is the mask '**********', not "
        "the URL)."
    )
    with pytest.raises(TypeError, match=exactly(message)):
        tsa.engine(lc, SecretStr(PG_URL))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "where", "what", "fix"),
    [*DECLARE, (tsa.engine, "Engine 'engine'", "URL", PG)],
    ids=[*IDS, "sqlalchemy"],
)
def test_the_mask_of_a_secret_str_is_refused_at_declaration(
    make: Make, where: str, what: str, fix: str
) -> None:
    lc = tether.Lifecycle()
    message = (
        f"{where}: the {what} is '**********', the mask pydantic shows for a SecretStr (its "
        f"str(), or an f-string of it), not a {what}: pass a function returning its "
        f"get_secret_value() instead, e.g. {fix}."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        make(lc, str(SecretStr(PG_URL)))


@pytest.mark.parametrize(("make", "where", "what", "fix"), DECLARE[:3], ids=IDS[:3])
async def test_a_function_returning_a_secret_str_fails_startup_naming_get_secret_value(
    make: Make, where: str, what: str, fix: str
) -> None:
    """Refused before the driver sees it (asyncpg, psycopg and redis-py failed with
    ``AttributeError: 'SecretStr' object has no attribute 'decode'``)."""
    lc = tether.Lifecycle()
    res = make(lc, lambda: SecretStr(PG_URL))
    cause = (
        f"TypeError: {where}: the function given for the {what} returned a SecretStr, not a "
        f"string: return its get_secret_value(), e.g. {fix} (str() of a SecretStr is the mask "
        f"'**********', not the {what})"
    )
    with pytest.raises(tether.StartupError, match=misconfigured(res.name, cause)) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, TypeError)
    assert SECRET not in str(info.value)


async def test_httpx_base_url_function_returning_a_secret_str_fails_startup() -> None:
    lc = tether.Lifecycle()
    thttpx.client(lc, base_url=lambda: SecretStr(f"https://u:{SECRET}@api.example.com"))  # type: ignore[arg-type, return-value]
    cause = (
        "TypeError: HTTP client 'http': the function given for the base_url returned a "
        "SecretStr, not a string: return its get_secret_value(), e.g. "
        "lambda: settings.url.get_secret_value() (str() of a SecretStr is the mask "
        "'**********', not the base_url)"
    )
    with pytest.raises(tether.StartupError, match=misconfigured("http", cause)):
        async with lc.run():
            pass  # pragma: no cover


@pytest.mark.parametrize(("make", "where", "what", "fix"), DECLARE[:3], ids=IDS[:3])
async def test_a_function_returning_the_mask_fails_startup_saying_so(
    make: Make, where: str, what: str, fix: str
) -> None:
    """``lambda: str(settings.database_url)``: tether's error, not the driver's parse error
    of ``'**********'`` with advice to retry longer."""
    lc = tether.Lifecycle()
    secret = SecretStr(PG_URL)
    res = make(lc, lambda: str(secret))
    cause = (
        f"ValueError: {where}: the function given for the {what} returned '**********', the "
        f"mask pydantic shows for a SecretStr (its str(), or an f-string of it), not a "
        f"{what}: return its get_secret_value() instead, e.g. {fix}"
    )
    with pytest.raises(tether.StartupError, match=misconfigured(res.name, cause)) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert SECRET not in str(info.value)


async def test_httpx_base_url_url_objects_are_used_as_their_string() -> None:
    """A function returning httpx's own URL (as before), or pydantic's ``HttpUrl``."""
    for given in (
        httpx.URL("https://api.example.com/v1/"),
        TypeAdapter(HttpUrl).validate_python("https://api.example.com/v1/"),
    ):
        lc = tether.Lifecycle()
        http = thttpx.client(lc, base_url=lambda given=given: given)  # type: ignore[misc]
        async with lc.run():
            assert str(lc.get(http).base_url) == "https://api.example.com/v1/"
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url=TypeAdapter(HttpUrl).validate_python("https://a.example"))  # type: ignore[arg-type]
    async with lc.run():
        assert str(lc.get(http).base_url) == "https://a.example/"


@pytest.mark.servers
@pytest.mark.parametrize("direct", [False, True], ids=["function", "direct"])
async def test_postgres_dsn_opens_asyncpg_and_psycopg_pools(
    postgres: Postgres, direct: bool
) -> None:
    """pydantic's ``PostgresDsn`` (pydantic-settings' type for a database URL), from a
    function or given directly: its ``str()``, password and all, reaches the server."""
    dsn = TypeAdapter(PostgresDsn).validate_python(postgres.dsn)
    given: Any = dsn if direct else lambda: dsn
    lc = tether.Lifecycle()
    apg = tpg.pool(lc, given, name="apg", min_size=1, max_size=1)
    psy = tpsycopg.pool(lc, given, name="psy", min_size=1, max_size=1)
    async with lc.run():
        assert await lc.get(apg).fetchval("SELECT current_user") == postgres.user
        async with lc.get(psy).connection() as conn:
            row = await (await conn.execute("SELECT current_user")).fetchone()
        assert row == (postgres.user,)


@pytest.mark.servers
@pytest.mark.parametrize("direct", [False, True], ids=["function", "direct"])
async def test_redis_dsn_opens_the_client(redis_server: Redis, direct: bool) -> None:
    url = TypeAdapter(RedisDsn).validate_python(redis_server.url)
    lc = tether.Lifecycle()
    r = tredis.client(lc, url if direct else lambda: url)  # type: ignore[arg-type, return-value]
    async with lc.run():
        assert await lc.get(r).ping() is True


# --------------------------------------------------------------------------- on/off options

_FROM_ENV = (
    "(a setting read from the environment is a string, and {value!r} would count as true: "
    'convert it, e.g. {option}=os.environ.get(...) == "1")'
)


@pytest.mark.parametrize(
    ("declare", "where", "option", "value"),
    [
        (lambda lc, v: tsqlite.database(lc, "x.db", wal=v), "database('database')", "wal", "false"),
        (
            lambda lc, v: tsqlite.database(lc, "x.db", foreign_keys=v),
            "database('database')",
            "foreign_keys",
            "0",
        ),
        (
            lambda lc, v: tsqlite.connection(lc, "x.db", create_dirs=v),
            "database('connection_database')",
            "create_dirs",
            "no",
        ),
        (lambda lc, v: thttpx.client(lc, http2=v), "HTTP client 'http'", "http2", "false"),
        (lambda lc, v: thttpx.client(lc, trust_env=v), "HTTP client 'http'", "trust_env", "false"),
        (
            lambda lc, v: thttpx.client(lc, follow_redirects=v),
            "HTTP client 'http'",
            "follow_redirects",
            "false",
        ),
        (
            lambda lc, v: tredis.client(lc, "redis://h", decode_responses=v),
            "Redis client 'redis'",
            "decode_responses",
            "false",
        ),
        (
            lambda lc, v: tredis.client(lc, "redis://h", retry_on_timeout=v),
            "Redis client 'redis'",
            "retry_on_timeout",
            "false",
        ),
    ],
    ids=[
        "aiosqlite-wal",
        "aiosqlite-foreign_keys",
        "aiosqlite-create_dirs",
        "httpx-http2",
        "httpx-trust_env",
        "httpx-follow_redirects",
        "redis-decode_responses",
        "redis-retry_on_timeout",
    ],
)
def test_an_on_off_option_read_from_the_environment_is_refused(
    declare: Callable[[tether.Lifecycle, object], Any], where: str, option: str, value: str
) -> None:
    """``"false"`` from the environment is true to ``if``: refused at declaration, saying
    so; a number too."""
    lc = tether.Lifecycle()
    hint = _FROM_ENV.format(value=value, option=option)
    message = f"{where}: {option}={value!r} is a str, not a bool. Pass True or False {hint}."
    with pytest.raises(TypeError, match=exactly(message)):
        declare(lc, value)
    with pytest.raises(
        TypeError, match=exactly(f"{where}: {option}=1 is an int, not a bool. Pass True or False.")
    ):
        declare(lc, 1)
    assert lc.resources == {}


@pytest.mark.parametrize("returned", ["secret", "mask"])
async def test_sqlalchemy_a_url_function_returning_a_secret_or_its_mask_fails_startup(
    returned: str,
) -> None:
    """The engine's URL function gets the same refusals (before: SQLAlchemy's "Could not
    parse SQLAlchemy URL" of the mask, with advice to retry longer)."""
    lc = tether.Lifecycle()
    secret = SecretStr(PG_URL.replace("postgresql:", "postgresql+asyncpg:"))
    url = (lambda: secret) if returned == "secret" else (lambda: str(secret))
    tsa.engine(lc, url)  # type: ignore[arg-type]
    if returned == "secret":
        cause = (
            "TypeError: the function given for the URL returned a SecretStr, not a string: "
            f"return its get_secret_value(), e.g. {PG} (str() of a SecretStr is the mask "
            "'**********', not the URL)"
        )
    else:
        cause = (
            "ValueError: the function given for the URL returned '**********', the mask "
            "pydantic shows for a SecretStr (its str(), or an f-string of it), not a URL: "
            f"return its get_secret_value() instead, e.g. {PG}"
        )
    with pytest.raises(tether.StartupError, match=misconfigured("engine", cause)) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert SECRET not in str(info.value)


MASKED = {
    "asyncpg": "postgresql://app:**********@127.0.0.1:9/db",
    "psycopg": "host=127.0.0.1 port=9 user=app password=********** dbname=db",
    "redis": "redis://:**********@127.0.0.1:9/0",
    "httpx": "https://u:**********@api.example.com/",
}


def _masked_message(where: str, what: str, *, returned: bool) -> str:
    given = (
        f"the function given for the {what} returned one with" if returned else f"the {what} has"
    )
    return (
        f"{where}: {given} pydantic's mask '**********' as its password (an f-string of a "
        f"SecretStr), not the password itself. Build the {what} with the secret's "
        f'get_secret_value(), e.g. f"...:{{settings.db_password.get_secret_value()}}@..."'
        f"{'' if returned else ', in a function passed for it'}."
    )


@pytest.mark.parametrize(("make", "where", "what", "fix"), DECLARE, ids=IDS)
def test_the_mask_as_a_password_inside_a_dsn_is_refused_at_declaration(
    make: Make, where: str, what: str, fix: str, request: pytest.FixtureRequest
) -> None:
    """``f"postgresql://app:{settings.password}@db/app"`` with a ``SecretStr`` password: the
    server refused the password ``**********``, a refusal no retry mends, and nothing said why.
    The DSN is not quoted in the message."""
    lc = tether.Lifecycle()
    given = MASKED[request.node.callspec.id]
    with pytest.raises(ValueError, match=exactly(_masked_message(where, what, returned=False))):
        make(lc, given)
    # A password that merely holds asterisks is a password.
    make(tether.Lifecycle(), given.replace("**********", "pa**word"))


@pytest.mark.parametrize(("make", "where", "what", "fix"), DECLARE[:3], ids=IDS[:3])
async def test_a_refused_dsn_function_result_is_not_retried(
    make: Make, where: str, what: str, fix: str, request: pytest.FixtureRequest
) -> None:
    """A function that returned a ``SecretStr``, or a DSN with the mask for its password,
    returns the same on every call: the start fails at once, not after ``retries=`` attempts
    and their backoff, and does not say it was tried several times."""
    masked = MASKED[request.node.callspec.id]
    for given, cause in (
        (
            SecretStr(PG_URL),
            f"TypeError: {where}: the function given for the {what} returned a SecretStr, not "
            f"a string: return its get_secret_value(), e.g. {fix} (str() of a SecretStr is the "
            f"mask '**********', not the {what})",
        ),
        (masked, "ValueError: " + _masked_message(where, what, returned=True)[:-1]),
    ):
        calls: list[object] = []

        def dsn(given: object = given) -> object:
            calls.append(given)
            return given

        lc = tether.Lifecycle()
        res = make(lc, dsn, retries=3, backoff=0.05)  # type: ignore[call-arg]
        with pytest.raises(tether.StartupError, match=misconfigured(res.name, cause)):
            async with lc.run():
                pass  # pragma: no cover
        assert len(calls) == 1
