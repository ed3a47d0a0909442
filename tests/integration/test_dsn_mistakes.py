"""Mistakes in the DSN of psycopg's and asyncpg's pools, against real servers: a SQLAlchemy
URL (``postgresql+psycopg://``, easy when one DATABASE_URL feeds both), a conninfo libpq
cannot parse, and a wrong password or database through PgBouncer.

- A SQLAlchemy URL and a conninfo libpq cannot parse are configuration mistakes: refused at
  the declaration for a string (parsed by libpq, connecting to nothing), when the app starts
  for one a function returns, never retried, with the fix; the password is in no line of
  the traceback (libpq's own error quotes the conninfo: it is chained with it redacted).
- PgBouncer refuses a wrong password with no SQLSTATE libpq passes on ("FATAL: SASL
  authentication failed") and 08P01 for asyncpg: refused for good, naming the credentials,
  as PostgreSQL's own 28P01; and an unknown database through it as 3D000.
"""

from __future__ import annotations

import socket
import time
import traceback
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import tether
from tests.servers import PG_PASSWORD, PgBouncer, Postgres
from tether._errors import unstopped
from tether.integrations import asyncpg as tapg
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

LIBPQ = f"libpq {psycopg.pq.version() // 10000}.{psycopg.pq.version() % 10000}"
#: A retry sleeps this long first: a start that fails sooner was not retried.
BACKOFF = 8.0
MODULES: dict[str, Any] = {"psycopg": tpsy, "asyncpg": tapg}
READER = {"psycopg": "libpq", "asyncpg": "asyncpg"}
WHAT = {"psycopg": "conninfo", "asyncpg": "DSN"}
MISREAD = (
    "Pool 'pool': {given} a port that is not a port number where its hosts are read, and an "
    "'@' after them: a password holding '/', '?', '#' or '@' must be URL-encoded (%2F, %3F, "
    "%23, %40), or it is read as the host and port. No connection can be made so, and no "
    "retry mends that: encode the password, e.g. with urllib.parse.quote(password, safe='')."
)


def shown(text: str) -> str:
    return text.replace(f":{PG_PASSWORD}@", ":***@")


def full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def sqlalchemy_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


def scheme_refused(given: str, what: str, reader: str, driver: str, dsn: str) -> str:
    return (
        f"Pool 'pool': {given} {shown(sqlalchemy_url(dsn, driver))}, a SQLAlchemy URL: "
        f"{reader} takes postgresql:// or postgres://, not the driver part '+{driver}' of its "
        f"scheme. Drop it: {shown(dsn)} (where one setting feeds SQLAlchemy too, drop it for "
        f"this pool, e.g. lambda: os.environ['DATABASE_URL'].replace('+{driver}', '', 1))."
    )


def unretried(cause: str) -> str:
    """The StartupError of a configuration mistake (no retry advice)."""
    return (
        f"App resource 'pool' failed to open: {cause}. The resources already open were "
        f"closed. Fix the cause above: a mistake in the configuration or the code, which no "
        f"retry mends."
    )


async def start(lc: tether.Lifecycle) -> tether.StartupError:
    with pytest.raises(tether.StartupError) as info:
        async with lc.run():
            pass  # pragma: no cover
    return info.value


# --------------------------------------------------------------------- SQLAlchemy URLs


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_a_sqlalchemy_url_is_refused_at_declaration(
    postgres: Postgres, kind: str, driver: str
) -> None:
    with pytest.raises(ValueError) as info:
        MODULES[kind].pool(tether.Lifecycle(), sqlalchemy_url(postgres.dsn, driver))
    expected = scheme_refused(
        f"the {WHAT[kind]} is", WHAT[kind], READER[kind], driver, postgres.dsn
    )
    assert str(info.value) == expected
    assert PG_PASSWORD not in full_traceback(info.value)


def test_a_sqlalchemy_url_with_postgres_scheme_is_refused_too() -> None:
    with pytest.raises(ValueError, match=r"^Pool 'pool': the conninfo is postgres\+psycopg2://"):
        tpsy.pool(tether.Lifecycle(), "postgres+psycopg2://app:hunter2-pw@db/app")
    with pytest.raises(ValueError) as info:
        tapg.pool(tether.Lifecycle(), "POSTGRES+asyncpg://app:hunter2-pw@db/app")
    assert str(info.value) == (
        "Pool 'pool': the DSN is POSTGRES+asyncpg://app:***@db/app, a SQLAlchemy URL: asyncpg "
        "takes postgresql:// or postgres://, not the driver part '+asyncpg' of its scheme. "
        "Drop it: POSTGRES://app:***@db/app (where one setting feeds SQLAlchemy too, drop it "
        "for this pool, e.g. lambda: os.environ['DATABASE_URL'].replace('+asyncpg', '', 1))."
    )


@pytest.mark.parametrize("kind", sorted(MODULES))
async def test_a_sqlalchemy_url_from_a_function_fails_the_start_unretried_and_unleaked(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    calls: list[int] = []
    url = sqlalchemy_url(postgres.dsn, "psycopg")

    def dsn() -> str:
        calls.append(1)
        return url

    lc = tether.Lifecycle()
    MODULES[kind].pool(lc, dsn, retries=3, backoff=BACKOFF)
    failure = await start(lc)
    cause = scheme_refused(
        f"the function given for the {WHAT[kind]} returned",
        WHAT[kind],
        READER[kind],
        "psycopg",
        postgres.dsn,
    )
    assert str(failure) == unretried(f"ValueError: {unstopped(cause)}")
    assert calls == [1]
    assert PG_PASSWORD not in full_traceback(failure)
    assert PG_PASSWORD not in caplog.text
    assert "retrying" not in caplog.text


# --------------------------------------------------------------- conninfo libpq cannot parse


def parse_refused(said: str, given: str = "the conninfo") -> str:
    return (
        f"Pool 'pool': {LIBPQ} cannot parse {given}: {said}. Fix it: pass a URL, "
        f"postgresql://host:port/dbname with user:password@ before the host (URL-encoded: %40 "
        f"for @), or key=value pairs, host=... port=5432 dbname=... (a value with spaces in "
        f"single quotes)."
    )


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on 127.0.0.1: a connection to it would be accepted."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.3)
        yield sock


def no_connection(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize(
    ("conninfo", "said"),
    [
        (
            "host=127.0.0.1 port={port} password=s3cret-pw dbname",
            'missing "=" after "dbname" in connection info string',
        ),
        (
            "host=127.0.0.1 port={port} password=s3cret-pw dbname='tether",
            "unterminated quoted string in connection info string",
        ),
        (
            "postgresql://tether:s3cret-pw@[::1:{port}/tether",
            'end of string reached when looking for matching "]" in IPv6 host address in URI: '
            '"postgresql://tether:***@[::1:{port}/tether"',
        ),
    ],
    ids=["missing-equals", "unterminated-quote", "ipv6-bracket"],
)
def test_a_conninfo_libpq_cannot_parse_is_refused_at_declaration(
    listener: socket.socket, conninfo: str, said: str
) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(psycopg.ProgrammingError) as info:
        tpsy.pool(tether.Lifecycle(), conninfo.format(port=port))
    assert str(info.value) == parse_refused(said.format(port=port))
    assert PG_PASSWORD not in full_traceback(info.value)
    assert no_connection(listener)


def test_the_declaration_parses_a_good_conninfo_without_connecting(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    tpsy.pool(tether.Lifecycle(), f"host=127.0.0.1 port={port} dbname=app password='a b'")
    tpsy.pool(tether.Lifecycle(), f"postgresql://app:pw@127.0.0.1:{port}/app?sslmode=disable")
    assert no_connection(listener)


async def test_a_conninfo_libpq_cannot_parse_from_a_function_is_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not retried, no advice of more retries=, no stray newline (libpq's message ends
    with one), and libpq's error (which quotes the conninfo) chained with its password
    redacted: its type and traceback stay."""
    calls: list[int] = []

    def conninfo() -> str:
        calls.append(1)
        return "postgresql://tether:s3cret-pw@[::1:5432/tether"

    lc = tether.Lifecycle()
    tpsy.pool(lc, conninfo, retries=3, backoff=BACKOFF)
    t0 = time.monotonic()
    failure = await start(lc)
    assert time.monotonic() - t0 < 5.0
    said = (
        'end of string reached when looking for matching "]" in IPv6 host address in URI: '
        '"postgresql://tether:***@[::1:5432/tether"'
    )
    cause = parse_refused(said, "the conninfo the function given for it returned")
    assert str(failure) == unretried(f"ProgrammingError: {unstopped(cause)}")
    assert calls == [1]
    chained = failure.__cause__
    assert isinstance(chained, psycopg.ProgrammingError)
    assert isinstance(chained.__cause__, psycopg.ProgrammingError)  # libpq's own, redacted
    assert str(chained.__cause__) == f"{said}\n"
    text = full_traceback(failure)
    assert PG_PASSWORD not in text
    assert "conninfo_to_dict" in text  # where libpq refused it
    assert PG_PASSWORD not in caplog.text
    assert "retrying" not in caplog.text


# ------------------------------------------------------------------------ through PgBouncer


def refused_text(cause: str, sqlstate: str) -> str:
    return (
        f"App resource 'pool' failed to open: {cause}. The resources already open were "
        f"closed. The server refused the credentials or the database (SQLSTATE {sqlstate}), "
        f"which no retry mends, so none was made: fix the user, password or database name it "
        f"connects with."
    )


def bouncer_said(kind: str, port: int, said: str) -> str:
    if kind == "psycopg":
        return (
            f'OperationalError: connection failed: connection to server at "127.0.0.1", port '
            f"{port} failed: FATAL:  {said}"
        )
    return f"ProtocolViolationError: {said}"


async def refused_through(
    kind: str, dsn: str, caplog: pytest.LogCaptureFixture
) -> tether.StartupError:
    lc = tether.Lifecycle()
    MODULES[kind].pool(lc, dsn, retries=3, backoff=BACKOFF, pgbouncer=True)
    t0 = time.monotonic()
    failure = await start(lc)
    assert time.monotonic() - t0 < 5.0  # a retry would have waited BACKOFF (8 s) first
    assert "retrying" not in caplog.text
    return failure


@pytest.mark.parametrize("kind", sorted(MODULES))
async def test_a_wrong_password_through_pgbouncer_is_refused_for_good(
    pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    dsn = pgbouncer.dsn.replace(f":{PG_PASSWORD}@", ":wrong-pw@")
    failure = await refused_through(kind, dsn, caplog)
    said = bouncer_said(kind, pgbouncer.port, "SASL authentication failed")
    assert str(failure) == refused_text(said, "28P01")
    assert "wrong-pw" not in full_traceback(failure)


@pytest.mark.parametrize("kind", sorted(MODULES))
async def test_an_unknown_user_through_pgbouncer_is_refused_for_good(
    pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    dsn = pgbouncer.dsn.replace(f"//tether:{PG_PASSWORD}@", "//nobody:some-pw@")
    failure = await refused_through(kind, dsn, caplog)
    said = bouncer_said(kind, pgbouncer.port, "SASL authentication failed")
    assert str(failure) == refused_text(said, "28P01")


@pytest.fixture(scope="module")
def md5_bouncer(postgres: Postgres) -> Iterator[PgBouncer]:
    with PgBouncer(postgres, auth_type="md5") as server:
        yield server


@pytest.mark.parametrize("kind", sorted(MODULES))
async def test_a_wrong_md5_password_through_pgbouncer_is_refused_for_good(
    md5_bouncer: PgBouncer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    dsn = md5_bouncer.dsn.replace(f":{PG_PASSWORD}@", ":wrong-pw@")
    failure = await refused_through(kind, dsn, caplog)
    said = bouncer_said(kind, md5_bouncer.port, "password authentication failed")
    assert str(failure) == refused_text(said, "28P01")


@pytest.mark.parametrize("kind", sorted(MODULES))
async def test_an_unknown_database_through_pgbouncer_is_refused_for_good(
    pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    dsn = pgbouncer.dsn.rsplit("/", 1)[0] + "/no_such_db"
    failure = await refused_through(kind, dsn, caplog)
    said = bouncer_said(kind, pgbouncer.port, 'database "no_such_db" does not exist')
    assert str(failure) == refused_text(said, "3D000")


@pytest.mark.parametrize("kind", sorted(MODULES))
async def test_the_right_password_through_pgbouncer_still_opens(
    pgbouncer: PgBouncer, kind: str
) -> None:
    lc = tether.Lifecycle()
    pool = MODULES[kind].pool(lc, pgbouncer.dsn, pgbouncer=True, min_size=1, max_size=2)
    async with lc.run():
        assert lc.get(pool) is not None


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        (
            "psycopg",
            "ProgrammingError: "
            + parse_refused(
                'unexpected spaces found in "***", use percent-encoded spaces (%20) instead',
                "the conninfo the function given for it returned",
            )[:-1],
        ),
        # asyncpg reads the port from the password ('pa'): refused before it quotes a piece
        # of the password (0.32: "bad query field: 'ss w0rd@...'", 0.30: "invalid literal
        # for int() with base 10: 'pa'").
        (
            "asyncpg",
            "ValueError: "
            + MISREAD.format(given="the DSN the function given for it returned has")[:-1],
        ),
    ],
)
async def test_a_driver_error_quoting_the_dsn_is_chained_without_its_password(
    kind: str, cause: str
) -> None:
    """A password with a '?' and a space, unencoded: the drivers' parse errors quote it (or
    a piece of it); the StartupError's whole traceback, the driver's error chained, shows
    none."""
    lc = tether.Lifecycle()
    MODULES[kind].pool(lc, lambda: "postgresql://app:pa?ss w0rd@127.0.0.1:1/app")
    failure = await start(lc)
    assert str(failure) in [unretried(one) for one in cause.split("|")]
    text = full_traceback(failure)
    assert "w0rd" not in text
    assert "pa?ss" not in text


def test_a_url_libpq_cannot_parse_is_refused_at_declaration_without_its_password() -> None:
    url = "postgresql://app:pa?ss " + "w0rd@127.0.0.1:1/app"  # not whole in the source line
    with pytest.raises(psycopg.ProgrammingError) as info:
        tpsy.pool(tether.Lifecycle(), url)
    assert str(info.value) == parse_refused(
        'unexpected spaces found in "***", use percent-encoded spaces (%20) instead'
    )
    text = full_traceback(info.value)
    assert "w0rd" not in text
    assert "pa?ss" not in text


# ------------------------------------------------------------------------------ ports


def port_refused(port: str, given: str, said: str = "") -> str:
    return (
        f"Pool 'pool': {given} port {port!r}, which is not a port number (1 to 65535){said}: no "
        f"connection can be made with it, and no retry mends that. Fix it (PostgreSQL's "
        f"default is 5432), or leave the port out for the default."
    )


@pytest.mark.parametrize(
    ("kind", "dsn", "port"),
    [
        ("psycopg", "host=127.0.0.1 port=abc dbname=app", "abc"),
        ("psycopg", "postgresql://app:s3cret-pw@127.0.0.1:5432x/app", "5432x"),
        ("psycopg", "postgresql://app:pw@h1:5432,h2:70000/app", "70000"),
        ("asyncpg", "postgresql://app:s3cret-pw@127.0.0.1:abc/app", "abc"),
        ("asyncpg", "postgresql://app:pw@[::1]:0/app", "0"),
        ("asyncpg", "postgresql://app:pw@h1:5432,h2:99999/app?sslmode=disable", "99999"),
    ],
)
def test_a_port_that_is_no_number_is_refused_at_declaration(kind: str, dsn: str, port: str) -> None:
    """It was read only as the pool connected: each of the startup's retries failed the
    same, as a server that "cannot be reached" (psycopg), or with asyncpg's bare
    "invalid literal for int() with base 10: 'abc'"."""
    with pytest.raises(ValueError) as caught:
        MODULES[kind].pool(tether.Lifecycle(), dsn)
    assert str(caught.value) == port_refused(port, f"the {WHAT[kind]} has")
    assert "s3cret" not in str(caught.value)


def test_an_empty_port_value_swallowing_the_next_option_is_explained() -> None:
    """libpq reads `port= password=...` as port 'password=...' (spaces around '=' are
    optional): the password is lost, and not quoted."""
    with pytest.raises(ValueError) as caught:
        tpsy.pool(tether.Lifecycle(), "host=127.0.0.1 port= password=s3cret dbname=app")
    assert str(caught.value) == (
        "Pool 'pool': the conninfo has 'port=' followed by 'password=': libpq reads the "
        "spaces around '=' as optional, so the port is 'password=...' and the password= is "
        "lost. No connection can be made so, and no retry mends that: give the port "
        "(PostgreSQL's default is 5432), write an empty one port='', or leave it out."
    )


@pytest.mark.parametrize(
    ("kind", "dsn"),
    [
        ("psycopg", "postgresql://app:p/ss" + "w0rd@127.0.0.1:5432/app"),  # host 'app', port 'p'
        ("asyncpg", "postgresql://app:p/ss" + "w0rd@127.0.0.1:5432/app"),
        ("asyncpg", "postgresql://app:p#ss" + "w0rd@127.0.0.1:5432/app"),  # (libpq reads it)
        ("asyncpg", "postgresql://app:p?ss" + "w0rd@127.0.0.1:5432/app"),
    ],
)
def test_a_port_read_from_an_unencoded_password_is_not_quoted(kind: str, dsn: str) -> None:
    """An unencoded '/', '#' or '@' in the password: the drivers read the host and port from
    it. Before, asyncpg and libpq quoted that piece of the password in their error."""
    with pytest.raises(ValueError) as caught:
        MODULES[kind].pool(tether.Lifecycle(), dsn)
    assert str(caught.value) == MISREAD.format(given=f"the {WHAT[kind]} has")
    assert "w0rd" not in str(caught.value)
    assert "ss" not in str(caught.value).replace("address", "").replace("pass", "")


def test_ports_left_out_or_empty_are_the_default() -> None:
    for dsn in (
        "postgresql://app:pw@127.0.0.1/app",
        "postgresql://app:pw@127.0.0.1:/app",
        "postgresql://app:pw@h1:5432,h2/app",
        "postgresql://app:pw@[::1]/app",
        "postgresql://app:pw@[::1]:65535/app",
    ):
        tapg.pool(tether.Lifecycle(), dsn)
        tpsy.pool(tether.Lifecycle(), dsn)
    tpsy.pool(tether.Lifecycle(), "host=127.0.0.1 port='' dbname=app")
    tpsy.pool(tether.Lifecycle(), "host=h1,h2 port=5432,5433 dbname=app")


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_a_port_from_a_function_fails_the_start_unretried(kind: str) -> None:
    calls: list[int] = []

    def dsn() -> str:
        calls.append(1)
        return "postgresql://app:s3cret-pw@127.0.0.1:5432x/app"

    lc = tether.Lifecycle()
    MODULES[kind].pool(lc, dsn, retries=3, backoff=BACKOFF)
    t0 = time.monotonic()
    failure = await start(lc)
    assert time.monotonic() - t0 < 5.0
    given = f"the {WHAT[kind]} the function given for it returned has"
    assert str(failure) == unretried(f"ValueError: {unstopped(port_refused('5432x', given))}")
    assert calls == [1]
    assert "s3cret" not in full_traceback(failure)
