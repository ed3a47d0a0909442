"""A session's transaction options, and what a session that took its connection at open says.

With the default ``connect=True`` the session's transaction has begun when the endpoint gets
it, so SQLAlchemy's per-transaction recipe (``session.connection(execution_options=
{"isolation_level": "SERIALIZABLE"})``) was ignored with one warning: the transaction ran
at READ COMMITTED. ``execution_options=`` declares them with the session (every connection
it takes); the recipe, and ``session.begin()``, now raise naming that fix.
"""

from collections.abc import Iterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import tether
from tests.servers import Postgres
from tests.unit._messages import exactly
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers

SERIALIZABLE = {"isolation_level": "SERIALIZABLE"}


def begun(fn: str) -> str:
    return (
        "Session 'session' is in a transaction already: tether began it when the session "
        "opened (connect=True), and commits it when the unit of work succeeds (rolls it back on "
        "a failure), so session.begin() cannot begin one. Leave the begin() block out (run a "
        "part that may fail in session.begin_nested()), or declare the session with "
        "connect=False to begin its transaction yourself. For the transaction's isolation "
        f"level, declare it: {fn}(lc, engine, execution_options={{'isolation_level': "
        "'SERIALIZABLE'})."
    )


def ignored(fn: str) -> str:
    return (
        "Session 'session': the execution options given to session.connection() would be "
        "ignored: tether took the session's connection when it opened (connect=True), so its "
        "transaction has begun with the session's own options (SQLAlchemy only warns, once, and "
        "the transaction runs at the engine's isolation level). Declare them with the session: "
        f"{fn}(lc, engine, execution_options={{'isolation_level': 'SERIALIZABLE'}}); or "
        "declare it with connect=False."
    )


class Kind:
    """An async (asyncpg, psycopg) or sync (psycopg) engine and session, and an app whose
    endpoints report what the session's transaction runs with."""

    def __init__(self, kind: str, postgres: Postgres, **session_options: Any) -> None:
        self.kind = kind
        self.lc = lc = tether.Lifecycle()
        self.app = app = FastAPI(lifespan=lc.lifespan)
        self.fn = "sync_session" if kind == "sync" else "session"
        show = text("SELECT current_setting('transaction_isolation'), "
                    "current_setting('transaction_read_only')")  # fmt: skip
        if kind == "sync":
            self.engine: Any = tsa.sync_engine(lc, postgres.url("postgresql+psycopg"), pool_size=1)
            session = tsa.sync_session(lc, self.engine, **session_options)
            plain = tsa.sync_session(lc, self.engine, name="plain")
            S = Annotated[Session, Depends(session)]

            @app.get("/show")
            def sync_show(s: S) -> list[str]:
                first = list(s.execute(show).one())
                s.commit()  # the next transaction takes the options too
                return [*first, *s.execute(show).one()]

            @app.get("/plain")
            def sync_plain(s: Annotated[Session, Depends(plain)]) -> list[str]:
                return list(s.execute(show).one())

            @app.get("/recipe")
            def sync_recipe(s: S) -> list[str]:
                s.connection(execution_options=SERIALIZABLE)
                return list(s.execute(show).one())

            @app.get("/begin")
            def sync_begin(s: S) -> list[str]:
                with s.begin():
                    return list(s.execute(show).one())

            return
        url = postgres.url(f"postgresql+{kind}")
        self.engine = tsa.engine(lc, url, pool_size=1)
        async_session = tsa.session(lc, self.engine, **session_options)
        async_plain = tsa.session(lc, self.engine, name="plain")
        A = Annotated[AsyncSession, Depends(async_session)]

        @app.get("/show")
        async def show_(s: A) -> list[str]:
            first = list((await s.execute(show)).one())
            await s.commit()
            return [*first, *(await s.execute(show)).one()]

        @app.get("/plain")
        async def plain_(s: Annotated[AsyncSession, Depends(async_plain)]) -> list[str]:
            return list((await s.execute(show)).one())

        @app.get("/recipe")
        async def recipe(s: A) -> list[str]:
            await s.connection(execution_options=SERIALIZABLE)
            return list((await s.execute(show)).one())

        @app.get("/begin")
        async def begin(s: A) -> list[str]:
            async with s.begin():
                return list((await s.execute(show)).one())


KINDS = ["asyncpg", "psycopg", "sync"]


@pytest.mark.parametrize("connect", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_execution_options_set_every_transaction_of_the_session(
    kind: str, connect: bool, postgres: Postgres
) -> None:
    options = {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True}
    k = Kind(kind, postgres, connect=connect, execution_options=options)
    with TestClient(k.app) as client:
        assert client.get("/show").json() == ["serializable", "on"] * 2
        # The pool's one connection goes back as it was: a session without them.
        assert client.get("/plain").json() == ["read committed", "off"]
        assert client.get("/show").json() == ["serializable", "on"] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_session_opened_in_its_transaction_says_so_to_begin_and_to_options(
    kind: str, postgres: Postgres
) -> None:
    """connect=True: ``session.begin()`` was a 500 saying "A transaction is already begun",
    and SQLAlchemy's per-transaction options were ignored with a warning (READ COMMITTED).
    Both now raise naming the fix. Options that are the session's own pass."""
    k = Kind(kind, postgres)
    with TestClient(k.app) as client:
        with pytest.raises(sa_exc.InvalidRequestError, match=exactly(begun(k.fn))):
            client.get("/begin")
        with pytest.raises(sa_exc.InvalidRequestError, match=exactly(ignored(k.fn))):
            client.get("/recipe")
        assert client.get("/plain").json() == ["read committed", "off"]  # nothing left over
    k = Kind(kind, postgres, execution_options=SERIALIZABLE)
    with TestClient(k.app) as client:
        assert client.get("/recipe").json() == ["serializable", "off"]  # its own: no warning
    k = Kind(kind, postgres, connect=False)  # SQLAlchemy's way, as before
    with TestClient(k.app) as client:
        assert client.get("/begin").json() == ["read committed", "off"]
        assert client.get("/recipe").json() == ["serializable", "off"]


def test_a_session_begins_again_after_its_own_commit(postgres: Postgres) -> None:
    """The refusal covers only the transaction tether began: after the endpoint's commit,
    ``begin()`` begins the next one."""
    lc = tether.Lifecycle()
    eng = tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=1)
    session = tsa.session(lc, eng)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def after_commit(s: Annotated[AsyncSession, Depends(session)]) -> int:
        await s.commit()
        async with s.begin():
            return int((await s.execute(text("SELECT 1"))).scalar_one())

    with TestClient(app) as client:
        assert client.get("/").json() == 1


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            [("isolation_level", "SERIALIZABLE")],
            TypeError,
            "{where}: execution_options must be a dict of SQLAlchemy execution options "
            "(execution_options={{'isolation_level': 'SERIALIZABLE'}}), not a list.",
        ),
        (
            {"isolation_level": "SERIALISABLE"},
            ValueError,
            "{where}: isolation_level='SERIALISABLE' is not an isolation level: use 'READ "
            "COMMITTED', 'READ UNCOMMITTED', 'REPEATABLE READ', 'SERIALIZABLE'.",
        ),
        (
            {"isolation_level": "autocommit"},
            ValueError,
            "{where}: isolation_level='AUTOCOMMIT' would commit each statement as it runs, so "
            "a failing unit of work could not be rolled back. Use the engine for that work "
            "(`{with_} engine.connect()` with "
            "`execution_options(isolation_level='AUTOCOMMIT')`), or another level.",
        ),
    ],
    ids=["not-a-dict", "typo", "autocommit"],
)
@pytest.mark.parametrize("fn", ["session", "sync_session"])
def test_execution_options_are_checked_when_declared(
    fn: str, options: Any, error: type[Exception], message: str
) -> None:
    lc = tether.Lifecycle()
    url = "postgresql+asyncpg://u@h/d" if fn == "session" else "postgresql+psycopg://u@h/d"
    eng: Any = (tsa.engine if fn == "session" else tsa.sync_engine)(lc, url)
    declare = tsa.session if fn == "session" else tsa.sync_session
    with_ = "async with" if fn == "session" else "with"
    message = message.format(where=f"{fn}('session')", with_=with_)
    with pytest.raises(error, match=exactly(message)):
        declare(lc, eng, execution_options=options)
    declare(lc, eng, execution_options={"isolation_level": "repeatable_read"})  # as SA spells


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    postgres.sql("CREATE TABLE IF NOT EXISTS sa_options_rows (k int)")
    yield "sa_options_rows"
    postgres.sql("DROP TABLE sa_options_rows")


def test_rolled_back_runs_a_session_with_options_in_its_transaction(
    postgres: Postgres, table: str
) -> None:
    """Under ``rolled_back`` the units run in the block's transaction (its isolation level):
    the options are not applied, and nothing fails for them."""
    lc = tether.Lifecycle()
    eng = tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=1)
    session = tsa.session(lc, eng, execution_options=SERIALIZABLE)

    async def main() -> None:
        async with lc.run(), tsa.rolled_back(session) as conn:
            async with lc.scope() as scope:
                s = await scope.get(session)
                await s.execute(text(f"INSERT INTO {table} VALUES (1)"))
            seen = await conn.execute(text(f"SELECT k FROM {table}"))
            assert seen.all() == [(1,)]
        assert postgres.sql(f"SELECT k FROM {table}") == []

    anyio.run(main)
