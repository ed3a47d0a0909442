"""A failure at tether's release point (the commit before the response) is answered by the
app's own exception handlers when it has one, as a failure in the endpoint is: a unique
violation flushed by the commit goes to ``@app.exception_handler(IntegrityError)``, an
``HTTPException`` a resource raises after its ``yield`` answers with its status, and a
``ResourceUnavailable`` raised at release goes to the app's handler for it. The unit of
work is closed and rolled back first: nothing is committed. Without such a handler, tether
answers 500 (503) as before.

Real PostgreSQL, SQLAlchemy sessions on asyncpg and psycopg; both ways tether serves a
route (it wraps FastAPI's request handler, or, for a route class it does not know, the
route's ``handle``), each from a plain asyncio task (as uvicorn serves) and from
``TestClient`` (in an anyio task group: the other release path).
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import tether
import tether.fastapi
from tests.routes import WrappingRoute
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


class Base(DeclarativeBase):
    pass


class Name(Base):
    __tablename__ = "cth_names"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


@pytest.fixture
def names(postgres: Postgres) -> Iterator[None]:
    postgres.sql("DROP TABLE IF EXISTS cth_names")
    postgres.sql("CREATE TABLE cth_names (id int PRIMARY KEY, name text NOT NULL UNIQUE)")
    postgres.sql("GRANT ALL ON cth_names TO tether")
    postgres.sql("INSERT INTO cth_names VALUES (1, 'taken')")
    yield
    postgres.sql("DROP TABLE IF EXISTS cth_names")


def rows(postgres: Postgres) -> list[tuple[Any, ...]]:
    return postgres.sql("SELECT id, name FROM cth_names ORDER BY id")


def not_idle(postgres: Postgres, name: str) -> list[dict[str, Any]]:
    return [r for r in postgres.activity(name) if r["state"] != "idle"]


def requests(app: FastAPI, lc: tether.Lifecycle, client: str, *calls: tuple[str, str]) -> list[Any]:
    """Send *calls* ((method, path)) in turn; each answer as (status, body)."""
    if client == "testclient":
        with TestClient(app, raise_server_exceptions=False) as c:
            answers = [c.request(method, path) for method, path in calls]
            return [(r.status_code, r.json()) for r in answers]

    async def main() -> list[Any]:
        async with lc.lifespan(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                out = []
                for method, path in calls:
                    # A plain asyncio task, as uvicorn serves each request.
                    task = asyncio.get_running_loop().create_task(c.request(method, path))
                    r = await task
                    out.append((r.status_code, r.json()))
                return out

    return asyncio.run(main())


def names_app(
    postgres: Postgres, driver: str, serving: str
) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[AsyncSession], str]:
    name = f"cth-{uuid.uuid4().hex[:12]}"
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url(f"postgresql+{driver}"), application_name=name)
    session = tsa.session(lc, engine)
    app = FastAPI(lifespan=lc.lifespan)
    if serving == "handle":
        app.router.route_class = WrappingRoute
    return app, lc, session, name


SERVINGS = pytest.mark.parametrize("serving", ["handler", "handle"])
CLIENTS = pytest.mark.parametrize("client", ["task", "testclient"])
DRIVERS = pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])


@DRIVERS
@SERVINGS
@CLIENTS
def test_a_unique_violation_at_commit_is_answered_by_the_apps_handler(
    postgres: Postgres, names: None, driver: str, serving: str, client: str
) -> None:
    app, lc, session, name = names_app(postgres, driver, serving)

    @app.exception_handler(IntegrityError)
    async def conflict(request: Request, exc: IntegrityError) -> JSONResponse:
        return JSONResponse({"detail": "name already taken"}, status_code=409)

    @app.post("/names/{id}/{new}")
    async def create(id: int, new: str, s: Annotated[AsyncSession, Depends(session)]) -> int:
        s.add(Name(id=id + 100, name=f"{new}, first of two"))
        s.add(Name(id=id, name=new))  # flushed by tether's commit, after the endpoint
        return id

    answers = requests(app, lc, client, ("POST", "/names/2/taken"), ("POST", "/names/3/free"))
    assert answers == [(409, {"detail": "name already taken"}), (200, 3)]
    # The failed unit committed nothing, not even its first row; the next one committed.
    assert rows(postgres) == [(1, "taken"), (3, "free"), (103, "free, first of two")]
    assert not_idle(postgres, name) == []
    assert lc.stats().resources["session"].in_use == 0


@SERVINGS
@CLIENTS
def test_a_unique_violation_at_commit_without_a_handler_is_still_a_500(
    postgres: Postgres, names: None, serving: str, client: str
) -> None:
    app, lc, session, name = names_app(postgres, "asyncpg", serving)

    @app.post("/names/{id}/{new}")
    async def create(id: int, new: str, s: Annotated[AsyncSession, Depends(session)]) -> int:
        s.add(Name(id=id, name=new))
        return id

    answers = requests(app, lc, client, ("POST", "/names/2/taken"))
    assert answers == [(500, {"detail": "Internal Server Error"})]
    assert rows(postgres) == [(1, "taken")]
    assert not_idle(postgres, name) == []


@SERVINGS
@CLIENTS
def test_an_http_exception_raised_by_a_resource_after_its_yield_answers_with_its_status(
    postgres: Postgres, names: None, serving: str, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A resource over the session that maps a conflict found at its flush to a 409 itself:
    the client gets that 409 (Starlette's handler for ``HTTPException``), and the session,
    closed after it, rolls back."""
    app, lc, session, name = names_app(postgres, "asyncpg", serving)

    @lc.resource
    async def uow(session: AsyncSession) -> AsyncIterator[AsyncSession]:
        yield session
        try:
            await session.flush()
        except IntegrityError:
            raise HTTPException(409, "that name is taken") from None

    @app.post("/names/{id}/{new}")
    async def create(id: int, new: str, s: Annotated[AsyncSession, Depends(uow)]) -> int:
        s.add(Name(id=id + 100, name=f"{new}, first of two"))
        s.add(Name(id=id, name=new))
        return id

    with caplog.at_level(logging.INFO, logger="tether"):
        answers = requests(app, lc, client, ("POST", "/names/2/taken"), ("POST", "/names/3/free"))
    assert answers == [(409, {"detail": "that name is taken"}), (200, 3)]
    assert rows(postgres) == [(1, "taken"), (3, "free"), (103, "free, first of two")]
    assert not_idle(postgres, name) == []
    # Chosen, not a crash: noted at INFO, with no traceback, as Starlette logs none for it.
    noted = [
        (r.levelname, r.getMessage(), r.exc_info)
        for r in caplog.records
        if getattr(r, "tether_resource", None) == "uow"
    ]
    assert noted == [
        (
            "INFO",
            "tether: closing resource 'uow' answered 409: HTTPException: 409: that name is taken",
            None,
        )
    ]


@SERVINGS
@CLIENTS
def test_resource_unavailable_at_release_is_answered_by_the_apps_handler(
    postgres: Postgres, names: None, serving: str, client: str
) -> None:
    app, lc, session, name = names_app(postgres, "asyncpg", serving)

    @lc.resource
    async def ledger() -> AsyncIterator[str]:
        yield "ledger"
        raise tether.ResourceUnavailable("the ledger lost its commit", resource="ledger")

    @app.exception_handler(tether.ResourceUnavailable)
    async def busy(request: Request, exc: tether.ResourceUnavailable) -> JSONResponse:
        return JSONResponse({"busy": exc.resource}, status_code=503)

    @app.post("/names/{id}/{new}")
    async def create(
        id: int,
        new: str,
        s: Annotated[AsyncSession, Depends(session)],
        ledger: Annotated[str, Depends(ledger)],
    ) -> int:
        s.add(Name(id=id, name=new))
        return id

    answers = requests(app, lc, client, ("POST", "/names/2/free"))
    assert answers == [(503, {"busy": "ledger"})]
    assert rows(postgres) == [(1, "taken")]  # the session, closed after, rolled back
    assert not_idle(postgres, name) == []


@SERVINGS
@CLIENTS
def test_an_idempotent_route_whose_commit_lost_its_connection_still_runs_again(
    postgres: Postgres, names: None, serving: str, client: str
) -> None:
    """With a handler for ``ResourceUnavailable`` too: a lost connection at the release of
    an ``@idempotent`` route runs it again (on the request-handler path); the handler
    answers only what is not retried."""
    app, lc, session, name = names_app(postgres, "asyncpg", serving)
    runs: list[int] = []

    @lc.resource
    async def ledger() -> AsyncIterator[str]:
        yield "ledger"
        if len(runs) == 1:
            raise tether.ResourceUnavailable("lost", resource="ledger", lost=True)

    @app.exception_handler(tether.ResourceUnavailable)
    async def busy(request: Request, exc: tether.ResourceUnavailable) -> JSONResponse:
        return JSONResponse({"busy": exc.resource}, status_code=503)

    @app.post("/names/{id}/{new}")
    @tether.fastapi.idempotent
    async def create(
        id: int,
        new: str,
        s: Annotated[AsyncSession, Depends(session)],
        ledger: Annotated[str, Depends(ledger)],
    ) -> int:
        runs.append(id)
        s.add(Name(id=id, name=new))
        return id

    answers = requests(app, lc, client, ("POST", "/names/2/free"))
    if serving == "handler":
        assert answers == [(200, 2)]
        assert runs == [2, 2]
        assert rows(postgres) == [(1, "taken"), (2, "free")]
    else:  # served through `handle`, which cannot run a route again (it warns)
        assert answers == [(503, {"busy": "ledger"})]
        assert runs == [2]
        assert rows(postgres) == [(1, "taken")]
    assert not_idle(postgres, name) == []
