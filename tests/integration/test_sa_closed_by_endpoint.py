"""An endpoint that closes the session tether gave it (``session.close()``, ``with
session:``), with writes not committed: refused, a 500, nothing committed.

Before, the close rolled the writes back while the request went on, and tether's commit at
the end committed nothing (or only what came after the close): a 200 for writes that were
lost, with nothing logged (trial 13, the FastAPI tutorial's ``db.close()`` habit). A close
with nothing to lose (after a commit, after reads only) goes through, as before.
"""

import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers

CLOSED = (
    "Session 'session' has writes not committed, and the endpoint closed it "
    "(session.close(), or `with session:`): that would roll them back while the request "
    "goes on, and answer 200 for writes that were lost. tether commits the session when the "
    "unit of work succeeds, and closes it: do not close it yourself. Call session.commit() to "
    "keep the writes now, or session.rollback() to discard them."
)


@pytest.fixture(params=["postgresql+asyncpg", "postgresql+psycopg", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.url(request.param)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_an_endpoint_closing_its_session_loses_no_write_silently(url: str, kind: str) -> None:
    table = f"closed_{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    if kind == "async":
        url = url.replace("sqlite://", "sqlite+aiosqlite://")
        engine: Any = tsa.engine(lc, url)
        session: Any = tsa.session(lc, engine)
    else:
        url = url.replace("postgresql+asyncpg", "postgresql+psycopg")
        engine = tsa.sync_engine(lc, url)
        session = tsa.sync_session(lc, engine)
    S = Annotated[Any, Depends(session)]
    app = FastAPI(lifespan=lc.lifespan)

    def insert(v: str) -> Any:
        return text(f"INSERT INTO {table} VALUES ('{v}')")

    if kind == "async":

        @app.post("/{how}")
        async def write(how: str, s: S) -> str:
            if how == "reads":
                await s.execute(text(f"SELECT count(*) FROM {table}"))
            else:
                await s.execute(insert(how))
            if how == "commits":
                await s.commit()
            await s.close()
            await s.execute(insert(f"{how}-after"))
            return "ok"

    else:

        @app.post("/{how}")
        def write(how: str, s: S) -> str:  # type: ignore[misc]
            if how == "with":
                with s:
                    s.execute(insert(how))
                return "ok"
            if how == "reads":
                s.execute(text(f"SELECT count(*) FROM {table}"))
            else:
                s.execute(insert(how))
            if how == "commits":
                s.commit()
            s.close()
            s.execute(insert(f"{how}-after"))
            return "ok"

    def rows() -> list[str]:
        with _plain(url) as conn:
            return [r[0] for r in conn.execute(text(f"SELECT v FROM {table} ORDER BY v"))]

    with TestClient(app) as client:
        with _plain(url) as conn:
            conn.execute(text(f"CREATE TABLE {table} (v text)"))
            conn.commit()
        with pytest.raises(tether.ScopeError) as refused:
            client.post("/closes")
        assert str(refused.value) == CLOSED
        if kind == "sync":
            with pytest.raises(tether.ScopeError, match="`with session:`"):
                client.post("/with")
        assert rows() == []  # nothing of either committed
        # Nothing to lose: the close goes through, and what follows commits.
        assert client.post("/commits").json() == "ok"
        assert client.post("/reads").json() == "ok"
        assert rows() == ["commits", "commits-after", "reads-after"]


def _plain(url: str) -> Connection:
    """A connection of the test's own, outside tether (no pool)."""
    sync_url = url.replace("+asyncpg", "+psycopg").replace("+aiosqlite", "")
    return create_engine(sync_url, poolclass=NullPool).connect()
