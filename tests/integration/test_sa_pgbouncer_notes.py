"""Prepared statements colliding behind PgBouncer (transaction mode) through SQLAlchemy: each
such 500 carries a note naming the fix, for ``sync_session`` as for ``session``, and for an
engine declared ``pgbouncer=True`` whose own ``prepare_threshold=`` turned preparing back on.

Before, a ``sync_session``'s error carried no note (the trial behind PgBouncer: 81 of 200
requests failed, none with a note), and with ``pgbouncer=True, prepare_threshold=0`` half the
failures were 503s saying the database could not be reached ("check the database and the
pool size"), the other half bare 500s."""

import asyncio
import uuid
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import tether
from tests.servers import PgBouncer, Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.timeout(120)]

NOT_DECLARED = "pass pgbouncer=True to the pool"
DECLARED = (
    "tether: the server does not have a prepared statement the driver cached, or has it "
    "already, although the engine is declared pgbouncer=True: a connect_args= option of "
    "yours (psycopg's prepare_threshold, asyncpg's statement_cache_size or "
    "prepared_statement_cache_size), or a PREPARE statement, prepares statements again, "
    "which PgBouncer in transaction mode does not keep across transactions (unless its "
    "max_prepared_statements is set). Remove it: pgbouncer=True turns the driver's "
    "preparing off."
)


def make(url: str, *, sync: bool, **engine_kw: Any) -> FastAPI:
    lc = tether.Lifecycle()
    name = f"notes-{uuid.uuid4().hex[:8]}"
    app = FastAPI(lifespan=lc.lifespan)

    @app.exception_handler(Exception)
    async def show(request: Any, exc: Exception) -> PlainTextResponse:
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
        return PlainTextResponse(f"{type(exc).__name__}: {exc}{notes}", status_code=500)

    if sync:
        eng = tsa.sync_engine(lc, url, pool_size=4, application_name=name, **engine_kw)
        sess = tsa.sync_session(lc, eng)

        @app.get("/q/{n}")
        def query_sync(n: int, s: Annotated[Session, Depends(sess)]) -> list[Any]:
            a = s.execute(text("SELECT CAST(:x AS int) + 1"), {"x": n}).scalar_one()
            b = s.execute(text("SELECT CAST(:x AS text) || 'b'"), {"x": str(n)}).scalar_one()
            return [a, b]

    else:
        aeng = tsa.engine(lc, url, pool_size=4, application_name=name, **engine_kw)
        asess = tsa.session(lc, aeng)

        @app.get("/q/{n}")
        async def query(n: int, s: Annotated[AsyncSession, Depends(asess)]) -> list[Any]:
            a = (await s.execute(text("SELECT CAST(:x AS int) + 1"), {"x": n})).scalar_one()
            b = (
                await s.execute(text("SELECT CAST(:x AS text) || 'b'"), {"x": str(n)})
            ).scalar_one()
            return [a, b]

    return app


def collisions(failed: list[tuple[int, str]]) -> list[str]:
    """The failures that name a prepared statement (at least one): a collision can also
    surface as a data error, when the name the server has is another statement's whose
    parameters it reads differently ("invalid byte sequence for encoding", 22021), which
    tether cannot tell from the app's own and leaves without a note."""
    named = [body for _, body in failed if "prepared statement" in body]
    assert named, failed[:3]
    return named


async def hammer(app: FastAPI, count: int) -> list[tuple[int, str]]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    limit = asyncio.Semaphore(8)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
    ):

        async def one(n: int) -> tuple[int, str]:
            async with limit:
                r = await client.get(f"/q/{n}")
                return r.status_code, r.text

        with anyio.fail_after(90):
            return await asyncio.gather(*(one(n) for n in range(count)))


@pytest.mark.parametrize("sync", [True, False], ids=["sync_session", "session"])
async def test_without_pgbouncer_true_each_failure_names_the_fix(
    postgres: Postgres, sync: bool
) -> None:
    # prepare_threshold=0: psycopg prepares every statement, so collisions come at once. A
    # PgBouncer of its own: its server connections hold no statement of an earlier test, so
    # the engine opens.
    with PgBouncer(postgres) as pgbouncer:
        url = pgbouncer.url("postgresql+psycopg")
        answers = await hammer(make(url, sync=sync, connect_args={"prepare_threshold": 0}), 200)
    failed = [(status, body) for status, body in answers if status != 200]
    assert failed, "no collision: the test proves nothing"
    assert {status for status, _ in failed} == {500}, [f for f in failed if f[0] != 500][:3]
    named = collisions(failed)
    assert all(NOT_DECLARED in body for body in named), named[:3]


@pytest.mark.parametrize("sync", [True, False], ids=["sync_session", "session"])
async def test_pgbouncer_true_with_preparing_turned_back_on_names_the_option(
    postgres: Postgres, sync: bool
) -> None:
    with PgBouncer(postgres) as pgbouncer:
        url = pgbouncer.url("postgresql+psycopg")
        app = make(url, sync=sync, pgbouncer=True, connect_args={"prepare_threshold": 0})
        answers = await hammer(app, 200)
    failed = [(status, body) for status, body in answers if status != 200]
    assert failed, "no collision: the test proves nothing"
    assert {status for status, _ in failed} == {500}, [f for f in failed if f[0] != 500][:3]
    named = collisions(failed)
    assert all(DECLARED in body for body in named), named[:3]
    assert not any(NOT_DECLARED in body for body in named), named[:3]
