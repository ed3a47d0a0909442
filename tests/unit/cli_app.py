"""Apps for the CLI tests: named in place of the Lifecycle their lifespan is."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from tests.unit.cli_target import lc
from tether.fastapi import health_router


@asynccontextmanager
async def mine(app: Any) -> AsyncIterator[None]:
    yield


app = FastAPI(lifespan=lc.lifespan)
wrapped = FastAPI(lifespan=lc.lifespan(wrap=mine))
called = FastAPI(lifespan=lc.lifespan())
other = FastAPI()

# Apps that include routers: FastAPI (0.115 on) merges the app's lifespan with each router's,
# which hides the app's own in a closure. tether's own health router is one.
with_health = FastAPI(lifespan=lc.lifespan)
with_health.include_router(health_router(lc))
with_routers = FastAPI(lifespan=lc.lifespan(wrap=mine))
with_routers.include_router(APIRouter(lifespan=mine))
with_routers.include_router(APIRouter())
other_with_router = FastAPI()
other_with_router.include_router(APIRouter(lifespan=mine))
