"""The asyncio-only drivers on anyio's trio backend (hypercorn -k trio,
`anyio.run(..., backend="trio")`): the start fails at once, naming the driver and the fix,
instead of `RuntimeError: no running event loop` (or trio's "unrecognized yield message")
with advice to retry longer, after `retries=` attempts."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import tether
from tests.unit._messages import misconfigured
from tether.integrations import aiosqlite as tsqlite
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import redis as tredis
from tether.integrations import sqlalchemy as tsa

pytest.importorskip("trio")

DSN = "postgresql://app:secret@127.0.0.1:9/db"

CASES: list[tuple[Callable[[tether.Lifecycle, Path], Any], str, str]] = [
    (lambda lc, _: tpg.pool(lc, DSN, retries=3), "Pool 'pool'", "asyncpg"),
    (lambda lc, _: tpsy.pool(lc, DSN, retries=3), "Pool 'pool'", "psycopg's async pool"),
    (
        lambda lc, _: tredis.client(lc, "redis://127.0.0.1:9/0", retries=3),
        "Redis client 'redis'",
        "redis-py's asyncio client",
    ),
    (lambda lc, tmp: tsqlite.database(lc, tmp / "app.db"), "database('database')", "aiosqlite"),
    (
        lambda lc, _: tsa.engine(lc, DSN.replace("postgresql:", "postgresql+asyncpg:")),
        "Engine 'engine'",
        "SQLAlchemy's async engine",
    ),
]


@pytest.mark.parametrize(
    ("make", "where", "driver"),
    CASES,
    ids=["asyncpg", "psycopg", "redis", "aiosqlite", "sqlalchemy"],
)
def test_an_asyncio_only_driver_on_trio_fails_the_start_at_once(
    make: Callable[[tether.Lifecycle, Path], Any], where: str, driver: str, tmp_path: Path
) -> None:
    lc = tether.Lifecycle()
    res = make(lc, tmp_path)
    cause = (
        f"RuntimeError: {where}: {driver} runs on asyncio only, and this app runs on another "
        f"event loop (anyio's trio backend: hypercorn -k trio, anyio.run(..., backend='trio'), "
        f"TestClient(backend='trio')). Run the app on asyncio (hypercorn -k asyncio, uvicorn), "
        f"or keep {driver} out of the trio app"
    )

    async def main() -> None:
        with anyio.fail_after(10):
            async with lc.run():
                pass  # pragma: no cover

    with pytest.raises(tether.StartupError, match=misconfigured(res.name, cause)):
        anyio.run(main, backend="trio")
