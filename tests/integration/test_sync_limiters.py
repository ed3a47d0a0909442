"""Sync resources opened in threads, against a real PostgreSQL: each has a thread limiter
of its own, so units of work waiting for a sync pool's connection never hold the tokens that
the units holding its connections need to open their next sync resource."""

import time
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import psycopg_pool
import pytest

import tether
from tests.servers import Postgres

pytestmark = [pytest.mark.servers, pytest.mark.anyio]


async def test_units_waiting_for_a_sync_pool_do_not_starve_its_holders(postgres: Postgres) -> None:
    """12 units on a sync psycopg pool of 2, each then opening a second sync resource, none
    with `concurrency=`: all are served at once (before, 10 waiting for the pool held every
    token of one limiter shared by both resources, the 2 holders could not open the second,
    and 10 units failed at the pool's timeout)."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def pool() -> Iterator[psycopg_pool.ConnectionPool]:
        with psycopg_pool.ConnectionPool(postgres.dsn, min_size=2, max_size=2, timeout=4) as p:
            yield p

    @lc.resource
    def conn(pool: psycopg_pool.ConnectionPool) -> Iterator[psycopg.Connection[Any]]:
        with pool.connection() as c:
            yield c

    @lc.resource
    def audit_log() -> Iterator[list[str]]:  # anything sync opened after the connection
        yield []

    served: list[int] = []

    async def unit() -> None:
        async with lc.scope() as s:
            c = await s.get(conn)
            await s.get(audit_log)
            served.append(c.execute("SELECT 1").fetchone()[0])  # type: ignore[index]

    async with lc.run():
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(unit)
        took = time.monotonic() - started
    assert served == [1] * 12
    assert took < 3.5  # the pool's timeout is 4 s
