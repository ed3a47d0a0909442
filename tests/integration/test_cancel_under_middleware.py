"""A request cancelled mid-statement under a ``BaseHTTPMiddleware`` (``@app.middleware
("http")``): the statement is cancelled on the server, as it is without the middleware.

Under the middleware, the route runs in a task of an anyio task group, which cancels it at
every await once the request's task is cancelled (uvicorn's graceful timeout, a timeout
middleware). SQLAlchemy then discarded the connection at once, and the hang-up cancelled
asyncpg's own cancel request: the statement ran on for its whole length, after the request
(and at a shutdown, the process) had ended (trial 17). On SQLAlchemy's asyncpg engine, and
on its psycopg one, where psycopg closes its connection itself, its own cancel request
cancelled the same way.
"""

import asyncio
import time
import uuid
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import tether
from tests.inprocess import http_scope, staying_client
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

GRACEFUL = "Task cancelled, timeout graceful shutdown exceeded"  # uvicorn's cancel message


def running(postgres: Postgres, name: str) -> list[str]:
    return [r["query"] for r in postgres.activity(name) if r["state"] == "active"]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("middleware", [True, False])
async def test_a_statement_cancelled_under_an_http_middleware_stops_on_the_server(
    postgres: Postgres, middleware: bool, driver: str
) -> None:
    name = f"mwc-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    url = postgres.url(f"postgresql+{driver}")
    engine = tsa.engine(lc, url, pool_size=2, application_name=name)
    session = tsa.session(lc, engine)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/slow")
    async def slow(s: Annotated[AsyncSession, Depends(session)]) -> dict[str, str]:
        await s.execute(text("SELECT pg_sleep(30)"))
        return {}

    if middleware:

        @app.middleware("http")
        async def passing(request: Request, call_next: Any) -> Any:
            return await call_next(request)

    sent: list[dict[str, Any]] = []
    receive = staying_client()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with lc.lifespan(app):
        task = asyncio.get_running_loop().create_task(
            app(http_scope("GET", "/slow"), receive, send)
        )
        deadline = time.monotonic() + 10
        while not running(postgres, name):
            assert time.monotonic() < deadline, "the statement never started"
            await asyncio.sleep(0.05)
        task.cancel(GRACEFUL)
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5  # the statement has 30 s to run
        while running(postgres, name):
            assert time.monotonic() < deadline, running(postgres, name)
            await asyncio.sleep(0.05)
