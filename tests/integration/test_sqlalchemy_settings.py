"""What an engine's `connect` listeners set with `SET` is what every unit of work starts with:
the session reset undoes a unit's own `SET`s (its `RESET ALL`), and puts the listeners' back,
in the same round trip (a `statement_timeout` set there used to vanish after the first
request). Noted once per connection, and only on an engine that has such listeners.

A pool of one connection, on asyncpg, psycopg and a sync engine; the listener added on the
open engine (after tether's own listeners) or on `Pool` itself (before them). The read is a
query at a new connection's first checkout: a cancellation landing in it leaves nothing behind.
"""

import asyncio
import gc
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

import tether
from tests.integration.drivers import settled
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

SETUP = ("SET search_path TO app, public", "SET statement_timeout = '2s'")
CHECK = (
    "SELECT pg_backend_pid(), current_setting('search_path'), "
    "current_setting('statement_timeout'), current_setting('lock_timeout')"
)
KINDS = ["postgresql+asyncpg", "postgresql+psycopg", "sync"]


def set_up(dbapi_connection: Any, record: Any) -> None:
    """SQLAlchemy's recipe for a `connect` listener: the `SET`s in autocommit, so no
    transaction is left open to roll them back."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    for sql in SETUP:
        cursor.execute(sql)
    cursor.close()
    dbapi_connection.autocommit = autocommit


def make(lc: tether.Lifecycle, pg: Postgres, kind: str) -> tuple[Any, Any]:
    if kind == "sync":
        sync = tsa.sync_engine(lc, pg.url("postgresql+psycopg"), pool_size=1)
        return sync, tsa.sync_session(lc, sync)
    engine = tsa.engine(lc, pg.url(kind), pool_size=1)
    return engine, tsa.session(lc, engine)


async def fetch(s: Any, sql: str) -> tuple[Any, ...]:
    if isinstance(s, Session):
        return await anyio.to_thread.run_sync(lambda: tuple(s.execute(text(sql)).one()))
    return tuple((await s.execute(text(sql))).one())


async def execute(s: Any, sql: str) -> None:
    if isinstance(s, Session):
        await anyio.to_thread.run_sync(s.execute, text(sql))
    else:
        await s.execute(text(sql))


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The settings tether reads (one query each)."""
    reads: list[str] = []
    read = tsa._read_settings

    def counted(dbapi_connection: Any) -> str:
        reads.append(read(dbapi_connection))
        return reads[-1]

    monkeypatch.setattr(tsa, "_read_settings", counted)
    return reads


async def units_of_work(lc: tether.Lifecycle, session: Any) -> tuple[Any, ...]:
    """Three units of work on the one connection; the first changes what the listener set,
    and sets more. What each one starts with."""
    async with lc.scope() as s:
        c = await s.get(session)
        first = await fetch(c, CHECK)
        await execute(c, "SET search_path TO nowhere")
        await execute(c, "SET statement_timeout = '9s'")
        await execute(c, "SET lock_timeout = '7s'")
        assert (await fetch(c, CHECK))[1:] == ("nowhere", "9s", "7s")
    for _ in range(2):
        async with lc.scope() as s:
            assert await fetch(await s.get(session), CHECK) == first  # the same backend
    return first


@pytest.mark.parametrize("kind", KINDS)
async def test_a_listener_on_the_open_engine(
    postgres: Postgres, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Added once the engine is open, so after tether's own listeners: the settings are read
    at the connection's first checkout, after every `connect` listener has run."""
    reads = count_reads(monkeypatch)
    lc = tether.Lifecycle()
    engine, session = make(lc, postgres, kind)
    async with lc.run():
        eng = lc.get(engine)
        sync: Engine = eng if kind == "sync" else eng.sync_engine
        event.listen(sync, "connect", set_up)
        # The connection made at startup, before the listener was added, is replaced.
        if kind == "sync":
            await anyio.to_thread.run_sync(eng.dispose)
        else:
            await eng.dispose()
        first = await units_of_work(lc, session)
    assert first[1:] == ("app, public", "2s", "0")
    assert len(reads) == 1, reads  # once for the connection, not at each checkout
    await anyio.sleep(0)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_listener_on_pool_itself(
    postgres: Postgres, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Added on `Pool` before the engine was made: it runs before the engine's own listeners,
    on every connection, the one made at startup too."""
    reads = count_reads(monkeypatch)
    lc = tether.Lifecycle()
    _, session = make(lc, postgres, kind)
    event.listen(Pool, "connect", set_up)
    try:
        async with lc.run():
            first = await units_of_work(lc, session)
    finally:
        event.remove(Pool, "connect", set_up)
    assert first[1:] == ("app, public", "2s", "0")
    assert len(reads) == 1, reads
    await anyio.sleep(0)


@pytest.mark.parametrize("kind", KINDS)
async def test_no_listener_no_query(
    postgres: Postgres, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine with no `connect` listener of the user's costs no query: the reset alone
    brings the session back to what the connection was opened with."""
    reads = count_reads(monkeypatch)
    lc = tether.Lifecycle()
    _, session = make(lc, postgres, kind)
    async with lc.run():
        first = await units_of_work(lc, session)
    assert first[1:] == ('"$user", public', "0", "0")
    assert reads == []
    await anyio.sleep(0)


@pytest.mark.parametrize("kind", ["postgresql+asyncpg", "postgresql+psycopg"])
@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
async def test_a_cancellation_in_the_read(
    postgres: Postgres, kind: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read is a query on the request path (at a new connection's first checkout): a
    cancellation landing in it is delivered, the connection discarded, no backend is left
    busy, and the next unit of work gets a new connection with the listener's settings."""
    app_name = f"tt-settings-{uuid.uuid4().hex[:6]}"
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url(kind), pool_size=1, application_name=app_name)
    session = tsa.session(lc, engine)
    read = tsa._read_settings
    cancel: list[Callable[[], Any]] = []

    def cancelled(dbapi_connection: Any) -> str:
        while cancel:
            cancel.pop()()  # lands on the query's first await
        return read(dbapi_connection)

    monkeypatch.setattr(tsa, "_read_settings", cancelled)

    async def unit_of_work() -> None:
        async with lc.scope() as s:
            await execute(await s.get(session), "SELECT 1")

    async def idle() -> bool:
        rows = await anyio.to_thread.run_sync(postgres.activity, app_name)
        return len(rows) <= 1 and all(r["state"] == "idle" for r in rows)

    async with lc.run():
        eng = lc.get(engine)
        event.listen(eng.sync_engine, "connect", set_up)
        await eng.dispose()
        if how == "task.cancel":
            task = asyncio.ensure_future(unit_of_work())
            cancel.append(task.cancel)
            await asyncio.wait({task})
            assert task.cancelled()
        else:
            with anyio.CancelScope() as scope:
                cancel.append(scope.cancel)
                await unit_of_work()
            assert scope.cancelled_caught
        assert not cancel  # it ran
        assert lc.stats().pools["engine"].discarded == 1
        await settled(lambda: eng.pool.checkedout() == 0, "the pool has it back")
        await settled(idle, "no backend busy")
        for _ in range(2):
            async with lc.scope() as s:
                c = await s.get(session)
                assert (await fetch(c, CHECK))[1:] == ("app, public", "2s", "0")
    gc.collect()  # a connection left open would warn now
    await anyio.sleep(0)
