"""What tether.asyncpg hands the next unit of work, beyond the server's session
(test_session_state.py): asyncpg's callbacks on the connection object, what the pool's
`init=` set, and the options that decide whether the reset runs.

A pool of one connection, so that the next unit of work surely gets the same connection.
"""

from typing import Any

import asyncpg
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg

pytestmark = [pytest.mark.anyio]


# --------------------------------------------------------------------------- bool options


@pytest.mark.fastapi_free
def test_a_string_for_pgbouncer_is_refused() -> None:
    """`pgbouncer="false"` (an environment variable's value) used to turn PgBouncer mode on,
    which skips the session reset: a `SET` of one request reached the next."""
    with pytest.raises(TypeError) as caught:
        tpg.pool(tether.Lifecycle(), "postgresql://localhost/x", pgbouncer="false")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "Pool 'pool': pgbouncer='false' is a str, not a bool. Pass True or False (a setting "
        "read from the environment is a string, and 'false' would count as true: convert it, "
        'e.g. pgbouncer=os.environ.get(...) == "1").'
    )


@pytest.mark.fastapi_free
@pytest.mark.parametrize("option", ["pgbouncer", "required"])
def test_the_pools_bool_options_refuse_other_values(option: str) -> None:
    with pytest.raises(TypeError, match=rf"^Pool 'pool': {option}=1 is an int, not a bool\."):
        tpg.pool(tether.Lifecycle(), "postgresql://localhost/x", **{option: 1})


@pytest.mark.fastapi_free
@pytest.mark.parametrize("option", ["transaction", "readonly"])
def test_the_connections_bool_options_refuse_other_values(option: str) -> None:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, "postgresql://localhost/x")
    with pytest.raises(TypeError, match=rf"^Connection 'conn': {option}='no' is a str"):
        tpg.connection(lc, pool, **{option: "no"})


@pytest.mark.fastapi_free
def test_once_record_refuses_a_string() -> None:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, "postgresql://localhost/x")

    async def job(c: asyncpg.Connection) -> None:
        pass

    with pytest.raises(TypeError, match=r"^tether.integrations.asyncpg.once\(key='k'\): record="):
        tpg.once(lc, pool, job, key="k", record="false")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- query loggers


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
async def test_query_loggers_of_a_unit_do_not_reach_the_next(
    postgres: Postgres, transaction: bool
) -> None:
    """A query logger a unit adds (`conn.add_query_logger`) used to stay on the connection
    (asyncpg's reset clears listeners, not these), receive the next units' SQL and
    arguments, and pile up. One the pool's `init=` added stays, and keeps receiving."""
    pool_logged: list[Any] = []

    def pool_logger(q: Any) -> None:
        pool_logged.append(q.args)

    async def init(c: asyncpg.Connection) -> None:
        c.add_query_logger(pool_logger)

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=init)
    conn = tpg.connection(lc, pool, transaction=transaction)
    logged: list[Any] = []
    async with lc.run():
        for unit in (1, 2, 3):
            async with lc.scope() as s:
                c = await s.get(conn)
                assert len(c._con._query_loggers) == 1  # init's only
                if unit == 1:
                    c.add_query_logger(lambda q: logged.append(q.args))
                await c.fetchval("SELECT $1::text", f"token of user {unit}")
    # Unit 1's own queries only (with a transaction, its COMMIT too: no arguments).
    assert [a for a in logged if a] == [("token of user 1",)]
    assert [a for a in pool_logged if a] == [(f"token of user {u}",) for u in (1, 2, 3)]


# --------------------------------------------------------------------------- init's settings


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_what_init_sets_reaches_every_unit_of_work(postgres: Postgres) -> None:
    """A `SET` in the pool's `init=` was undone by the reset before any request saw it (the
    pool's own startup query already releases the connection once). It is kept, as psycopg's
    `configure=` is: the reset undoes the unit's own `SET`s, and puts init's back."""

    async def init(c: asyncpg.Connection) -> None:
        await c.execute("SET search_path TO app, public")
        await c.execute("SET statement_timeout = '30s'")

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=init)
    conn = tpg.connection(lc, pool)
    check = "SELECT current_setting('search_path'), current_setting('statement_timeout')"
    seen = []
    async with lc.run():
        for _ in range(3):
            async with lc.scope() as s:
                c = await s.get(conn)
                seen.append(tuple(await c.fetchrow(check)))
                await c.execute("SET statement_timeout = '1s'; SET search_path TO nowhere")
        assert lc.stats().pools["pool"].discarded == 0
    assert seen == [("app, public", "30s")] * 3


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_rolled_back_drops_a_units_query_loggers_as_production_does(
    postgres: Postgres,
) -> None:
    """In `rolled_back` every unit of work gets the block's connection: the query loggers one
    adds go at its end, as on release."""
    lc = tether.Lifecycle()
    conn = tpg.connection(lc, tpg.pool(lc, postgres.dsn, min_size=1, max_size=1))
    logged: list[Any] = []
    async with lc.run(), tpg.rolled_back(conn):
        for unit in (1, 2):
            async with lc.scope() as s:
                c = await s.get(conn)
                if unit == 1:
                    c.add_query_logger(lambda q: logged.append(q.args))
                await c.fetchval("SELECT $1::text", f"unit {unit}")
    assert [a for a in logged if a] == [("unit 1",)]
