"""Type checks of the public API (mypy --strict; never run)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import assert_type

import tether
import tether.fastapi

lc = tether.Lifecycle()


class Pool: ...


class Conn: ...


@lc.resource(scope="app")
async def pool() -> AsyncIterator[Pool]:
    yield Pool()


@lc.resource
async def conn(pool: Pool) -> AsyncIterator[Conn]:
    yield Conn()


@lc.resource
def sync_conn() -> Iterator[Conn]:
    yield Conn()


@lc.resource
@asynccontextmanager
async def acm() -> AsyncIterator[Conn]:
    yield Conn()


@lc.resource(name="cm")
@contextmanager
def cm() -> Iterator[Conn]:
    yield Conn()


@lc.resource
async def coro() -> int:
    return 1


@lc.resource(scope="app")
def settings() -> str:
    return "s"


@lc.resource(error_status=lambda status: status >= 500)
async def lenient() -> AsyncIterator[Conn]:
    yield Conn()


async def check() -> None:
    assert_type(pool, tether.Resource[Pool])
    assert_type(conn, tether.Resource[Conn])
    assert_type(lenient, tether.Resource[Conn])
    assert_type(sync_conn, tether.Resource[Conn])
    assert_type(acm, tether.Resource[Conn])
    assert_type(cm, tether.Resource[Conn])
    assert_type(coro, tether.Resource[int])
    assert_type(settings, tether.Resource[str])
    async with lc.run(), lc.scope() as s:
        assert_type(await s.get(conn), Conn)
        assert_type(lc.get(pool), Pool)
        assert_type(lc.stats(), tether.Stats)
        figures = lc.stats().pools["pool"]
        assert_type(figures, tether.PoolStats)
        assert_type(figures.created, int | None)
        assert_type(figures.create_time, float | None)
        assert_type(figures.discarded, int | None)
        assert_type(await lc.health(), tether.HealthReport)
        assert_type((await lc.health()).checks[0].detail, str | None)
    try:
        pass
    except tether.ResourceUnavailable as exc:
        assert_type(exc.timed_out, bool)
        assert_type(exc.lost, bool)


@tether.fastapi.idempotent
@tether.fastapi.release("response")
async def export(n: int) -> list[int]:
    return [n]


async def check_route_marks() -> None:
    # The route marks keep the endpoint's own signature (FastAPI reads it).
    assert_type(await export(1), list[int])
