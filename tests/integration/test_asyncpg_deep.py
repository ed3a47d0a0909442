"""tether.integrations.asyncpg, what the next unit of work gets, and what an error says: the
asyncpg-deep review's findings, against a real PostgreSQL (and uvicorn for a client that leaves).

- a write refused by the unit's own read-only transaction (or a pool read-only on purpose) is
  the endpoint's error, not a failover: the pool keeps its connections;
- a type codec a unit sets does not reach the next unit on that connection;
- a prepared statement the app named itself gets a note about it, not "pass pgbouncer=True";
- `isolation=` and `readonly=` are checked as the resource is registered;
- a client leaving a stream inside its `async with conn.transaction():` blames no one;
- after `pool.set_connect_args(...)` the messages name the new DSN.
"""

import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import httpx
import pytest

import tether
from tests.servers import Postgres
from tests.serving import Server
from tether.integrations import asyncpg as tpg

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    """A table of this test only."""
    name = f"deep_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (k int)")
    try:
        yield name
    finally:
        postgres.sql(f"DROP TABLE {name}")


async def backends(lc: tether.Lifecycle, pool: tether.Resource[Any]) -> set[int]:
    """The server pids of the pool's idle connections (asyncpg's holders)."""
    p = lc.get(pool)
    return {h._con.get_server_pid() for h in p._holders if h._con is not None}


# --------------------------------------------------------------------------- bug 2: 25006


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    "case", ["own-readonly-block", "set-transaction-read-only", "read-only-pool"]
)
async def test_a_read_only_write_of_the_units_own_is_its_error_not_a_failover(
    postgres: Postgres, table: str, case: str
) -> None:
    """A write refused (25006) by the unit's own read-only transaction, or by a pool the app
    made read-only on purpose, used to be classed as a failover: a 503 with Retry-After (a
    retry that can never succeed), a "failover" warning, and every connection of the pool
    replaced. Only a server read-only for every session is one: here the error is the
    endpoint's (a 500), and the pool keeps its connections."""
    settings = {"default_transaction_read_only": "on"} if case == "read-only-pool" else None
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=2, max_size=2, server_settings=settings)
    conn = tpg.connection(lc, pool, transaction=case == "set-transaction-read-only")
    async with lc.run():
        before = await backends(lc, pool)
        for _ in range(2):
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    if case == "own-readonly-block":
                        async with c.transaction(readonly=True):
                            await c.execute(f"INSERT INTO {table} VALUES (1)")
                    else:
                        if case == "set-transaction-read-only":
                            await c.execute("SET TRANSACTION READ ONLY")
                        await c.execute(f"INSERT INTO {table} VALUES (1)")
        # Still usable, on the same backends: nothing was replaced or discarded.
        async with lc.scope() as s:
            c = await s.get(conn)
            assert await c.fetchval("SELECT 1") == 1
        assert await backends(lc, pool) == before
        figures = lc.stats().pools["pool"]
        assert (figures.created, figures.discarded) == (2, 0)
    assert postgres.sql(f"SELECT count(*) FROM {table}") == [(0,)]


# --------------------------------------------------------------------------- bug 3: codecs


def _as_dict(value: str) -> Any:
    return json.loads(value)


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
@pytest.mark.parametrize("setter", ["set_type_codec", "set_builtin_type_codec"])
async def test_a_codec_a_unit_sets_does_not_reach_the_next_unit(
    postgres: Postgres, transaction: bool, setter: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A codec a unit set (`conn.set_type_codec`, `set_builtin_type_codec`) stayed on its
    connection (asyncpg's reset keeps codecs): the next unit on that connection decoded with
    it, units on others without. The connection is now closed as it goes back, with a warning
    saying to set codecs in `init=`; those `init=` and `setup=` set stay, and a unit that sets
    none keeps its connection."""

    async def init(c: asyncpg.Connection) -> None:
        await c.set_type_codec("jsonb", encoder=json.dumps, decoder=_as_dict, schema="pg_catalog")

    async def setup(c: Any) -> None:
        await c.set_builtin_type_codec("xid8", schema="pg_catalog", codec_name="int8")

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=init, setup=setup)
    conn = tpg.connection(lc, pool, transaction=transaction)
    query = """SELECT '{"a": 1}'::json, '{"b": 2}'::jsonb, '7'::xid8, '8'::oid, pg_backend_pid()"""
    seen = []
    async with lc.run():
        for unit in range(4):
            async with lc.scope() as s:
                c = await s.get(conn)
                seen.append(tuple(await c.fetchrow(query)))
                if unit == 1 and setter == "set_type_codec":
                    await c.set_type_codec(
                        "json", encoder=json.dumps, decoder=_as_dict, schema="pg_catalog"
                    )
                elif unit == 1:
                    await c.set_builtin_type_codec("oid", schema="pg_catalog", codec_name="text")
        figures = lc.stats().pools["pool"]
    values = [row[:4] for row in seen]
    assert values == [('{"a": 1}', {"b": 2}, 7, 8)] * 4  # unit 2 used to get unit 1's codec
    assert (figures.created, figures.discarded) == (2, 0)
    pids = [row[4] for row in seen]
    assert pids[0] == pids[1] != pids[2] == pids[3]  # unit 1's connection went
    warned = [r.getMessage() for r in caplog.records if "type codec" in r.getMessage()]
    assert warned == [
        "tether: 'conn': the unit of work changed a type codec (set_type_codec, "
        "set_builtin_type_codec or reset_type_codec), which asyncpg's reset keeps: the "
        "connection was closed, not returned, so the next unit on it does not decode with "
        "it. Set codecs in the pool's init= (every connection, once), not per unit of work"
    ]


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize("way", ["pool.acquire", "rolled_back"])
async def test_a_codec_changed_on_another_way_back_is_not_the_next_units(
    postgres: Postgres, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A codec set on a connection that goes back another way than a unit's (the app's own
    `pool.acquire()`, a test's `rolled_back()` block) went back with it: the next unit decoded
    with it, and was then blamed for it (warned, and its connection closed). The pool closes
    such a connection as it comes back, whichever way."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
    conn = tpg.connection(lc, pool)
    seen = []
    async with lc.run():
        if way == "pool.acquire":
            async with lc.get(pool).acquire() as c:
                await c.set_builtin_type_codec("oid", schema="pg_catalog", codec_name="text")
        else:
            async with tpg.rolled_back(conn) as c:
                await c.set_builtin_type_codec("oid", schema="pg_catalog", codec_name="text")
        caplog.clear()
        for _ in range(2):
            async with lc.scope() as s:
                c = await s.get(conn)
                seen.append(tuple(await c.fetchrow("SELECT '8'::oid, pg_backend_pid()")))
    assert [row[0] for row in seen] == [8, 8]  # the first used to get '8' (text)
    assert seen[0][1] == seen[1][1]  # and kept its connection
    assert [r for r in caplog.records if "type codec" in r.getMessage()] == []


# --------------------------------------------------------------------------- bug 4: PREPARE

APP_NOTE = (
    "tether: the prepared statement {name!r} is the app's own (SQL PREPARE, or "
    "conn.prepare(..., name=...)), not one the driver caches. It lives in one server session, "
    "and the session reset keeps it: the next unit of work on that pooled connection finds it "
    "there (preparing it again fails), and a unit on another connection does not have it. "
    "DEALLOCATE it in the unit of work that prepared it, or use conn.prepare() without a name."
)


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize("how", ["conn.prepare", "sql"])
async def test_a_statement_the_app_named_gets_no_pgbouncer_note(
    postgres: Postgres, how: str
) -> None:
    """A statement the app named itself outlives the unit (the reset keeps prepared
    statements), so the next unit preparing it on that connection fails. The note used to
    say "pass pgbouncer=True" (on a server without PgBouncer; and that turns the session
    reset off). It now names the statement and the fix."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
    conn = tpg.connection(lc, pool)
    name = "double_it" if how == "conn.prepare" else "p1"
    async with lc.run():
        for unit in range(2):
            with pytest.raises(asyncpg.DuplicatePreparedStatementError) if unit else nullcontext():
                async with lc.scope() as s:
                    c = await s.get(conn)
                    if how == "conn.prepare":
                        await c.prepare("SELECT $1::int * 2", name=name)
                    else:
                        await c.execute(f"PREPARE {name} AS SELECT 1")
        with pytest.raises(asyncpg.InvalidSQLStatementNameError) as missing:
            async with lc.scope() as s:
                c = await s.get(conn)
                await c.execute("EXECUTE nowhere")
    assert missing.value.__notes__ == [APP_NOTE.format(name="nowhere")]


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_the_app_note_names_the_statement_and_not_pgbouncer(postgres: Postgres) -> None:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1)
    conn = tpg.connection(lc, pool)
    async with lc.run():
        async with lc.scope() as s:
            await (await s.get(conn)).execute("PREPARE p1 AS SELECT 1")
        with pytest.raises(asyncpg.DuplicatePreparedStatementError) as caught:
            async with lc.scope() as s:
                await (await s.get(conn)).execute("PREPARE p1 AS SELECT 1")
    assert caught.value.__notes__ == [APP_NOTE.format(name="p1")]


# --------------------------------------------------------------------------- bugs 5, 6: options


@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    ("isolation", "fix"),
    [
        ("repeatable read", "isolation='repeatable_read'"),
        ("SERIALIZABLE", "isolation='serializable'"),
        ("snapshot", "one of them"),
    ],
)
def test_an_isolation_asyncpg_does_not_know_is_refused_at_registration(
    isolation: str, fix: str
) -> None:
    """It used to register fine, the app started healthy, and every request was a 500."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, "postgresql://localhost/x")
    with pytest.raises(ValueError) as caught:
        tpg.connection(lc, pool, transaction=True, isolation=isolation)
    assert str(caught.value) == (
        f"Connection 'conn': isolation={isolation!r} is not an isolation level asyncpg knows "
        f"('read_committed', 'read_uncommitted', 'repeatable_read', 'serializable'), so every "
        f"request would fail as it begins its transaction. Pass {fix}, or None for the "
        f"server's default."
    )


@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"readonly": True},
            "Connection 'conn': readonly=True needs transaction=True: it is of the unit of "
            "work's transaction, and transaction=False runs none (each statement commits on "
            "its own), so it would be ignored and writes committed. Pass transaction=True, or "
            "drop readonly=True.",
        ),
        (
            {"isolation": "serializable"},
            "Connection 'conn': isolation='serializable' needs transaction=True: it is of the "
            "unit of work's transaction, and transaction=False runs none (each statement "
            "commits on its own), so it would be ignored. Pass transaction=True, or drop "
            "isolation='serializable'.",
        ),
        (
            {"isolation": "serializable", "readonly": True},
            "Connection 'conn': isolation='serializable' and readonly=True need "
            "transaction=True: they are of the unit of work's transaction, and "
            "transaction=False runs none (each statement commits on its own), so they would "
            "be ignored and writes committed. Pass transaction=True, or drop them.",
        ),
    ],
)
def test_transaction_options_without_a_transaction_are_refused(
    options: dict[str, Any], message: str
) -> None:
    """`readonly=True` without `transaction=True` was ignored: writes through a "read-only"
    resource were committed. `isolation=` was ignored the same way."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, "postgresql://localhost/x")
    with pytest.raises(ValueError) as caught:
        tpg.connection(lc, pool, **options)
    assert str(caught.value) == message
    for isolation in (None, "read_committed", "repeatable_read", "serializable"):
        tpg.connection(lc, pool, name=f"ok_{isolation}", transaction=True, isolation=isolation,
                       readonly=True)  # fmt: skip


# --------------------------------------------------------------------------- bug 7: a stream left

ROWS = 400


def stream_app() -> Any:
    """uvicorn's factory: a stream whose body iterates a cursor inside its own
    `async with conn.transaction():`, with `release="response"`."""
    from fastapi import Depends, FastAPI
    from fastapi.responses import StreamingResponse

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, lambda: os.environ["DEEP_DSN"], min_size=1, max_size=1)
    conn = tpg.connection(lc, pool, name="sc", release="response")
    app = FastAPI(lifespan=lc.lifespan)
    logging.getLogger("tether").addHandler(_EventHandler())
    logging.getLogger("tether").setLevel(logging.DEBUG)

    @app.get("/stream")
    async def stream(c: Annotated[asyncpg.Connection, Depends(conn)]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with c.transaction():
                query = f"SELECT g, pg_sleep(0.005) FROM generate_series(1, {ROWS}) g"
                async for row in c.cursor(query):
                    yield f"{row[0]}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/check")
    async def check(c: Annotated[asyncpg.Connection, Depends(conn)]) -> dict[str, Any]:
        return {"in_transaction": c.is_in_transaction(), "pid": c.get_server_pid()}

    return app


class _EventHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"EVENT {record.levelname} {record.getMessage()}", flush=True)


@pytest.mark.servers
def test_a_client_leaving_a_stream_inside_its_transaction_block_is_no_warning(
    postgres: Postgres, tmp_path: Path
) -> None:
    """The client left a stream whose body was inside `async with conn.transaction():`.
    tether rolls that transaction back as the connection goes back, and used to warn
    "returned inside an open transaction ... commit or roll back the transactions you start",
    blaming code that is correct. It now says so at debug level; the next request is clean."""
    server = Server(
        "tests.integration.test_asyncpg_deep:stream_app",
        tmp_path,
        "--factory",
        env={"DEEP_DSN": postgres.dsn},
    )
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while data.count(b"\n") < 30:
                data += s.recv(4096)
        ended = (
            "DEBUG tether: 'sc': the unit of work was interrupted (the client went away, or "
            "it was cancelled) inside a transaction it opened; rolling it back"
        )
        server.wait_for(ended, timeout=10)
        check = httpx.get(f"{server.base_url}/check", timeout=10).json()
        assert check["in_transaction"] is False
        full = httpx.get(f"{server.base_url}/stream", timeout=30)
        assert full.text.split() == [str(n) for n in range(1, ROWS + 1)]
        assert not [e for e in server.events() if e.startswith("WARNING")]
    finally:
        server.stop()


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_a_transaction_left_open_by_the_code_is_still_warned_of(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A `BEGIN` the code never ended (no `async with`) is the code's: still a warning."""
    lc = tether.Lifecycle()
    conn = tpg.connection(lc, tpg.pool(lc, postgres.dsn, min_size=1, max_size=1))
    async with lc.run():
        for fail in (False, True):
            with pytest.raises(RuntimeError) if fail else nullcontext():
                async with lc.scope() as s:
                    await (await s.get(conn)).execute("BEGIN")
                    if fail:
                        raise RuntimeError("the unit failed")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warned
        == [
            "tether: 'conn': connection returned inside an open transaction; rolling it back "
            "(commit or roll back the transactions you start)"
        ]
        * 2
    )


# --------------------------------------------------------------------------- bug 8: new DSN


@pytest.mark.servers
@pytest.mark.fastapi_free
@pytest.mark.parametrize("given", ["dsn", "kwargs"])
async def test_after_set_connect_args_messages_name_the_new_target(
    postgres: Postgres, given: str
) -> None:
    """`pool.set_connect_args(new)` (asyncpg's way to rotate credentials or hosts): tether's
    503 used to name the old DSN while connecting to the new one."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=0, max_size=1, acquire_timeout=2)
    conn = tpg.connection(lc, pool)
    async with lc.run():
        p = lc.get(pool)
        if given == "dsn":
            p.set_connect_args("postgresql://rotated:s3cret@127.0.0.1:1/app")
            shown = "postgresql://rotated:***@127.0.0.1:1/app"
        else:
            p.set_connect_args(host="127.0.0.1", port=1, user="rotated", password="s3cret")
            shown = "the database (host='127.0.0.1', port=1, user='rotated')"
        await p.expire_connections()
        with pytest.raises(tether.ResourceUnavailable) as caught:
            async with lc.scope() as s:
                await s.get(conn)
    said = str(caught.value)
    assert said.startswith(f"'pool' cannot reach {shown}: "), said
    assert "s3cret" not in said
    assert postgres.dsn.split("@")[1] not in said


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_set_connect_args_keeps_the_options_pool_derived(postgres: Postgres) -> None:
    """asyncpg's `set_connect_args` replaces every connection option: a `pgbouncer=True` pool
    lost its `statement_cache_size=0` (so, behind PgBouncer, a credentials rotation brought
    back the named statements it breaks on), and every pool its `connect_timeout`. They stay
    unless given."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=0, max_size=1, pgbouncer=True, connect_timeout=3)
    conn = tpg.connection(lc, pool)
    async with lc.run():
        p = lc.get(pool)
        p.set_connect_args(postgres.dsn, command_timeout=9)
        await p.expire_connections()
        async with lc.scope() as s:
            c = await s.get(conn)
            assert await c.fetchval("SELECT $1::int", 1) == 1
            assert c._con._stmt_cache.get_max_size() == 0
            assert c._con._config.command_timeout == 9
        assert p._connect_kwargs == {"timeout": 3, "statement_cache_size": 0, "command_timeout": 9}
        p.set_connect_args(postgres.dsn, timeout=4, statement_cache_size=5)
        assert p._connect_kwargs == {"timeout": 4, "statement_cache_size": 5}
