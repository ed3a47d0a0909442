"""A Lifecycle is freed once nothing of the app holds it, after serving on a real PostgreSQL:
an app built per test (the usual FastAPI fixture) must not keep every earlier test's app,
pools and their figures alive. The integrations recorded each connection and session resource
they made (for ``rolled_back()``) in module-level weak dictionaries whose values led back to
their keys, so no Lifecycle with an asyncpg or psycopg connection, or a SQLAlchemy engine or
session, was ever freed (but for typing's and FastAPI's bounded caches, which let go of the
oldest as they fill)."""

import functools
import gc
import weakref
from collections.abc import Callable
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = pytest.mark.servers


def asyncpg_conn(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    return tpg.connection(lc, tpg.pool(lc, pg.dsn, min_size=1, max_size=2), transaction=True)


def psycopg_conn(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    return tpsy.connection(lc, tpsy.pool(lc, pg.dsn, min_size=1, max_size=2))


def sa_session(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    return tsa.session(lc, tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=2))


def sa_sync_session(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    return tsa.sync_session(lc, tsa.sync_engine(lc, pg.url("postgresql+psycopg"), pool_size=2))


@pytest.mark.parametrize(
    "make",
    [asyncpg_conn, psycopg_conn, sa_session, sa_sync_session],
    ids=["asyncpg", "psycopg", "sqlalchemy", "sqlalchemy-sync"],
)
def test_a_lifecycle_that_served_is_freed_with_its_app(
    postgres: Postgres, make: Callable[[tether.Lifecycle, Postgres], tether.Resource[Any]]
) -> None:
    def serve() -> weakref.ref[tether.Lifecycle]:
        lc = tether.Lifecycle()
        resource = make(lc, postgres)
        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        def index(value: Annotated[Any, Depends(resource)]) -> str:
            return type(value).__name__

        with TestClient(app) as client:
            assert client.get("/").status_code == 200
        return weakref.ref(lc)

    freed = serve()
    # typing's and FastAPI's bounded caches (`Annotated[...]`, the dependency classification)
    # hold the last apps' resources until they fill: emptied here, as filling them would.
    for cache in [o for o in gc.get_objects() if isinstance(o, functools._lru_cache_wrapper)]:
        cache.cache_clear()
    gc.collect()
    assert freed() is None
