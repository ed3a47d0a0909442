"""Type checks of the public API (mypy --strict; never run)."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import TextIO, assert_type

from fastapi import FastAPI

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
        assert_type(await s.run_sync(len, "abc"), int)
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
@tether.fastapi.leak_threshold(3600)
async def export(n: int) -> list[int]:
    return [n]


async def check_route_marks() -> None:
    # The route marks keep the endpoint's own signature (FastAPI reads it).
    assert_type(await export(1), list[int])


async def bare_lifespan(app: FastAPI) -> AsyncIterator[None]:
    # A lifespan written as a bare async generator function, as FastAPI takes it.
    yield


@asynccontextmanager
async def cm_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
    yield {"state": "s"}


def check_lifespans() -> None:
    FastAPI(lifespan=lc.lifespan(wrap=bare_lifespan))
    FastAPI(lifespan=lc.lifespan(wrap=cm_lifespan))


# A plain `def` hands out what it returns, never entered or iterated (even a lock, a
# semaphore, a file); a context-manager class is entered, as `@(async)contextmanager` ones.
@lc.resource(scope="app")
def limit() -> asyncio.Semaphore:
    return asyncio.Semaphore(10)


@lc.resource(scope="app")
def lock() -> threading.Lock:
    return threading.Lock()


@lc.resource(scope="app")
def logfile() -> TextIO:
    return open("/dev/null", "w")


@lc.resource
def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory()


class Session:
    async def __aenter__(self) -> Conn:
        return Conn()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


class SyncSession:
    def __enter__(self) -> Conn:
        return Conn()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


session = lc.resource(Session)
sync_session = lc.resource(scope="app")(SyncSession)
pool_class = lc.resource(scope="app")(Pool)


async def check_plain_functions() -> None:
    assert_type(limit, tether.Resource[asyncio.Semaphore])
    assert_type(lock, tether.Resource[threading.Lock])
    assert_type(logfile, tether.Resource[TextIO])
    assert_type(scratch, tether.Resource[tempfile.TemporaryDirectory[str]])
    assert_type(session, tether.Resource[Conn])
    assert_type(sync_session, tether.Resource[Conn])
    assert_type(pool_class, tether.Resource[Pool])
    async with lc.get(limit):
        lc.get(logfile).write("x")


# psycopg: a pool tether did not open is accepted where tether's `Pool` is, as documented.
from typing import Any  # noqa: E402

from psycopg import AsyncConnection, IsolationLevel  # noqa: E402
from psycopg_pool import AsyncConnectionPool  # noqa: E402

from tether.integrations import psycopg as tpsy  # noqa: E402


@lc.resource(scope="app")
async def own_pool() -> AsyncIterator[AsyncConnectionPool[AsyncConnection[Any]]]:
    p: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool("postgresql://x", open=False)
    yield p


async def _job(c: AsyncConnection[Any]) -> None: ...


def check_psycopg_own_pool() -> None:
    assert_type(tpsy.connection(lc, own_pool), tether.Resource[AsyncConnection[Any]])
    tpsy.once(lc, own_pool, _job, key="k")
    assert_type(
        tpsy.connection(lc, tpsy.pool(lc, "postgresql://x"), name="c2"),
        tether.Resource[AsyncConnection[Any]],
    )
    tpsy.connection(lc, own_pool, name="c3", transaction=True, isolation="serializable")
    tpsy.connection(
        lc, own_pool, name="c4", transaction=True, isolation=IsolationLevel.SERIALIZABLE
    )
    tpsy.connection(lc, own_pool, name="c5", transaction=True, readonly=True)


# A misspelt option is a type error too (the runtime refuses it naming the one meant);
# `--strict` warns of an unused ignore, so each line below must stay an error.
tether.Lifecycle(drain_timout=30)  # type: ignore[arg-type]
lc.resource(scope="app", timout=3)  # type: ignore[call-overload]
assert_type(tether.Lifecycle(drain_timeout=30, close_timeout=5), tether.Lifecycle)


def check_rolled_back_is_async_only(conn: tether.Resource[AsyncConnection[Any]]) -> None:
    # An async context manager: `with` on it stays a type error (the runtime's TypeError
    # says how to enter it from a sync test).
    with tpsy.rolled_back(conn):  # type: ignore[attr-defined]
        pass


async def check_rolled_back_yields_the_connection(
    conn: tether.Resource[AsyncConnection[Any]],
) -> None:
    async with tpsy.rolled_back(conn) as c:
        assert_type(c, AsyncConnection[Any])
