"""A DSN of several hosts (libpq's and asyncpg's failover list), against two real PostgreSQL
servers: a backend the integrations end on the server (a query cut short, a connection still
querying as it goes back) is ended on the server its connection reached.

The first host is down when the pool opens, so its connections reach the second; then the
first comes back. Before, tether's connection to end the backend reached the first host, the
one that answered then, where that pid is no backend (or another session's), and the query
ran on, for its whole length, on the second.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import text

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def first() -> Iterator[Postgres]:
    """The DSN's first host: down as the pool opens, up again after."""
    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


def both(first: Postgres, second: Postgres) -> str:
    """A DSN of both servers, *first* first (the same role and database on each)."""
    return second.dsn.replace(
        f"127.0.0.1:{second.port}", f"127.0.0.1:{first.port},127.0.0.1:{second.port}"
    )


def running(postgres: Postgres, name: str) -> list[str]:
    return [r["query"] for r in postgres.activity(name) if r["state"] == "active"]


async def ended_on(postgres: Postgres, name: str) -> None:
    """The query left running on *postgres* ends within 5 s (it had 30 s to run)."""
    deadline = time.monotonic() + 5
    while running(postgres, name):
        assert time.monotonic() < deadline, running(postgres, name)
        await asyncio.sleep(0.05)


async def started_on(postgres: Postgres, name: str) -> None:
    deadline = time.monotonic() + 10
    while not running(postgres, name):
        assert time.monotonic() < deadline, "the statement never started"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["psycopg", "psycopg-pghost", "sqlalchemy"])
async def test_a_query_cut_short_is_ended_on_the_server_its_connection_reached(
    kind: str, first: Postgres, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg hangs up on a query an anyio scope cut short; tether ends its backend from a
    connection of its own, made to the host the connection reached: the hosts in the
    conninfo, or in libpq's environment (`PGHOST`, `PGPORT`: they were not seen, trial 33)."""
    name = f"multi-{uuid.uuid4().hex[:8]}"
    dsn = both(first, postgres)
    lc = tether.Lifecycle()
    if kind == "psycopg-pghost":
        monkeypatch.setenv("PGHOST", "127.0.0.1,127.0.0.1")
        monkeypatch.setenv("PGPORT", f"{first.port},{postgres.port}")
        dsn = f"dbname=tether user={postgres.user} password=s3cret-pw"
    if kind.startswith("psycopg"):
        pool = tpsy.pool(lc, dsn, min_size=1, max_size=2, kwargs={"application_name": name})
        conn: tether.Resource[Any] = tpsy.connection(lc, pool)

        async def cut_short(value: Any) -> None:
            await value.execute("SELECT pg_sleep(30)")
    else:
        # SQLAlchemy's spelling of several hosts: one `host=` each, in the query.
        hosts = f"host=127.0.0.1:{first.port}&host=127.0.0.1:{postgres.port}"
        url = postgres.url("postgresql+psycopg").replace(f"127.0.0.1:{postgres.port}", "")
        engine = tsa.engine(lc, f"{url}?{hosts}", pool_size=2, application_name=name)
        conn = tsa.session(lc, engine)

        async def cut_short(value: Any) -> None:
            await value.execute(text("SELECT pg_sleep(30)"))

    first.kill()
    try:
        async with lc.run():
            first.start()  # the first host is back: a new connection would reach it
            with pytest.raises(TimeoutError):
                async with lc.scope() as s:
                    value = await s.get(conn)
                    with anyio.fail_after(1):
                        await cut_short(value)
            await ended_on(postgres, name)
    finally:
        first.start()


async def test_a_connection_still_querying_is_ended_on_the_server_it_reached(
    first: Postgres, postgres: Postgres
) -> None:
    """asyncpg: a connection a task still queries on as its unit ends is terminated, and its
    backend ended through another connection of the pool: here one made after the first host
    came back, on the other server. It is ended where it runs."""
    name = f"multi-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, both(first, postgres), min_size=1, max_size=2,
                    server_settings={"application_name": name})  # fmt: skip
    conn = tpg.connection(lc, pool)
    first.kill()
    try:
        async with lc.run():
            first.start()
            left: asyncio.Task[Any] | None = None
            async with lc.scope() as s:
                c = await s.get(conn)
                left = asyncio.get_running_loop().create_task(c.execute("SELECT pg_sleep(30)"))
                await started_on(postgres, name)
            await ended_on(postgres, name)
            with pytest.raises(Exception):  # noqa: B017, PT011 - the connection went under it
                await left
    finally:
        first.start()


async def test_a_query_cut_short_is_ended_when_only_async_creator_can_log_in() -> None:
    """SQLAlchemy's `async_creator=` holding the password (a secrets manager, a token): the
    connection tether makes to end a backend cannot log in ("no password supplied"), so the
    backend gets its cancel request instead, which needs no login. Before (trial 34), the
    WARNING said it could not end it, and the query ran on for its whole length."""
    import psycopg

    name = f"creator-{uuid.uuid4().hex[:8]}"
    with Postgres(auth="scram-sha-256") as server:

        async def creator() -> Any:
            return await psycopg.AsyncConnection.connect(
                server.dsn, application_name=name
            )  # (the password is in the DSN the creator holds, not the engine's URL)

        lc = tether.Lifecycle()
        engine = tsa.engine(lc, "postgresql+psycopg://", async_creator=creator, pool_size=2)
        session = tsa.session(lc, engine)
        async with lc.run():
            with pytest.raises(TimeoutError):
                async with lc.scope() as s:
                    value = await s.get(session)
                    with anyio.fail_after(1):
                        await value.execute(text("SELECT pg_sleep(30)"))
            await ended_on(server, name)
