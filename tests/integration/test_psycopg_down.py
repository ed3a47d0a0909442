"""psycopg with its own PostgreSQL, killed while the app serves: the 503 says the database
cannot be reached, not that the pool is too small."""

from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

import tether
from tests.servers import Postgres
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.servers, pytest.mark.anyio]


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    with Postgres() as server:
        yield server


async def test_a_database_gone_with_no_connection_in_use_is_said_so(
    own_postgres: Postgres,
) -> None:
    """With none of the pool's connections in use, a wait that times out is no sign of a
    pool too small or requests too slow: the pool could not make a connection. Before, the
    503 blamed those (and a restart read as saturation)."""
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, own_postgres.dsn, min_size=1, max_size=2, timeout=1.0)
    conn = tpsy.connection(lc, pool)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(c: Annotated[Any, Depends(conn)]) -> int:
        cur = await c.execute("SELECT 1")
        row = await cur.fetchone()
        return int(row[0])

    transport = httpx.ASGITransport(app=app)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
    ):
        assert (await client.get("/")).json() == 1
        own_postgres.kill()
        statuses = [(await client.get("/")).status_code for _ in range(3)]
        answer = await client.get("/")
    assert statuses[-1] == 503
    assert answer.status_code == 503
    assert answer.json()["detail"] == (
        "Pool 'pool' (size 2, in use 0, waiting 0) could not give a connection: none is in "
        "use, and the pool could not make one within timeout=1 s: the database cannot be "
        "reached, or is restarting. Retry shortly; if it persists, check that the database "
        "runs and is reachable."
    )
