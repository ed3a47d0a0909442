"""OpenTelemetry metrics read from `lc.stats()`, collected by the OpenTelemetry SDK."""

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import tether
from tests.asgi.test_prometheus import pools_with_timeouts, time_out_each
from tether.metrics.opentelemetry import POOL_NAME, SCOPE, STATE, register

Point = tuple[str, frozenset[tuple[str, Any]]]


def collect(reader: InMemoryMetricReader) -> tuple[dict[Point, float], dict[str, Any]]:
    """Every data point the SDK collected now, by (metric name, attributes); and each metric."""
    points: dict[Point, float] = {}
    found: dict[str, Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "tether"
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
                for point in metric.data.data_points:
                    points[(metric.name, frozenset(point.attributes.items()))] = point.value
    return points, found


def key(name: str, **attributes: str) -> Point:
    return (name, frozenset(attributes.items()))


def test_metrics_follow_requests() -> None:
    """Two requests that open a session, one whose resource fails to open: the collection
    shows the opens, closes, failures and values in use, with the conventions' names."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "p"

    @lc.resource
    async def session(pool: str) -> AsyncIterator[str]:
        yield "s"

    @lc.resource
    async def broken() -> AsyncIterator[str]:
        raise RuntimeError("cannot open")
        yield "never"

    reader = InMemoryMetricReader()
    register(lc, MeterProvider(metric_readers=[reader]))
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(s: Annotated[str, Depends(session)]) -> str:
        return s

    @app.get("/broken")
    async def uses_broken(b: Annotated[str, Depends(broken)]) -> str:
        return b

    sess = {POOL_NAME: "session", SCOPE: "request"}
    app_pool = {POOL_NAME: "pool", SCOPE: "app"}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/broken").status_code == 500
        points, found = collect(reader)
    assert points[key("tether.resource.in_use", **sess)] == 0
    assert points[key("tether.resource.in_use", **app_pool)] == 1
    # No driver pool (no `pool_stats`), so no connections of one.
    assert not any(name == "db.client.connection.count" for name, _ in points)
    assert points[key("tether.resource.opens", **sess)] == 2
    assert points[key("tether.resource.closes", **sess)] == 2
    assert points[key("tether.resource.max_in_use", **sess)] == 1
    assert points[key("tether.resource.wait_time", **sess)] > 0
    assert points[key("tether.resource.use_time", **sess)] > 0
    assert points[key("tether.resource.timeouts", **sess)] == 0
    broken_attrs = {POOL_NAME: "broken", SCOPE: "request"}
    assert points[key("tether.resource.errors", **broken_attrs, **{"tether.phase": "open"})] == 1
    assert points[key("tether.resource.errors", **broken_attrs, **{"tether.phase": "close"})] == 0
    assert points[key("tether.resource.leaks", **sess)] == 0
    assert points[key("tether.units.in_flight")] == 0
    assert points[key("tether.units.refused")] == 0
    assert points[key("tether.lifecycle.running")] == 1
    # The conventions' kinds and units: values in use go up and down; times are seconds.
    assert found["tether.resource.in_use"].data.is_monotonic is False
    assert found["tether.resource.in_use"].unit == "{value}"
    assert found["tether.resource.opens"].data.is_monotonic is True
    assert found["tether.resource.wait_time"].unit == "s"
    # After shutdown: not running, nothing in use.
    points, _ = collect(reader)
    assert points[key("tether.lifecycle.running")] == 0
    assert points[key("tether.resource.in_use", **app_pool)] == 0


# Made-up pool figures: connections in use at the app's shutdown too (no real pool).
@pytest.mark.tether_unchecked
def test_a_driver_pool_reports_its_own_connections() -> None:
    """For a pool with the driver's figures (as the integrations set), the instruments show
    its used and idle connections, its maximum and the requests waiting (where known)."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def pg() -> str:
        return "pool"

    @lc.resource(scope="app")
    def engine() -> str:
        return "engine"

    pg.pool_stats = lambda p: tether.PoolStats(
        name="pg", max=10, open=4, in_use=3, idle=1, waiting=2, created=6, create_time=0.03,
        discarded=2,
    )  # fmt: skip
    engine.pool_stats = lambda p: tether.PoolStats(
        name="engine", max=5, open=1, in_use=0, idle=1, waiting=None
    )
    reader = InMemoryMetricReader()
    register(lc, MeterProvider(metric_readers=[reader]))
    with TestClient(FastAPI(lifespan=lc.lifespan)):
        points, found = collect(reader)
    pg_attrs = {POOL_NAME: "pg", SCOPE: "app"}
    engine_attrs = {POOL_NAME: "engine", SCOPE: "app"}
    assert points[key("db.client.connection.count", **pg_attrs, **{STATE: "used"})] == 3
    assert points[key("db.client.connection.count", **pg_attrs, **{STATE: "idle"})] == 1
    assert points[key("db.client.connection.max", **pg_attrs)] == 10
    assert points[key("db.client.connection.pending_requests", **pg_attrs)] == 2
    assert found["db.client.connection.count"].data.is_monotonic is False
    assert found["db.client.connection.count"].unit == "{connection}"
    assert points[key("db.client.connection.max", **engine_attrs)] == 5
    assert key("db.client.connection.pending_requests", **engine_attrs) not in points
    assert points[key("tether.connection.created", **pg_attrs)] == 6
    assert points[key("tether.connection.create_time", **pg_attrs)] == 0.03
    assert points[key("tether.connection.discarded", **pg_attrs)] == 2
    assert key("tether.connection.created", **engine_attrs) not in points  # not known


def make(*names: str) -> tuple[tether.Lifecycle, list[tether.Resource[str]]]:
    """A Lifecycle with a request resource of each name."""
    lc = tether.Lifecycle()
    resources = []
    for name in names:

        async def factory() -> AsyncIterator[str]:
            yield "x"

        resources.append(lc.resource(name=name)(factory))
    return lc, resources


async def use(lc: tether.Lifecycle, *resources: tether.Resource[str]) -> None:
    """Open and close each resource once, in a unit of work of *lc* (which runs)."""
    async with lc.scope() as unit:
        for res in resources:
            await unit.get(res)


def opens(pool_name: str) -> Point:
    return key("tether.resource.opens", **{POOL_NAME: pool_name, SCOPE: "request"})


def max_in_use(pool_name: str) -> Point:
    return key("tether.resource.max_in_use", **{POOL_NAME: pool_name, SCOPE: "request"})


def test_two_lifecycles_on_one_meter_provider_are_both_exported() -> None:
    """Two Lifecycles on a meter provider: one set of instruments, whose callbacks report
    both; what they both report (a resource of the same name, the units of work) is added
    up, and the lifecycle runs while either does."""
    a, (a_session, a_only) = make("session", "a")
    b, (b_session, b_only) = make("session", "b")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = register(a, provider)
    assert register(b, provider) == instruments
    assert len(instruments) == 20

    async def main() -> dict[Point, float]:
        async with a.run(), b.run():
            await use(a, a_session, a_only)
            await use(b, b_session, b_only)
            await use(b, b_only)
            async with a.scope():
                return collect(reader)[0]

    points = asyncio.run(main())
    assert points[opens("a")] == 1
    assert points[opens("b")] == 2
    assert points[opens("session")] == 2
    assert points[key("tether.units.in_flight")] == 1
    assert points[key("tether.lifecycle.running")] == 1


def test_the_same_lifecycle_registered_twice_is_reported_once() -> None:
    lc, (res,) = make("session")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    assert register(lc, provider) == register(lc, provider)

    async def main() -> dict[Point, float]:
        async with lc.run():
            await use(lc, res)
            return collect(reader)[0]

    assert asyncio.run(main())[opens("session")] == 1


def test_a_lifecycle_garbage_collected_drops_out() -> None:
    """The instruments hold their Lifecycles weakly: one gone (a finished test's app) is no
    longer exported, and nothing of it stays alive."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    kept = make("kept")[0]
    gone = make("gone")[0]
    register(gone, provider)
    register(kept, provider)
    ref = weakref.ref(gone)
    del gone
    gc.collect()
    assert ref() is None
    points, _ = collect(reader)
    assert key("tether.resource.in_use", **{POOL_NAME: "kept", SCOPE: "request"}) in points
    assert key("tether.resource.in_use", **{POOL_NAME: "gone", SCOPE: "request"}) not in points


def test_an_app_built_again_reports_the_new_lifecycle() -> None:
    """An app built per test on one meter provider: the new Lifecycle's gauges are exported,
    not the first one's (closed, still referenced); once both are closed, the one registered
    last. The counters add up both: a cumulative count never goes back."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counts = []
    lifecycles = []
    for requests in (1, 2):
        lc = tether.Lifecycle()

        @lc.resource
        async def session() -> AsyncIterator[str]:
            yield "s"

        register(lc, provider)
        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        async def root(s: Annotated[str, Depends(session)]) -> str:
            return s

        with TestClient(app) as client:
            for _ in range(requests):
                client.get("/")
            points = collect(reader)[0]
            counts.append((points[opens("session")], points[max_in_use("session")]))
        lifecycles.append(lc)  # still referenced, and closed
    assert counts == [(1, 1), (3, 1)]
    points = collect(reader)[0]
    assert (points[opens("session")], points[key("tether.lifecycle.running")]) == (3, 0)


# Made-up pool figures: connections in use at the app's shutdown too (no real pool).
@pytest.mark.tether_unchecked
def test_connection_instruments_are_per_driver_pool() -> None:
    """Only driver pools have ``db.client.connection.count`` and ``.timeouts`` points, so their
    sum is the pools' connections; every resource's values open now are
    ``tether.resource.in_use``. A timeout counts under the pool the resource draws from
    (directly or through another resource), and every resource's under
    ``tether.resource.timeouts``; one drawing from two pools, or from none, only there."""
    lc, (conn, *timing_out) = pools_with_timeouts()
    reader = InMemoryMetricReader()
    register(lc, MeterProvider(metric_readers=[reader]))

    async def main() -> tuple[dict[Point, float], dict[str, Any]]:
        async with lc.run():
            await time_out_each(lc, timing_out)
            async with lc.scope() as unit:
                await unit.get(conn)  # one connection of pg in use (its figures say 1)
                return collect(reader)

    points, found = asyncio.run(main())
    pg = {POOL_NAME: "pg", SCOPE: "app"}
    cache = {POOL_NAME: "cache", SCOPE: "app"}
    counts = {
        attrs: v for (name, attrs), v in points.items() if name == "db.client.connection.count"
    }
    assert counts == {
        key("", **pg, **{STATE: "used"})[1]: 1,
        key("", **pg, **{STATE: "idle"})[1]: 1,
        key("", **cache, **{STATE: "used"})[1]: 0,
        key("", **cache, **{STATE: "idle"})[1]: 0,
    }
    for name, scope, in_use in [("settings", "app", 1), ("pg", "app", 1), ("conn", "request", 1),
                                ("waits", "request", 0)]:  # fmt: skip
        assert points[key("tether.resource.in_use", **{POOL_NAME: name, SCOPE: scope})] == in_use
    assert found["tether.resource.in_use"].data.is_monotonic is False
    pool_timeouts = {
        attrs: v for (name, attrs), v in points.items() if name == "db.client.connection.timeouts"
    }
    assert pool_timeouts == {key("", **pg)[1]: 2, key("", **cache)[1]: 0}
    for name in ("waits", "through", "both", "alone"):
        assert points[key("tether.resource.timeouts", **{POOL_NAME: name, SCOPE: "request"})] == 1
    assert points[key("tether.resource.timeouts", **{POOL_NAME: "conn", SCOPE: "request"})] == 0
    assert found["tether.resource.timeouts"].data.is_monotonic is True


def test_the_attribute_names_are_exported_for_views_and_filters() -> None:
    from tether.metrics import opentelemetry as totel

    assert sorted(totel.__all__) == ["PHASE", "POOL_NAME", "SCOPE", "STATE", "register"]
    assert (totel.POOL_NAME, totel.SCOPE, totel.STATE, totel.PHASE) == (
        "db.client.connection.pool.name",
        "tether.resource.scope",
        "db.client.connection.state",
        "tether.phase",
    )
