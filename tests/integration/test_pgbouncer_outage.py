"""PostgreSQL down behind PgBouncer: statements PgBouncer never ran are 503s, even outside a
transaction.

A client already connected to PgBouncer is not refused when the server goes away: its next
statement waits in PgBouncer for a server connection, and PgBouncer then drops the client
with "query_wait_timeout" or "server login has been failing". The statement never reached a
server, so it is safe to retry: a 503 with Retry-After, as inside a transaction, not the 500
of a statement lost under way (whose outcome is not known).
"""

import re
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.integration.drivers import ASYNCPG_BEFORE_0_32
from tests.servers import PgBouncer, Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy

pytestmark = pytest.mark.servers

NEVER_SENT = (
    r"Pool 'pool': PgBouncer found no server connection for the statement, so it did not run "
    r"\(.*(query_wait_timeout|server login has been failing).*\)\. Retry shortly; if it "
    r"persists, check the database behind PgBouncer\."
)


@pytest.fixture
def servers() -> Iterator[tuple[Postgres, PgBouncer]]:
    """A PostgreSQL of this test only (it is stopped), behind its own PgBouncer."""
    with Postgres() as pg, PgBouncer(pg, settings={"query_wait_timeout": 1}) as bouncer:
        yield pg, bouncer


def _asyncpg(lc: tether.Lifecycle, dsn: str) -> tether.Resource[Any]:
    return tpg.connection(lc, tpg.pool(lc, dsn, pgbouncer=True, min_size=1, max_size=1))


def _psycopg(lc: tether.Lifecycle, dsn: str) -> tether.Resource[Any]:
    pool = tpsy.pool(lc, dsn, pgbouncer=True, min_size=1, max_size=1, pre_ping=False)
    return tpsy.connection(lc, pool)


@pytest.mark.parametrize("make", [_asyncpg, _psycopg], ids=["asyncpg", "psycopg"])
def test_statements_pgbouncer_never_ran_are_503s(
    servers: tuple[Postgres, PgBouncer],
    make: Callable[[tether.Lifecycle, str], tether.Resource[Any]],
) -> None:
    if make is _asyncpg and ASYNCPG_BEFORE_0_32:
        pytest.skip("asyncpg < 0.32 drops PgBouncer's message as the connection closes")
    pg, bouncer = servers
    lc = tether.Lifecycle()
    conn = make(lc, bouncer.dsn)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/q")
    async def q(c: Annotated[Any, Depends(conn)]) -> str:
        await c.execute("SELECT 1")  # no transaction: autocommit
        return "ok"

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/q").status_code == 200
        pg.kill()
        answers = [client.get("/q") for _ in range(3)]
        assert [a.status_code for a in answers] == [503] * 3, [a.text for a in answers]
        assert all(a.headers["retry-after"] == "1" for a in answers)
        details = [a.json()["detail"] for a in answers]
        assert any(re.fullmatch(NEVER_SENT, d) for d in details), details
        pg.start()
        deadline = time.monotonic() + 20
        while client.get("/q").status_code != 200:  # back without a restart of the app
            assert time.monotonic() < deadline
            time.sleep(0.2)
