"""SQLModel's sessions through tether.integrations.sqlalchemy (``class_=``), against PostgreSQL:
``session.exec(select(...))`` on real SQLModel models, async (asyncpg, psycopg) and sync, in
units of work and in FastAPI endpoints; tether's commit, rollback and use-after-release guard
hold for them as for SQLAlchemy's own sessions."""

import re
from collections.abc import Iterator
from typing import Annotated, Any

import anyio.to_thread
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.orm import Session as SASession
from sqlmodel import Field, Session, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

import tether
from tests.servers import Postgres
from tests.unit._messages import exactly
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


class Hero(SQLModel, table=True):
    __tablename__ = "tsm_heroes"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    age: int | None = None


@pytest.fixture
def heroes(postgres: Postgres) -> Iterator[None]:
    postgres.sql("DROP TABLE IF EXISTS tsm_heroes")
    postgres.sql(
        "CREATE TABLE tsm_heroes (id serial PRIMARY KEY, name text UNIQUE NOT NULL, age int)"
    )
    postgres.sql("GRANT ALL ON tsm_heroes, tsm_heroes_id_seq TO PUBLIC")
    yield
    postgres.sql("DROP TABLE IF EXISTS tsm_heroes")


def names(postgres: Postgres) -> list[str]:
    return [row[0] for row in postgres.sql("SELECT name FROM tsm_heroes ORDER BY id")]


@pytest.mark.anyio
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_an_async_sqlmodel_session_execs(
    postgres: Postgres, heroes: None, driver: str
) -> None:
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url(f"postgresql+{driver}"), pool_size=2)
    session = tsa.session(lc, engine, class_=AsyncSession)
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)
            assert type(s) is AsyncSession
            assert isinstance(s.sync_session, Session)  # SQLModel's, guarded
            s.add(Hero(name="Deadpond", age=30))
            s.add(Hero(name="Rusty-Man", age=48))
        assert names(postgres) == ["Deadpond", "Rusty-Man"]  # committed at the release
        with pytest.raises(RuntimeError):
            async with lc.scope() as scope:
                s = await scope.get(session)
                s.add(Hero(name="Spider-Boy"))
                await s.flush()
                raise RuntimeError("the endpoint failed")
        assert names(postgres) == ["Deadpond", "Rusty-Man"]  # rolled back
        async with lc.scope() as scope:
            s = await scope.get(session)
            older = (await s.exec(select(Hero).where(Hero.age > 40))).all()
            assert [h.name for h in older] == ["Rusty-Man"]
            hero = (await s.exec(select(Hero).where(Hero.name == "Deadpond"))).one()
            hero.age = 31
        assert postgres.sql("SELECT age FROM tsm_heroes WHERE name = 'Deadpond'") == [(31,)]
        with pytest.raises(tether.ResourceClosedError, match="cannot be used again"):
            await s.exec(select(Hero))  # after its unit of work: tether's guard
        assert lc.stats().resources["session"].leaks == 1


@pytest.mark.anyio
async def test_a_sync_sqlmodel_session_execs(postgres: Postgres, heroes: None) -> None:
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, postgres.url("postgresql+psycopg"), pool_size=2)
    session = tsa.sync_session(lc, engine, class_=Session)
    async with lc.run():
        async with lc.scope() as scope:
            s = await scope.get(session)
            assert isinstance(s, Session)
            s.add(Hero(name="Deadpond", age=30))
        assert names(postgres) == ["Deadpond"]
        async with lc.scope() as scope:
            s = await scope.get(session)

            def read() -> list[Any]:
                return list(s.exec(select(Hero.name, Hero.age)).all())

            assert [tuple(row) for row in await anyio.to_thread.run_sync(read)] == [
                ("Deadpond", 30)
            ]
        with pytest.raises(tether.ResourceClosedError, match="cannot be used again"):
            s.exec(select(Hero))


def test_sqlmodel_sessions_in_fastapi_endpoints(postgres: Postgres, heroes: None) -> None:
    """FastAPI's SQL tutorial, with tether's sessions: ``async def`` and ``def`` endpoints,
    ``session.exec(select(...))``, a 404 that rolls back."""
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=2)
    session = tsa.session(lc, engine, class_=AsyncSession)
    sync_engine = tsa.sync_engine(
        lc, postgres.url("postgresql+psycopg"), name="sync_engine", pool_size=2
    )
    sync_session = tsa.sync_session(lc, sync_engine, name="sync_session", class_=Session)
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/heroes")
    async def create(hero: Hero, s: Annotated[AsyncSession, Depends(session)]) -> Hero:
        s.add(hero)
        await s.flush()
        return hero

    @app.get("/heroes")
    async def read_all(s: Annotated[AsyncSession, Depends(session)]) -> list[Hero]:
        return list((await s.exec(select(Hero).order_by(Hero.id))).all())

    @app.patch("/heroes/{name}")
    def rename(name: str, to: str, s: Annotated[Session, Depends(sync_session)]) -> dict[str, str]:
        hero = s.exec(select(Hero).where(Hero.name == name)).first()
        s.add(Hero(name=f"{to} (audit)"))  # rolled back with the 404
        if hero is None:
            raise HTTPException(404, "no such hero")
        hero.name = to
        return {"name": to}

    with TestClient(app) as client:
        assert client.post("/heroes", json={"name": "Deadpond", "age": 30}).status_code == 200
        assert client.patch("/heroes/Deadpond", params={"to": "Dead"}).json() == {"name": "Dead"}
        assert client.patch("/heroes/Nobody", params={"to": "X"}).status_code == 404
        got = client.get("/heroes").json()
        assert [(h["name"], h["age"]) for h in got] == [("Dead", 30), ("Dead (audit)", None)]
    assert names(postgres) == ["Dead", "Dead (audit)"]


# --------------------------------------------------------------------------- class_ refused


def test_class_must_be_a_session_class_of_the_right_kind() -> None:
    lc = tether.Lifecycle()
    engine = tsa.engine(lc, "postgresql+asyncpg://u@localhost/db")
    sync_engine = tsa.sync_engine(lc, "postgresql+psycopg://u@localhost/db", name="sync")
    async_want = (
        "Pass a subclass of sqlalchemy.ext.asyncio.AsyncSession (SQLModel's is "
        "sqlmodel.ext.asyncio.session.AsyncSession)"
    )
    sync_want = "Pass a subclass of sqlalchemy.orm.Session (SQLModel's is sqlmodel.Session)"
    with pytest.raises(TypeError) as caught:
        tsa.session(lc, engine, class_=Session)  # type: ignore[arg-type]
    assert re.match(
        exactly(
            "session('session'): class_=sqlmodel.orm.session.Session is a sync Session class, "
            f"and session() makes async sessions. {async_want}, or declare it with "
            "sync_session()."
        ),
        str(caught.value),
    )
    with pytest.raises(TypeError) as caught:
        tsa.sync_session(lc, sync_engine, class_=AsyncSession)  # type: ignore[arg-type]
    assert re.match(
        exactly(
            "sync_session('session'): class_=sqlmodel.ext.asyncio.session.AsyncSession is an "
            f"AsyncSession class, and sync_session() makes sync sessions. {sync_want}, or "
            "declare it with session()."
        ),
        str(caught.value),
    )
    with pytest.raises(TypeError) as caught:
        tsa.session(lc, engine, class_="sqlmodel.AsyncSession")  # type: ignore[arg-type]
    assert re.match(
        exactly(
            f"session('session'): class_='sqlmodel.AsyncSession' is not a session class. "
            f"{async_want}."
        ),
        str(caught.value),
    )
    # SQLAlchemy's own (the defaults) and subclasses are taken.
    tsa.session(lc, engine, name="a", class_=SAAsyncSession)
    tsa.sync_session(lc, sync_engine, name="b", class_=SASession)
