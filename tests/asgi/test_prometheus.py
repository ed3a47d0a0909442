"""Prometheus metrics read from `lc.stats()`, served the usual way."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Response
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

import tether
from tether.metrics.prometheus import register


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
    assert (
        'db_client_connection_count{pool_name="session",scope="request",state="used"} 0.0' in text
    )
    assert (
        'db_client_connection_use_time_seconds_count{pool_name="session",scope="request"} 2.0'
        in text
    )
    assert (
        'db_client_connection_wait_time_seconds_count{pool_name="session",scope="request"} 2.0'
        in text
    )
    assert (
        'tether_resource_errors_total{phase="close",pool_name="session",scope="request"} 0.0'
        in text
    )
    assert "tether_lifecycle_running 1.0" in text


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
