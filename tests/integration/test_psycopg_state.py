"""What tether.psycopg hands the next unit of work, beyond the server's session
(test_session_state.py): psycopg's own state on the connection object, the connection object
itself after its unit of work, and the options that decide whether the reset runs.

A pool of one connection, so that the next unit of work surely gets the same connection.
"""

import logging
from typing import Annotated, Any

import anyio
import psycopg
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

import tether
from tests.servers import Postgres
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.anyio]

Conn = psycopg.AsyncConnection[Any]


async def one(c: Any, sql: str) -> Any:
    row = await (await c.execute(sql)).fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------- bool options


@pytest.mark.fastapi_free
def test_a_string_for_pgbouncer_is_refused() -> None:
    """`pgbouncer="false"` (an environment variable's value) used to turn PgBouncer mode on,
    which skips the session reset: connections went back dirty."""
    with pytest.raises(TypeError) as caught:
        tpsy.pool(tether.Lifecycle(), "postgresql://localhost/x", pgbouncer="false")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "Pool 'pool': pgbouncer='false' is a str, not a bool. Pass True or False (a setting "
        "read from the environment is a string, and 'false' would count as true: convert it, "
        'e.g. pgbouncer=os.environ.get(...) == "1").'
    )


@pytest.mark.fastapi_free
@pytest.mark.parametrize("option", ["pgbouncer", "pre_ping", "required"])
def test_the_pools_bool_options_refuse_other_values(option: str) -> None:
    with pytest.raises(TypeError, match=rf"^Pool 'pool': {option}=1 is an int, not a bool\."):
        tpsy.pool(tether.Lifecycle(), "postgresql://localhost/x", **{option: 1})


@pytest.mark.fastapi_free
@pytest.mark.parametrize("option", ["transaction", "reset_session"])
def test_the_connections_bool_options_refuse_other_values(option: str) -> None:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, "postgresql://localhost/x")
    with pytest.raises(TypeError, match=rf"^Connection 'conn': {option}='no' is a str"):
        tpsy.connection(lc, pool, **{option: "no"})


@pytest.mark.fastapi_free
def test_once_record_refuses_a_string() -> None:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, "postgresql://localhost/x")

    async def job(c: Conn) -> None:
        pass

    with pytest.raises(TypeError, match=r"^once 'job': record='false' is a str, not a bool"):
        tpsy.once(lc, pool, job, key="k", record="false")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- notifications


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_notifications_received_in_a_unit_do_not_reach_the_next(postgres: Postgres) -> None:
    """A NOTIFY that reached unit 1's LISTEN, unread, waits in psycopg's backlog (the reset's
    own query reads it off the wire): unit 2's `conn.notifies()` used to yield it first,
    with unit 1's channel and payload."""
    lc = tether.Lifecycle()
    conn = tpsy.connection(lc, tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1))
    other = await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True)
    try:
        async with lc.run():
            async with lc.scope() as s:
                c = await s.get(conn)
                pid = c.info.backend_pid
                await c.execute("LISTEN alice_inbox")
                await other.execute("NOTIFY alice_inbox, 'alice: code 913377'")
                await anyio.sleep(0.1)  # it reaches the socket; unit 1 never reads it
            async with lc.scope() as s:
                c = await s.get(conn)
                assert c.info.backend_pid == pid  # the same connection
                await c.execute("LISTEN bob_inbox")
                await other.execute("NOTIFY bob_inbox, 'bob: hello'")
                got = [(n.channel, n.payload) async for n in c.notifies(timeout=1.0, stop_after=1)]
                assert got == [("bob_inbox", "bob: hello")]
    finally:
        await other.close()


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_handlers_added_in_a_unit_do_not_reach_the_next(postgres: Postgres) -> None:
    """Notify and notice handlers a unit adds used to stay on the connection, receive the
    next units' notifications and notices, and pile up, one per unit. Those the pool's
    `configure=` added stay, and keep receiving."""
    pool_notices: list[str] = []

    def on_pool_notice(d: psycopg.errors.Diagnostic) -> None:
        pool_notices.append(str(d.message_primary))

    async def configure(c: Conn) -> None:
        c.add_notice_handler(on_pool_notice)

    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1, configure=configure)
    conn = tpsy.connection(lc, pool)
    other = await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True)
    notified: list[tuple[int, str]] = []
    noticed: list[tuple[int, str]] = []
    try:
        async with lc.run():
            for unit in (1, 2, 3):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    assert len(c._notice_handlers) == 1  # configure's only
                    assert c._notify_handlers == []
                    if unit == 1:
                        c.add_notify_handler(lambda n: notified.append((1, n.payload)))
                        c.add_notice_handler(lambda d: noticed.append((1, str(d.message_primary))))
                    await c.execute(f"LISTEN unit_{unit}")
                    await other.execute(f"NOTIFY unit_{unit}, 'for unit {unit}'")
                    await anyio.sleep(0.05)
                    await c.execute(f"DO $$ BEGIN RAISE NOTICE 'unit {unit} notice'; END $$")
    finally:
        await other.close()
    assert notified == [(1, "for unit 1")]
    assert noticed == [(1, "unit 1 notice")]
    assert pool_notices == ["unit 1 notice", "unit 2 notice", "unit 3 notice"]


# --------------------------------------------------------------------------- prepare_threshold


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_prepare_threshold_0_keeps_the_connection(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """With psycopg's "prepare every query" (`prepare_threshold=0`) the reset, several
    statements, was prepared and refused by PostgreSQL: every connection was closed after
    every unit of work, with a warning each time."""
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1, kwargs={"prepare_threshold": 0})
    conn = tpsy.connection(lc, pool)
    pids = []
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            for _ in range(3):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    await c.execute("SET statement_timeout = '7s'")
                    pids.append(await one(c, "SELECT pg_backend_pid()"))
            async with lc.scope() as s:
                assert await one(await s.get(conn), "SHOW statement_timeout") == "0"
            assert lc.stats().pools["pool"].discarded == 0
    assert len(set(pids)) == 1
    assert not [r for r in caplog.records if "could not reset" in r.getMessage()]


# --------------------------------------------------------------------------- used after release


GIVEN_BACK = (
    "Connection 'tx' was given back to pool 'pool' at the end of its unit of work (in a "
    "request, release='handler' gives it back when the endpoint returns, before the "
    "response), and cannot be used after: the pool may have handed it to another request, "
    "and the statement would run in that one's transaction. A StreamingResponse body that "
    "queries needs release='response'; a background task, a connection of its own "
    "(`async with lc.scope() as s: await s.get(tx)`)."
)


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_a_connection_used_after_its_unit_of_work_raises(postgres: Postgres) -> None:
    """The connection a unit of work got used to keep working after it went back to the
    pool: a statement on it ran inside whichever unit of work got the connection next, in
    its transaction, silently (asyncpg's pool proxy raises; so does tether's SQLAlchemy
    session)."""
    postgres.sql("DROP TABLE IF EXISTS state_audit; CREATE TABLE state_audit (who text)")
    lc = tether.Lifecycle()
    tx = tpsy.connection(
        lc, tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1), name="tx", transaction=True
    )
    async with lc.run():
        async with lc.scope() as s:
            stale = await s.get(tx)
            assert isinstance(stale, psycopg.AsyncConnection)  # as psycopg's own
            pid = stale.info.backend_pid
        async with lc.scope() as s:
            c = await s.get(tx)
            assert c.info.backend_pid == pid
            for _ in range(2):  # one leak, however often used
                with pytest.raises(tether.ResourceClosedError) as caught:
                    await stale.execute("INSERT INTO state_audit VALUES ('A, late')")
                assert str(caught.value) == GIVEN_BACK
                assert caught.value.resource == "tx"
            with pytest.raises(tether.ResourceClosedError):
                stale.cursor()
            await c.execute("INSERT INTO state_audit VALUES ('B')")
        assert lc.stats().resources["tx"].leaks == 1
        assert "given back to the pool" in repr(stale)
    assert postgres.sql("SELECT who FROM state_audit") == [("B",)]


@pytest.mark.servers
def test_a_streaming_body_gets_the_error_or_its_connection(postgres: Postgres) -> None:
    """A StreamingResponse body that queries: with release="handler" it raises the message
    naming the fix, with release="response" it has its connection to its last byte."""
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1)
    early = tpsy.connection(lc, pool, name="tx", transaction=True)
    late = tpsy.connection(lc, pool, name="late", release="response")
    app = FastAPI(lifespan=lc.lifespan)

    def stream(c: Conn) -> StreamingResponse:
        async def body() -> Any:
            yield "rows\n"
            yield f"{await one(c, 'SELECT 41 + 1')}\n"

        return StreamingResponse(body())

    @app.get("/early")
    async def handler(c: Annotated[Conn, Depends(early)]) -> StreamingResponse:
        return stream(c)

    @app.get("/late")
    async def response(c: Annotated[Conn, Depends(late)]) -> StreamingResponse:
        return stream(c)

    with TestClient(app) as client:
        assert client.get("/late").text == "rows\n42\n"
        with pytest.raises(tether.ResourceClosedError) as caught:
            client.get("/early")
        assert str(caught.value) == GIVEN_BACK
        assert client.get("/late").text == "rows\n42\n"


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_rolled_back_drops_a_units_handlers_as_production_does(postgres: Postgres) -> None:
    """In `rolled_back` every unit of work gets the block's connection: the handlers one adds
    go at its end, as on release; those the test added on the block's connection stay for
    the block, and go with it (they used to stay on the pool's connection after it)."""
    lc = tether.Lifecycle()
    conn = tpsy.connection(lc, tpsy.pool(lc, postgres.dsn, min_size=1, max_size=1))
    seen: list[str] = []

    def fixture_handler(d: psycopg.errors.Diagnostic) -> None:
        seen.append(f"fixture: {d.message_primary}")

    async with lc.run():
        async with tpsy.rolled_back(conn) as block:
            block.add_notice_handler(fixture_handler)
            for unit in (1, 2):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    if unit == 1:
                        c.add_notice_handler(lambda d: seen.append(f"unit 1: {d.message_primary}"))
                    await c.execute(f"DO $$ BEGIN RAISE NOTICE 'in unit {unit}'; END $$")
            assert block._notice_handlers == [fixture_handler]
        async with lc.scope() as s:  # the same connection, out of the block
            c = await s.get(conn)
            assert c._notice_handlers == []
            await c.execute("DO $$ BEGIN RAISE NOTICE 'after the block'; END $$")
    assert seen == ["fixture: in unit 1", "unit 1: in unit 1", "fixture: in unit 2"]
