"""What the integration tests run the same way on each driver's value."""

import time
from typing import Any

import tether


async def scalar(c: Any, sql: str) -> Any:
    """The one value *sql* returns, on an asyncpg or psycopg connection or a SQLAlchemy session
    (a sync one runs it in a thread)."""
    if hasattr(c, "fetchval"):  # asyncpg
        return await c.fetchval(sql)
    if hasattr(c, "cursor"):  # psycopg
        return (await (await c.execute(sql)).fetchone())[0]
    import anyio.to_thread
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    if isinstance(c, Session):
        return await anyio.to_thread.run_sync(lambda: c.execute(text(sql)).scalar_one())
    return (await c.execute(text(sql))).scalar_one()


async def health_at_once(lc: tether.Lifecycle) -> tether.HealthReport:
    """``lc.health()``, which must answer in under 250 ms: a probe never queues behind traffic."""
    t0 = time.monotonic()
    report = await lc.health()
    took = time.monotonic() - t0
    assert took < 0.25, took
    return report
