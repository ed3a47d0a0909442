"""Work done once per deployment at startup, whatever the workers (pain.md T5.5).

`once(lc, pool, fn, key=...)` of the asyncpg, psycopg and SQLAlchemy integrations, against a
real PostgreSQL: several lifecycles start at the same moment, each with its own pool, as the
workers of one deployment do. Ground truth: the rows the work wrote, the table of done keys,
and pg_stat_activity / pg_locks.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import tether
from tests.servers import PgBouncer, Postgres
from tether.integrations import _once
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

Work = Callable[[Any], Awaitable[Any]]


def asyncpg_once(lc: tether.Lifecycle, pg: Postgres, fn: Work, **kw: Any) -> tether.Resource[bool]:
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=2,
                    server_settings={"application_name": kw.pop("app", "once")})  # fmt: skip
    return tpg.once(lc, pool, fn, **kw)


def psycopg_once(lc: tether.Lifecycle, pg: Postgres, fn: Work, **kw: Any) -> tether.Resource[bool]:
    pool = tpsy.pool(lc, pg.dsn, min_size=1, max_size=2,
                     kwargs={"application_name": kw.pop("app", "once")})  # fmt: skip
    return tpsy.once(lc, pool, fn, **kw)


def sqlalchemy_once(
    lc: tether.Lifecycle, pg: Postgres, fn: Work, **kw: Any
) -> tether.Resource[bool]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=2,
                        application_name=kw.pop("app", "once"))  # fmt: skip
    return tsa.once(lc, engine, fn, **kw)


DRIVERS = pytest.mark.parametrize(
    "declare",
    [asyncpg_once, psycopg_once, sqlalchemy_once],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)


async def execute(conn: Any, sql: str) -> None:
    """Run *sql* on the connection `fn` is given, whichever driver it is."""
    if hasattr(conn, "run_sync"):  # SQLAlchemy's AsyncConnection
        from sqlalchemy import text

        await conn.execute(text(sql))
    else:
        await conn.execute(sql)


async def start(lc: tether.Lifecycle, res: tether.Resource[bool]) -> tuple[bool, float]:
    """Start *lc* as a worker would; return the resource's value and how long startup took."""
    started = time.monotonic()
    async with lc.run():
        return lc.get(res), time.monotonic() - started


async def sql(pg: Postgres, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg.dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
def names(postgres: Postgres) -> tuple[str, str]:
    """A table for the work to write, and a key, both this test's own."""
    tag = uuid.uuid4().hex[:8]
    postgres.sql(f"CREATE TABLE runs_{tag} (at timestamptz DEFAULT clock_timestamp())")
    return f"runs_{tag}", f"test:{tag}"


@DRIVERS
async def test_workers_starting_together_run_the_work_once(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """Three workers start at once: one runs the work, the other two wait until it is done
    (they do not serve before the schema is there) and skip it; a restart skips it too,
    and a new key runs again."""
    runs, key = names

    async def migrate(conn: Any) -> None:
        await execute(conn, f"INSERT INTO {runs} DEFAULT VALUES")
        await asyncio.sleep(0.5)

    def worker(k: str = key) -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        lc = tether.Lifecycle()
        return lc, declare(lc, postgres, migrate, key=k)

    results = await asyncio.gather(*(start(*worker()) for _ in range(3)))
    assert sorted(ran for ran, _ in results) == [False, False, True]
    assert all(took >= 0.45 for _, took in results), results  # the skippers waited for it
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 1
    record = await sql(postgres, "SELECT done_by, seconds FROM tether_once WHERE key = $1", key)
    assert len(record) == 1
    assert record[0]["seconds"] >= 0.45

    assert await start(*worker()) == (False, pytest.approx(0, abs=0.4))  # a restart
    assert (await start(*worker(key + ":v2")))[0] is True  # the next deployment
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 2


@DRIVERS
async def test_workers_run_the_work_once_under_repeatable_read(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """The database's default isolation is repeatable read (a hardening): the worker that
    waited for the lock took its snapshot before the wait, did not see the first one's
    record, ran the work again, and failed to start on the record's INSERT (trial 24). The
    lock's transaction is read committed, whatever the default."""
    runs, key = names

    async def migrate(conn: Any) -> None:
        await execute(conn, f"INSERT INTO {runs} DEFAULT VALUES")
        await asyncio.sleep(0.5)

    def worker() -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        lc = tether.Lifecycle()
        return lc, declare(lc, postgres, migrate, key=key)

    postgres.sql("ALTER ROLE tether SET default_transaction_isolation = 'repeatable read'")
    try:
        results = await asyncio.gather(*(start(*worker()) for _ in range(2)))
    finally:
        postgres.sql("ALTER ROLE tether RESET default_transaction_isolation")
    assert sorted(ran for ran, _ in results) == [False, True]
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 1


async def test_an_autocommit_engine_runs_the_work_once(
    postgres: Postgres, names: tuple[str, str]
) -> None:
    """An engine of `isolation_level="AUTOCOMMIT"`: the lock's "transaction" was none, so
    its lock was gone at once and every worker ran the work (trial 28). The lock's
    transaction is one whatever the engine's isolation level."""
    runs, key = names

    async def migrate(conn: Any) -> None:
        await execute(conn, f"INSERT INTO {runs} DEFAULT VALUES")
        await asyncio.sleep(0.5)

    def worker() -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        lc = tether.Lifecycle()
        engine = tsa.engine(
            lc, postgres.url("postgresql+asyncpg"), pool_size=2, isolation_level="AUTOCOMMIT"
        )
        return lc, tsa.once(lc, engine, migrate, key=key)

    results = await asyncio.gather(*(start(*worker()) for _ in range(2)))
    assert sorted(ran for ran, _ in results) == [False, True]
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 1


@DRIVERS
async def test_a_failed_run_keeps_nothing_and_the_next_start_runs_it(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """The work fails half-way: the app does not start, what the work did is rolled back,
    nothing is recorded, no backend is left in a transaction; the next start runs it."""
    runs, key = names
    attempts = 0

    async def migrate(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        await execute(conn, f"INSERT INTO {runs} DEFAULT VALUES")
        if attempts == 1:
            raise RuntimeError("migration 2 of 3 failed")

    lc = tether.Lifecycle()
    res = declare(lc, postgres, migrate, key=key, app=f"once-{key}")
    with pytest.raises(tether.StartupError, match="'migrate'") as info:
        await start(lc, res)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert await sql(postgres, f"SELECT * FROM {runs}") == []
    assert await sql(postgres, "SELECT * FROM tether_once WHERE key = $1", key) == []
    # A closed backend leaves pg_stat_activity when its process has exited, a moment later.
    deadline = time.monotonic() + 5
    while left := await sql(
        postgres,
        "SELECT state FROM pg_stat_activity WHERE application_name = $1",
        f"once-{key}",
    ):
        assert time.monotonic() < deadline, left
        await asyncio.sleep(0.02)

    lc = tether.Lifecycle()
    assert (await start(lc, declare(lc, postgres, migrate, key=key)))[0] is True
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 1


@DRIVERS
async def test_waiting_past_the_timeout_fails_startup_and_leaves_nothing_waiting(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """Another worker holds the lock (a migration that hangs): startup fails after
    `timeout` seconds, and the server is left with no backend of ours waiting for the
    lock, so it cannot take the lock later on a connection nobody uses."""
    runs, key = names
    holder = await asyncpg.connect(postgres.dsn)
    try:
        await holder.execute("BEGIN")
        await holder.fetchval("SELECT pg_advisory_xact_lock($1)", _once.lock_id(key))

        async def migrate(conn: Any) -> None:
            await execute(conn, f"INSERT INTO {runs} DEFAULT VALUES")

        lc = tether.Lifecycle()
        res = declare(lc, postgres, migrate, key=key, timeout=1.0, app=f"once-{key}")
        began = time.monotonic()
        with pytest.raises(tether.StartupError, match="'migrate'"):
            await start(lc, res)
        assert 0.9 <= time.monotonic() - began < 6
        deadline = time.monotonic() + 3
        while waiting := await sql(
            postgres,
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            f"once-{key}",
        ):
            assert time.monotonic() < deadline, f"backends still there: {waiting}"
            await asyncio.sleep(0.05)
    finally:
        await holder.close()  # ends its transaction: the lock is free
    lc = tether.Lifecycle()
    assert (await start(lc, declare(lc, postgres, migrate, key=key)))[0] is True


@DRIVERS
async def test_record_false_runs_in_every_worker_one_at_a_time(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """With record=False nothing is recorded: each worker runs the work, never two at once."""
    runs, key = names
    running = most = 0

    async def migrate(conn: Any) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await execute(conn, f"INSERT INTO {runs} DEFAULT VALUES")
        await asyncio.sleep(0.2)
        running -= 1

    def worker() -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        lc = tether.Lifecycle()
        return lc, declare(lc, postgres, migrate, key=key, record=False, table="not_made")

    results = await asyncio.gather(*(start(*worker()) for _ in range(3)))
    assert [ran for ran, _ in results] == [True, True, True]
    assert most == 1
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 3
    assert await sql(postgres, "SELECT to_regclass('not_made') IS NULL AS missing") == [(True,)]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_behind_pgbouncer_in_transaction_mode(
    pgbouncer: PgBouncer, postgres: Postgres, names: tuple[str, str], driver: str
) -> None:
    """Through PgBouncer in transaction mode each transaction may get another server
    connection, so a session-level lock would be taken on one and left there; the
    transaction-level lock holds: three workers, one run."""
    runs, key = names

    async def migrate(conn: Any) -> None:
        await conn.execute(f"INSERT INTO {runs} DEFAULT VALUES")
        await asyncio.sleep(0.3)

    def worker() -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        lc = tether.Lifecycle()
        if driver == "asyncpg":
            pool = tpg.pool(lc, pgbouncer.dsn, min_size=1, max_size=2, pgbouncer=True)
            return lc, tpg.once(lc, pool, migrate, key=key)
        ppool = tpsy.pool(lc, pgbouncer.dsn, min_size=1, max_size=2, pgbouncer=True)
        return lc, tpsy.once(lc, ppool, migrate, key=key)

    results = await asyncio.gather(*(start(*worker()) for _ in range(3)))
    assert sorted(ran for ran, _ in results) == [False, False, True]
    assert len(await sql(postgres, f"SELECT * FROM {runs}")) == 1
    assert await sql(postgres, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [
        (0,)
    ]


async def commit(conn: Any) -> None:
    if hasattr(conn, "run_sync"):
        await conn.commit()
    else:
        await conn.execute("COMMIT")


@DRIVERS
async def test_work_that_ends_the_transaction_is_refused(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """A commit inside the work would free the lock early: the app does not start, and
    nothing is recorded."""
    _, key = names
    lc = tether.Lifecycle()
    res = declare(lc, postgres, commit, key=key)
    with pytest.raises(tether.StartupError) as info:
        await start(lc, res)
    assert str(info.value.__cause__) == (
        "once 'commit': the function ended the transaction that holds the lock (a commit or "
        f"rollback on the connection it was given), so other workers may have run '{key}' "
        "too. Leave the transaction to tether; use a nested transaction (a savepoint) for a "
        "block that must roll back on its own."
    )
    assert await sql(postgres, "SELECT * FROM tether_once WHERE key = $1", key) == []


async def test_a_role_that_may_not_create_the_table_is_told_what_to_do(
    postgres: Postgres, names: tuple[str, str]
) -> None:
    """PostgreSQL 15 lets no other role create tables in `public`: the error shows the SQL to
    run once as the owner, or record=False."""
    _, key = names
    postgres.sql("DO $$ BEGIN CREATE ROLE once_app LOGIN; EXCEPTION WHEN duplicate_object "
                 "THEN NULL; END $$")  # fmt: skip
    dsn = postgres.dsn.replace("tether:s3cret-pw@", "once_app@")

    async def noop(conn: Any) -> None:
        pass

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, dsn, min_size=1, max_size=1)
    res = tpg.once(lc, pool, noop, key=key, table="app_once")
    with pytest.raises(tether.StartupError) as info:
        await start(lc, res)
    cause = info.value.__cause__
    assert isinstance(cause, PermissionError)
    assert str(cause) == (
        "once 'noop': cannot create the table 'app_once' that records work done "
        "(InsufficientPrivilegeError: permission denied for schema public). Create it once as "
        "a role that may:\n"
        "  CREATE TABLE IF NOT EXISTS app_once (key text PRIMARY KEY, done_at timestamptz NOT "
        "NULL DEFAULT now(), done_by text NOT NULL, seconds double precision NOT NULL);\n"
        "  GRANT SELECT, INSERT ON app_once TO <the app's role>;\n"
        "or pass record=False (the work then runs in every worker, one at a time)."
    )
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, dsn, min_size=1, max_size=1)
    assert (await start(lc, tpg.once(lc, pool, noop, key=key, record=False)))[0] is True


async def test_sqlalchemy_once_needs_postgresql(tmp_path: Any) -> None:
    """An SQLite engine has no advisory locks: startup fails, naming both."""

    async def noop(conn: Any) -> None:
        pass

    lc = tether.Lifecycle()
    engine = tsa.engine(lc, f"sqlite+aiosqlite:///{tmp_path}/x.db", name="db")
    res = tsa.once(lc, engine, noop, key="k")
    with pytest.raises(tether.StartupError) as info:
        await start(lc, res)
    assert str(info.value.__cause__) == (
        "once 'noop': engine 'db' is sqlite, and once() needs PostgreSQL's advisory locks. For "
        "a sqlite database (a test run, the demo), declare in its place an app resource of your "
        'own that runs it at every start: `@lc.resource(scope="app") async def run_noop(engine: '
        "AsyncEngine) -> None: async with engine.begin() as conn: await noop(conn)`, choosing "
        "between the two by the URL."
    )


def test_bad_arguments_are_refused_when_declared() -> None:
    """Mistakes surface where `once` is called, not at the next deployment."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, "postgresql://unused")

    def sync_work(conn: Any) -> None:
        pass

    async def work(conn: Any) -> None:
        pass

    with pytest.raises(TypeError) as info:
        tpg.once(lc, pool, sync_work, key="k")  # type: ignore[arg-type]
    assert str(info.value).startswith(
        f"once 'sync_work': {sync_work!r} is not an async function. Pass `async def "
        f"sync_work(conn): ...`; it runs on the connection that holds the lock"
    )
    with pytest.raises(ValueError, match=r"^once 'work': key='' must be a non-empty string "):
        tpg.once(lc, pool, work, key="")
    with pytest.raises(ValueError) as bad_table:
        tpg.once(lc, pool, work, key="k", table="done; DROP TABLE x")
    assert str(bad_table.value) == (
        "once 'work': table='done; DROP TABLE x' is not a plain SQL name (letters, digits "
        "and `_`, optionally `schema.table`)."
    )


DECLARE_ONCE: dict[str, Callable[..., Any]] = {
    "asyncpg": lambda lc, work, **kw: tpg.once(lc, tpg.pool(lc, "postgresql://u@h/d"), work, **kw),
    "psycopg": lambda lc, work, **kw: tpsy.once(
        lc, tpsy.pool(lc, "postgresql://u@h/d"), work, **kw
    ),
    "sqlalchemy": lambda lc, work, **kw: tsa.once(
        lc, tsa.engine(lc, "postgresql+asyncpg://u@h/d"), work, **kw
    ),
}


@pytest.mark.parametrize("driver", DECLARE_ONCE)
@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        (
            {"key": 5},
            TypeError,
            "once 'work': key=5 is an int, not a string. Pass a string that changes when the "
            "work does, e.g. f'migrations:{APP_VERSION}' (the work runs once per key).",
        ),
        (
            {"key": "  "},
            ValueError,
            "once 'work': key='  ' must be a non-empty string of at most 200 characters that "
            "changes when the work does, e.g. f'migrations:{APP_VERSION}' (the work runs once "
            "per key).",
        ),
        (
            {"key": "k", "table": 5},
            TypeError,
            "once 'work': table=5 is an int, not a string. Pass the name of the table that "
            "records the work done, e.g. table='tether_once' (the default).",
        ),
        (
            {"key": "k", "record": "no"},
            TypeError,
            "once 'work': record='no' is a str, not a bool. Pass True or False (a setting read "
            "from the environment is a string, and 'no' would count as true: convert it, e.g. "
            'record=os.environ.get(...) == "1").',
        ),
        (
            {"key": "k", "name": ""},
            ValueError,
            "once(work, name=...): Resource name='' is not a valid parameter name, and a "
            "parameter asks for a resource by its name: use letters, digits and underscores, "
            "not starting with a digit, e.g. name='db'.",
        ),
    ],
    ids=["key-type", "key-blank", "table-type", "record-str", "name-empty"],
)
def test_each_bad_argument_has_its_own_message_on_every_driver(
    driver: str, given: dict[str, Any], error: type[Exception], message: str
) -> None:
    """`table=5` was Python's bare "expected string or bytes-like object"; `key=5` a
    ValueError; `name=""` was taken as no name (the function's); `record=` named a call the
    user did not write (`tether.integrations.asyncpg.once(key='k')`) on two drivers of three.
    The same message on each driver now, where `once` is called."""
    lc = tether.Lifecycle()

    async def work(conn: Any) -> None:
        pass

    with pytest.raises(error) as info:
        DECLARE_ONCE[driver](lc, work, **given)
    assert str(info.value) == message
    assert "work" not in lc.resources


def test_uvicorn_workers_migrate_once_and_all_serve(
    postgres: Postgres, names: tuple[str, str], tmp_path: Any
) -> None:
    """`uvicorn --workers 3`, each worker migrating at startup with a migration that fails if
    run twice: all three start, one of them ran it, and every request finds the schema."""
    import httpx

    from tests.serving import Server

    _, key = names
    table = f"notes_{key.partition(':')[2]}"
    env = {"TETHER_TEST_DSN": postgres.dsn, "TETHER_TEST_TABLE": table, "TETHER_TEST_KEY": key}
    server = Server("tests.integration.app_once:app", tmp_path, "--workers", "3", env=env)
    try:
        deadline = time.monotonic() + 30
        while len(started := re.findall(r"EVENT started \d+ (ran=\w+)", server.output())) < 3:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        assert sorted(started) == ["ran=False", "ran=False", "ran=True"]
        with httpx.Client(base_url=server.base_url) as client:
            answers = [client.get("/notes") for _ in range(30)]
        assert {a.status_code for a in answers} == {200}
        assert {tuple(a.json()["notes"]) for a in answers} == {("seeded",)}
        assert "Traceback" not in server.output()
    finally:
        server.stop()


ENV_PY = """
from alembic import context

config = context.config
context.configure(
    connection=config.attributes["connection"],
    version_table=config.attributes["version_table"],
)
with context.begin_transaction():  # inside once's transaction: Alembic joins it
    context.run_migrations()
"""

REVISION = """
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("INSERT INTO {table} (id) VALUES (1)")


def downgrade():
    op.drop_table("{table}")
"""


async def test_alembic_upgrade_runs_once_across_workers(
    postgres: Postgres, names: tuple[str, str], tmp_path: Any
) -> None:
    """The documented Alembic recipe: `alembic upgrade head` through `conn.run_sync`, in
    three workers starting together. The revision (not idempotent: it creates a table) runs
    once, in once's transaction, and Alembic's version table says head."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncConnection

    _, key = names
    tag = key.partition(":")[2]
    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV_PY)
    (scripts / "versions" / "0001.py").write_text(REVISION.format(table=f"alembic_t_{tag}"))

    async def migrate(conn: AsyncConnection) -> None:
        def upgrade(sync_conn: Any) -> None:
            config = Config()
            config.set_main_option("script_location", str(scripts))
            config.attributes["connection"] = sync_conn
            config.attributes["version_table"] = f"alembic_version_{tag}"
            command.upgrade(config, "head")

        await conn.run_sync(upgrade)

    def worker() -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        lc = tether.Lifecycle()
        engine = tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=1)
        return lc, tsa.once(lc, engine, migrate, key=f"alembic:{tag}:0001")

    results = await asyncio.gather(*(start(*worker()) for _ in range(3)))
    assert sorted(ran for ran, _ in results) == [False, False, True]
    assert await sql(postgres, f"SELECT id FROM alembic_t_{tag}") == [(1,)]
    assert await sql(postgres, f"SELECT version_num FROM alembic_version_{tag}") == [("0001",)]


@DRIVERS
async def test_a_start_cancelled_at_each_wake_up_keeps_the_work_and_its_record_together(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """A worker's startup (the pool, then the lock, the check, the work, the record, the
    commit) cancelled at each wake-up of its task (``tests/wakeups.py``), each time under a
    new key. The resources open in tasks of their own, which the cancellation reaches through
    anyio's task group. Whatever the moment: the work's rows exist exactly when the key is
    recorded done, no backend of it is left (in a transaction, or holding the lock), and the
    next start runs the work exactly when it was not recorded."""
    from tests.wakeups import cancelled_at_wake_up

    _, tag = names
    table = f"wk_{tag.partition(':')[2]}"
    await sql(postgres, f"CREATE TABLE {table} (k text)")
    app = f"once-wk-{tag.partition(':')[2]}"

    async def migrate(conn: Any) -> None:
        await execute(conn, f"INSERT INTO {table} VALUES ('{current[0]}')")

    current = [""]

    def fresh(key: str) -> tuple[tether.Lifecycle, tether.Resource[bool]]:
        current[0] = key
        lc = tether.Lifecycle()
        return lc, declare(lc, postgres, migrate, key=key, app=app)

    async def counts(key: str) -> tuple[int, int]:
        written = await sql(postgres, f"SELECT count(*) FROM {table} WHERE k = $1", key)
        done = await sql(postgres, "SELECT count(*) FROM tether_once WHERE key = $1", key)
        return written[0][0], done[0][0]

    async def nothing_left(what: str) -> None:
        deadline = time.monotonic() + 3
        while left := await sql(
            postgres, "SELECT state FROM pg_stat_activity WHERE application_name = $1", app
        ):
            assert time.monotonic() < deadline, f"{what}: backends left: {left}"
            await asyncio.sleep(0.02)

    _, wake_ups = await cancelled_at_wake_up(None, start(*fresh(f"{tag}:clean")))
    assert await counts(f"{tag}:clean") == (1, 1)
    fired_any = False
    for k in range(1, 3 * wake_ups + 6):
        key = f"{tag}:{k}"
        what = f"startup cancelled at wake-up {k} of {wake_ups}"
        fired, _ = await cancelled_at_wake_up(k, start(*fresh(key)))
        fired_any |= fired
        written, done = await counts(key)
        assert written == done, f"{what}: {written} rows written, recorded {done}"
        await nothing_left(what)
        ran, _ = await start(*fresh(key))
        assert ran is (done == 0), f"{what}: recorded {done}, ran again: {ran}"
        assert await counts(key) == (1, 1), what
        if not fired:
            break
    assert fired_any


async def each_connection(lc: tether.Lifecycle, query: str, n: int) -> list[tuple[Any, ...]]:
    """*query*'s row on each of *n* connections of the lifecycle's pool, held at once."""
    pool_res = next(r for r in lc.resources.values() if r.name in ("pool", "engine"))
    pool = lc.get(pool_res)
    rows: list[tuple[Any, ...]] = []
    if isinstance(pool, asyncpg.Pool):
        conns = [await pool.acquire() for _ in range(n)]
        rows = [tuple(await c.fetchrow(query)) for c in conns]
        for c in conns:
            await pool.release(c)
    elif hasattr(pool, "getconn"):  # psycopg
        pconns = [await pool.getconn() for _ in range(n)]
        rows = [tuple(await (await c.execute(query)).fetchone()) for c in pconns]
        for c in pconns:
            await c.rollback()
            await pool.putconn(c)
    else:  # SQLAlchemy's AsyncEngine
        from sqlalchemy import text

        sconns = [await pool.connect() for _ in range(n)]
        rows = [tuple((await c.execute(text(query))).one()) for c in sconns]
        for c in sconns:
            await c.close()
    return rows


@DRIVERS
async def test_what_the_work_sets_on_its_session_is_not_the_first_requests(
    postgres: Postgres, names: tuple[str, str], declare: Callable[..., tether.Resource[bool]]
) -> None:
    """A migration's `SET search_path`, `SET lock_timeout` and temporary tables stay with it:
    the connection it ran on goes back to the pool reset, as after a request."""
    _, key = names

    async def migrate(conn: Any) -> None:
        await execute(conn, "SET search_path TO nowhere, public")
        await execute(conn, "SET lock_timeout = '1min'")
        await execute(conn, "CREATE TEMP TABLE scratch AS SELECT 'migration secret'::text AS v")

    lc = tether.Lifecycle()
    declare(lc, postgres, migrate, key=key)
    query = (
        "SELECT current_setting('search_path'), current_setting('lock_timeout'), "
        "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
    )
    async with lc.run():
        assert await each_connection(lc, query, 2) == [('"$user", public', "0", 0)] * 2


# ----------------------------------------------------------------------- a sync (def) app


def test_a_sync_engine_is_refused_at_declaration_naming_an_async_one_for_once() -> None:
    """It was accepted, then the startup ran `await eng.connect()` on the sync Engine: a
    connection checked out on the event loop, a TypeError, and the connection never given
    back."""
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, "postgresql+psycopg://u:p@h/db")

    async def migrate(conn: Any) -> None:  # pragma: no cover - never run
        pass

    with pytest.raises(TypeError) as caught:
        tsa.once(lc, engine, migrate, key="schema:1")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "once(migrate): the engine resource 'engine' is a sync engine (sync_engine()), and "
        "once() runs on an async one, engine(). Declare one on the same URL for it (with "
        "psycopg, postgresql+psycopg:// serves both): migrations = tsa.engine(lc, url, "
        "name='migrations', pool_size=1), then tsa.once(lc, migrations, migrate, "
        "key='schema:1') with `async def migrate(conn): await conn.run_sync(...)` (run_sync "
        "calls your sync code, metadata.create_all or Alembic's upgrade, with a sync "
        "connection)."
    )


async def test_a_sync_app_runs_its_schema_once_through_an_async_engine_on_the_same_url(
    postgres: Postgres,
) -> None:
    """What the refusal above says to do, done: a `def` app's sync engine and session, and
    an async engine on the same postgresql+psycopg:// URL for `once`, whose function runs the
    sync `create_all` through `run_sync`; the app's sync session then writes to the table."""
    from sqlalchemy import Column, Integer, MetaData, Table, text

    table = f"once_sync_{uuid.uuid4().hex[:8]}"
    metadata = MetaData()
    Table(table, metadata, Column("id", Integer, primary_key=True))
    url = postgres.url("postgresql+psycopg")
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, url, pool_size=2)
    session = tsa.sync_session(lc, engine)
    migrations = tsa.engine(lc, url, name="migrations", pool_size=1)

    async def migrate(conn: Any) -> None:
        await conn.run_sync(metadata.create_all)

    tsa.once(lc, migrations, migrate, key=f"schema:{table}")
    try:
        async with lc.run():
            async with lc.scope("job") as unit:
                db = await unit.get(session)
                await asyncio.to_thread(db.execute, text(f"INSERT INTO {table} VALUES (1)"))
        assert postgres.sql(f"SELECT id FROM {table}") == [(1,)]
    finally:
        postgres.sql(f"DROP TABLE IF EXISTS {table}")
        postgres.sql(f"DELETE FROM tether_once WHERE key = 'schema:{table}'")
