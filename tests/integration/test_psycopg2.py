"""tether.integrations.sqlalchemy's sync path over psycopg2: ``sync_engine(lc,
"postgresql+psycopg2://...")`` (or a bare ``postgresql://`` on SQLAlchemy 2.0, whose default
driver it is) with ``def`` endpoints, a common setup. And what psycopg (3) keeps on its
connection object the same way (transaction settings, row factories).

A pool of one connection where the next unit of work must get the same one (its backend pid is
checked). Ground truth comes from the server (a second connection's reads,
``pg_stat_activity``) and from the driver's connection object.
"""

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
import httpx
import psycopg2
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import event, text
from sqlalchemy.orm import Session

import tether
from tests.integration.test_disconnect_threads import call
from tests.integration.test_session_state import CHECK, DIRTY
from tests.servers import PgBouncer, Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]


URL = "postgresql+psycopg2://u@h/d"


def app_name() -> str:
    return f"tsa-pg2-{uuid.uuid4().hex[:10]}"


def declare(
    lc: tether.Lifecycle, url: str, app: str, **engine_kwargs: Any
) -> tuple[tether.Resource[Any], tether.Resource[Session]]:
    """A sync engine on *url* (a pool of one connection) and its session resource."""
    engine_kwargs.setdefault("pool_size", 1)
    eng = tsa.sync_engine(lc, url, application_name=app, **engine_kwargs)
    return eng, tsa.sync_session(lc, eng)


def driver_of(s: Session) -> Any:
    drv = s.connection().connection.driver_connection
    assert isinstance(drv, psycopg2.extensions.connection)
    return drv


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture(scope="module")
def roles(postgres: Postgres) -> None:
    for role in ("once_reader", "tether_guest"):
        postgres.sql(f"DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object "
                     "THEN NULL; END $$")  # fmt: skip
    postgres.sql("GRANT once_reader TO tether, tether_guest")


@pytest.fixture
def notes(postgres: Postgres) -> Iterator[str]:
    """A table whose `parent` is checked at COMMIT (a deferred foreign key)."""
    name = f"pg2_notes_{uuid.uuid4().hex[:10]}"
    postgres.sql(
        f"CREATE TABLE {name} (id int PRIMARY KEY, parent int REFERENCES {name} (id) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    postgres.sql(f"GRANT ALL ON {name} TO tether")
    yield name
    postgres.sql(f"DROP TABLE IF EXISTS {name}")


def test_a_bare_postgresql_url_picks_psycopg2_on_sqlalchemy_2_0() -> None:
    """Why psycopg2 matters: SQLAlchemy 2.0 (down to tether's floor) picks it for a bare
    ``postgresql://`` URL; 2.1 picks psycopg (3). The tests name it: ``postgresql+psycopg2``."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    default = make_url("postgresql://u@h/d").get_dialect().driver
    assert default == ("psycopg2" if sqlalchemy.__version__.startswith("2.0.") else "psycopg")
    assert make_url(URL).get_dialect().driver == "psycopg2"


# --------------------------------------------------------------------------- commit, rollback


async def test_def_endpoints_commit_roll_back_and_a_failed_commit_is_a_500(
    postgres: Postgres, notes: str
) -> None:
    """A ``def`` endpoint's writes commit when it returns, roll back when it raises; a
    ``COMMIT`` the server refuses (a deferred foreign key) is a 500, rolled back, and the
    connection goes back idle, the next request committing on it."""
    app_ = app_name()
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url("postgresql+psycopg2"), app_)
    app = FastAPI(lifespan=lc.lifespan)
    S = Annotated[Session, Depends(session)]
    pids: list[int] = []

    def pid(s: Session) -> None:
        pids.append(s.execute(text("SELECT pg_backend_pid()")).scalar_one())

    @app.post("/ok/{n}")
    def ok(n: int, s: S) -> dict[str, int]:
        pid(s)
        s.execute(text(f"INSERT INTO {notes} VALUES (:n, NULL)"), {"n": n})
        return {"id": n}

    @app.post("/boom/{n}")
    def boom(n: int, s: S) -> None:
        pid(s)
        s.execute(text(f"INSERT INTO {notes} VALUES (:n, NULL)"), {"n": n})
        raise RuntimeError("boom")

    @app.post("/orphan/{n}")
    def orphan(n: int, s: S) -> dict[str, int]:
        pid(s)  # the foreign key is checked at COMMIT, after the endpoint returned
        s.execute(text(f"INSERT INTO {notes} VALUES (:n, 999)"), {"n": n})
        return {"id": n}

    @app.get("/state")
    def state(s: S) -> dict[str, Any]:
        pid(s)
        drv = driver_of(s)
        row = s.execute(text("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
                             "AND locktype = 'transactionid'")).scalar_one()  # fmt: skip
        return {"xid_locks": row, "status": drv.status}

    async with lc.lifespan(app), client(app) as c:
        assert (await c.post("/ok/1")).status_code == 200
        assert (await c.post("/boom/2")).status_code == 500
        assert (await c.post("/orphan/3")).status_code == 500
        assert [r["state"] for r in postgres.activity(app_)] == ["idle"]
        assert (await c.post("/ok/4")).status_code == 200
        r = await c.get("/state")
        assert r.status_code == 200
        assert r.json()["xid_locks"] == 0
    assert len(set(pids)) == 1, pids
    assert postgres.sql(f"SELECT id FROM {notes} ORDER BY id") == [(1,), (4,)]
    assert postgres.activity_after_close(app_) == []


async def test_a_caught_statement_error_is_not_a_200(postgres: Postgres, notes: str) -> None:
    """An endpoint that catches a failed statement's error and returns: PostgreSQL answers
    the ``COMMIT`` of the aborted transaction with a rollback, psycopg2 reports success; tether
    fails the commit, so the client gets a 500, never a 200 for what was not committed."""
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url("postgresql+psycopg2"), app_name())
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/twice")
    def twice(s: Annotated[Session, Depends(session)]) -> dict[str, str]:
        s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))
        try:
            s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))  # duplicate key
        except Exception:
            return {"status": "already there"}
        return {"status": "created"}

    async with lc.lifespan(app), client(app) as c:
        assert (await c.post("/twice")).status_code == 500
    assert postgres.sql(f"SELECT count(*) FROM {notes}") == [(0,)]


async def test_a_killed_backend_between_requests_is_replaced(
    postgres: Postgres, notes: str
) -> None:
    """The pooled connection's backend ends between two requests (a failover, an idle
    timeout): the pre-ping sees it, the next request gets a new one and answers 200."""
    app_ = app_name()
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url("postgresql+psycopg2"), app_)
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/n/{n}")
    def add(n: int, s: Annotated[Session, Depends(session)]) -> int:
        s.execute(text(f"INSERT INTO {notes} VALUES (:n, NULL)"), {"n": n})
        return int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())

    async with lc.lifespan(app), client(app) as c:
        first = await c.post("/n/1")
        assert await anyio.to_thread.run_sync(postgres.terminate, app_) == 1
        second = await c.post("/n/2")
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json() != second.json()
    assert postgres.sql(f"SELECT id FROM {notes} ORDER BY id") == [(1,), (2,)]


async def test_rolled_back_with_psycopg2(postgres: Postgres, notes: str) -> None:
    """`rolled_back` on a psycopg2 session: the endpoints' writes are seen inside the block and
    rolled back at its end; a unit's ``SET`` does not reach the next one."""
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url("postgresql+psycopg2"), app_name())
    app = FastAPI(lifespan=lc.lifespan)
    S = Annotated[Session, Depends(session)]

    @app.post("/n/{n}")
    def add(n: int, s: S) -> str:
        found = s.execute(text("SELECT current_setting('statement_timeout')")).scalar_one()
        s.execute(text("SET statement_timeout = '7s'"))
        s.execute(text(f"INSERT INTO {notes} VALUES (:n, NULL)"), {"n": n})
        return str(found)

    async with lc.lifespan(app), client(app) as c, tsa.rolled_back(session) as conn:
        found = [(await c.post(f"/n/{n}")).json() for n in (1, 2)]
        seen = await anyio.to_thread.run_sync(
            lambda: conn.execute(text(f"SELECT id FROM {notes} ORDER BY id")).all()
        )
    assert found == ["0", "0"]
    assert [tuple(r) for r in seen] == [(1,), (2,)]
    assert postgres.sql(f"SELECT count(*) FROM {notes}") == [(0,)]


async def test_a_transaction_begun_in_autocommit_and_left_open_is_rolled_back(
    postgres: Postgres, notes: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw ``BEGIN`` in an ``AUTOCOMMIT`` engine, left open by a unit that failed before its
    ``COMMIT``: psycopg2's ``rollback()`` does nothing in autocommit, so tether rolls it back
    on release, with a warning; the next unit neither sees its rows nor stays in it."""
    import logging

    app_ = app_name()
    lc = tether.Lifecycle()
    _, session = declare(
        lc, postgres.url("postgresql+psycopg2"), app_, isolation_level="AUTOCOMMIT"
    )
    async with lc.run():
        with caplog.at_level(logging.WARNING, logger="tether"), pytest.raises(RuntimeError):
            async with lc.scope() as scope:
                s = await scope.get(session)

                def first() -> None:
                    s.execute(text("BEGIN"))
                    s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))
                    raise RuntimeError("failed before its COMMIT")

                await anyio.to_thread.run_sync(first)
        assert [r["state"] for r in postgres.activity(app_)] == ["idle"]
        async with lc.scope() as scope:
            s = await scope.get(session)

            def second() -> tuple[Any, ...]:
                return tuple(
                    s.execute(
                        text(f"SELECT count(*), txid_current_if_assigned() FROM {notes}")
                    ).one()
                )

            assert await anyio.to_thread.run_sync(second) == (0, None)
        assert lc.stats().pools["engine"].discarded == 0
    assert [r.getMessage() for r in caplog.records] == [
        "tether: 'engine': connection returned inside an open transaction; rolling it back "
        "(commit or roll back the transactions you start)"
    ]


# --------------------------------------------------------------------------- session state


async def test_the_next_unit_of_work_gets_a_clean_session(postgres: Postgres, roles: None) -> None:
    """``SET``, roles, a temporary table, an advisory lock, ``LISTEN`` and the session's
    default transaction characteristics a unit left do not reach the next one."""
    check = (
        CHECK + ", current_setting('default_transaction_isolation'), "
        "current_setting('default_transaction_read_only')"
    )
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url("postgresql+psycopg2"), app_name())
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)
            clean = await anyio.to_thread.run_sync(lambda: tuple(s.execute(text(check)).one()))

            def dirty() -> tuple[Any, ...]:
                for sql in [
                    *DIRTY,
                    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                ]:
                    s.execute(text(sql))
                return tuple(s.execute(text(check)).one())

            found = await anyio.to_thread.run_sync(dirty)
        assert found[1:7] == ("123s", "nowhere, public", "once_reader", 1, "tether_guest", 1)
        assert found[8:] == ("serializable", "on")
        async with lc.scope() as scope:
            s = await scope.get(session)
            after = await anyio.to_thread.run_sync(lambda: tuple(s.execute(text(check)).one()))
        assert after[0] == clean[0]  # the same backend: reset, not replaced
        assert after[1:] == clean[1:]
        assert after[8:] == ("read committed", "off")


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql+psycopg"])
async def test_transaction_settings_on_the_driver_do_not_reach_the_next(
    postgres: Postgres, notes: str, scheme: str
) -> None:
    """psycopg2 (and psycopg) keep a connection's transaction settings (``set_session()``,
    ``readonly``, ``isolation_level``...) on the connection object, and send them with each
    ``BEGIN``: a unit that set them must not leave the next units read-only (their writes
    failed, as on a replica) or serializable."""
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url(scheme), app_name())
    check = (
        "SELECT pg_backend_pid(), current_setting('transaction_isolation'), "
        "current_setting('transaction_read_only'), current_setting('transaction_deferrable')"
    )
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)

            def first() -> tuple[Any, ...]:
                clean = tuple(s.execute(text(check)).one())
                s.commit()  # both drivers refuse these inside a transaction
                # Taken again by the session (idle): the one of the pool, as the unit's.
                drv = s.connection().connection.driver_connection
                if scheme.endswith("psycopg2"):
                    drv.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)
                else:
                    drv.isolation_level = 3  # psycopg.IsolationLevel.SERIALIZABLE
                    drv.read_only = drv.deferrable = True
                return clean

            clean = await anyio.to_thread.run_sync(first)
        async with lc.scope() as scope:
            s = await scope.get(session)

            def second() -> tuple[Any, ...]:
                got = tuple(s.execute(text(check)).one())
                s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))
                return got

            after = await anyio.to_thread.run_sync(second)
        assert after == clean
    assert postgres.sql(f"SELECT id FROM {notes}") == [(1,)]


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql+psycopg"])
async def test_autocommit_a_unit_turned_on_does_not_reach_the_next(
    postgres: Postgres, notes: str, scheme: str
) -> None:
    """A unit that turned the driver's ``autocommit`` on (for a ``VACUUM``, say) must not
    leave it on: the next unit's writes would each commit at once, and its rollback on an
    exception would undo nothing."""
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url(scheme), app_name())
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)

            def first() -> None:
                s.commit()
                drv = s.connection().connection.driver_connection  # idle: see above
                drv.autocommit = True
                drv.cursor().execute(f"VACUUM {notes}")

            await anyio.to_thread.run_sync(first)
        with pytest.raises(RuntimeError, match="boom"):
            async with lc.scope() as scope:
                s = await scope.get(session)

                def second() -> None:
                    s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))
                    raise RuntimeError("boom")

                await anyio.to_thread.run_sync(second)
    assert postgres.sql(f"SELECT id FROM {notes}") == []


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql+psycopg"])
async def test_a_row_factory_a_unit_set_does_not_reach_the_next(
    postgres: Postgres, scheme: str
) -> None:
    """A unit that asked the driver for dict rows (psycopg2's ``cursor_factory =
    RealDictCursor``, psycopg's ``row_factory = dict_row``) must not leave them: SQLAlchemy
    reads the driver's rows as tuples: every later unit's rows held the column names."""
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url(scheme), app_name())
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)

            def first() -> Any:
                drv = s.connection().connection.driver_connection
                if scheme.endswith("psycopg2"):
                    import psycopg2.extras

                    drv.cursor_factory = psycopg2.extras.RealDictCursor
                else:
                    import psycopg.rows

                    drv.row_factory = psycopg.rows.dict_row
                    drv.prepare_threshold = 0  # prepare every query: not behind PgBouncer
                cursor = drv.cursor()
                cursor.execute("SELECT 1 AS one")
                return cursor.fetchone()

            assert await anyio.to_thread.run_sync(first) == {"one": 1}
        async with lc.scope() as scope:
            s = await scope.get(session)
            got = await anyio.to_thread.run_sync(
                lambda: s.execute(text("SELECT 1 AS one, 'two' AS two")).one()
            )
            drv = await anyio.to_thread.run_sync(
                lambda: s.connection().connection.driver_connection
            )
        assert tuple(got) == (1, "two")
        if scheme.endswith("+psycopg"):
            assert drv.prepare_threshold == 5  # psycopg's default, as the pool made it


async def test_transaction_settings_on_psycopg_async_do_not_reach_the_next(
    postgres: Postgres, notes: str
) -> None:
    """The same with an async engine on psycopg: ``set_read_only()`` and
    ``set_isolation_level()`` a unit called on the driver's connection are undone."""
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url("postgresql+psycopg"), pool_size=1)
    session = tsa.session(lc, engine)
    check = "SELECT pg_backend_pid(), current_setting('transaction_read_only')"
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)
            clean = tuple((await s.execute(text(check))).one())
            await s.commit()
            drv = (await (await s.connection()).get_raw_connection()).driver_connection
            await drv.set_read_only(True)
            await drv.set_isolation_level(3)  # psycopg.IsolationLevel.SERIALIZABLE
        async with lc.scope() as scope:
            s = await scope.get(session)
            after = tuple((await s.execute(text(check))).one())
            await s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))
        assert after == clean
    assert postgres.sql(f"SELECT id FROM {notes}") == [(1,)]


async def test_a_search_path_the_engine_sets_on_connect_survives_the_reset(
    postgres: Postgres,
) -> None:
    """The SQLAlchemy documentation's ``search_path`` recipe (a ``connect`` listener that
    runs ``SET search_path``) is the pool's setup: the reset keeps it, unit after unit, while
    a unit's own ``SET search_path`` does not reach the next."""
    schema = f"pg2_schema_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE SCHEMA {schema}")
    postgres.sql(f"GRANT ALL ON SCHEMA {schema} TO tether")
    lc = tether.Lifecycle()
    engine, session = declare(lc, postgres.url("postgresql+psycopg2"), app_name())

    def set_path(dbapi_connection: Any, record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION search_path = {schema}, public")
        cursor.close()
        dbapi_connection.autocommit = autocommit

    try:
        async with lc.run():
            eng = lc.get(engine)
            event.listen(eng, "connect", set_path)
            await anyio.to_thread.run_sync(eng.dispose)
            seen = []
            for unit in (1, 2, 3):
                async with lc.scope() as scope:
                    s = await scope.get(session)

                    def use(s: Session = s, unit: int = unit) -> None:
                        row = s.execute(text("SELECT pg_backend_pid(), "
                                             "current_setting('search_path')")).one()  # fmt: skip
                        seen.append(tuple(row))
                        s.execute(text(f"SET search_path = elsewhere_{unit}"))

                    await anyio.to_thread.run_sync(use)
        assert len({pid for pid, _ in seen}) == 1, seen
        assert [path for _, path in seen] == [f"{schema}, public"] * 3
    finally:
        postgres.sql(f"DROP SCHEMA {schema} CASCADE")


async def test_notices_and_notifications_of_a_unit_of_work_do_not_reach_the_next(
    postgres: Postgres,
) -> None:
    """psycopg2 keeps the server's notices (``conn.notices``) and the notifications its
    ``LISTEN`` received (``conn.notifies``) in lists on the connection object: what a unit
    left there (a notice quoting its data, a notification for another user) is not the next
    unit's to read."""
    alice, bob = f"alice_{uuid.uuid4().hex[:8]}", f"bob_{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    _, session = declare(
        lc, postgres.url("postgresql+psycopg2"), app_name(), isolation_level="AUTOCOMMIT"
    )
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)

            def first() -> int:
                s.execute(text(f"LISTEN {alice}"))
                # On the driver's cursor: SQLAlchemy empties `notices` after its statements.
                driver_of(s).cursor().execute("DO $$ BEGIN RAISE NOTICE 'alice: 4242'; END $$")
                return int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())

            pid = await anyio.to_thread.run_sync(first)
            await anyio.to_thread.run_sync(postgres.sql, f"NOTIFY {alice}, 'reset code 913377'")
            await asyncio.sleep(0.2)
        async with lc.scope() as scope:
            s = await scope.get(session)

            def second() -> tuple[int, list[str], list[tuple[str, str]]]:
                drv = driver_of(s)
                notices = list(drv.notices)
                now = int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())
                s.execute(text(f"LISTEN {bob}"))
                postgres.sql(f"NOTIFY {bob}, 'hello'")
                time.sleep(0.2)
                drv.poll()
                return now, notices, [(n.channel, n.payload) for n in drv.notifies]

            now, notices, notifies = await anyio.to_thread.run_sync(second)
        assert now == pid
        assert notices == []
        assert notifies == [(bob, "hello")]


async def test_a_notification_list_the_engine_sets_up_stays(postgres: Postgres) -> None:
    """A ``connect`` listener may give psycopg2 a list of its own for notifications: the pool's
    setup, which stays, emptied, unit after unit; a list a unit of work put there does not."""
    channel = f"jobs_{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    engine, session = declare(
        lc, postgres.url("postgresql+psycopg2"), app_name(), isolation_level="AUTOCOMMIT"
    )
    mine: list[Any] = []

    def set_up(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.notifies = mine

    async with lc.run():
        eng = lc.get(engine)
        event.listen(eng, "connect", set_up)
        await anyio.to_thread.run_sync(eng.dispose)
        for unit in (1, 2, 3):
            async with lc.scope() as scope:
                s = await scope.get(session)

                def use(s: Session = s, unit: int = unit) -> tuple[bool, list[Any]]:
                    drv = driver_of(s)
                    found = (drv.notifies is mine, list(drv.notifies))
                    s.execute(text(f"LISTEN {channel}"))
                    postgres.sql(f"NOTIFY {channel}, 'unit {unit}'")
                    time.sleep(0.1)
                    drv.poll()
                    assert [n.payload for n in mine] == [f"unit {unit}"]
                    drv.notifies = []  # the unit's own list
                    return found

                assert await anyio.to_thread.run_sync(use) == (True, [])


# --------------------------------------------------------------------------- PgBouncer


async def test_pgbouncer_transaction_mode(pgbouncer: PgBouncer) -> None:
    """``pgbouncer=True`` with psycopg2 through PgBouncer in transaction mode: concurrent
    ``def`` endpoints share its server connections, every one answers."""
    lc = tether.Lifecycle()
    _, session = declare(
        lc, pgbouncer.url("postgresql+psycopg2"), app_name(), pgbouncer=True, pool_size=4
    )
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/n/{n}")
    def n(n: int, s: Annotated[Session, Depends(session)]) -> dict[str, int]:
        s.execute(text("SET LOCAL statement_timeout = '5s'"))
        got = s.execute(text("SELECT CAST(:n AS int) + 1"), {"n": n}).scalar_one()
        return {"n": got}

    async with lc.lifespan(app), client(app) as c:
        results = [None] * 60

        async def one(i: int) -> None:
            r = await c.get(f"/n/{i}")
            results[i] = (r.status_code, r.json())

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
    assert results == [(200, {"n": i + 1}) for i in range(60)]


async def test_pgbouncer_driver_settings_do_not_reach_the_next(
    pgbouncer: PgBouncer, postgres: Postgres, notes: str
) -> None:
    """Behind PgBouncer the server session is not reset (the next transaction may run on
    another server connection), but what psycopg2 keeps on the client's connection object
    still goes back as the pool's setup left it: a unit's ``readonly=True`` or
    ``autocommit=True`` does not reach the next unit."""
    lc = tether.Lifecycle()
    _, session = declare(lc, pgbouncer.url("postgresql+psycopg2"), app_name(), pgbouncer=True)
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)

            def first() -> None:
                s.execute(text("SELECT 1"))
                s.commit()
                drv = driver_of(s)  # taken again, idle: the pool's one connection
                drv.set_session(readonly=True, autocommit=True)

            await anyio.to_thread.run_sync(first)
        with pytest.raises(RuntimeError, match="boom"):
            async with lc.scope() as scope:
                s = await scope.get(session)

                def second() -> None:
                    s.execute(text(f"INSERT INTO {notes} VALUES (1, NULL)"))
                    raise RuntimeError("boom")

                await anyio.to_thread.run_sync(second)
        async with lc.scope() as scope:
            s = await scope.get(session)
            await anyio.to_thread.run_sync(
                lambda: s.execute(text(f"INSERT INTO {notes} VALUES (2, NULL)"))
            )
    assert postgres.sql(f"SELECT id FROM {notes}") == [(2,)]


# --------------------------------------------------------------------------- client gone


async def test_a_client_gone_during_a_def_endpoint_leaves_nothing_in_transaction(
    postgres: Postgres, notes: str
) -> None:
    """The client leaves while a ``def`` endpoint writes: the endpoint runs to its end in
    its thread, its writes roll back, and the connection goes back clean (not idle in
    transaction): the next requests commit theirs on it."""
    app_ = app_name()
    lc = tether.Lifecycle()
    _, session = declare(lc, postgres.url("postgresql+psycopg2"), app_, max_overflow=0)
    app = FastAPI(lifespan=lc.lifespan)
    S = Annotated[Session, Depends(session)]
    ended: list[str] = []
    counter = iter(range(1000, 2000))
    states: list[Any] = []

    @app.post("/long")
    def long(s: S) -> dict[str, str]:
        for i in range(100):
            s.execute(text(f"INSERT INTO {notes} VALUES (:i, NULL)"), {"i": i})
            time.sleep(0.005)
        ended.append("returned")
        return {"status": "done"}

    @app.post("/one")
    def one(s: S) -> dict[str, str]:
        s.execute(text(f"INSERT INTO {notes} VALUES (:i, NULL)"), {"i": next(counter)})
        return {"status": "done"}

    async with lc.lifespan(app):
        assert await call(app, "/long", leave_after=0.2) == [499]
        assert ended == ["returned"]  # the thread ran to its end, then rolled back
        states.append([r["state"] for r in postgres.activity(app_)])
        for _ in range(3):
            assert await call(app, "/one", leave_after=None) == [200]
        states.append([r["state"] for r in postgres.activity(app_)])
    assert states == [["idle"], ["idle"]]
    assert postgres.sql(f"SELECT count(*) FROM {notes}") == [(3,)]
    assert postgres.activity_after_close(app_) == []
