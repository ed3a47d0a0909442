"""tether.psycopg after an outage: back within about two seconds of the server.

psycopg_pool tries to replace each lost connection after a delay that doubles from 1 s (up to
its 5-minute ``reconnect_timeout``), and those attempts count against the pool's size, so no
request could get a connection before the next one came due: after an outage of 8 s the
first request served came 3.8 s after the server was back (12 s after an outage of 45 s),
every one before it a 503 saying the database could not be reached. asyncpg's and
SQLAlchemy's pools connect on demand, within 0.2 s. tether caps the delay at 2 s (with
psycopg_pool's jitter kept, so that a pool's attempts do not all come at once).
"""

import time
from typing import Any

import anyio
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import psycopg as tpsy

pytestmark = [pytest.mark.anyio, pytest.mark.servers, pytest.mark.fastapi_free]

OUTAGE = 8.0


async def test_requests_are_served_within_about_two_seconds_of_the_server_coming_back() -> None:
    with Postgres() as pg:
        lc = tether.Lifecycle()
        pool = tpsy.pool(lc, pg.dsn, min_size=2, max_size=2, timeout=1.0)
        conn = tpsy.connection(lc, pool)

        async def ask() -> bool:
            try:
                async with lc.scope() as s:
                    c: Any = await s.get(conn)
                    await c.execute("SELECT 1")
                    return True
            except Exception:  # a 503 (ResourceUnavailable), or a connection lost under it
                return False

        async with lc.run():
            assert await ask()
            pg.kill()
            ends = time.monotonic() + OUTAGE
            while time.monotonic() < ends:  # light traffic, failing
                await ask()
                await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(pg.start)
            back = time.monotonic()
            while not await ask():
                assert time.monotonic() - back < 10, "not served 10 s after the server was back"
                await anyio.sleep(0.05)
            took = time.monotonic() - back
        assert took < 3.5, f"first request served {took:.1f} s after the server was back"
