"""What tether.asyncpg does with asyncpg options that touch its own settings, and with an
endpoint that steps outside them (trial 23):

* `reset=`: the app's runs after tether's session reset (it replaced it, and a unit's `SET`
  and temporary tables reached the next); one that is not callable is refused at declaration;
* `pgbouncer=True` with `statement_cache_size=` or `reset=`: refused at declaration (each
  undid PgBouncer mode: most requests failed, some with another client's statement);
* a startup parameter PgBouncer refuses (`server_settings=`): said so, and not retried;
* a raw `COMMIT` in a `transaction=True` unit: said, on success and on failure;
* a notification listener left by a unit: dropped without asyncpg's warning.

A pool of one connection, so that the next unit of work surely gets the same connection.
"""

import logging
import warnings
from typing import Any

import pytest

import tether
from tests.servers import PgBouncer, Postgres
from tether.integrations import asyncpg as tpg

pytestmark = [pytest.mark.anyio]

DSN = "postgresql://localhost/x"


@pytest.mark.fastapi_free
def test_a_reset_that_is_not_callable_is_refused_at_declaration() -> None:
    with pytest.raises(TypeError) as caught:
        tpg.pool(tether.Lifecycle(), DSN, reset="SELECT 1")
    assert str(caught.value) == (
        "Pool 'pool': reset='SELECT 1' is not a coroutine function. asyncpg calls "
        "reset(conn) as a connection goes back to the pool: `async def reset(conn): await "
        "conn.execute(...)`. tether resets the session itself (RESET ALL, SET ROLE, temporary "
        "tables, what init= set kept); yours runs after it."
    )


@pytest.mark.fastapi_free
def test_pgbouncer_mode_refuses_a_statement_cache_and_a_reset() -> None:
    with pytest.raises(ValueError) as caught:
        tpg.pool(tether.Lifecycle(), DSN, pgbouncer=True, statement_cache_size=100)
    assert str(caught.value) == (
        "Pool 'pool': statement_cache_size=100 with pgbouncer=True. PgBouncer in transaction "
        "mode runs each transaction on any server connection, where asyncpg's named "
        "statements are missing or are another client's (errors such as \"prepared statement "
        "__asyncpg_stmt_3__ does not exist\", or a statement run with another one's "
        "parameters): pgbouncer=True sets statement_cache_size=0. Drop statement_cache_size=, "
        "or drop pgbouncer=True if this DSN reaches PostgreSQL directly or PgBouncer in "
        "session mode."
    )

    async def reset(conn: Any) -> None:
        pass

    with pytest.raises(ValueError) as caught:
        tpg.pool(tether.Lifecycle(), DSN, pgbouncer=True, reset=reset)
    assert str(caught.value).startswith(
        "Pool 'pool': reset= with pgbouncer=True. Behind PgBouncer in transaction mode the "
        "reset would run on whichever server connection PgBouncer picks"
    )
    # What PgBouncer mode sets itself, given again, is fine.
    tpg.pool(tether.Lifecycle(), DSN, pgbouncer=True, statement_cache_size=0)


async def test_the_apps_reset_runs_after_tethers(postgres: Postgres) -> None:
    ran: list[str] = []

    async def reset(conn: Any) -> None:
        ran.append(await conn.fetchval("SELECT current_setting('work_mem')"))

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, reset=reset)
    conn = tpg.connection(lc, pool)
    async with lc.run():
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.execute("SET work_mem = '99MB'; CREATE TEMP TABLE left_behind (x int)")
        async with lc.scope() as unit:
            c = await unit.get(conn)
            left = await c.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname = 'left_behind' "
                "AND relpersistence = 't'"
            )
            assert (await c.fetchval("SELECT current_setting('work_mem')"), left) == ("4MB", 0)
    assert ran[:1] == ["4MB"]  # after tether's reset


async def test_a_startup_parameter_pgbouncer_refuses_is_said_and_not_retried(
    pgbouncer: PgBouncer,
) -> None:
    lc = tether.Lifecycle()
    tpg.pool(lc, pgbouncer.dsn, pgbouncer=True, server_settings={"work_mem": "7MB"}, retries=2)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass
    said = str(caught.value)
    assert (
        "Pool 'pool': the server refused the startup parameter 'work_mem' (\"unsupported "
        'startup parameter"): PgBouncer passes on only the few it tracks, refuses the '
        "others, and drops those its ignore_startup_parameters lists without a word. Take "
        "'work_mem' out of server_settings=, and set it with the role's defaults (ALTER ROLE "
        "... SET work_mem = ...) or PgBouncer's connect_query. No retry mends this, so none "
        "was made."
    ) in said, said
    assert "attempt" not in said


async def test_a_raw_commit_in_a_transaction_unit_is_said(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    postgres.sql("DROP TABLE IF EXISTS raw_commits")
    postgres.sql("CREATE TABLE raw_commits (v text)")
    postgres.sql("GRANT ALL ON raw_commits TO tether")
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
    tx = tpg.connection(lc, pool, transaction=True)
    said = (
        "tether: 'conn': the endpoint ended the unit of work's transaction itself (a COMMIT "
        "or ROLLBACK it ran on the connection): the statements after it ran outside any "
        "transaction, each committed as it ran{}. For a part of the unit, use `async with "
        "conn.transaction():` (a savepoint); to commit as you go, use a connection resource "
        "without transaction=True."
    )
    caplog.set_level(logging.WARNING, logger="tether")
    async with lc.run():
        async with lc.scope() as unit:
            c = await unit.get(tx)
            await c.execute("INSERT INTO raw_commits VALUES ('a'); COMMIT")
            await c.execute("INSERT INTO raw_commits VALUES ('b')")
        assert said.format("") in caplog.messages
        caplog.clear()
        with pytest.raises(RuntimeError):
            async with lc.scope() as unit:
                c = await unit.get(tx)
                await c.execute("INSERT INTO raw_commits VALUES ('c'); COMMIT")
                await c.execute("INSERT INTO raw_commits VALUES ('d')")
                raise RuntimeError("a failure after it")
        assert said.format(", and this unit's failure rolls none of them back") in caplog.messages
    rows = postgres.sql("SELECT v FROM raw_commits ORDER BY v")
    assert rows == [("a",), ("b",), ("c",), ("d",)]


async def test_a_notification_listener_left_by_a_unit_goes_without_a_warning(
    postgres: Postgres,
) -> None:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
    conn = tpg.connection(lc, pool)
    got: list[str] = []
    async with lc.run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with lc.scope() as unit:
                c = await unit.get(conn)
                await c.add_listener("left_here", lambda *args: got.append(args[-1]))
        assert [str(w.message) for w in caught] == []  # asyncpg's InterfaceWarning, before
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.execute("LISTEN left_here; NOTIFY left_here, 'next'")  # the next unit's own
            await c.execute("UNLISTEN left_here")
    assert got == []  # the first unit's callback is gone


async def test_undo_overrides_in_a_block_leaves_the_blocks_own(postgres: Postgres) -> None:
    """`tether.testing.undo_overrides(lc)` in the middle of a test, inside a `rolled_back()`
    block: the test's own overrides go, the block's stays, and what the test writes after is
    still rolled back (the block's went too, and the writes were committed: trial 26)."""
    import tether.testing

    postgres.sql("DROP TABLE IF EXISTS block_notes")
    postgres.sql("CREATE TABLE block_notes (v text)")
    postgres.sql("GRANT ALL ON block_notes TO tether")
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=2)
    conn = tpg.connection(lc, pool)

    @lc.resource
    def user() -> str:
        return "real"

    async with lc.run(), tpg.rolled_back(conn):
        lc.override(user, lambda: "stray")
        undone = tether.testing.undo_overrides(lc)
        assert [line.split(" made at")[0] for line in undone] == ["lc.override(user, ...)"]
        async with lc.scope() as unit:
            c = await unit.get(conn)
            await c.execute("INSERT INTO block_notes VALUES ('in the block')")
    assert postgres.sql("SELECT count(*) FROM block_notes") == [(0,)]
