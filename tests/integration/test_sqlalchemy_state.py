"""tether.integrations.sqlalchemy: what a unit of work leaves on the driver's connection, not
only on the server's session, does not reach the next unit of work.

A pool of one connection, so the next unit of work surely gets the same one (its backend pid
is checked). Ground truth comes from the server (``pg_stat_activity``, a second connection's
reads) and from the driver's connection object.
"""

import asyncio
import logging
import uuid
from typing import Any

import anyio.to_thread
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

LEFT_OPEN = (
    "tether: 'engine': connection returned inside an open transaction; rolling it back (commit "
    "or roll back the transactions you start)"
)


def app_name() -> str:
    return f"tsa-state-{uuid.uuid4().hex[:10]}"


def table(postgres: Postgres) -> str:
    name = f"tsa_state_{uuid.uuid4().hex[:10]}"
    postgres.sql(f"CREATE TABLE {name} (who text)")
    postgres.sql(f"GRANT ALL ON {name} TO PUBLIC")
    return name


def declare(
    lc: tether.Lifecycle, postgres: Postgres, kind: str, app: str, **engine_kwargs: Any
) -> tether.Resource[Any]:
    """A session resource on a pool of one connection: kind is the async driver, or "sync"."""
    return declare_both(lc, postgres, kind, app, **engine_kwargs)[1]


def declare_both(
    lc: tether.Lifecycle, postgres: Postgres, kind: str, app: str, **engine_kwargs: Any
) -> tuple[tether.Resource[Any], tether.Resource[Any]]:
    """The engine and session resources of `declare`."""
    if kind == "sync":
        url = postgres.url("postgresql+psycopg")
        eng = tsa.sync_engine(lc, url, pool_size=1, application_name=app, **engine_kwargs)
        return eng, tsa.sync_session(lc, eng)
    url = postgres.url(f"postgresql+{kind}")
    engine = tsa.engine(lc, url, pool_size=1, application_name=app, **engine_kwargs)
    return engine, tsa.session(lc, engine)


async def run(s: AsyncSession | Session, sql: str) -> Any:
    """Run *sql* on the session; its first value, if it returns rows."""
    if isinstance(s, Session):
        result = await anyio.to_thread.run_sync(s.execute, text(sql))
    else:
        result = await s.execute(text(sql))
    return result.scalar() if result.returns_rows else None


async def driver_of(s: AsyncSession | Session) -> Any:
    if isinstance(s, Session):
        return s.connection().connection.driver_connection
    return (await (await s.connection()).get_raw_connection()).driver_connection


def states(postgres: Postgres, app: str) -> list[str | None]:
    return [row["state"] for row in postgres.activity(app)]


# --------------------------------------------------------------------------- open transaction


@pytest.mark.parametrize(
    ("kind", "begin"),
    [
        ("asyncpg", "sql"),
        ("asyncpg", "driver"),  # asyncpg's own transaction(), started and never ended
        ("psycopg", "sql"),
        ("sync", "sql"),
    ],
)
async def test_a_transaction_the_unit_began_in_autocommit_is_rolled_back(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, kind: str, begin: str
) -> None:
    """A raw ``BEGIN`` (or an unfinished ``driver.transaction()``) in an ``AUTOCOMMIT`` engine,
    left open by a unit of work that failed before its ``COMMIT``: rolled back on release.
    Before, with asyncpg the connection went back "idle in transaction" for good: the next
    unit read the failed one's rows and none of its own writes was ever committed."""
    app, rows = app_name(), table(postgres)
    lc = tether.Lifecycle()
    session = declare(lc, postgres, kind, app, isolation_level="AUTOCOMMIT")
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"), pytest.raises(RuntimeError):
            async with lc.scope() as scope:
                s = await scope.get(session)
                pid = await run(s, "SELECT pg_backend_pid()")
                if begin == "driver":
                    await (await driver_of(s)).transaction().start()
                else:
                    await run(s, "BEGIN")
                await run(s, f"INSERT INTO {rows} VALUES ('A: debit')")
                raise RuntimeError("unit A failed before its COMMIT")
        assert states(postgres, app) == ["idle"]
        if kind == "asyncpg":  # SQLAlchemy's psycopg adapter rolls it back itself
            assert [r.getMessage() for r in caplog.records] == [LEFT_OPEN]
        async with lc.scope() as scope:
            s = await scope.get(session)
            assert await run(s, "SELECT pg_backend_pid()") == pid
            assert await run(s, f"SELECT count(*) FROM {rows}") == 0
            assert await run(s, "SELECT txid_current_if_assigned()") is None
            if begin == "driver":  # asyncpg knows it ended: a transaction of its own again
                tr = (await driver_of(s)).transaction()
                await tr.start()
                await run(s, f"INSERT INTO {rows} VALUES ('B')")
                await tr.commit()
            else:
                await run(s, f"INSERT INTO {rows} VALUES ('B')")
        assert postgres.sql(f"SELECT who FROM {rows}") == [("B",)]
        assert states(postgres, app) == ["idle"]
        assert lc.stats().pools["engine"].discarded == 0


async def test_psycopg_in_a_transaction_at_the_reset_is_rolled_back_first(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg: SQLAlchemy's rollback on return ends a transaction the unit began itself,
    even in autocommit. Were it skipped or refused (``pool_reset_on_return=None``, psycopg's
    ``transaction()`` block left unexited), the reset rolls it back first, with the warning,
    instead of running inside it and leaving it open."""
    import psycopg

    rows = table(postgres)
    with caplog.at_level(logging.WARNING, logger="tether"):
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {rows} VALUES ('A')")
            tsa._reset_driver(conn)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.autocommit is True
        aconn = await psycopg.AsyncConnection.connect(postgres.dsn)
        try:
            await aconn.execute(f"INSERT INTO {rows} VALUES ('B')")  # psycopg's own BEGIN
            await greenlet_spawn(tsa._reset_driver, aconn)  # as SQLAlchemy's pool runs it
            assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert aconn.autocommit is False
        finally:
            await aconn.close()
    assert [r.getMessage() for r in caplog.records] == [LEFT_OPEN] * 2
    assert postgres.sql(f"SELECT count(*) FROM {rows}") == [(0,)]


# --------------------------------------------------------------------------- driver callbacks


async def notify(postgres: Postgres, channel: str, payload: str) -> None:
    await anyio.to_thread.run_sync(postgres.sql, f"NOTIFY {channel}, '{payload}'")
    await asyncio.sleep(0.2)


async def test_asyncpg_callbacks_of_a_unit_of_work_do_not_reach_the_next(
    postgres: Postgres,
) -> None:
    """Listeners, log listeners, query loggers and termination listeners a unit of work adds on
    asyncpg's connection are dropped on release. Before, a stale listener made the next unit's
    ``add_listener`` skip its ``LISTEN`` (it never received anything), and a query logger got
    every later unit's SQL and arguments."""
    app, channel = app_name(), f"jobs_{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    session = declare(lc, postgres, "asyncpg", app, isolation_level="AUTOCOMMIT")
    calls: list[tuple[int, str]] = []
    async with lc.run():
        pids = []
        for unit in (1, 2):
            async with lc.scope() as scope:
                s = await scope.get(session)
                pids.append(await run(s, "SELECT pg_backend_pid()"))
                drv = await driver_of(s)
                found = (
                    len(drv._listeners),
                    len(drv._log_listeners),
                    len(drv._query_loggers),
                    len(drv._termination_listeners),
                )
                assert found == (0, 0, 0, 0), (unit, found)

                def heard(c: Any, pid: int, ch: str, payload: str, u: int = unit) -> None:
                    calls.append((u, payload))

                await drv.add_listener(channel, heard)
                drv.add_log_listener(lambda c, m, u=unit: calls.append((u, "log")))
                drv.add_query_logger(lambda q, u=unit: calls.append((u, q.query)))
                drv.add_termination_listener(lambda c, u=unit: calls.append((u, "closed")))
                assert await run(s, "SELECT count(*) FROM pg_listening_channels()") == 1
                await notify(postgres, channel, f"job {unit}")
                await run(s, "SELECT 1")
                assert (unit, f"job {unit}") in calls
                assert all(u == unit for u, _ in calls), calls
                calls.clear()
        assert pids[0] == pids[1]
    await asyncio.sleep(0.05)
    # The connection closed at shutdown: the units' termination listeners were dropped.
    assert calls == []


@pytest.mark.parametrize("kind", ["psycopg", "sync"])
async def test_psycopg_handlers_of_a_unit_of_work_do_not_reach_the_next(
    postgres: Postgres, kind: str
) -> None:
    """Notify and notice handlers a unit of work adds on psycopg's connection are dropped on
    release; SQLAlchemy's own notice handler (its dialect logs notices) stays. Before, they
    piled up, one per unit, and each received every later unit's notifications and notices."""
    app, channel = app_name(), f"jobs_{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    session = declare(lc, postgres, kind, app, isolation_level="AUTOCOMMIT")
    calls: list[tuple[int, str]] = []
    async with lc.run():
        pids, found = [], []
        for unit in (1, 2, 3):
            async with lc.scope() as scope:
                s = await scope.get(session)
                pids.append(await run(s, "SELECT pg_backend_pid()"))
                drv = await driver_of(s)
                found.append((list(drv._notify_handlers), list(drv._notice_handlers)))
                drv.add_notify_handler(lambda n, u=unit: calls.append((u, n.payload)))
                drv.add_notice_handler(lambda d, u=unit: calls.append((u, d.message_primary)))
                await run(s, f"LISTEN {channel}")
                await notify(postgres, channel, f"job {unit}")
                await run(s, f"DO $$ BEGIN RAISE NOTICE 'notice {unit}'; END $$")
                assert sorted(calls) == [(unit, f"job {unit}"), (unit, f"notice {unit}")]
                calls.clear()
        assert len(set(pids)) == 1
        # As SQLAlchemy set it up, at every checkout: its dialect's notice handler only.
        assert found[0] == found[1] == found[2]
        assert found[0][0] == []
        assert len(found[0][1]) == 1


async def test_psycopg_notifications_of_a_unit_of_work_do_not_reach_the_next(
    postgres: Postgres,
) -> None:
    """A notification that reached a unit's ``LISTEN`` and that it did not read is not given
    to the next unit's ``notifies()`` (psycopg keeps it on the connection object)."""
    app, alice, bob = app_name(), f"alice_{uuid.uuid4().hex[:8]}", f"bob_{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    session = declare(lc, postgres, "psycopg", app, isolation_level="AUTOCOMMIT")
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)
            await run(s, f"LISTEN {alice}")
            await notify(postgres, alice, "alice: your reset code is 913377")
        async with lc.scope() as scope:
            s = await scope.get(session)
            drv = await driver_of(s)
            await run(s, f"LISTEN {bob}")
            await notify(postgres, bob, "bob: hello")
            got = [(n.channel, n.payload) async for n in drv.notifies(timeout=0.5)]
            assert got == [(bob, "bob: hello")]


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg", "sync"])
async def test_callbacks_the_engine_sets_up_on_connect_stay(postgres: Postgres, kind: str) -> None:
    """A callback an engine's ``connect`` listener adds (logging the server's notices, say) is
    the pool's setup, not a unit of work's: it stays, and still works, unit after unit."""
    app = app_name()
    lc = tether.Lifecycle()
    engine, session = declare_both(lc, postgres, kind, app)
    heard: list[str] = []

    def on_notice(*args: Any) -> None:
        message = args[-1]  # asyncpg: (connection, message); psycopg: (diagnostic,)
        heard.append(getattr(message, "message", None) or message.message_primary)

    def set_up(dbapi_connection: Any, record: Any) -> None:
        drv = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if kind == "asyncpg":
            drv.add_log_listener(on_notice)
        else:
            drv.add_notice_handler(on_notice)

    async with lc.run():
        eng = lc.get(engine)
        event.listen(getattr(eng, "sync_engine", eng), "connect", set_up)
        # The next connection is made with the listener (the startup probe's had none).
        if kind == "sync":
            await anyio.to_thread.run_sync(eng.dispose)
        else:
            await eng.dispose()
        for unit in (1, 2, 3):
            async with lc.scope() as scope:
                s = await scope.get(session)
                await run(s, f"DO $$ BEGIN RAISE NOTICE 'unit {unit}'; END $$")
                await asyncio.sleep(0.05)
    assert heard == ["unit 1", "unit 2", "unit 3"]


# --------------------------------------------------------------------------- prepare_threshold=0


@pytest.mark.parametrize("kind", ["psycopg", "sync"])
async def test_psycopg_preparing_every_query_keeps_its_connections(
    postgres: Postgres, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """psycopg with ``prepare_threshold=0`` (prepare every query): the reset, several
    statements, is never prepared. Before, PostgreSQL refused to prepare it, and every
    connection was discarded after every unit of work, with a warning."""
    app = app_name()
    lc = tether.Lifecycle()
    session = declare(lc, postgres, kind, app, connect_args={"prepare_threshold": 0})
    async with lc.run():
        pids = set()
        with caplog.at_level(logging.WARNING, logger="tether"):
            for _ in range(3):
                async with lc.scope() as scope:
                    s = await scope.get(session)
                    await run(s, "SET statement_timeout = '7s'")
                    pids.add(await run(s, "SELECT pg_backend_pid()"))
        async with lc.scope() as scope:
            s = await scope.get(session)
            assert await run(s, "SHOW statement_timeout") == "0"
        assert caplog.records == []
        assert len(pids) == 1
        assert lc.stats().pools["engine"].discarded == 0


async def test_rolled_back_with_psycopg_preparing_every_query(postgres: Postgres) -> None:
    """`rolled_back`'s reset after each unit of work is never prepared either."""
    lc = tether.Lifecycle()
    session = declare(lc, postgres, "psycopg", app_name(), connect_args={"prepare_threshold": 0})
    async with lc.run(), tsa.rolled_back(session):
        for _ in range(2):
            async with lc.scope() as scope:
                s = await scope.get(session)
                await run(s, "SET statement_timeout = '7s'")
        async with lc.scope() as scope:
            s = await scope.get(session)
            assert await run(s, "SHOW statement_timeout") == "0"


# --------------------------------------------------------------------------- the pool's logger


async def test_the_pool_logs_under_sqlalchemy_pool(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's pool (tether's subclass of ``AsyncAdaptedQueuePool``) logs as SQLAlchemy's
    own does: ``sqlalchemy.pool`` at DEBUG shows it (SQLAlchemy's debug recipe), and the
    ``tether`` logger at INFO does not get its chatter (it was
    ``tether.integrations.sqlalchemy.LoopBoundPool``: the reverse of both)."""
    lc = tether.Lifecycle()
    session = declare(lc, postgres, "asyncpg", app_name())
    caplog.set_level(logging.INFO, logger="tether")
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.pool")
    async with lc.run():
        async with lc.scope() as scope:
            await run(await scope.get(session), "SELECT 1")
    pool_names = {r.name for r in caplog.records if r.name.startswith("sqlalchemy.pool")}
    assert pool_names == {"sqlalchemy.pool.impl.AsyncAdaptedQueuePool"}
    assert any("checked out from pool" in r.getMessage() for r in caplog.records)
    assert [r.name for r in caplog.records if r.name.startswith("tether.")] == []


# --------------------------------------------------------------------------- declaration checks


def test_a_mistyped_session_option_fails_the_declaration() -> None:
    """Checked when declared: before, the app started, readiness said 200, and every request
    using the session was a 500."""
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, "postgresql+asyncpg://u@localhost/db")
    sync = tsa.sync_engine(lc, "postgresql+psycopg://u@localhost/db", name="sync")
    with pytest.raises(TypeError) as caught:
        tsa.session(lc, engine, autoflsuh=False)
    assert str(caught.value) == (
        "session('session'): autoflsuh= (did you mean autoflush=?) is not an option of "
        "AsyncSession, which session() passes its keyword arguments to. Fix or remove it."
    )
    with pytest.raises(TypeError) as caught:
        tsa.sync_session(lc, sync, name="db", expire_on_comit=True, infoo={})
    assert str(caught.value) == (
        "sync_session('db'): expire_on_comit= (did you mean expire_on_commit=?) and infoo= "
        "(did you mean info=?) are not options of Session, which sync_session() passes its "
        "keyword arguments to. Fix or remove them."
    )
    with pytest.raises(TypeError) as caught:
        tsa.session(lc, engine, bind=None)
    assert str(caught.value) == (
        "session('session'): bind= is not an option here: tether binds the session to the "
        "engine resource given to session(). Leave it out."
    )
    with pytest.raises(ValueError, match="join_transaction_mode") as refused:
        tsa.session(lc, engine, join_transaction_mode="sometimes")
    assert str(refused.value).startswith(
        "session('session'): AsyncSession() refused the keyword arguments given to session(): "
    )
    # What the session classes take is taken, the sync session's through the async one's.
    tsa.session(lc, engine, name="ok", autoflush=False, info={"app": 1}, twophase=False)
    tsa.sync_session(lc, sync, name="ok_sync", autoflush=False)


FALSE = (
    "{where}: {option}='false' is a str, not a bool. Pass True or False (a setting read from "
    "the environment is a string, and 'false' would count as true: convert it, e.g. "
    '{option}=os.environ.get(...) == "1").'
)


@pytest.mark.parametrize(
    ("declare_it", "where", "option"),
    [
        (lambda lc, e, s: tsa.engine(lc, "postgresql+asyncpg://h/d", pool_pre_ping="false"),
         "Engine 'engine'", "pool_pre_ping"),
        (lambda lc, e, s: tsa.engine(lc, "postgresql+asyncpg://h/d", reset_session="false"),
         "Engine 'engine'", "reset_session"),
        (lambda lc, e, s: tsa.engine(lc, "postgresql+asyncpg://h/d", pgbouncer="false"),
         "Engine 'engine'", "pgbouncer"),
        (lambda lc, e, s: tsa.engine(lc, "postgresql+asyncpg://h/d", required="false"),
         "Engine 'engine'", "required"),
        (lambda lc, e, s: tsa.sync_engine(lc, "postgresql+psycopg://h/d", name="db",
                                          pool_pre_ping="false"),
         "Engine 'db'", "pool_pre_ping"),
        (lambda lc, e, s: tsa.sync_engine(lc, "postgresql+psycopg://h/d", name="db",
                                          required="false"),
         "Engine 'db'", "required"),
        (lambda lc, e, s: tsa.session(lc, e, expire_on_commit="false"),
         "session('session')", "expire_on_commit"),
        (lambda lc, e, s: tsa.session(lc, e, connect="false"), "session('session')", "connect"),
        (lambda lc, e, s: tsa.sync_session(lc, s, expire_on_commit="false"),
         "sync_session('session')", "expire_on_commit"),
        (lambda lc, e, s: tsa.sync_session(lc, s, connect="false"),
         "sync_session('session')", "connect"),
        (lambda lc, e, s: tsa.once(lc, e, migrate, key="v1", record="false"),
         "once 'migrate'", "record"),
    ],
)  # fmt: skip
def test_on_off_options_must_be_bools(declare_it: Any, where: str, option: str) -> None:
    """A string from the environment ("false", which ``if`` takes as true) is refused when
    declared, naming the option and the fix."""
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, "postgresql+asyncpg://u@localhost/db", name="e")
    sync = tsa.sync_engine(lc, "postgresql+psycopg://u@localhost/db", name="s")
    with pytest.raises(TypeError) as caught:
        declare_it(lc, engine, sync)
    assert str(caught.value) == FALSE.format(where=where, option=option)


async def migrate(conn: Any) -> None:
    pass  # pragma: no cover - never run
