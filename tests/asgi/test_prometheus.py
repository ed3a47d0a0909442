"""Prometheus metrics read from `lc.stats()`, served the usual way."""

import asyncio
import gc
import os
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Response
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import tether
from tether.metrics.prometheus import TetherCollector, register


def test_metrics_follow_requests() -> None:
    """After two requests, the scrape shows two opens and closes of the session, none in use."""
    lc = tether.Lifecycle()

    @lc.resource
    async def session() -> AsyncIterator[str]:
        yield "s"

    registry = CollectorRegistry()
    register(lc, registry)
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(s: Annotated[str, Depends(session)]) -> str:
        return s

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain")

    with TestClient(app) as client:
        client.get("/")
        client.get("/")
        text = client.get("/metrics").text
    assert 'tether_resource_in_use{pool_name="session",scope="request"} 0.0' in text
    assert "db_client_connection_count{" not in text  # no driver pool, no connections
    assert 'tether_resource_use_time_seconds_count{pool_name="session",scope="request"} 2.0' in text
    assert (
        'tether_resource_wait_time_seconds_count{pool_name="session",scope="request"} 2.0' in text
    )
    assert (
        'tether_resource_errors_total{phase="close",pool_name="session",scope="request"} 0.0'
        in text
    )
    assert "tether_lifecycle_running 1.0" in text


# Made-up pool figures: connections in use at the app's shutdown too (no real pool).
@pytest.mark.tether_unchecked
def test_a_driver_pool_reports_its_own_connections() -> None:
    """For a pool with the driver's figures (as the integrations set), the scrape shows its
    used and idle connections, its maximum and the requests waiting."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def pg() -> str:
        return "pool"

    pg.pool_stats = lambda p: tether.PoolStats(
        name="pg", max=10, open=4, in_use=3, idle=1, waiting=2, created=6, create_time=0.03,
        discarded=2,
    )  # fmt: skip
    registry = CollectorRegistry()
    register(lc, registry)
    app = FastAPI(lifespan=lc.lifespan)
    with TestClient(app):
        text = generate_latest(registry).decode()
    for line in [
        'db_client_connection_count{pool_name="pg",scope="app",state="used"} 3.0',
        'db_client_connection_count{pool_name="pg",scope="app",state="idle"} 1.0',
        'db_client_connection_max{pool_name="pg",scope="app"} 10.0',
        'db_client_connection_pending_requests{pool_name="pg",scope="app"} 2.0',
        'db_client_connection_create_time_seconds_count{pool_name="pg",scope="app"} 6.0',
        'db_client_connection_create_time_seconds_sum{pool_name="pg",scope="app"} 0.03',
        'tether_connection_discarded_total{pool_name="pg",scope="app"} 2.0',
    ]:
        assert line in text.splitlines(), line


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


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Each sample of a scrape, parsed as Prometheus would; fails on a family given twice."""
    text = generate_latest(registry).decode()
    assert text.count("# HELP db_client_connection_count ") <= 1, text
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def opens(pool_name: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return sample("tether_resource_wait_time_seconds_count", pool_name=pool_name, scope="request")


@pytest.fixture
def on_default_registry() -> Iterator[list[TetherCollector]]:
    """Collectors a test registers on the default REGISTRY, taken off it after the test."""
    collectors: list[TetherCollector] = []
    yield collectors
    for collector in dict.fromkeys(collectors):
        REGISTRY.unregister(collector)


def test_two_lifecycles_share_the_default_registry(
    on_default_registry: list[TetherCollector],
) -> None:
    """Two Lifecycles on the default registry (an app built per test, two apps in one
    process): no DuplicateTimeseries, one collector, and a scrape reports both."""
    a, (ra,) = make("a")
    b, (rb,) = make("b")
    on_default_registry.append(register(a))
    on_default_registry.append(register(b))
    assert on_default_registry[0] is on_default_registry[1]
    assert on_default_registry[0].lifecycles == [a, b]

    async def main() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with a.run(), b.run():
            await use(a, ra)
            await use(b, rb)
            await use(b, rb)
            return samples(REGISTRY)

    found = asyncio.run(main())
    assert found[opens("a")] == 1
    assert found[opens("b")] == 2
    assert found[sample("tether_lifecycle_running")] == 1


def test_taken_off_the_default_registry_a_new_collector_is_registered(
    on_default_registry: list[TetherCollector],
) -> None:
    """After ``REGISTRY.unregister(collector)`` (a test's cleanup), ``register`` puts a new
    collector on the registry instead of adding to the one taken off."""
    a, _ = make("a")
    first = register(a)
    REGISTRY.unregister(first)
    b, _ = make("b")
    second = register(b)
    on_default_registry.append(second)
    assert second is not first
    assert second.lifecycles == [b]
    assert sample("tether_resource_in_use", pool_name="b", scope="request") in samples(REGISTRY)


def test_two_lifecycles_on_one_registry_give_each_family_once() -> None:
    """Two Lifecycles on a registry: each family once (valid exposition), each Lifecycle's
    series in it; series they both report (a resource of the same name, the units of work)
    are added up, and the lifecycle runs while either does."""
    a, (a_session, a_only) = make("session", "a")
    b, (b_session,) = make("session")
    registry = CollectorRegistry()
    assert register(a, registry) is register(b, registry)

    async def main() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with a.run(), b.run():
            await use(a, a_session, a_only)
            await use(b, b_session)
            await use(b, b_session)
            async with a.scope():
                return samples(registry)

    found = asyncio.run(main())
    assert found[opens("session")] == 3
    assert found[opens("a")] == 1
    assert found[sample("tether_units_in_flight")] == 1
    assert found[sample("tether_lifecycle_running")] == 1
    assert found[sample("tether_resource_max_in_use", pool_name="session", scope="request")] == 2


def test_the_same_lifecycle_registered_twice_is_reported_once() -> None:
    lc, (res,) = make("session")
    registry = CollectorRegistry()
    collector = register(lc, registry)
    assert register(lc, registry) is collector
    assert collector.lifecycles == [lc]

    async def main() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with lc.run():
            await use(lc, res)
            return samples(registry)

    assert asyncio.run(main())[opens("session")] == 1


def test_a_lifecycle_garbage_collected_drops_out() -> None:
    """The collector holds its Lifecycles weakly: one gone (a finished test's app) is no
    longer scraped, and nothing of it stays alive; what it counted while scraped stays in
    the counters and summaries, which never go back."""
    registry = CollectorRegistry()
    kept = make("kept")[0]
    gone = make("gone")[0]
    register(kept, registry)
    collector = register(gone, registry)
    ref = weakref.ref(gone)
    del gone
    gc.collect()
    assert ref() is None
    assert collector.lifecycles == [kept]
    found = samples(registry)
    kept_count = sample("tether_resource_in_use", pool_name="kept", scope="request")
    assert kept_count in found
    assert not any(labels and ("pool_name", "gone") in labels for _, labels in found)
    assert found[sample("tether_units_refused_total")] == 0
    kept_opens = opens("kept")
    assert found[kept_opens] == 0
    del kept
    gc.collect()
    found = samples(registry)
    assert kept_count not in found  # none left: nothing open, nothing running
    assert sample("tether_lifecycle_running") not in found
    assert found[kept_opens] == 0  # the counters it was scraped with stay
    assert found[sample("tether_units_refused_total")] == 0
    assert generate_latest(CollectorRegistry()) == b""


def test_a_closed_lifecycle_drops_out_while_another_is_not_closed() -> None:
    """A Lifecycle whose app scope closed (the previous test's app, still referenced) is
    left out of the gauges while another is not closed; when all are closed, the one
    registered last is reported, so a lone app's final figures still reach the last scrape.
    Its counts stay in the counters and summaries, which never go back."""
    registry = CollectorRegistry()
    old, (old_session,) = make("session")
    new, (new_session,) = make("session")
    register(old, registry)

    async def main() -> None:
        async with old.run():
            await use(old, old_session)
            await use(old, old_session)

    max_in_use = sample("tether_resource_max_in_use", pool_name="session", scope="request")
    asyncio.run(main())
    found = samples(registry)
    assert (found[opens("session")], found[max_in_use]) == (2, 1)  # closed, but the only one
    register(new, registry)
    found = samples(registry)
    assert found[max_in_use] == 0  # the new one, not started yet
    assert found[sample("tether_lifecycle_running")] == 0
    assert found[opens("session")] == 2  # the old one's opens stay counted

    async def again() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with new.run():
            await use(new, new_session)
            return samples(registry)

    found = asyncio.run(again())
    assert (found[opens("session")], found[sample("tether_lifecycle_running")]) == (3, 1)
    found = samples(registry)  # both closed: the last registered, and every one's counts
    assert (found[opens("session")], found[max_in_use]) == (3, 1)


def pools_with_timeouts() -> tuple[tether.Lifecycle, list[tether.Resource[str]]]:
    """Two driver pools (their figures as the integrations set them) and a plain app
    resource; request resources that time out opening: one drawing from ``pg`` directly, one
    through ``conn``, one from both pools, one from none. Returns ``conn`` and those four."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def settings() -> str:  # configuration, no connection
        return "dsn"

    @lc.resource(scope="app")
    def pg(settings: str) -> str:
        return "pg pool"

    @lc.resource(scope="app")
    def cache() -> str:
        return "redis pool"

    pg.pool_stats = lambda p: tether.PoolStats(
        name="pg", max=3, open=2, in_use=1, idle=1, waiting=0
    )
    cache.pool_stats = lambda p: tether.PoolStats(
        name="cache", max=5, open=0, in_use=0, idle=0, waiting=None
    )

    @lc.resource
    async def conn(pg: str) -> AsyncIterator[str]:
        yield "conn"

    @lc.resource(timeout=0.01)
    async def waits(pg: str) -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "never"

    @lc.resource(timeout=0.01)
    async def through(conn: str) -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "never"

    @lc.resource(timeout=0.01)
    async def both(conn: str, cache: str) -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "never"

    @lc.resource(timeout=0.01)
    async def alone() -> AsyncIterator[str]:
        await asyncio.sleep(10)
        yield "never"

    return lc, [conn, waits, through, both, alone]


async def time_out_each(lc: tether.Lifecycle, resources: list[tether.Resource[str]]) -> None:
    """Open each of *resources* in a unit of work of its own: each times out (a 503)."""
    for res in resources:
        async with lc.scope() as unit:
            with pytest.raises(tether.ResourceUnavailable):
                await unit.get(res)


# Made-up pool figures: connections in use at the app's shutdown too (no real pool).
@pytest.mark.tether_unchecked
def test_connection_series_are_per_driver_pool() -> None:
    """Only driver pools have ``db_client_connection_*`` series, so their sum is the pools'
    connections; a plain resource, or one drawing from a pool, has its values open now as
    ``tether_resource_in_use``. A timeout counts under the pool the resource draws from
    (directly or through another resource), and every resource's under
    ``tether_resource_timeouts_total``; one drawing from two pools, or from none, only there."""
    lc, (conn, *timing_out) = pools_with_timeouts()
    registry = CollectorRegistry()
    register(lc, registry)

    async def main() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with lc.run():
            await time_out_each(lc, timing_out)
            async with lc.scope() as unit:
                await unit.get(conn)  # one connection of pg in use (its figures say 1)
                return samples(registry)

    found = asyncio.run(main())
    counts = {
        labels: v for (name, labels), v in found.items() if name == "db_client_connection_count"
    }
    assert counts == {
        frozenset({("pool_name", "pg"), ("scope", "app"), ("state", "used")}): 1,
        frozenset({("pool_name", "pg"), ("scope", "app"), ("state", "idle")}): 1,
        frozenset({("pool_name", "cache"), ("scope", "app"), ("state", "used")}): 0,
        frozenset({("pool_name", "cache"), ("scope", "app"), ("state", "idle")}): 0,
    }
    for name, scope, in_use in [("settings", "app", 1), ("pg", "app", 1), ("conn", "request", 1),
                                ("waits", "request", 0)]:  # fmt: skip
        assert found[sample("tether_resource_in_use", pool_name=name, scope=scope)] == in_use
    pool_timeouts = {
        labels: v for (name, labels), v in found.items()
        if name == "db_client_connection_timeouts_total"
    }  # fmt: skip
    assert pool_timeouts == {
        frozenset({("pool_name", "pg"), ("scope", "app")}): 2,  # waits, and through (via conn)
        frozenset({("pool_name", "cache"), ("scope", "app")}): 0,
    }
    for name in ("waits", "through", "both", "alone"):
        assert found[sample("tether_resource_timeouts_total", pool_name=name, scope="request")] == 1
    assert found[sample("tether_resource_timeouts_total", pool_name="conn", scope="request")] == 0


# A worker process of an app with prometheus-client in multiprocess mode, set up as its docs
# say: a registry of its own with a MultiProcessCollector (added before tether's). It serves
# argv[1] requests, then scrapes that registry for each line read on stdin; it stops at EOF.
WORKER = """
import sys, time
from typing import Annotated
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
import tether
from tether.metrics import prometheus

prometheus.REFRESH_INTERVAL = 3600.0  # no refresh but the first: a scrape makes its own
lc = tether.Lifecycle()

@lc.resource
async def session():
    yield "s"

@lc.resource(scope="app")
def pg():
    return "pool"

pg.pool_stats = lambda p: tether.PoolStats(
    name="pg", max=10, open=4, in_use=3, idle=1, waiting=0, created=4, create_time=0.5
)
registry = CollectorRegistry()
MultiProcessCollector(registry)
prometheus.register(lc, registry)
app = FastAPI(lifespan=lc.lifespan)

@app.get("/")
async def root(s: Annotated[str, Depends(session)]) -> str:
    return s

with TestClient(app) as client:
    time.sleep(0.5)  # past the sweeper's first refresh
    for _ in range(int(sys.argv[1])):
        client.get("/")
    for line in sys.stdin:
        print(generate_latest(registry).decode() + "END", flush=True)
"""


class Worker:
    """A worker process (WORKER) writing to prometheus-client's files in *path*."""

    def __init__(self, path: Path, requests: int) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(requests)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """What this worker's /metrics would answer (each family once)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("scrape\n")
        self.proc.stdin.flush()
        text = "".join(iter(self.proc.stdout.readline, "END\n"))
        names = [family.name for family in text_string_to_metric_families(text)]
        assert len(names) == len(set(names)), f"a family reported twice: {names}"
        return read(text_string_to_metric_families(text))

    def stop(self) -> None:
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0


def read(families: Iterable[Metric]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in families
        for s in family.samples
    }


OPENS = sample("tether_resource_wait_time_seconds_count", pool_name="session", scope="request")
CLOSES = sample("tether_resource_use_time_seconds_count", pool_name="session", scope="request")
RUNNING = sample("tether_lifecycle_running")
POOL_USED = sample("db_client_connection_count", pool_name="pg", scope="app", state="used")


def test_with_several_worker_processes_a_scrape_adds_them_up(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, each worker writes its figures to prometheus-client's
    files: a scrape of either worker reports both (counters and summaries added up, the pools'
    connections too, running the highest); the figures of a worker that stopped stay counted,
    and what it had open or running does not."""
    first = Worker(tmp_path, 3)
    second = None
    try:
        assert first.scrape()[OPENS] == 3
        second = Worker(tmp_path, 4)
        for worker in (second, first):
            figures = worker.scrape()
            assert (figures[OPENS], figures[CLOSES]) == (7, 7)
            assert (figures[POOL_USED], figures[RUNNING]) == (6, 1)
            assert figures[sample("db_client_connection_max", pool_name="pg", scope="app")] == 20
            assert figures[sample("db_client_connection_create_time_seconds_sum",
                                  pool_name="pg", scope="app")] == 1.0  # fmt: skip
        first.stop()
        figures = second.scrape()
        assert (figures[OPENS], figures[POOL_USED], figures[RUNNING]) == (7, 3, 1)
    finally:
        for worker in (first, second):
            if worker is not None and worker.proc.poll() is None:
                worker.stop()
    stopped = read(MultiProcessCollector(None, str(tmp_path)).collect())
    assert (stopped[OPENS], stopped[CLOSES]) == (7, 7)
    assert (stopped[POOL_USED], stopped[RUNNING]) == (0, 0)
