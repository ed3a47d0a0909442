"""What the integration tests run the same way on each driver's value."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

import tether
from tests.servers import Postgres

#: asyncpg before 0.32 (the floors run 0.30), whose cancellation was reworked in 0.32:
#: SQLAlchemy invalidates a connection whose query was cancelled, and asyncpg cancels one
#: whose acquire or check was; the sockets of those paths are left to the garbage collector
#: (a ResourceWarning in a later test; measured: 0.30 and 0.31 leak, 0.32 does not), and a
#: future of its own can be left with an error nobody retrieves.
ASYNCPG_BEFORE_0_32 = tuple(int(part) for part in asyncpg.__version__.split(".")[:2]) < (0, 32)


async def backends(pg: Postgres, app_name: str) -> int:
    """The server's count of the connections of *app_name* (ground truth)."""
    conn = await asyncpg.connect(pg.dsn, server_settings={"application_name": "truth"})
    try:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        return int(await conn.fetchval(sql, app_name))
    finally:
        await conn.close()


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
    """``lc.health()``, which must answer at once: a probe never queues behind traffic.

    Queued, a check waits for a connection a pool timeout (1 s or more) and is reported
    without a word of the busy or saturated pool (what the callers assert). Timed by each
    check's own latency, not the call's: a check answered from the pool's figures runs a
    few lines without awaiting, which a loaded machine's busy event loop cannot stretch (the
    call's wall clock it can, by a second or two, past any bound that told a queued check).
    A check that ran (redis-py 5's uncapped pool, which nothing queues behind) awaits its
    server, which a loaded machine can stretch: it is held only to finishing well within
    its check_timeout (5 s at most)."""
    t0 = time.monotonic()
    report = await lc.health()
    took = time.monotonic() - t0
    for check in report.checks:
        from_figures = check.detail is not None or (check.error or "").startswith("saturated")
        assert check.latency < (0.6 if from_figures else 5.0), (check, took)
    return report


# ---------------------------------------------- one unit-of-work resource per driver


@dataclass
class Driver:
    """One integration, set up on its own Lifecycle."""

    lc: tether.Lifecycle
    conn: tether.Resource[Any]
    scalar: Callable[[Any, str, tuple[Any, ...]], Awaitable[Any]]  # one value of a query
    checked_out: Callable[[], int]  # connections the driver's pool has handed out


def _asyncpg(dsn: str, app_name: str, release: str = "handler") -> Driver:
    from tether.integrations import asyncpg as tpg

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, dsn, min_size=2, max_size=2, server_settings={"application_name": app_name})
    conn = tpg.connection(lc, pool, transaction=True, release=release)  # type: ignore[arg-type]

    async def scalar(c: Any, sql: str, args: tuple[Any, ...]) -> Any:
        return await c.fetchval(sql.replace("%s", "$1"), *args)

    def checked_out() -> int:
        p = lc.get(pool)
        return int(p.get_size() - p.get_idle_size())

    return Driver(lc, conn, scalar, checked_out)


def _psycopg(dsn: str, app_name: str, release: str = "handler") -> Driver:
    from tether.integrations import psycopg as tpsy

    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, dsn, min_size=2, max_size=2, kwargs={"application_name": app_name})
    conn = tpsy.connection(lc, pool, transaction=True, release=release)  # type: ignore[arg-type]

    async def scalar(c: Any, sql: str, args: tuple[Any, ...]) -> Any:
        cur = await c.execute(sql, args)
        row = await cur.fetchone() if cur.description is not None else None
        return None if row is None else row[0]

    def checked_out() -> int:
        stats = lc.get(pool).get_stats()
        return int(stats.get("pool_size", 0) - stats.get("pool_available", 0))

    return Driver(lc, conn, scalar, checked_out)


def _named(sql: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """``%s`` placeholders as SQLAlchemy's named ones, with their values."""
    params = {f"p{i}": a for i, a in enumerate(args)}
    for name in params:
        sql = sql.replace("%s", f":{name}", 1)
    return sql, params


def _sqlalchemy(dsn: str, app_name: str, release: str = "handler") -> Driver:
    from sqlalchemy import text

    from tether.integrations import sqlalchemy as tsa

    lc = tether.Lifecycle()
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = tsa.engine(lc, url, pool_size=2, application_name=app_name)
    session = tsa.session(lc, engine, release=release)  # type: ignore[arg-type]

    async def scalar(s: Any, sql: str, args: tuple[Any, ...]) -> Any:
        statement, params = _named(sql, args)
        result = await s.execute(text(statement), params)
        return result.scalar() if result.returns_rows else None

    def checked_out() -> int:
        return int(lc.get(engine).pool.checkedout())

    return Driver(lc, session, scalar, checked_out)


def _sqlalchemy_sync(dsn: str, app_name: str, release: str = "handler") -> Driver:
    """A sync engine and session (psycopg): opened, used and closed in worker threads."""
    from sqlalchemy import text

    from tether.integrations import sqlalchemy as tsa

    lc = tether.Lifecycle()
    url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = tsa.sync_engine(lc, url, pool_size=2, application_name=app_name)
    session = tsa.sync_session(lc, engine, release=release)  # type: ignore[arg-type]

    async def scalar(s: Any, sql: str, args: tuple[Any, ...]) -> Any:
        statement, params = _named(sql, args)

        def run() -> Any:
            result = s.execute(text(statement), params)
            return result.scalar() if result.returns_rows else None

        return await anyio.to_thread.run_sync(run)

    def checked_out() -> int:
        return int(lc.get(engine).pool.checkedout())

    return Driver(lc, session, scalar, checked_out)


DRIVERS = {
    "asyncpg": _asyncpg,
    "psycopg": _psycopg,
    "sqlalchemy": _sqlalchemy,
    "sqlalchemy-sync": _sqlalchemy_sync,
}


async def settled(check: Callable[[], Any], what: str, timeout: float = 3.0) -> None:
    t0 = time.monotonic()
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not true within {timeout} s")
        await asyncio.sleep(0.02)


def set_read_only(pg: Postgres, on: bool) -> None:
    """Make the server read-only for every session, as a replica is (or writable again), and
    wait until new backends see it."""
    if on:
        pg.sql("ALTER SYSTEM SET default_transaction_read_only = on")
    else:
        pg.sql("ALTER SYSTEM RESET default_transaction_read_only")
    pg.sql("SELECT pg_reload_conf()")
    # pg_reload_conf() only signals the postmaster, which reloads when it gets to it (a
    # fixed sleep may end first on a loaded machine). Once a new backend sees the setting,
    # the postmaster has reloaded and passed the signal on: every backend applies it at its
    # next command.
    want = "on" if on else "off"
    deadline = time.monotonic() + 10
    while pg.sql("SHOW default_transaction_read_only") != [(want,)]:
        assert time.monotonic() < deadline, f"default_transaction_read_only is not {want}"
        time.sleep(0.02)
