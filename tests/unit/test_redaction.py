"""Passwords and secrets are hidden in every message tether builds: ``redact`` (URLs, keys
naming a secret, dict reprs), ``describe`` (an exception), and the exact passwords of the
DSNs resources opened with (``remember_secrets``), which drivers' parse errors quote."""

import io
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether
import tether._errors
from tests.unit._messages import misconfigured
from tether._errors import describe, redact, remember_secrets
from tether.integrations import asyncpg as tasyncpg
from tether.integrations import psycopg as tpsycopg
from tether.integrations import redis as tredis
from tether.integrations import sqlalchemy as tsqlalchemy


@pytest.fixture(autouse=True)
def no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no remembered password (and leaves none behind)."""
    monkeypatch.setattr(tether._errors, "_secrets", ())


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # libpq reads '#', '?' and spaces as part of the password (up to the '@' before the
        # first '/'); urllib an unencoded '@'.
        ("postgresql://app:hunter2#x@h/db", "postgresql://app:***@h/db"),
        ("postgresql://app:hunter2?x@h:5432/db", "postgresql://app:***@h:5432/db"),
        ("postgresql://app:a#b?c@d@h/db?sslmode=disable", "postgresql://app:***@h/db?sslmode=disable"),
        ("postgresql://app:hun ter2@h/db", "postgresql://app:***@h/db"),
        # An unencoded '/' (a base64 password): SQLAlchemy reads it to the first '@'.
        ("postgresql+asyncpg://app:hunter2/Xk9+q=@h/db", "postgresql+asyncpg://app:***@h/db"),
        # A Redis user holding an '@' (a tenant): the password is after its ':'.
        ("redis://user@tenant:hunter2@h:6379/0", "redis://user@tenant:***@h:6379/0"),
        # A port is not a password, and an '@' in a path is not the userinfo's.
        ("https://api.example.com:8443/users/a@b.com", "https://api.example.com:8443/users/a@b.com"),
        ("redis://h:6379 sent by x@y", "redis://h:6379 sent by x@y"),
        ("postgresql://app@h:5432/db?application_name=a@b", "postgresql://app@h:5432/db?application_name=a@b"),
        # Keys ending in password or secret, in key/value form or a URL's query.
        ("host=h sslpassword=hunter2 dbname=d", "host=h sslpassword=*** dbname=d"),
        ("postgresql://app@h/db?sslpassword=hunter2&sslmode=require", "postgresql://app@h/db?sslpassword=***&sslmode=require"),
        ("host=h oauth_client_secret=hunter2 dbname=d", "host=h oauth_client_secret=*** dbname=d"),
        ("PGPASSWORD=hunter2", "PGPASSWORD=***"),
        ("https://api.example.com/v1?access_token=hunter2", "https://api.example.com/v1?access_token=***"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=hunter2", "https://b.s3.amazonaws.com/k?X-Amz-Signature=***"),
        # In a URL's query, also the keys web APIs put credentials in.
        ("https://maps.example.com/api?key=hunter2&q=x", "https://maps.example.com/api?key=***&q=x"),
        ("https://a.blob.core.windows.net/c?sv=2022&sig=hunter2%2B", "https://a.blob.core.windows.net/c?sv=2022&sig=***"),
        ("https://api.example.com/v1?auth=hunter2", "https://api.example.com/v1?auth=***"),
        ("https://api.example.com/v1?q=1&AWS_Access_Key=hunter2", "https://api.example.com/v1?q=1&AWS_Access_Key=***"),
        ("https://api.example.com/v1?private-key=hunter2", "https://api.example.com/v1?private-key=***"),
        ("https://api.example.com/v1?monkey=1&keys=2&signal=3", "https://api.example.com/v1?monkey=1&keys=2&signal=3"),
        ("postgresql://app@h/db?sslkey=/etc/key.pem&sslmode=require", "postgresql://app@h/db?sslkey=/etc/key.pem&sslmode=require"),
        # Quoted values with escaped quotes, and unquoted ones with escapes, hidden whole.
        (r"host=h password='o\'hunter2-tail' dbname=d", "host=h password=*** dbname=d"),
        ("host=h password='hunter2 tail' dbname=d", "host=h password=*** dbname=d"),
        (r"host=h password=hunter2\ tail dbname=d", "host=h password=*** dbname=d"),
        ("host=h password='unterminated hunter2", "host=h password=***"),
        # A dict's repr, JSON, a 'password:' line.
        ("{'user': 'app', 'password': 'hunter2', 'port': 1}", "{'user': 'app', 'password': ***, 'port': 1}"),
        ("{'password': \"o'hunter2\"}", "{'password': ***}"),
        ('{"sslpassword": "hunter2"}', '{"sslpassword": ***}'),
        ("Password: hunter2", "Password: ***"),
        # What names no secret is left alone.
        ("FATAL: password authentication failed for user \"app\"", "FATAL: password authentication failed for user \"app\""),
        ("fe_sendauth: no password supplied", "fe_sendauth: no password supplied"),
        ("max_tokens=5 sslkey=/etc/key.pem", "max_tokens=5 sslkey=/etc/key.pem"),
    ],
)  # fmt: skip
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_describe_redacts_a_dict_given_as_dsn() -> None:
    """SQLAlchemy's `Expected string or URL object, got {...}` passes through describe()."""
    exc = ValueError("Expected string or URL object, got {'user': 'app', 'password': 'hunter2'}")
    assert describe(exc) == (
        "ValueError: Expected string or URL object, got {'user': 'app', 'password': ***}"
    )


@pytest.mark.parametrize(
    ("dsn", "message", "shown"),
    [
        # asyncpg and redis-py read the part before an unencoded '/' as the port.
        (
            "postgresql://app:hunter2/Xk9+q=@h/db",
            "invalid literal for int() with base 10: 'hunter2'",
            "invalid literal for int() with base 10: '***'",
        ),
        (
            "redis://:hunter2#Xk9@h:6379/0",
            "Port could not be cast to integer value as 'hunter2'",
            "Port could not be cast to integer value as '***'",
        ),
        # libpq reads the second word of an unquoted password as a keyword.
        (
            "host=h user=app password=hunter2 oh-secret dbname=d",
            'missing "=" after "oh-secret" in connection info string',
            'missing "=" after "***" in connection info string',
        ),
        # A password in a mapping of connection parameters, and in a URL's query.
        ({"password": "hunter2 x"}, "got 'hunter2 x'", "got '***'"),
        ("postgresql://app@h/db?sslpassword=hun/ter2", "bad value 'hun/ter2'", "bad value '***'"),
        # An unencoded '@' then '/': the authority ends at the '/', and the rest of the
        # password was shown in the URL of a 503 (trial 19: 15 characters of 18).
        (
            "postgresql://tether:Kx9@Vb7QmZr2Lp/Tw4@127.0.0.1:5432/tether",
            "cannot reach postgresql://tether:Kx9@Vb7QmZr2Lp/Tw4@127.0.0.1:5432/tether",
            "cannot reach postgresql://tether:***@127.0.0.1:5432/tether",
        ),
        # redis-py quotes the host it parsed out of the password, lower-cased.
        (
            "redis://:Vb7QmZr2@Lp?x@127.0.0.1:6379/0",
            "Error connecting to vb7qmzr2:6379. Name or service not known.",
            "Error connecting to ***:6379. Name or service not known.",
        ),
    ],
)
def test_remembered_passwords_are_hidden_where_a_driver_quotes_them(
    dsn: object, message: str, shown: str
) -> None:
    remember_secrets(dsn)
    assert redact(message) == shown
    assert describe(ValueError(message)) == f"ValueError: {shown}"


def test_plain_passwords_are_not_remembered() -> None:
    """A password of letters, digits and -._~ is found by the patterns, and no driver splits
    it: remembering it would hide a common word (a development password) everywhere."""
    remember_secrets("postgresql://postgres:postgres@localhost/postgres")
    remember_secrets("host=h password=abc")
    assert redact("postgresql://postgres:postgres@localhost/postgres") == (
        "postgresql://postgres:***@localhost/postgres"
    )


def test_a_piece_of_a_password_is_hidden_as_a_word_not_inside_others() -> None:
    """`Wr0ng#pass@x`: its piece `pass` is hidden where a driver quotes it, and no longer
    cut out of other words (the refusal that says to encode the password read "encode
    the ***word")."""
    remember_secrets("postgresql://app:Wr0ng#pass@x@127.0.0.1/db")
    assert redact("invalid literal for int() with base 10: 'pass'") == (
        "invalid literal for int() with base 10: '***'"
    )
    assert redact("a password holding '#' must be URL-encoded: encode the password") == (
        "a password holding '#' must be URL-encoded: encode the password"
    )
    assert redact("bad password Wr0ng#pass@x here") == "bad password *** here"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@h:5432/db?application_name=a@b",  # a port, a query's '@'
        "postgresql://app@h/db?password=hunter2&sslmode=require",  # the query's other keys
        "host=h password=hunter2 sslmode=require dbname=d",
    ],
)
def test_what_is_not_a_password_is_not_remembered(dsn: str) -> None:
    remember_secrets(dsn)
    text = "port 5432, sslmode=require, application_name=a@b, dbname=d"
    assert redact(text) == text


def test_a_dict_dsn_is_refused_naming_its_type_only() -> None:
    lc = tether.Lifecycle()
    config = {"host": "db", "user": "app", "password": "hunter2-secret"}
    cases = [
        (tasyncpg.pool, "Pool 'pool'", "DSN"),
        (tpsycopg.pool, "Pool 'pool'", "conninfo"),
        (tredis.client, "Redis client 'redis'", "URL"),
    ]
    for make, where, what in cases:
        with pytest.raises(TypeError, match=re.escape(f"{where}: the {what} must be")) as info:
            make(lc, config)  # type: ignore[operator]
        assert "hunter2" not in str(info.value)
        assert str(info.value).startswith(
            f"{where}: the {what} must be a string or a function returning one, not a dict; "
            f"build the {what} string from it, or pass e.g. "
        )


@pytest.mark.anyio
async def test_sqlalchemy_url_function_returning_a_dict() -> None:
    """SQLAlchemy's own error would print the dict, password and all."""
    lc = tether.Lifecycle()
    tsqlalchemy.engine(lc, lambda: {"user": "app", "password": "hunter2-secret"})  # type: ignore[arg-type,return-value]
    cause = (
        "TypeError: the function given for the URL returned a dict, not a string or a "
        "sqlalchemy.engine.URL; build the URL from it (URL.create(...))"
    )
    with pytest.raises(tether.StartupError, match=misconfigured("engine", cause)):
        async with lc.run():
            pass  # pragma: no cover


@pytest.mark.anyio
async def test_a_password_in_a_failure_tether_logs_is_hidden_in_its_traceback_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cleanup whose error quotes a DSN: the log line hid its password, and the traceback
    of the same record printed it in full."""
    dsn = "postgresql://app:hunter2@db.example:5432/app"
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def client() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            raise ConnectionError(f"could not flush to {dsn}")

    with caplog.at_level(logging.ERROR, logger="tether"), pytest.raises(tether.ShutdownError):
        async with lc.run():
            pass
    assert "Traceback (most recent call last)" in caplog.text
    assert "ConnectionError: could not flush to postgresql://app:***@db.example:5432/app" in (
        caplog.text
    )
    assert "hunter2" not in caplog.text


def test_a_handlers_own_traceback_format_is_kept_where_nothing_is_hidden() -> None:
    """The traceback text is made by tether only where it hides a password in it: a
    formatter that prints one line per record (for a log shipper) formats tether's own."""

    class OneLine(logging.Formatter):
        def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
            return f"EXC {ei[1]!r}"

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLine("%(message)s"))
    logger = logging.getLogger("tether")
    logger.addHandler(handler)
    try:
        try:
            raise ConnectionError("boom")
        except ConnectionError:
            logger.exception("failure")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "failure\nEXC ConnectionError('boom')\n"
