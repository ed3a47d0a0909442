"""A server that refuses the connection (a role or database that does not exist, a wrong
password) refuses it again: `retries=` are not spent on it, with every driver.

asyncpg and SQLAlchemy on asyncpg carry the server's SQLSTATE; psycopg (and SQLAlchemy on
psycopg) do not, as libpq keeps it to itself at connect time: tether reads the server's
message then (`tests/unit/test_refusals.py` pins which messages). A wrong password is tested
on asyncpg (`test_asyncpg.py`), as this server trusts every password.
"""

import contextlib
import time

import anyio
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

CASES = [
    ("role", "28000"),
    ("database", "3D000"),
]


def refused_dsn(pg: Postgres, what: str, scheme: str = "postgresql") -> str:
    dsn = pg.url(scheme) if scheme != "postgresql" else pg.dsn
    if what == "role":
        return dsn.replace("//tether:", "//no_such_role:")
    return dsn.rsplit("/", 1)[0] + "/no_such_db"


SCHEMES = {
    "psycopg": "postgresql",
    "sqlalchemy-psycopg": "postgresql+psycopg",
    "sqlalchemy-sync": "postgresql+psycopg",
    "sqlalchemy-asyncpg": "postgresql+asyncpg",
}


#: A retry sleeps this long first: far above the bound the tests assert (a sleep never ends
#: early, so a retry always fails it), and the bound far above a refusal on a loaded machine.
BACKOFF = 8.0


def make(lc: tether.Lifecycle, kind: str, dsn: str) -> None:
    if kind == "psycopg":
        tpsy.pool(lc, dsn, retries=3, backoff=BACKOFF)
    elif kind == "sqlalchemy-sync":
        tsa.sync_engine(lc, dsn, retries=3, backoff=BACKOFF)
    else:
        tsa.engine(lc, dsn, retries=3, backoff=BACKOFF)


@pytest.mark.parametrize(("what", "sqlstate"), CASES)
@pytest.mark.parametrize("kind", sorted(SCHEMES))
async def test_a_refused_connection_is_not_retried(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, kind: str, what: str, sqlstate: str
) -> None:
    lc = tether.Lifecycle()
    make(lc, kind, refused_dsn(postgres, what, SCHEMES[kind]))
    t0 = time.monotonic()
    with pytest.raises(tether.StartupError) as info:
        async with lc.run():
            pass  # pragma: no cover
    assert time.monotonic() - t0 < 5.0  # a retry would have waited BACKOFF (8 s) first
    text = str(info.value)
    thing = 'role "no_such_role"' if what == "role" else 'database "no_such_db"'
    if "ResourceUnavailable" not in text:  # the driver's own error, then tether's word on it
        # (psycopg's pool; SQLAlchemy 2.0 raises asyncpg's own error from a connect)
        assert text.endswith(
            f"{thing} does not exist. The resources already open were closed. The "
            f"server refused the credentials or the database (SQLSTATE {sqlstate}), which no "
            "retry mends, so none was made: fix the user, password or database name it "
            "connects with."
        )
    else:  # the engine's pool says it, in the error a request would get too
        assert text.endswith(
            f"{thing} does not exist. The server refused the credentials or the "
            f"database (SQLSTATE {sqlstate}): check the user, password and database name it "
            "connects with. The resources already open were closed. No retry mends a "
            "refusal, so none was made."
        )
    assert "retrying" not in caplog.text


@pytest.mark.parametrize("password", ["wrong-pw", None], ids=["wrong", "missing"])
async def test_a_redis_server_that_refuses_the_credentials_is_not_retried(
    password: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis too: a wrong or missing password was tried `retries=` times with backoff (7 s
    for retries=3), and the message advised more retries=. With required=False the
    background attempts drop to once a minute, as for PostgreSQL."""
    import redis as sync_redis

    from tests.servers import Redis
    from tether.integrations import redis as tredis

    with Redis() as rd, contextlib.ExitStack() as undo:
        with sync_redis.Redis.from_url(rd.url) as first:
            first.config_set("requirepass", "right-pw")
        admin = sync_redis.Redis.from_url(rd.url.replace("redis://", "redis://:right-pw@"))
        undo.callback(admin.close)
        undo.callback(admin.config_set, "requirepass", "")  # for the harness's own stop
        url = rd.url if password is None else rd.url.replace("redis://", f"redis://:{password}@")
        lc = tether.Lifecycle()
        tredis.client(lc, url, retries=3, backoff=BACKOFF)
        t0 = time.monotonic()
        with pytest.raises(tether.StartupError) as info:
            async with lc.run():
                pass  # pragma: no cover
        assert time.monotonic() - t0 < 5.0  # no backoff waited (a retry waits 8 s first)
        message = str(info.value)
        assert message.startswith(
            f"App resource 'redis' failed to open: AuthenticationError: Redis client 'redis': "
            f"the server at {url.replace(f':{password}@', ':***@')} refused the credentials ("
        )
        assert message.endswith(
            "). Fix the user and password in its URL, or the server's ACL. The resources "
            "already open were closed. Fix the cause above: a mistake in the configuration or "
            "the code, which no retry mends."
        )
        assert "wrong-pw" not in message

        caplog.clear()
        down = tether.Lifecycle()
        tredis.client(down, url, required=False, backoff=0.05)
        async with down.run():
            await anyio.sleep(0.5)
        refused = [r for r in caplog.records if "no retry mends that" in r.getMessage()]
        assert len(refused) == 1
        assert tether.Lifecycle.stats(down).resources["redis"].open_errors <= 2
