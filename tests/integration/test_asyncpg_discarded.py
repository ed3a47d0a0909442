"""asyncpg: the pool's ``discarded`` counts an idle connection the server ended, once, against
a real PostgreSQL.

A connection can end while it sits idle in the pool (``pg_terminate_backend``, an
``idle_session_timeout``, a restart): no unit of work holds it, so none gives it back closed,
and asyncpg replaces it on its own (when a unit next takes its place in the pool, or at once to
keep ``min_size``). Each is counted as discarded once, whoever notices first; a connection the
pool retires (``expire_connections()``, ``max_inactive_connection_lifetime``, the pool closing)
is not. Ground truth: the server's backends of the pool's ``application_name``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import tether
from tests.integration.drivers import backends, settled
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.metrics.prometheus import register

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


async def all_at_once(lc: tether.Lifecycle, conn: tether.Resource[Any], n: int) -> set[int]:
    """*n* units of work holding a connection each at the same time; their backends' pids."""
    pids: set[int] = set()
    held = anyio.Event()

    async def unit() -> None:
        async with lc.scope() as s:
            pids.add(int(await (await s.get(conn)).fetchval("SELECT pg_backend_pid()")))
            if len(pids) == n:
                held.set()
            await held.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(unit)
    return pids


def figures(lc: tether.Lifecycle) -> tuple[Any, ...]:
    p = lc.stats().pools["pg"]
    return (p.open, p.in_use, p.idle, p.created, p.discarded)


async def test_idle_connections_the_server_ended_are_discarded_once(postgres: Postgres) -> None:
    """Three idle connections ended on the server: three discarded, in the figures and the
    metric fed from them; then three units of work at once get three new connections, and
    the pool's open and idle ones are the server's backends."""
    app_name = f"lost-idle-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, name="pg", min_size=3, max_size=3,
                    server_settings={"application_name": app_name})  # fmt: skip
    conn = tpg.connection(lc, pool)
    registry = CollectorRegistry()
    register(lc, registry)

    def exported() -> float | None:
        labels = {"pool_name": "pg", "scope": "app"}
        return registry.get_sample_value("tether_connection_discarded_total", labels)

    async with lc.run():
        assert figures(lc) == (3, 0, 3, 3, 0)
        before = await all_at_once(lc, conn, 3)
        assert figures(lc) == (3, 0, 3, 3, 0)

        # Waits until each backend has exited (up to 5 s each): the killed ones linger.
        assert await asyncio.to_thread(postgres.terminate, app_name) == 3
        try:
            await settled(lambda: lc.stats().pools["pg"].discarded == 3, "three discarded", 10)
        finally:
            print("after the kills:", lc.stats().pools["pg"])
        await asyncio.sleep(0.3)  # nothing counts one again
        assert lc.stats().pools["pg"].discarded == 3
        assert exported() == 3

        after = await all_at_once(lc, conn, 3)
        assert not after & before
        # asyncpg made three new ones, in place of the three lost; nothing else was discarded.
        assert figures(lc) == (3, 0, 3, 6, 3)
        assert await backends(postgres, app_name) == 3
        assert exported() == 3


async def test_connections_ended_an_instant_before_units_take_them_are_discarded_once(
    postgres: Postgres,
) -> None:
    """The server ends every idle connection while the event loop is blocked, so asyncpg has
    not read the news when units of work take them: the first is handed out and found dead by
    its ``BEGIN`` (counted as tether gives it back), the others asyncpg finds closed in the
    pool (counted as they close). Each is counted once: three."""
    app_name = f"lost-instant-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, name="pg", min_size=3, max_size=3,
                    server_settings={"application_name": app_name})  # fmt: skip
    conn = tpg.connection(lc, pool, transaction=True)
    async with lc.run():
        before = await all_at_once(lc, conn, 3)
        assert figures(lc) == (3, 0, 3, 3, 0)
        # Not in a thread: the loop reads no socket until the backends are gone.
        assert postgres.terminate(app_name) == 3
        async with lc.scope() as s:
            assert int(await (await s.get(conn)).fetchval("SELECT pg_backend_pid()")) not in before
        try:
            await settled(lambda: lc.stats().pools["pg"].discarded == 3, "three discarded", 10)
        finally:
            print("after the kills:", lc.stats().pools["pg"])
        after = await all_at_once(lc, conn, 3)
        assert not after & before
        assert figures(lc) == (3, 0, 3, 6, 3)
        assert await backends(postgres, app_name) == 3


async def test_connections_the_pool_retires_are_not_discarded(postgres: Postgres) -> None:
    """asyncpg closes connections of its own accord: those of before ``expire_connections()``
    as units next take them, those idle for ``max_inactive_connection_lifetime``, and all of
    them as the pool closes. None was broken: none is discarded."""
    app_name = f"retired-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, name="pg", min_size=0, max_size=2,
                    max_inactive_connection_lifetime=1.0,
                    server_settings={"application_name": app_name})  # fmt: skip
    conn = tpg.connection(lc, pool)
    async with lc.run():
        p = lc.get(pool)
        first = await all_at_once(lc, conn, 2)
        await p.expire_connections()
        second = await all_at_once(lc, conn, 2)
        assert not first & second
        assert figures(lc)[3:] == (4, 0)
        # Idle for longer than max_inactive_connection_lifetime: closed, none left.
        await settled(lambda: lc.stats().pools["pg"].open == 0, "none open", 10)
        await all_at_once(lc, conn, 2)
        assert figures(lc) == (2, 0, 2, 6, 0)
    await asyncio.sleep(0.1)  # the pool closed with two idle connections
    assert p._tether.discarded == 0

    async def gone() -> bool:  # a closed connection's backend lingers a moment
        return await backends(postgres, app_name) == 0

    await settled(gone, "no backend left", 5)
