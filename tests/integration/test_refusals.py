"""A server that refuses the connection (a role or database that does not exist, a wrong
password) refuses it again: `retries=` are not spent on it, with every driver.

asyncpg and SQLAlchemy on asyncpg carry the server's SQLSTATE; psycopg (and SQLAlchemy on
psycopg) do not, as libpq keeps it to itself at connect time: tether reads the server's
message then (`tests/unit/test_refusals.py` pins which messages). A wrong password is tested
on asyncpg (`test_asyncpg.py`), as this server trusts every password.
"""

import time

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


def make(lc: tether.Lifecycle, kind: str, dsn: str) -> None:
    if kind == "psycopg":
        tpsy.pool(lc, dsn, retries=3, backoff=2.0)
    elif kind == "sqlalchemy-sync":
        tsa.sync_engine(lc, dsn, retries=3, backoff=2.0)
    else:
        tsa.engine(lc, dsn, retries=3, backoff=2.0)


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
    assert time.monotonic() - t0 < 1.5  # a retry would have waited 2 s first
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
