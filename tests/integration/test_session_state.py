"""What a unit of work leaves on a pooled connection does not reach the next one
(reliability.md, test 15; asyncpg's pool resets its connections the same way).

A pool of one connection; one request changes the session (`SET`, `SET SESSION
AUTHORIZATION`, `SET ROLE`, an advisory lock, `LISTEN`, a temporary table with a row in it,
in a committed transaction and outside one); the next request, on the same backend, sees none
of it.
"""

from typing import Any

import anyio
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

DIRTY = [
    "CREATE TEMP TABLE tether_leftover (secret text)",
    "INSERT INTO tether_leftover VALUES ('card 4242')",
    "SET SESSION AUTHORIZATION tether_guest",
    "SET statement_timeout = '123s'",
    "SET search_path TO nowhere, public",
    "SET ROLE once_reader",
    "SELECT pg_advisory_lock(4242)",
    "LISTEN tether_chan",
]
CHECK = (
    "SELECT pg_backend_pid(), current_setting('statement_timeout'), "
    "current_setting('search_path'), current_user, "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), "
    "session_user, "
    "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), "
    "(SELECT count(*) FROM pg_listening_channels())"
)


class Driver:
    def __init__(self, kind: str, transaction: bool) -> None:
        self.kind, self.transaction = kind, transaction

    def make(self, lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
        if self.kind == "asyncpg":
            pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=1)
            return tpg.connection(lc, pool, transaction=self.transaction)
        if self.kind == "psycopg":
            ppool = tpsy.pool(lc, pg.dsn, min_size=1, max_size=1)
            return tpsy.connection(lc, ppool, transaction=self.transaction)
        if self.kind == "sync":
            sync = tsa.sync_engine(lc, pg.url("postgresql+psycopg"), pool_size=1)
            return tsa.sync_session(lc, sync)
        engine = tsa.engine(lc, pg.url(self.kind), pool_size=1)
        return tsa.session(lc, engine)

    async def execute(self, c: Any, sql: str) -> None:
        if self.kind == "sync":
            from sqlalchemy import text

            c.execute(text(sql))
        elif self.kind.startswith("postgresql+"):
            from sqlalchemy import text

            await c.execute(text(sql))
        else:
            await c.execute(sql)

    async def fetch(self, c: Any, sql: str) -> tuple[Any, ...]:
        if self.kind == "sync":
            from sqlalchemy import text

            return tuple(c.execute(text(sql)).one())
        if self.kind.startswith("postgresql+"):
            from sqlalchemy import text

            return tuple((await c.execute(text(sql))).one())
        if self.kind == "psycopg":
            return tuple(await (await c.execute(sql)).fetchone())
        return tuple(await c.fetchrow(sql))


DRIVERS = [
    Driver("asyncpg", False),
    Driver("asyncpg", True),
    Driver("psycopg", False),
    Driver("psycopg", True),
    Driver("postgresql+asyncpg", True),
    Driver("postgresql+psycopg", True),
    Driver("sync", True),
]
IDS = [
    "asyncpg",
    "asyncpg-tx",
    "psycopg",
    "psycopg-tx",
    "sqlalchemy-asyncpg",
    "sqlalchemy-psycopg",
    "sqlalchemy-sync",
]


@pytest.fixture(scope="module")
def role(postgres: Postgres) -> None:
    for role in ("once_reader", "tether_guest"):
        postgres.sql(f"DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object "
                     "THEN NULL; END $$")  # fmt: skip
    postgres.sql("GRANT once_reader TO tether, tether_guest")


@pytest.mark.parametrize("driver", DRIVERS, ids=IDS)
async def test_the_next_unit_of_work_gets_a_clean_session(
    postgres: Postgres, role: None, driver: Driver
) -> None:
    lc = tether.Lifecycle()
    conn = driver.make(lc, postgres)
    async with lc.run():
        async with lc.scope() as s:
            c = await s.get(conn)
            clean = await driver.fetch(c, CHECK)
            for sql in DIRTY:
                await driver.execute(c, sql)
            dirty = await driver.fetch(c, CHECK)
        # LISTEN takes effect at the commit: not counted here.
        assert dirty[1:7] == ("123s", "nowhere, public", "once_reader", 1, "tether_guest", 1)
        async with lc.scope() as s:
            after = await driver.fetch(await s.get(conn), CHECK)
        assert after[0] == clean[0]  # the same backend: reset, not replaced
        assert after[1:] == clean[1:]
    await anyio.sleep(0)


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg"])
async def test_a_role_given_when_connecting_survives_the_reset(
    postgres: Postgres, role: None, kind: str
) -> None:
    """The reset undoes a `SET ROLE` back to the role the connection was opened with, not to
    the login user: an app that connects with a role keeps it for every request."""
    lc = tether.Lifecycle()
    if kind == "asyncpg":
        pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1,
                        server_settings={"role": "once_reader"})  # fmt: skip
        conn: tether.Resource[Any] = tpg.connection(lc, pool)
    else:
        ppool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1,
                          kwargs={"options": "-c role=once_reader"})  # fmt: skip
        conn = tpsy.connection(lc, ppool)
    driver = Driver(kind, False)
    async with lc.run():
        async with lc.scope() as s:
            c = await s.get(conn)
            assert await driver.fetch(c, "SELECT current_user") == ("once_reader",)
            await driver.execute(c, "SET ROLE tether_guest")
        async with lc.scope() as s:
            assert await driver.fetch(await s.get(conn), "SELECT current_user") == ("once_reader",)
    await anyio.sleep(0)


SETUP = ("SET search_path TO app, public", "SET statement_timeout = '2s'")
SETUP_CHECK = (
    "SELECT pg_backend_pid(), current_setting('search_path'), current_setting('statement_timeout')"
)


async def test_what_psycopg_configure_sets_survives_the_reset(postgres: Postgres) -> None:
    """Settings the pool's `configure=` makes with `SET` are what every unit of work starts
    with: the reset undoes the unit's own `SET`s, and puts configure's back (a
    `statement_timeout` set there used to vanish after the first request)."""

    async def setup_psycopg(conn: Any) -> None:
        for sql in SETUP:
            await conn.execute(sql)
        await conn.commit()

    lc = tether.Lifecycle()
    ppool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1, configure=setup_psycopg)
    conn = tpsy.connection(lc, ppool, transaction=True)
    driver = Driver("psycopg", True)
    async with lc.run():
        async with lc.scope() as s:
            c = await s.get(conn)
            first = await driver.fetch(c, SETUP_CHECK)
            await driver.execute(c, "SET search_path TO nowhere")
            await driver.execute(c, "SET statement_timeout = '9s'")
        for _ in range(2):
            async with lc.scope() as s:
                assert await driver.fetch(await s.get(conn), SETUP_CHECK) == first
    assert first[1:] == ("app, public", "2s")
    await anyio.sleep(0)


async def test_psycopg_connection_settings_do_not_reach_the_next_unit_of_work(
    postgres: Postgres,
) -> None:
    """What psycopg keeps on the connection object (`read_only`, the isolation level,
    `deferrable`, the row factory) is put back as the pool gave it: a unit of work that made
    its connection read-only used to leave the next one's writes failing as on a replica (a
    503, and every connection of the pool replaced)."""
    import psycopg
    from psycopg.rows import dict_row, namedtuple_row

    lc = tether.Lifecycle()
    ppool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1, kwargs={"row_factory": dict_row})
    conn = tpsy.connection(lc, ppool, transaction=True)
    async with lc.run():
        async with lc.scope() as s:
            c = await s.get(conn)
            pid = c.info.backend_pid
            await c.set_read_only(True)
            await c.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            await c.set_deferrable(True)
            c.row_factory = namedtuple_row
            await c.execute("SELECT 1")
        async with lc.scope() as s:
            c = await s.get(conn)
            assert c.info.backend_pid == pid  # the same connection, put back as it was
            assert (c.read_only, c.isolation_level, c.deferrable) == (None, None, None)
            assert c.row_factory is dict_row
            await c.execute("CREATE TEMP TABLE written (k int)")  # a write: not read-only
            row = await (
                await c.execute("SELECT current_setting('transaction_isolation') AS i")
            ).fetchone()
            assert row == {"i": "read committed"}
        assert lc.stats().pools["pool"].discarded == 0
