"""SQLAlchemy `rolled_back(session)` and the other session resources of the same engine.

Only the units of work that ask for the block's resource are in the block: a session of
another resource of the engine (an `audit_session`, a read-only one) gets a connection of its
own, and what it writes is committed for real. That used to pass in silence (the row left for
the next test, or another xdist worker); it is warned of now, as asyncpg and psycopg warn of a
connection resource of the same pool. Against a real PostgreSQL.
"""

import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers

TABLE = "sa_rbo_items"
INSERT = text(f"INSERT INTO {TABLE} (id) VALUES (:id)")


def outside(block: str, engine: str) -> str:
    return (
        f"rolled_back({block!r}) is open, and a unit of work took a connection of pool "
        f"{engine!r} through another resource: it is outside the block, so it does not see "
        f"what the block wrote, and what it writes is committed and stays after the test. Give "
        f"rolled_back() the resource the code under test uses, or open one block per resource."
    )


@pytest.fixture
def items(postgres: Postgres) -> Iterator[None]:
    postgres.sql(f"DROP TABLE IF EXISTS {TABLE}")
    postgres.sql(f"CREATE TABLE {TABLE} (id int PRIMARY KEY)")
    postgres.sql(f"GRANT ALL ON {TABLE} TO tether")
    yield
    postgres.sql(f"DROP TABLE IF EXISTS {TABLE}")


def rows(postgres: Postgres) -> list[int]:
    return [r[0] for r in postgres.sql(f"SELECT id FROM {TABLE} ORDER BY id")]


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan and an in-process client, on the test's event loop."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        yield client


@contextmanager
def quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning raised in the block (in any thread): for "none was raised"."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield seen


def messages(seen: Any) -> list[str]:
    return [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.anyio
async def test_a_session_of_another_resource_of_the_engine_is_warned_of(
    postgres: Postgres, items: None, driver: str
) -> None:
    """The block is on `session`; requests write through `audit_session` (connects as it
    opens) and `lazy_session` (``connect=False``), other resources of the same engine. Their
    rows are committed for real, each with a warning naming the block's resource, the engine
    and the fix; `session`'s own requests are in the block, with none; a lazy session that
    is never used takes no connection, and is not warned of. Under ``-W error`` the warning
    fails the request before it writes anything."""
    lc = tether.Lifecycle()
    eng = tsa.engine(lc, postgres.url(f"postgresql+{driver}"), name="db", pool_size=4)
    session = tsa.session(lc, eng, name="session")
    audit = tsa.session(lc, eng, name="audit_session")
    lazy = tsa.session(lc, eng, name="lazy_session", connect=False)
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes/{item_id}")
    async def note(item_id: int, s: Annotated[AsyncSession, Depends(session)]) -> int:
        await s.execute(INSERT, {"id": item_id})
        return item_id

    @app.post("/audit/{item_id}")
    async def audited(item_id: int, a: Annotated[AsyncSession, Depends(audit)]) -> int:
        await a.execute(INSERT, {"id": item_id})
        return item_id

    @app.post("/lazy/{item_id}")
    async def lazily(
        item_id: int, s: Annotated[AsyncSession, Depends(lazy)], write: bool = True
    ) -> int:
        if write:
            await s.execute(INSERT, {"id": item_id})
        return item_id

    async with running(app) as client:
        async with tsa.rolled_back(session) as conn:
            with quiet() as seen:
                assert (await client.post("/notes/1")).status_code == 200  # in the block
                assert (await client.post("/lazy/3?write=false")).status_code == 200
            assert messages(seen) == []
            with pytest.warns(RuntimeWarning) as warned:
                audited_status = (await client.post("/audit/2")).status_code
            with pytest.warns(RuntimeWarning) as warned_lazy:  # as it takes its connection
                lazy_status = (await client.post("/lazy/4")).status_code
            assert (audited_status, lazy_status) == (200, 200)
            assert [str(w.message) for w in [*warned, *warned_lazy]] == [
                outside("session", "db")
            ] * 2
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # as under -W error
                assert (await client.post("/audit/5")).status_code == 500
            ids = (await conn.execute(text(f"SELECT id FROM {TABLE} ORDER BY id"))).scalars()
            assert list(ids) == [1, 2, 4]  # 2 and 4 committed; 5 failed before writing
        with quiet() as seen:
            assert (await client.post("/audit/6")).status_code == 200  # no block: no warning
            # A block per resource: both are in, neither is warned of.
            async with tsa.rolled_back(session), tsa.rolled_back(audit):
                assert (await client.post("/notes/7")).status_code == 200
                assert (await client.post("/audit/8")).status_code == 200
        assert messages(seen) == []
    assert rows(postgres) == [2, 4, 6]  # 2 and 4 were committed for real, and warned of


def test_a_sync_session_of_another_resource_of_the_engine_is_warned_of(
    postgres: Postgres, items: None
) -> None:
    """`sync_session`s in `def` endpoints under `TestClient`, the block on `session` through
    the client's portal: a request writing through `audit_session` is warned of (in the
    thread that opens its session), one through `session` is not."""
    lc = tether.Lifecycle()
    eng = tsa.sync_engine(lc, postgres.url("postgresql+psycopg"), name="db", pool_size=4)
    session = tsa.sync_session(lc, eng, name="session")
    audit = tsa.sync_session(lc, eng, name="audit_session")
    lazy = tsa.sync_session(lc, eng, name="lazy_session", connect=False)
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes/{item_id}")
    def note(item_id: int, s: Annotated[Session, Depends(session)]) -> int:
        s.execute(INSERT, {"id": item_id})
        return item_id

    @app.post("/audit/{item_id}")
    def audited(item_id: int, a: Annotated[Session, Depends(audit)]) -> int:
        a.execute(INSERT, {"id": item_id})
        return item_id

    @app.post("/lazy/{item_id}")
    def lazily(item_id: int, s: Annotated[Session, Depends(lazy)], write: bool = True) -> int:
        if write:
            s.execute(INSERT, {"id": item_id})
        return item_id

    with TestClient(app) as client:
        assert client.portal is not None
        with client.portal.wrap_async_context_manager(tsa.rolled_back(session)):
            with quiet() as seen:
                assert client.post("/notes/1").status_code == 200
                assert client.post("/lazy/3?write=false").status_code == 200
            assert messages(seen) == []
            with pytest.warns(RuntimeWarning) as warned:
                audited_status = client.post("/audit/2").status_code
            with pytest.warns(RuntimeWarning) as warned_lazy:  # as it takes its connection
                lazy_status = client.post("/lazy/4").status_code
            assert (audited_status, lazy_status) == (200, 200)
            assert [str(w.message) for w in [*warned, *warned_lazy]] == [
                outside("session", "db")
            ] * 2
        with quiet() as seen:
            assert client.post("/audit/5").status_code == 200  # no block: no warning
        assert messages(seen) == []
    assert rows(postgres) == [2, 4, 5]


def test_a_session_of_another_engine_of_the_same_database_is_warned_of(
    postgres: Postgres, items: None
) -> None:
    """The app's async `session` and, for its `def` routes, a `sync_session` on a
    `sync_engine()` of the same database: the block on `session` does not cover the sync
    one, whose writes stayed after the test in silence (trial 21). Warned of now; a block
    for each covers both; another database's engine is not warned of."""
    lc = tether.Lifecycle()
    eng = tsa.engine(lc, postgres.url("postgresql+asyncpg"), name="db", pool_size=2)
    sync_eng = tsa.sync_engine(lc, postgres.url("postgresql+psycopg"), name="sync_db")
    other_eng = tsa.sync_engine(lc, "sqlite://", name="elsewhere")
    session = tsa.session(lc, eng, name="session")
    sync_session = tsa.sync_session(lc, sync_eng, name="sync_session")
    elsewhere = tsa.sync_session(lc, other_eng, name="elsewhere_session")
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/notes/{item_id}")
    async def note(item_id: int, s: Annotated[AsyncSession, Depends(session)]) -> int:
        await s.execute(INSERT, {"id": item_id})
        return item_id

    @app.post("/sync/{item_id}")
    def sync_note(item_id: int, s: Annotated[Session, Depends(sync_session)]) -> int:
        s.execute(INSERT, {"id": item_id})
        return item_id

    @app.get("/elsewhere")
    def read_elsewhere(s: Annotated[Session, Depends(elsewhere)]) -> int:
        return int(s.execute(text("SELECT 1")).scalar_one())

    with TestClient(app) as client:
        assert client.portal is not None
        with client.portal.wrap_async_context_manager(tsa.rolled_back(session)):
            with quiet() as seen:
                assert client.post("/notes/1").status_code == 200
                assert client.get("/elsewhere").status_code == 200
            assert messages(seen) == []
            with pytest.warns(RuntimeWarning) as warned:
                assert client.post("/sync/2").status_code == 200
            assert [str(w.message) for w in warned] == [outside("session", "sync_db")]
        with (
            client.portal.wrap_async_context_manager(tsa.rolled_back(session)),
            client.portal.wrap_async_context_manager(tsa.rolled_back(sync_session)),
            quiet() as seen,
        ):
            assert client.post("/notes/3").status_code == 200
            assert client.post("/sync/4").status_code == 200
        assert messages(seen) == []
    assert rows(postgres) == [2]  # the one outside both blocks, warned of
