"""A command cancelled between its request and its reply never poisons the next user
(reliability.md, test 8; redis-py's CVE-2023-28858/9 was exactly this).

A latency proxy (`tests/faultproxy.py`) holds every chunk 10 ms each way, so a command
is cancelled, at a random moment, after it was sent and before its reply came back. The next
unit of work asks for a value of its own on the same pool: it must get its own value, never
the reply meant for the cancelled one, and nothing may stay checked out.

Then, without a proxy, a unit of work (a Redis command) is cancelled at each of its wake-ups:
what it awaited is done and it has not run yet, so the cancellation arrives together with the
reply. The cancellation must not be swallowed (on Python 3.11 redis-py's ``asyncio.wait_for``
dropped it; tether's client raises it), and the next one still gets its own value.
"""

import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import tether
from tests.faultproxy import FaultProxy
from tests.integration.drivers import ASYNCPG_BEFORE_0_32, scalar, settled
from tests.servers import Postgres, Redis, _pg_url
from tests.wakeups import cancelled_at_turn, cancelled_at_wake_up
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import redis as tredis
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

ROUNDS = 15
POOL = 2


@pytest.fixture
def pg_proxy(postgres: Postgres) -> Iterator[FaultProxy]:
    with FaultProxy(postgres.port) as p:
        yield p


@pytest.fixture
def redis_proxy(redis_server: Redis) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.port) as p:
        yield p


def asyncpg_conn(lc: tether.Lifecycle, proxy: FaultProxy) -> Any:
    pool = tpg.pool(lc, _pg_url("postgresql", proxy.port, None), max_size=POOL)
    return tpg.connection(lc, pool, transaction=True)


def psycopg_conn(lc: tether.Lifecycle, proxy: FaultProxy) -> Any:
    pool = tpsy.pool(lc, _pg_url("postgresql", proxy.port, None), max_size=POOL)
    return tpsy.connection(lc, pool, transaction=True)


def sqlalchemy_session(lc: tether.Lifecycle, proxy: FaultProxy) -> Any:
    if ASYNCPG_BEFORE_0_32:
        pytest.skip("asyncpg < 0.32 leaves a cancelled connection's sockets to the GC")
    url = _pg_url("postgresql+asyncpg", proxy.port, None)
    return tsa.session(lc, tsa.engine(lc, url, pool_size=POOL))


#: The three PostgreSQL drivers, as a test's ``make`` parameter.
each_driver = pytest.mark.parametrize(
    "make",
    [asyncpg_conn, psycopg_conn, sqlalchemy_session],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)


@each_driver
async def test_postgres_a_cancelled_query_never_answers_the_next_one(
    pg_proxy: FaultProxy, make: Any
) -> None:
    lc = tether.Lifecycle()
    conn = make(lc, pg_proxy)
    async with lc.run():
        pg_proxy.latency(0.01)
        cancelled = 0
        for i in range(ROUNDS):
            with anyio.move_on_after(random.uniform(0.0, 0.04)) as scope:
                async with lc.scope() as s:
                    await scalar(await s.get(conn), f"SELECT 'foo-{i}'")
            cancelled += scope.cancelled_caught
            with anyio.fail_after(20):
                async with lc.scope() as s:
                    assert await scalar(await s.get(conn), f"SELECT 'bar-{i}'") == f"bar-{i}"
        assert cancelled >= ROUNDS // 4, cancelled  # the cancellations did happen
        assert lc.stats().resources[conn.name].in_use == 0
        assert sum(p.in_use or 0 for p in lc.stats().pools.values()) == 0


async def test_redis_a_cancelled_command_never_answers_the_next_one(
    redis_proxy: FaultProxy,
) -> None:
    lc = tether.Lifecycle()
    url = f"redis://127.0.0.1:{redis_proxy.port}/0"
    cache = tredis.client(lc, url, max_connections=POOL)
    prefix = uuid.uuid4().hex[:8]
    async with lc.run():
        r = lc.get(cache)
        for i in range(ROUNDS):
            await r.set(f"{prefix}:foo-{i}", f"foo-{i}")
            await r.set(f"{prefix}:bar-{i}", f"bar-{i}")
        redis_proxy.latency(0.01)
        cancelled = 0
        for i in range(ROUNDS):
            with anyio.move_on_after(random.uniform(0.0, 0.04)) as scope:
                await r.get(f"{prefix}:foo-{i}")
            cancelled += scope.cancelled_caught
            with anyio.fail_after(20):
                assert await r.get(f"{prefix}:bar-{i}") == f"bar-{i}".encode()
        assert cancelled >= ROUNDS // 4, cancelled


# ------------------------------------------------- cancelled as the reply arrives


def _direct(make: Any, postgres: Postgres) -> Any:
    """*make*'s resource, on the server itself (no proxy)."""

    class Direct:
        port = postgres.port

    return lambda lc: make(lc, Direct)


@each_driver
async def test_postgres_a_query_cancelled_as_its_reply_arrives_never_answers_the_next_one(
    postgres: Postgres, make: Any
) -> None:
    """``task.cancel()`` at each wake-up of a unit of work (what it awaited is done, it has
    not run yet): the reply and the cancellation arrive together. Then an anyio cancel scope
    at each turn of the event loop, whatever the unit of work is doing. The next unit of work
    gets its own value, and nothing stays checked out."""
    lc = tether.Lifecycle()
    conn = _direct(make, postgres)(lc)

    async def foo(i: int) -> None:
        async with lc.scope() as s:
            await scalar(await s.get(conn), f"SELECT 'foo-{i}'")

    async def the_next_gets_its_own(k: int) -> None:
        with anyio.fail_after(10):
            async with lc.scope() as s:
                assert await scalar(await s.get(conn), f"SELECT 'bar-{k}'") == f"bar-{k}"
        assert lc.stats().resources[conn.name].in_use == 0

    async with lc.run():
        _, wake_ups = await cancelled_at_wake_up(None, foo(0))
        fired_any = False
        for k in range(1, 3 * wake_ups + 6):
            fired, _ = await cancelled_at_wake_up(k, foo(k), keeps_message=True)
            fired_any |= fired
            await the_next_gets_its_own(k)
            if not fired:
                break
        assert fired_any

        fired_count = 0
        for k in range(1, 400):
            if not await cancelled_at_turn(k, foo(k), how="cancel scope"):
                break
            fired_count += 1
            await the_next_gets_its_own(k)
        assert 2 <= fired_count < 399, fired_count
        # A connection closed mid-query is replaced by the pool's own task: not at once.
        await settled(
            lambda: sum(p.in_use or 0 for p in lc.stats().pools.values()) == 0, "pool all back"
        )


@contextlib.asynccontextmanager
async def redis_foo_bar(
    redis_server: Redis,
) -> AsyncIterator[tuple[tether.Lifecycle, Any, Any, str]]:
    """A running tether Redis client (pool of ``POOL``), with keys ``<prefix>:foo`` and
    ``<prefix>:bar`` set to ``foo`` and ``bar``."""
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, max_connections=POOL)
    prefix = uuid.uuid4().hex[:8]
    async with lc.run():
        r = lc.get(cache)
        await r.set(f"{prefix}:foo", "foo")
        await r.set(f"{prefix}:bar", "bar")
        yield lc, cache, r, prefix


async def test_redis_a_command_cancelled_as_its_reply_arrives_never_answers_the_next_one(
    redis_server: Redis,
) -> None:
    async with redis_foo_bar(redis_server) as (lc, cache, r, prefix):
        _, wake_ups = await cancelled_at_wake_up(None, r.get(f"{prefix}:foo"))
        fired_any = False
        for k in range(1, 3 * wake_ups + 6):
            fired, _ = await cancelled_at_wake_up(k, r.get(f"{prefix}:foo"), keeps_message=True)
            fired_any |= fired
            with anyio.fail_after(10):
                assert await r.get(f"{prefix}:bar") == b"bar"
            if not fired:
                break
        assert fired_any
        assert lc.stats().pools[cache.name].in_use == 0


# ------------------------------------------------- cancelled at each turn of the loop


@pytest.mark.parametrize("how", ["cancel scope", "task.cancel"])
async def test_redis_a_command_cancelled_at_each_turn_of_the_loop_is_cancelled(
    redis_server: Redis, how: str
) -> None:
    """A command cancelled at each turn of the event loop from its start until it ends,
    whatever it is doing then, by ``task.cancel()`` and by an anyio cancel scope (the
    cancellation of ``move_on_after``, Starlette's disconnect watch, a task group). On Python
    3.11 the send's ``asyncio.wait_for`` drops one that lands while its waiter is cancelled
    and the send is done in the same turn: tether raised it again without its message, and
    anyio's scope let it through to the caller (a bare ``CancelledError`` out of
    ``move_on_after``). The next command gets its own reply."""
    async with redis_foo_bar(redis_server) as (lc, cache, r, prefix):
        fired = 0
        for k in range(1, 200):
            if not await cancelled_at_turn(k, r.get(f"{prefix}:foo"), how=how):
                break
            fired += 1
            with anyio.fail_after(10):
                assert await r.get(f"{prefix}:bar") == b"bar"
        assert 2 <= fired < 199, fired
        assert lc.stats().pools[cache.name].in_use == 0
