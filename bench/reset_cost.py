"""What resetting the PostgreSQL session on release costs a unit of work (psycopg, SQLAlchemy).

    BENCH_PG_DSN=postgresql://... python -m bench.reset_cost [--units 2000] [--runs 3]

The psycopg and SQLAlchemy integrations undo what a unit of work left on the session when its
connection goes back (``RESET ROLE; RESET ALL; ...``: one round trip; asyncpg's pool always
did). This runs units of work of one ``SELECT 1`` each through ``lc.scope()`` on a pool of one
connection, with ``reset_session=True`` (the default) and ``False``, interleaved run by run,
and prints the wall time per unit of work: the difference is the reset's round trip.

Then the reset statements alone, on one asyncpg connection: tether's ``RESET_SESSION``
against the one before it took in ``SET SESSION AUTHORIZATION DEFAULT`` and ``DISCARD TEMP``
(``PREVIOUS_RESET``), interleaved run by run: what those add to every release.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import tether
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa
from tether.integrations._common import RESET_SESSION

PREVIOUS_RESET = "RESET ROLE; RESET ALL; CLOSE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all()"


def _declare(kind: str, dsn: str, reset: bool) -> tuple[tether.Lifecycle, Any, Any]:
    lc = tether.Lifecycle()
    if kind == "psycopg":
        pool = tpsy.pool(lc, dsn, min_size=1, max_size=1)
        res = tpsy.connection(lc, pool, reset_session=reset)

        async def use(c: Any) -> None:
            await c.execute("SELECT 1")

        return lc, res, use
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = tsa.engine(lc, url, pool_size=1, reset_session=reset)
    res = tsa.session(lc, engine)

    async def use_session(s: Any) -> None:
        from sqlalchemy import text

        await s.execute(text("SELECT 1"))

    return lc, res, use_session


async def _per_unit(kind: str, dsn: str, reset: bool, units: int) -> float:
    lc, res, use = _declare(kind, dsn, reset)
    run: Callable[[Any], Awaitable[None]] = use
    async with lc.run():
        for _ in range(units // 10):  # warm up
            async with lc.scope() as s:
                await run(await s.get(res))
        started = time.perf_counter()
        for _ in range(units):
            async with lc.scope() as s:
                await run(await s.get(res))
        return (time.perf_counter() - started) / units * 1e6


async def _statements(dsn: str, runs: int, count: int) -> dict[str, list[float]]:
    conn = await asyncpg.connect(dsn)
    figures: dict[str, list[float]] = {"previous": [], "current": []}
    try:
        for _ in range(runs):
            for name, sql in (("previous", PREVIOUS_RESET), ("current", RESET_SESSION)):
                started = time.perf_counter()
                for _ in range(count):
                    await conn.execute(sql)
                figures[name].append((time.perf_counter() - started) / count * 1e6)
    finally:
        await conn.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    dsn = os.environ["BENCH_PG_DSN"]
    for kind in ("psycopg", "sqlalchemy"):
        figures: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.runs):
            for reset in (False, True):
                figures[reset].append(asyncio.run(_per_unit(kind, dsn, reset, args.units)))
        without, with_reset = (statistics.median(figures[r]) for r in (False, True))
        print(
            f"{kind:10} µs per unit of work: reset_session=False {without:7.1f}, "
            f"True {with_reset:7.1f} (+{with_reset - without:.1f})"
        )
    figures = asyncio.run(_statements(dsn, args.runs * 3, args.units))
    previous, current = (statistics.median(figures[k]) for k in ("previous", "current"))
    print(
        f"reset alone µs (asyncpg): previous {previous:7.1f}, current {current:7.1f} "
        f"({current - previous:+.1f})"
    )


if __name__ == "__main__":
    main()
