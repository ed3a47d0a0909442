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
