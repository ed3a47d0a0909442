"""Counters never go back when the Lifecycles an exporter reads change, in a single process:
one of two apps stopping, an app built again (the pattern for tests), a Lifecycle run again
or garbage-collected. Counted against a real PostgreSQL through asyncpg pools, with both
exporters on the same Lifecycles: Prometheus (a falling ``_total`` is a counter reset, so
``increase()`` counts twice) and OpenTelemetry (an observable counter's callback returns
cumulative values: one that falls gives a delta backend a negative count).
"""

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from prometheus_client import CollectorRegistry

import tether
from tests.asgi.test_opentelemetry import Point, key
from tests.asgi.test_prometheus import sample, samples
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.metrics import opentelemetry as totel
from tether.metrics import prometheus as tprom
from tether.metrics.opentelemetry import POOL_NAME, SCOPE


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with Postgres() as server:
        yield server


def build(dsn: str) -> tuple[tether.Lifecycle, FastAPI]:
    """An app with an asyncpg pool ``pg`` (one connection made at its start) and a request's
    connection ``conn`` drawn from it, serving ``/q``."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, dsn, name="pg", min_size=1, max_size=2)
    conn = tpg.connection(lc, pool, name="conn")
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/q")
    async def q(c: Annotated[asyncpg.Connection, Depends(conn)]) -> int:
        return int(await c.fetchval("SELECT 1"))

    return lc, app


@asynccontextmanager
async def serving(lc: tether.Lifecycle, app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """*app* running (its lifespan: the pool open), and a client of it."""
    transport = httpx.ASGITransport(app=app)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        yield client


async def requests(client: httpx.AsyncClient, n: int) -> None:
    for _ in range(n):
        assert (await client.get("/q")).status_code == 200


class Exporters:
    """A Prometheus registry and a meter provider with a cumulative and a delta reader, every
    Lifecycle registered on both; each read checks that no delta of a counter is negative."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.cumulative = InMemoryMetricReader()
        self.delta = InMemoryMetricReader(
            preferred_temporality={ObservableCounter: AggregationTemporality.DELTA}
        )
        self.provider = MeterProvider(metric_readers=[self.cumulative, self.delta])
        self.deltas: list[dict[Point, float]] = []

    def register(self, lc: tether.Lifecycle) -> None:
        tprom.register(lc, self.registry)
        totel.register(lc, self.provider)

    def read(self) -> tuple[dict[Any, float], dict[Point, float]]:
        """The Prometheus samples and the cumulative OpenTelemetry points now."""
        deltas = points(self.delta, monotonic_only=True)
        negative = {point: value for point, value in deltas.items() if value < 0}
        assert not negative, f"a counter went back: {negative}"
        self.deltas.append(deltas)
        return samples(self.registry), points(self.cumulative)

    def shutdown(self) -> None:
        self.provider.shutdown()


def points(reader: InMemoryMetricReader, *, monotonic_only: bool = False) -> dict[Point, float]:
    found: dict[Point, float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if monotonic_only and not getattr(metric.data, "is_monotonic", False):
                    continue
                sums: Any = metric.data  # sums and gauges here: each point has a value
                for point in sums.data_points:
                    found[(metric.name, frozenset(point.attributes.items()))] = point.value
    return found


OPENS = sample("tether_resource_wait_time_seconds_count", pool_name="conn", scope="request")
CLOSES = sample("tether_resource_use_time_seconds_count", pool_name="conn", scope="request")
MADE = sample("db_client_connection_create_time_seconds_count", pool_name="pg", scope="app")
IN_USE = sample("tether_resource_in_use", pool_name="pg", scope="app")
RUNNING = sample("tether_lifecycle_running")
OTEL_OPENS = key("tether.resource.opens", **{POOL_NAME: "conn", SCOPE: "request"})
OTEL_MADE = key("tether.connection.created", **{POOL_NAME: "pg", SCOPE: "app"})
OTEL_RUNNING = key("tether.lifecycle.running")


@pytest.mark.servers
@pytest.mark.anyio
async def test_one_of_two_apps_stopping_takes_nothing_off_the_counters(
    postgres: Postgres,
) -> None:
    """Two apps in one process on the same registry and meter provider: when one stops, its
    opens and its pool's connections made stay counted (Prometheus, OpenTelemetry cumulative;
    a delta of 0, not a negative one), while what it had open or running drops out."""
    exporters = Exporters()
    first, first_app = build(postgres.dsn)
    second, second_app = build(postgres.dsn)
    exporters.register(first)
    exporters.register(second)
    try:
        async with serving(second, second_app) as second_client:
            async with serving(first, first_app) as first_client:
                await requests(first_client, 5)
                await requests(second_client, 2)
                prom, otel = exporters.read()
                made = sum(lc.stats().pools["pg"].created or 0 for lc in (first, second))
                assert made >= 2  # each pool made its first connection at least
                assert (prom[OPENS], prom[CLOSES], prom[MADE], prom[IN_USE]) == (7, 7, made, 2)
                assert (otel[OTEL_OPENS], otel[OTEL_MADE]) == (7, made)
            # The first app stopped (its pool closed); the second runs on.
            prom, otel = exporters.read()
            assert (prom[OPENS], prom[CLOSES], prom[MADE]) == (7, 7, made)
            assert (prom[IN_USE], prom[RUNNING]) == (1, 1)  # the second's pool only
            assert (otel[OTEL_OPENS], otel[OTEL_MADE]) == (7, made)
            assert exporters.deltas[-1][OTEL_OPENS] == 0
            await requests(second_client, 1)
            prom, otel = exporters.read()
            assert (prom[OPENS], otel[OTEL_OPENS], exporters.deltas[-1][OTEL_OPENS]) == (8, 8, 1)
        prom, otel = exporters.read()
        assert (prom[OPENS], prom[CLOSES], prom[MADE], prom[RUNNING]) == (8, 8, made, 0)
        assert (otel[OTEL_OPENS], otel[OTEL_MADE], otel[OTEL_RUNNING]) == (8, made, 0)
    finally:
        exporters.shutdown()


@pytest.mark.servers
def test_an_app_built_again_or_run_again_counts_on(postgres: Postgres) -> None:
    """An app built again in the same process (one per test) adds to the counts of the one
    before; a Lifecycle run again goes on from its own counts (not counted twice), its new
    pool's connections added to the old one's. Every delta is 0 or more."""
    exporters = Exporters()
    made = opened = 0

    async def serve(lc: tether.Lifecycle, app: FastAPI, n: int) -> None:
        """Run *app*, serve *n* requests, and check both exporters while it runs."""
        nonlocal made, opened
        async with serving(lc, app) as client:
            await requests(client, n)
            opened += n
            prom, otel = exporters.read()
            made += lc.stats().pools["pg"].created or 0
            assert (prom[OPENS], prom[CLOSES]) == (opened, opened)
            assert (prom[MADE], prom[IN_USE]) == (made, 1)
            assert (otel[OTEL_OPENS], otel[OTEL_MADE]) == (opened, made)

    try:
        lifecycles = []
        for n in (3, 4):
            lc, app = build(postgres.dsn)
            exporters.register(lc)
            asyncio.run(serve(lc, app, n))
            prom, otel = exporters.read()
            assert (prom[OPENS], prom[MADE], prom[RUNNING]) == (opened, made, 0)
            assert (otel[OTEL_OPENS], otel[OTEL_MADE]) == (opened, made)
            lifecycles.append((lc, app))
        assert opened == 7

        # The last Lifecycle runs again: its resources' counts go on from 4, its pool is new.
        lc, app = lifecycles[-1]
        asyncio.run(serve(lc, app, 2))
        assert lc.stats()["conn"].opened == 6
        assert opened == 9

        prom, otel = exporters.read()  # both closed: every one's counts, the last one's gauges
        assert (prom[OPENS], prom[CLOSES], prom[MADE], prom[RUNNING]) == (9, 9, made, 0)
        assert (otel[OTEL_OPENS], otel[OTEL_MADE], otel[OTEL_RUNNING]) == (9, made, 0)
    finally:
        exporters.shutdown()


def test_retired_totals_stay_one_per_series() -> None:
    """Apps built, run and garbage-collected again and again on one registry and meter
    provider: each one's opens stay counted, the totals kept are one per series, and nothing of
    a Lifecycle garbage-collected stays."""
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    collector = None
    session_opens = sample(
        "tether_resource_wait_time_seconds_count", pool_name="session", scope="request"
    )
    otel_opens = key("tether.resource.opens", **{POOL_NAME: "session", SCOPE: "request"})
    for built in range(1, 21):
        lc = tether.Lifecycle()

        @lc.resource
        async def session() -> AsyncIterator[str]:
            yield "s"

        async def once(lc: tether.Lifecycle = lc, session: Any = session) -> None:
            async with lc.run(), lc.scope() as unit:
                await unit.get(session)

        collector = tprom.register(lc, registry)
        totel.register(lc, provider)
        asyncio.run(once())
        assert samples(registry)[session_opens] == built
        assert points(reader)[otel_opens] == built
        del lc, session, once
        gc.collect()
    assert collector is not None
    assert collector.lifecycles == []
    found = samples(registry)
    assert (found[session_opens], points(reader)[otel_opens]) == (20, 20)
    assert sample("tether_resource_in_use", pool_name="session", scope="request") not in found
    totals = collector._totals
    assert not totals._seen  # no Lifecycle alive
    assert len(totals._retired) == 7  # the resource's 6 (errors: open, close), units refused
    provider.shutdown()


TIMEOUTS = sample("db_client_connection_timeouts_total", pool_name="pg", scope="app")


@pytest.mark.servers
@pytest.mark.anyio
async def test_a_lifecycle_run_again_counts_its_pools_timeouts_once(postgres: Postgres) -> None:
    """A pool's timeouts (its connection resource's waits that ran out, which the Lifecycle
    keeps across runs) seen while the app ran, then while it was closed, then in a second
    run with none: one timeout. The series was retired when it was not reported (the app
    closed) and added again when it was: 2."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, name="pg", min_size=1, max_size=1, acquire_timeout=0.2)
    conn = tpg.connection(lc, pool, name="conn")
    exporters = Exporters()
    exporters.register(lc)
    try:
        async with lc.run(), lc.scope("holds it") as first:
            await first.get(conn)
            with pytest.raises(tether.ResourceUnavailable):
                async with lc.scope("times out") as second:
                    await second.get(conn)
            assert exporters.read()[0][TIMEOUTS] == 1
        assert exporters.read()[0][TIMEOUTS] == 1  # closed: its last figures stand
        async with lc.run():
            assert exporters.read()[0][TIMEOUTS] == 1
        assert exporters.read()[0][TIMEOUTS] == 1
        assert lc.stats()["conn"].timeouts == 1
    finally:
        exporters.shutdown()


def test_two_scrapes_at_once_count_what_happened_once() -> None:
    """Two scrapes at once (an HA pair of Prometheus servers, prometheus-client's threaded
    server): one read the figures, a request was served, the other read and added them up
    first; the first, adding up its older figures next, took them for a pool started again
    and counted the newer ones twice, for good. Scrapes take turns now."""
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    registry = CollectorRegistry()
    tprom.register(lc, registry)
    real = lc.stats
    read, go_on = threading.Event(), threading.Event()

    def stats() -> Any:
        figures = real()
        if not read.is_set():  # the first scrape pauses once it has read
            read.set()
            assert go_on.wait(5)
        return figures

    conn.counters.opened = 10  # requests served
    lc.stats = stats  # type: ignore[method-assign]
    first = threading.Thread(target=samples, args=(registry,))
    first.start()
    assert read.wait(5)
    conn.counters.opened = 12  # two more while the first scrape runs
    second = threading.Thread(target=samples, args=(registry,))
    second.start()
    second.join(0.5)  # it waits for the first (it used to add up first)
    go_on.set()
    first.join(5)
    second.join(5)
    count = sample("tether_resource_wait_time_seconds_count", pool_name="conn", scope="request")
    assert samples(registry)[count] == 12


MADE_BY_PG = sample("db_client_connection_create_time_seconds_count", pool_name="pg", scope="app")


@pytest.mark.servers
def test_a_pool_opened_again_between_two_reads_adds_its_connections(postgres: Postgres) -> None:
    """A Lifecycle run twice, read only while each run was open: the second run's pool is a
    new one, whose count (1) had reached the first one's (1) at its first read and was taken
    for the same pool's: 1 connection made, not 2. Each run's pool counts now."""
    lc, app = build(postgres.dsn)
    exporters = Exporters()
    exporters.register(lc)

    async def serve() -> tuple[float, float]:
        async with serving(lc, app) as client:
            await requests(client, 1)
            prom, otel = exporters.read()
            return prom[MADE_BY_PG], otel[OTEL_MADE]

    try:
        first = asyncio.run(serve())
        made = lc.stats().pools.get("pg")
        assert made is None  # closed: no pool figures
        second = asyncio.run(serve())
        assert (first, second) == ((1, 1), (2, 2))
    finally:
        exporters.shutdown()
