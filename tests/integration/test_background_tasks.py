"""Background tasks own their resources (pain.md T2.4).

FastAPI runs a request's `BackgroundTasks` after the response is sent. The request's
connection is back in the pool by then (tether releases it at the handler), so a task that
opens its own unit of work (`async with lc.scope()`) gets a connection of its own, even from
a pool of one, and commits or rolls back independently of the request.
"""

import uuid
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]


async def execute(c: Any, sql: str, *args: Any) -> None:
    if hasattr(c, "fetchval"):  # asyncpg
        await c.execute(sql, *args)
        return
    from sqlalchemy import text

    params = {f"p{i}": value for i, value in enumerate(args, 1)}
    await c.execute(text(sql.replace("$1", ":p1")), params)


def asyncpg_tx(lc: tether.Lifecycle, pg: Postgres) -> Any:
    pool = tpg.pool(lc, pg.dsn, min_size=1, max_size=1, acquire_timeout=2)
    return tpg.connection(lc, pool, transaction=True)


def sqlalchemy_session(lc: tether.Lifecycle, pg: Postgres) -> Any:
    return tsa.session(
        lc, tsa.engine(lc, pg.url("postgresql+asyncpg"), pool_size=1, pool_timeout=2)
    )


@pytest.mark.parametrize("make", [asyncpg_tx, sqlalchemy_session], ids=["asyncpg", "sqlalchemy"])
async def test_a_background_task_gets_its_own_connection_and_transaction(
    postgres: Postgres, make: Any
) -> None:
    table = f"bg_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {table} (what text)")
    postgres.sql(f"GRANT ALL ON {table} TO {postgres.user}")
    lc = tether.Lifecycle()
    conn = make(lc, postgres)
    app = FastAPI(lifespan=lc.lifespan)
    seen: list[tuple[str, int]] = []

    async def task(what: str, fail: bool) -> None:
        in_use = sum(p.in_use or 0 for p in lc.stats().pools.values())
        seen.append(("task starts, connections in use", in_use))
        async with lc.scope("background") as s:
            c = await s.get(conn)
            await execute(c, f"INSERT INTO {table} VALUES ($1)", what)
            if fail:
                msg = "the task failed after its write"
                raise RuntimeError(msg)

    @app.post("/write")
    async def write(
        c: Annotated[Any, Depends(conn)], background: BackgroundTasks, fail_task: bool = False
    ) -> dict[str, str]:
        await execute(c, f"INSERT INTO {table} VALUES ($1)", "request")
        background.add_task(task, "task", fail_task)
        return {"status": "written"}

    async with lc.lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.post("/write")).status_code == 200
            assert sorted(r[0] for r in postgres.sql(f"SELECT what FROM {table}")) == [
                "request",
                "task",
            ]
            postgres.sql(f"DELETE FROM {table}")
            # A failing task rolls back its own write, not the request's (already committed).
            await client.post("/write", params={"fail_task": "true"})
            assert [r[0] for r in postgres.sql(f"SELECT what FROM {table}")] == ["request"]
    # The request's connection was back before each task started: with a pool of one the
    # task got it (no 503 waiting for it) and nothing else was checked out.
    assert seen == [("task starts, connections in use", 0)] * 2
    assert lc.stats().resources[conn.name].opened == 4
