"""Connections have a lifetime (pain.md T8.6, reliability.md test 16).

With a lifetime of one second, a connection older than that is replaced when it is next
taken (or given back), never closed under the unit of work holding it, and a young one is
reused. asyncpg has no lifetime of its own: tether's pool has `max_lifetime=`. psycopg's pool
has `max_lifetime`, SQLAlchemy's `pool_recycle`; the integrations pass them on.
"""

import time
from typing import Any

import anyio
import pytest

import tether
from tests.integration.drivers import scalar
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

APP = "tether-lifetime"
LIFETIME = 1.0


def asyncpg_conn(lc: tether.Lifecycle, pg: Postgres) -> Any:
    pool = tpg.pool(
        lc,
        pg.dsn,
        min_size=1,
        max_size=1,
        max_lifetime=LIFETIME,
        server_settings={"application_name": APP},
    )
    return tpg.connection(lc, pool)


def psycopg_conn(lc: tether.Lifecycle, pg: Postgres) -> Any:
    pool = tpsy.pool(
        lc,
        pg.dsn,
        min_size=1,
        max_size=1,
        max_lifetime=LIFETIME,
        kwargs={"application_name": APP},
    )
    return tpsy.connection(lc, pool)


def sqlalchemy_session(lc: tether.Lifecycle, pg: Postgres) -> Any:
    engine = tsa.engine(
        lc, pg.url("postgresql+asyncpg"), pool_size=1, pool_recycle=LIFETIME, application_name=APP
    )
    return tsa.session(lc, engine)


@pytest.mark.parametrize(
    "make",
    [asyncpg_conn, psycopg_conn, sqlalchemy_session],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)
async def test_an_old_connection_is_replaced_between_units_never_during_one(
    postgres: Postgres, make: Any
) -> None:
    lc = tether.Lifecycle()
    conn = make(lc, postgres)
    async with lc.run():
        async with lc.scope() as s:  # outlives the lifetime: not closed under it
            c = await s.get(conn)
            first = await scalar(c, "SELECT pg_backend_pid()")
            await anyio.sleep(LIFETIME * 1.5)
            assert await scalar(c, "SELECT pg_backend_pid()") == first
        async with lc.scope() as s:  # the old one is gone: a new backend
            second = await scalar(await s.get(conn), "SELECT pg_backend_pid()")
        assert second != first
        async with lc.scope() as s:  # a young one is reused
            assert await scalar(await s.get(conn), "SELECT pg_backend_pid()") == second
        started = time.monotonic()
        while first in {row["pid"] for row in postgres.activity(APP)}:
            assert time.monotonic() - started < 5, "the expired backend is still connected"
            await anyio.sleep(0.05)


def test_max_lifetime_must_be_positive() -> None:
    with pytest.raises(ValueError) as caught:
        tpg.pool(tether.Lifecycle(), "postgresql://x", max_lifetime=0)
    assert str(caught.value) == (
        "Pool 'pool': max_lifetime=0 must be a positive number of seconds (or None)."
    )
