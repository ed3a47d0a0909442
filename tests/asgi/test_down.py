"""An app resource that is down (`required=False`) shows in every reader of `lc.stats()`: the
stats themselves, the dashboard's JSON and page table, `tether stats`, Prometheus and
OpenTelemetry; and stops showing once it opens."""

import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from fastapi.testclient import TestClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

import tether
from tests.asgi.test_opentelemetry import collect, key
from tether.cli import render_stats
from tether.fastapi import dashboard_router
from tether.metrics import opentelemetry, prometheus

WHY = (
    "App resource 'cache' is down: it failed to open (ConnectionRefusedError: refused), and "
    "the app runs without it (required=False) while it is retried in the background. Retry "
    "shortly."
)


def test_a_down_resource_is_shown_down_then_up() -> None:
    lc = tether.Lifecycle()
    up = [False]

    @lc.resource(scope="app", required=False, backoff=0.05)
    async def cache() -> AsyncIterator[str]:
        if not up[0]:
            raise ConnectionRefusedError("refused")
        yield "cache"

    registry = CollectorRegistry()
    prometheus.register(lc, registry)
    reader = InMemoryMetricReader()
    opentelemetry.register(lc, MeterProvider(metric_readers=[reader]))
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(dashboard_router(lc))

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain")

    with TestClient(app) as client:
        assert lc.stats().resources["cache"].down == WHY
        data = client.get("/tether/stats.json").json()
        assert [r["down"] for r in data["resources"]] == [WHY]
        assert f"DOWN cache: {WHY}" in render_stats(data).splitlines()
        assert (
            'tether_resource_down{pool_name="cache",scope="app"} 1.0' in client.get("/metrics").text
        )
        points, _ = collect(reader)
        assert points[key("tether.resource.down", **{"db.client.connection.pool.name": "cache",
                                                      "tether.resource.scope": "app"})] == 1  # fmt: skip

        up[0] = True
        deadline = time.monotonic() + 5  # the retry runs in the client's event loop thread
        while lc.stats().resources["cache"].down is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        data = client.get("/tether/stats.json").json()
        assert [r["down"] for r in data["resources"]] == [None]
        assert not any(line.startswith("DOWN") for line in render_stats(data).splitlines())
        assert (
            'tether_resource_down{pool_name="cache",scope="app"} 0.0' in client.get("/metrics").text
        )
