"""A sync session on an engine the user built (an app resource returning their own
``create_engine(...)``), against a real PostgreSQL: the FIRST burst after startup gets the
pool's 503 at ``pool_timeout``, as every later one does.

A sync session's unit first waits, on the event loop, for a token of its thread limiter
(``concurrency=``), bounded by the pool's ``pool_timeout``. For an engine tether did not make
that timeout was read from the engine tether learned of inside the first session's open, in
its thread, after a token: every unit that began waiting before then waited without bound.
A reviewer's burst of 100 ``def`` requests holding the session 0.3 s on ``pool_size=2,
max_overflow=0, pool_timeout=2`` was served in full, the slowest after 15.25 s; the second
burst got its 503s at ~2.1 s. The engine app resource is open since startup: its pool is
read when the first unit asks.

Also the mistakes of declaring: an async driver's URL given to ``sync_engine``, and the
mirror, a sync driver's URL given to ``engine``, refused at declaration (or, for a URL a
function returns, at startup as a configuration mistake, not retried).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

import tether
from tests.servers import Postgres
from tests.unit._messages import exactly
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.anyio]

TIMEOUT = 2
HOLD = 0.6
UNITS = 30  # served two at a time, 0.6 s each: 9 s for the last without the bound


def users_engine(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Engine]:
    @lc.resource(scope="app")
    def engine() -> Iterator[Engine]:
        eng = create_engine(
            pg.url("postgresql+psycopg"), pool_size=2, max_overflow=0, pool_timeout=TIMEOUT
        )
        yield eng
        eng.dispose()

    return engine


async def burst(
    lc: tether.Lifecycle, session: tether.Resource[Any]
) -> tuple[list[float], list[tuple[float, tether.ResourceUnavailable]]]:
    served: list[float] = []
    refused: list[tuple[float, tether.ResourceUnavailable]] = []
    started = time.monotonic()

    async def unit() -> None:
        try:
            async with lc.scope() as s:
                await s.get(session)
                await anyio.sleep(HOLD)
                served.append(time.monotonic() - started)
        except tether.ResourceUnavailable as exc:
            refused.append((time.monotonic() - started, exc))

    async with anyio.create_task_group() as tg:
        for _ in range(UNITS):
            tg.start_soon(unit)
    return sorted(served), sorted(refused, key=lambda r: r[0])


@pytest.mark.servers
@pytest.mark.fastapi_free
async def test_the_first_burst_on_a_users_engine_gets_503_at_pool_timeout(
    postgres: Postgres,
) -> None:
    """No warm-up: the first burst after startup. Before, all 30 units were served, the last
    after ~9 s; now those whose token would come after ``pool_timeout`` are refused then, and
    no unit ends later than three timeouts."""
    lc = tether.Lifecycle()
    session = tsa.sync_session(lc, users_engine(lc, postgres), concurrency=2)
    async with lc.run():
        first = await burst(lc, session)
        second = await burst(lc, session)  # as it always was: the same answer
    for served, refused in (first, second):
        assert served, (served, refused)
        assert refused, (served, refused)
        assert len(served) + len(refused) == UNITS
        assert max(served) < 3 * TIMEOUT, served
        assert all(TIMEOUT - 0.1 < took < 3 * TIMEOUT for took, _ in refused), refused
        for _, exc in refused:
            assert exc.timed_out
            assert exc.retry_after == 1
            assert (
                "could not give a connection: no connection came free within "
                "pool_timeout=2 s (pool_size=2, max_overflow=0, checked out 2, overflow 0); "
                "the requests holding them are slow, or the pool is too small for the load"
            ) in str(exc)


@pytest.mark.servers
async def test_the_first_burst_of_def_requests_answers_503_with_retry_after(
    postgres: Postgres,
) -> None:
    """The reviewer's app, in-process: ``def`` endpoints over HTTP, the first burst."""
    import httpx
    from fastapi import Depends, FastAPI

    lc = tether.Lifecycle()
    session = tsa.sync_session(lc, users_engine(lc, postgres), concurrency=2)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/s")
    def s(sess: Session = Depends(session)) -> dict[str, bool]:  # noqa: B008 (a local resource)
        sess.execute(text(f"SELECT pg_sleep({HOLD})"))
        return {"ok": True}

    answers: list[tuple[int, str | None, float]] = []
    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            started = time.monotonic()

            async def get() -> None:
                r = await client.get("/s", timeout=60)
                answers.append(
                    (r.status_code, r.headers.get("retry-after"), time.monotonic() - started)
                )

            async with anyio.create_task_group() as tg:
                for _ in range(UNITS):
                    tg.start_soon(get)
    statuses = sorted({status for status, _, _ in answers})
    assert statuses == [200, 503], answers
    assert max(took for _, _, took in answers) < 3 * TIMEOUT, answers
    assert all(after == "1" for status, after, _ in answers if status == 503), answers


_ASYNC_URL = (
    "Engine 'engine': {driver!r} is an async driver, and sync_engine() makes a sync engine, "
    "which needs a sync driver: use {drivers} in the URL (e.g. {example!r}), or declare an "
    "async engine with engine() and its sessions with session()."
)


@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    ("url", "driver", "drivers", "example"),
    [
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite", "'sqlite'", "sqlite:///x.db"),
        (
            "postgresql+asyncpg://u:s3cret@h/d",
            "postgresql+asyncpg",
            "'postgresql+psycopg' or 'postgresql+psycopg2'",
            "postgresql+psycopg://u:***@h/d",
        ),
    ],
)
def test_an_async_driver_url_is_refused_by_sync_engine_at_declaration(
    url: str, driver: str, drivers: str, example: str
) -> None:
    """Before, accepted, and at startup SQLAlchemy's "Pool class SyncPool cannot be used with
    asyncio engine", with tether's advice to give retries= or a longer timeout=."""
    lc = tether.Lifecycle()
    message = _ASYNC_URL.format(driver=driver, drivers=drivers, example=example)
    with pytest.raises(ValueError, match=exactly(message)):
        tsa.sync_engine(lc, url)
    assert lc.resources == {}


@pytest.mark.fastapi_free
async def test_an_async_driver_url_from_a_function_fails_startup_as_a_mistake() -> None:
    """Read at startup: the same words, a configuration mistake, not retried."""
    lc = tether.Lifecycle()
    calls: list[int] = []

    def url() -> str:
        calls.append(1)
        return "sqlite+aiosqlite:///x.db"

    tsa.sync_engine(lc, url, retries=2, backoff=0)
    cause = "ValueError: " + _ASYNC_URL.format(
        driver="sqlite+aiosqlite", drivers="'sqlite'", example="sqlite:///x.db"
    )
    with pytest.raises(
        tether.StartupError,
        match=exactly(
            f"App resource 'engine' failed to open: {cause} The resources already open were "
            f"closed. It was not retried (retries=2). Fix the cause above: a mistake in the "
            f"configuration or the code, which no retry mends."
        ),
    ):
        async with lc.run():
            pass  # pragma: no cover
    assert calls == [1]


@pytest.mark.fastapi_free
def test_a_sync_driver_url_is_refused_by_engine_at_declaration() -> None:
    """The mirror, as it already was: engine() given a sync driver's URL."""
    with pytest.raises(
        ValueError,
        match=exactly(
            "Engine 'engine': 'sqlite' is a sync driver, and engine() makes an async engine, "
            "which needs an async driver: use 'sqlite+aiosqlite' in the URL (e.g. "
            "'sqlite+aiosqlite:///x.db'), or declare a sync engine with sync_engine()."
        ),
    ):
        tsa.engine(tether.Lifecycle(), "sqlite:///x.db")
