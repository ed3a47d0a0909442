"""A worker of a deployment that migrates at startup with `once` (tests/integration/test_once.py).

Served by uvicorn with several workers: each worker runs this module's lifespan, and the
migration must run in one of them only. Its DSN, table and key come from the environment.
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI

import tether
from tether.integrations import asyncpg as tpg

TABLE = os.environ.get("TETHER_TEST_TABLE", "notes")

lc = tether.Lifecycle()
pool = tpg.pool(lc, lambda: os.environ["TETHER_TEST_DSN"], min_size=1, max_size=2)
conn = tpg.connection(lc, pool)


async def migrate(c: asyncpg.Connection) -> None:
    # Not idempotent on purpose: a second run would fail on the existing table.
    await c.execute(f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, text text NOT NULL)")
    await c.execute(f"INSERT INTO {TABLE} (text) VALUES ('seeded')")
    await asyncio.sleep(1.0)  # a slow migration: the other workers wait for it


migrated = tpg.once(lc, pool, migrate, key=os.environ.get("TETHER_TEST_KEY", "schema:1"))


@asynccontextmanager
async def announce(app: FastAPI) -> AsyncIterator[None]:
    # One write per line: three worker processes share the output file.
    os.write(1, f"EVENT started {os.getpid()} ran={lc.get(migrated)}\n".encode())
    yield


app = FastAPI(lifespan=lc.lifespan(wrap=announce))


@app.get("/notes")
async def notes(c: Annotated[Any, Depends(conn)]) -> dict[str, Any]:
    rows = await c.fetch(f"SELECT text FROM {TABLE}")
    return {"pid": os.getpid(), "notes": [r["text"] for r in rows]}
