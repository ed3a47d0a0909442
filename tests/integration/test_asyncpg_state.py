"""What tether.asyncpg hands the next unit of work, beyond the server's session
(test_session_state.py): asyncpg's callbacks on the connection object, what the pool's
`init=` set, and the options that decide whether the reset runs.

A pool of one connection, so that the next unit of work surely gets the same connection.
"""

import asyncio
import uuid
from contextlib import nullcontext
from typing import Any

import anyio
import asyncpg
import pytest

import tether
from tests.integration.drivers import settled
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

    with pytest.raises(TypeError, match=r"^once 'job': record='false' is a str, not a bool"):
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


# --------------------------------------------------------------------------- termination listeners


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
@pytest.mark.parametrize("with_init", [False, True], ids=["no-init", "init"])
async def test_termination_listeners_of_a_unit_do_not_reach_the_next(
    postgres: Postgres, transaction: bool, with_init: bool
) -> None:
    """A termination listener a unit adds (`conn.add_termination_listener`) used to stay on
    the connection (asyncpg's reset clears the listeners and log listeners, not these): one
    more per unit, and a later unit's close ran every earlier unit's callback, each given that
    later unit's connection. Those the pool's `init=` added stay, as does tether's own (which
    counts an idle connection the server ended)."""
    app_name = f"term-listeners-{uuid.uuid4().hex[:8]}"
    pool_closed: list[str] = []

    async def init(c: asyncpg.Connection) -> None:
        c.add_termination_listener(lambda _: pool_closed.append("init's"))

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=init if with_init else None,
                    server_settings={"application_name": app_name})  # fmt: skip
    kept = 2 if with_init else 1  # tether's, and init's
    conn = tpg.connection(lc, pool, transaction=transaction)
    closed: list[int] = []
    found: list[int] = []  # the termination listeners each unit found on its connection
    async with lc.run():
        for unit in (1, 2, 3):
            async with lc.scope() as s:
                c = await s.get(conn)
                found.append(len(c._con._termination_listeners))
                c.add_termination_listener(lambda _, unit=unit: closed.append(unit))
                await c.execute("SELECT 1")
        # With a transaction, its commit fails on the closed connection: a 503.
        lost = pytest.raises(tether.ResourceUnavailable) if transaction else nullcontext()
        with lost:
            async with lc.scope() as s:
                c = await s.get(conn)
                found.append(len(c._con._termination_listeners))
                c.add_termination_listener(lambda _: closed.append(4))
                c.terminate()  # unit 4's connection closes: its own listener runs, no other
                await anyio.sleep(0.1)
        assert (found, sorted(closed)) == ([kept] * 4, [4])  # unit 4's own only
        assert pool_closed == ["init's"] * with_init
        assert lc.stats().pools["pool"].discarded == 1  # counted as given back closed
        # The next connection, lost while idle: init's listener runs, tether's counts it.
        async with lc.scope() as s:
            c = await s.get(conn)
            c.add_termination_listener(lambda _: closed.append(5))
            await c.execute("SELECT 1")
        assert await asyncio.to_thread(postgres.terminate, app_name) == 1
        await settled(lambda: lc.stats().pools["pool"].discarded == 2, "two discarded", 10)
        assert pool_closed == ["init's", "init's"] * with_init
    assert closed == [4]


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_rolled_back_drops_a_units_termination_listeners(postgres: Postgres) -> None:
    """In `rolled_back` every unit of work gets the block's connection: the termination
    listeners and log listeners one adds go at its end, as on release (tether drops the
    former, asyncpg's reset the latter); the test's own on the block's connection stay for
    the block, and go with it."""
    lc = tether.Lifecycle()
    conn = tpg.connection(lc, tpg.pool(lc, postgres.dsn, min_size=1, max_size=1))
    closed: list[str] = []

    def fixture_listener(_: Any) -> None:
        closed.append("fixture")

    async with lc.run():
        async with tpg.rolled_back(conn) as block:
            found = set(block._con._termination_listeners)
            block.add_termination_listener(fixture_listener)
            block.add_query_logger(lambda q: None)
            for unit in (1, 2):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    assert len(c._con._termination_listeners) == len(found) + 1
                    c.add_termination_listener(lambda _, unit=unit: closed.append(f"unit {unit}"))
                    c.add_log_listener(
                        lambda _, m, unit=unit: closed.append(f"log {unit}: {m.message}")
                    )
                    await c.execute(f"DO $$ BEGIN RAISE NOTICE 'in unit {unit}'; END $$")
                    await anyio.sleep(0.05)
            assert len(block._con._termination_listeners) == len(found) + 1
            raw = block._con
        assert set(raw._termination_listeners) == found  # the block's own went with it
        assert not raw._query_loggers
        async with lc.scope() as s:
            c = await s.get(conn)
            c.terminate()
            await anyio.sleep(0.1)
    assert closed == ["log 1: in unit 1", "log 2: in unit 2"]
