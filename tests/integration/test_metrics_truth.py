"""Metrics and readiness tell the truth under stress (reliability.md, test 18), against a real
PostgreSQL.

* A scripted run with a known number of units of work, of forced acquire timeouts and of
  connections held: the exported OpenTelemetry values equal what happened, and the pool's
  figures equal the server's own count of its backends (``pg_stat_activity``); sampled every
  10 ms, the pool never reports more connections than its maximum, nor does the server see
  more.
* With every connection in use, the readiness probe answers at once (a probe that queued
  behind the traffic would fail its timeout and take a busy instance out of rotation); with
  units of work waiting and none served for longer than the acquire timeout, it says the pool
  is stuck, at once too.

The soak half of test 18 is ``make soak`` (``tests/soak.py``); a short run of it is in
``test_soak.py``.
"""

import asyncio
import re
import time
import uuid
from typing import Annotated, Any

import anyio
import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import tether
from tests.asgi.test_opentelemetry import collect, key
from tests.integration.drivers import backends, health_at_once, scalar, settled
from tests.servers import Postgres
from tether.fastapi import health_router
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa
from tether.metrics.opentelemetry import POOL_NAME, SCOPE, STATE, register

pytestmark = [pytest.mark.servers, pytest.mark.anyio]


# --------------------------------------------------------------------------- readiness


def asyncpg_pool(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    pool = tpg.pool(lc, pg.dsn, name="pg", min_size=2, max_size=2, acquire_timeout=1.0)
    return tpg.connection(lc, pool)


def psycopg_pool(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    pool = tpsy.pool(lc, pg.dsn, name="pg", min_size=2, max_size=2, timeout=1.0)
    return tpsy.connection(lc, pool)


def sqlalchemy_engine(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), name="pg", pool_size=2, pool_timeout=1)
    return tsa.session(lc, engine)


def sqlalchemy_sync_engine(lc: tether.Lifecycle, pg: Postgres) -> tether.Resource[Any]:
    engine = tsa.sync_engine(lc, pg.url("postgresql+psycopg"), name="pg", pool_size=2,
                             pool_timeout=1)  # fmt: skip
    return tsa.sync_session(lc, engine)


@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    ("make", "timeout_name"),
    [(asyncpg_pool, "acquire_timeout"), (psycopg_pool, "timeout"),
     (sqlalchemy_engine, "pool_timeout"), (sqlalchemy_sync_engine, "pool_timeout")],
    ids=["asyncpg", "psycopg", "sqlalchemy", "sqlalchemy-sync"],
)  # fmt: skip
async def test_readiness_answers_at_once_with_every_connection_in_use(
    postgres: Postgres, make: Any, timeout_name: str
) -> None:
    lc = tether.Lifecycle(check_timeout=3.0)
    conn = make(lc, postgres)
    async with lc.run():
        report = await lc.health()
        assert report.ok, report.as_dict()
        assert report["pg"].detail is None

        release, asking = anyio.Event(), True
        held: list[int] = []

        async def hold() -> None:
            async with lc.scope() as s:
                assert await scalar(await s.get(conn), "SELECT 1") == 1
                held.append(1)
                await release.wait()

        async def ask(delay: float) -> None:
            # A unit of work waiting for a connection; it times out (503) and asks again.
            await anyio.sleep(delay)
            while asking:
                try:
                    async with lc.scope() as s:
                        await s.get(conn)
                except tether.ResourceUnavailable:
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            tg.start_soon(hold)
            with anyio.fail_after(5):
                while len(held) < 2:
                    await anyio.sleep(0.01)
            served_at = time.monotonic()
            for delay in (0.0, 0.25, 0.5):
                tg.start_soon(ask, delay)
            await anyio.sleep(0.6)

            # Busy: every connection in use, units waiting, one handed out 0.6 s ago.
            report = await health_at_once(lc)
            assert report.ok, report.as_dict()
            detail = report["pg"].detail or ""
            assert re.fullmatch(
                r"busy: all 2 connections in use, \d+ waiting; "
                r"one was handed out \d+\.\d s ago",
                detail,
            ), detail

            # Stuck: units waiting, and none handed out for longer than the wait they get,
            # once their waits time out (after 1 s; later on a loaded machine).
            await anyio.sleep(max(0.0, served_at + 1.5 - time.monotonic()))
            report = await health_at_once(lc)
            while report.ok and time.monotonic() < served_at + 6:
                await anyio.sleep(0.1)
                report = await health_at_once(lc)
            assert not report.ok
            error = report["pg"].error or ""
            assert re.fullmatch(
                r"saturated: all 2 connections in use, \d+ waiting, and none handed out "
                rf"for \d+\.\d s \(longer than {timeout_name}=1 s\): the queries holding "
                r"them are stuck, or the database stopped answering; held by 2 units of work "
                r"\(2 scope\), the oldest for \d+\.\d s: what they wait on may be another "
                r"service",
                error,
            ), error

            asking = False
            release.set()
        # Traffic gone: the check runs again, and passes.
        report = await lc.health()
        assert report.ok, report.as_dict()
        assert report["pg"].detail is None


# --------------------------------------------------------------------------- metrics


async def test_exported_metrics_equal_what_happened(postgres: Postgres) -> None:
    app_name = f"truth-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(
        lc, postgres.dsn, name="pg", min_size=1, max_size=3, acquire_timeout=0.3,
        server_settings={"application_name": app_name},
    )  # fmt: skip
    tx = tpg.connection(lc, pool, name="tx", transaction=True)
    reader = InMemoryMetricReader()
    register(lc, MeterProvider(metric_readers=[reader]))
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc))

    @app.get("/q")
    async def q(c: Annotated[asyncpg.Connection, Depends(tx)], hold: float = 0.0) -> int:
        await c.execute("SELECT pg_sleep($1)", hold)
        return 1

    over: list[str] = []  # invariant breaches seen by the samplers
    done = anyio.Event()

    async def sample_pool() -> None:
        while not done.is_set():
            p = lc.stats().pools.get("pg")
            if p is not None and (p.in_use or 0) + (p.idle or 0) > 3:
                over.append(f"pool: {p}")
            await anyio.sleep(0.01)

    async def sample_server() -> None:
        while not done.is_set():
            if (n := await backends(postgres, app_name)) > 3:
                over.append(f"server: {n} backends")
            await anyio.sleep(0.05)

    transport = httpx.ASGITransport(app=app)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        anyio.create_task_group() as samplers,
    ):
        samplers.start_soon(sample_pool)
        samplers.start_soon(sample_server)
        statuses: list[int] = []
        for _ in range(10):
            statuses.append((await client.get("/q")).status_code)

        refused: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                # 2 s: the quick ones' 0.3 s waits end in it (a 503 each) with 1.7 s to spare
                statuses.append((await client.get("/q", params={"hold": 2.0})).status_code)

            async def quick() -> None:
                refused.append(await client.get("/q"))

            for _ in range(3):
                tg.start_soon(slow)
            with anyio.fail_after(5):
                while (lc.stats().pools["pg"].in_use or 0) < 3:
                    await anyio.sleep(0.01)
            # Probed before the quick ones wait: once their waits fail (0.3 s, sooner than a
            # loaded machine may get to the probe after them), the pool reads saturated.
            ready = await client.get("/health/ready")
            assert ready.status_code == 200, ready.text
            pg_check = ready.json()["checks"]["pg"]
            assert pg_check["detail"].startswith("busy: all 3 connections")
            # Not queued behind the 2 s holds (it would wait acquire_timeout, 300 ms, then
            # fail): read from the pool's figures, a few lines run without awaiting, which a
            # loaded machine's busy event loop cannot stretch as it can the request's time.
            assert pg_check["latency_ms"] < 250, pg_check
            for _ in range(4):
                tg.start_soon(quick)
        for _ in range(5):
            statuses.append((await client.get("/q")).status_code)
        done.set()

        assert statuses == [200] * 18
        assert [r.status_code for r in refused] == [503] * 4
        assert all("Retry-After" in r.headers for r in refused)
        assert over == []

        points, _ = collect(reader)
        at_rest = await backends(postgres, app_name)
    conn = {POOL_NAME: "tx", SCOPE: "request"}
    pg = {POOL_NAME: "pg", SCOPE: "app"}
    assert points[key("tether.resource.opens", **conn)] == 18
    assert points[key("tether.resource.closes", **conn)] == 18
    assert points[key("tether.resource.timeouts", **conn)] == 4
    assert points[key("db.client.connection.timeouts", **pg)] == 4  # the pool's, per pool
    assert points[key("tether.resource.errors", **conn, **{"tether.phase": "open"})] == 4
    assert points[key("tether.resource.errors", **conn, **{"tether.phase": "close"})] == 0
    assert points[key("tether.resource.max_in_use", **conn)] == 3
    assert points[key("tether.resource.leaks", **conn)] == 0
    assert points[key("tether.resource.in_use", **conn)] == 0
    assert key("db.client.connection.count", **conn, **{STATE: "used"}) not in points
    # The pool's own figures, against the server's.
    assert points[key("db.client.connection.count", **pg, **{STATE: "used"})] == 0
    assert points[key("db.client.connection.count", **pg, **{STATE: "idle"})] == at_rest
    assert 1 <= at_rest <= 3
    assert points[key("db.client.connection.max", **pg)] == 3
    assert points[key("db.client.connection.pending_requests", **pg)] == 0
    # One connection at startup (min_size=1), two more for the three slow requests.
    assert points[key("tether.connection.created", **pg)] == 3
    assert points[key("tether.connection.create_time", **pg)] > 0
    assert points[key("tether.connection.discarded", **pg)] == 0
    assert points[key("tether.units.in_flight")] == 0
    # And once the app has stopped, the server has no backend of it left.
    assert await backends(postgres, app_name) == 0


# ------------------------------------------------------- connections made and discarded


def asyncpg_counted(lc: tether.Lifecycle, pg: Postgres, app_name: str) -> tether.Resource[Any]:
    pool = tpg.pool(lc, pg.dsn, name="pg", min_size=2, max_size=2,
                    server_settings={"application_name": app_name})  # fmt: skip
    return tpg.connection(lc, pool, transaction=True)


def psycopg_counted(lc: tether.Lifecycle, pg: Postgres, app_name: str) -> tether.Resource[Any]:
    pool = tpsy.pool(lc, pg.dsn, name="pg", min_size=2, max_size=2,
                     kwargs={"application_name": app_name})  # fmt: skip
    return tpsy.connection(lc, pool, transaction=True)


def sqlalchemy_counted(lc: tether.Lifecycle, pg: Postgres, app_name: str) -> tether.Resource[Any]:
    engine = tsa.engine(lc, pg.url("postgresql+asyncpg"), name="pg", pool_size=2,
                        application_name=app_name)  # fmt: skip
    return tsa.session(lc, engine)


@pytest.mark.fastapi_free
@pytest.mark.parametrize(
    "make",
    [asyncpg_counted, psycopg_counted, sqlalchemy_counted],
    ids=["asyncpg", "psycopg", "sqlalchemy"],
)
async def test_a_pool_counts_the_connections_it_made_and_those_it_discarded(
    postgres: Postgres, make: Any
) -> None:
    """``created`` and ``create_time`` count the connections the pool made; ``discarded`` the
    one whose backend the server killed mid-query (nothing else), and the server's count of
    backends equals the pool's open connections."""
    app_name = f"made-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    conn = make(lc, postgres, app_name)

    async def unit(sql: str = "SELECT 1") -> Any:
        async with lc.scope() as s:
            return await scalar(await s.get(conn), sql)

    async with lc.run():
        for _ in range(5):
            assert await unit() == 1
        p = lc.stats().pools["pg"]
        assert p.discarded == 0
        assert p.created == p.open
        assert p.open is not None
        assert p.open >= 1
        assert p.create_time is not None
        assert p.create_time > 0

        # The server kills the backend of a unit of work while its query runs.
        victim = asyncio.ensure_future(unit("SELECT pg_sleep(30)"))
        sql = (
            f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app_name}' "
            f"AND query LIKE '%pg_sleep(30)%' AND state = 'active'"
        )
        with anyio.fail_after(5):
            while not (rows := await asyncio.to_thread(postgres.sql, sql)):
                await anyio.sleep(0.02)
        await asyncio.to_thread(postgres.sql, f"SELECT pg_terminate_backend({rows[0][0]})")
        with anyio.fail_after(5), pytest.raises(Exception):  # noqa: B017,PT011 - driver's
            await victim
        for _ in range(5):
            assert await unit() == 1

        try:
            await settled(lambda: lc.stats().pools["pg"].discarded == 1, "one discarded")
        finally:
            p = lc.stats().pools["pg"]
        assert p.discarded == 1, p
        # Every connection made is open now, or was discarded, or was retired.
        assert p.created is not None
        assert p.open is not None
        assert p.created >= p.open + 1, p

        # The killed backend stays in pg_stat_activity until its exit is done, a moment after its
        # client saw the error (longer on a loaded machine), so the server's count settles.
        async def as_many_backends_as_open() -> bool:
            return await backends(postgres, app_name) == lc.stats().pools["pg"].open

        try:
            await settled(as_many_backends_as_open, "as many backends as open connections", 5.0)
        finally:
            n, p = await backends(postgres, app_name), lc.stats().pools["pg"]
        assert n == p.open, p
