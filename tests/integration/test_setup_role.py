"""A role the pool's own setup takes (asyncpg's `init=`, psycopg's `configure=`, a SQLAlchemy
`connect` listener) is what every unit of work runs as: the reset between units undoes a
unit's own `SET ROLE`, and puts the setup's back, as it does the setup's `SET`s. It used to
drop it at the first release: every request then ran as the login role, and read what the
role of least privilege may not."""

from typing import Any

import anyio
import pytest
from sqlalchemy import event, text

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

CHECK = "SELECT current_user::text, session_user::text, current_setting('search_path')"
KINDS = ["asyncpg", "psycopg", "sqlalchemy"]


@pytest.fixture(scope="module")
def roles(postgres: Postgres) -> None:
    for role in ("setup_reader", "setup_other"):
        postgres.sql(f"DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object "
                     "THEN NULL; END $$")  # fmt: skip
    postgres.sql("GRANT setup_reader, setup_other TO tether")
    postgres.sql("CREATE TABLE IF NOT EXISTS setup_secret (v text)")
    postgres.sql("REVOKE ALL ON setup_secret FROM setup_reader")


def make(lc: tether.Lifecycle, pg: Postgres, kind: str, setup: str) -> tuple[Any, Any]:
    """A pool of one connection whose setup runs *setup*; its request resource, and the
    engine (SQLAlchemy: its listener is added once it is open)."""
    if kind == "asyncpg":

        async def init(conn: Any) -> None:
            await conn.execute(setup)

        pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=1, init=init)
        return None, tpg.connection(lc, pool)
    if kind == "psycopg":

        async def configure(conn: Any) -> None:
            await conn.execute(setup)
            await conn.commit()

        ppool = tpsy.pool(lc, pg.dsn, min_size=1, max_size=1, configure=configure)
        return None, tpsy.connection(lc, ppool)
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=1)
    return engine, tsa.session(lc, engine)


async def fetch(kind: str, c: Any, sql: str) -> tuple[Any, ...]:
    if kind == "asyncpg":
        return tuple(await c.fetchrow(sql))
    if kind == "psycopg":
        return tuple(await (await c.execute(sql)).fetchone())
    return tuple((await c.execute(text(sql))).one())


async def execute(kind: str, c: Any, sql: str) -> None:
    await c.execute(text(sql) if kind == "sqlalchemy" else sql)


async def start(lc: tether.Lifecycle, engine: Any, setup: str) -> None:
    if engine is None:
        return

    def set_up(dbapi_connection: Any, record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        for sql in setup.split("; "):  # one statement each: asyncpg's prepares it
            cursor.execute(sql)
        cursor.close()
        dbapi_connection.autocommit = autocommit

    eng = lc.get(engine)
    event.listen(eng.sync_engine, "connect", set_up)
    await eng.dispose()  # the connection made at startup had no listener


@pytest.mark.parametrize("kind", KINDS)
async def test_a_role_the_setup_takes_is_every_units_role(
    postgres: Postgres, roles: None, kind: str
) -> None:
    setup = "SET ROLE setup_reader; SET search_path TO app, public"
    lc = tether.Lifecycle()
    engine, conn = make(lc, postgres, kind, setup)
    async with lc.run():
        await start(lc, engine, setup)
        async with lc.scope() as s:
            c = await s.get(conn)
            first = await fetch(kind, c, CHECK)
            await execute(kind, c, "SET ROLE setup_other")  # the unit's own: undone
        for _ in range(2):
            async with lc.scope() as s:
                c = await s.get(conn)
                assert await fetch(kind, c, CHECK) == first
                may_read = "SELECT has_table_privilege('setup_secret', 'SELECT')"
                assert await fetch(kind, c, may_read) == (False,)
    assert first == ("setup_reader", "tether", "app, public")
    await anyio.sleep(0)
