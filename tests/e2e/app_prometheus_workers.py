"""An app served by `uvicorn --workers 2` with prometheus-client in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` set), as its docs set it up: a registry of its own with a
``MultiProcessCollector``, mounted at /metrics. ``GET /`` opens the request resource and
answers the worker's pid."""

import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector

import tether
from tether.metrics.prometheus import register

# APP_SWEEP_INTERVAL: a test's, to stop a worker before its first sweep.
lc = tether.Lifecycle(sweep_interval=float(os.environ.get("APP_SWEEP_INTERVAL", "0.25")))


@lc.resource
async def session() -> AsyncIterator[int]:
    yield os.getpid()


registry = CollectorRegistry()
MultiProcessCollector(registry)
register(lc, registry)
served = Counter("app_served", "Requests served, counted by prometheus-client itself.")

app = FastAPI(lifespan=lc.lifespan)
app.mount("/metrics", make_asgi_app(registry=registry))


@app.get("/")
async def root(pid: Annotated[int, Depends(session)]) -> int:
    served.inc()
    return pid
