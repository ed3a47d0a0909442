"""Apps for the CLI tests: named in place of the Lifecycle their lifespan is."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tests.unit.cli_target import lc


@asynccontextmanager
async def mine(app: Any) -> AsyncIterator[None]:
    yield


app = FastAPI(lifespan=lc.lifespan)
wrapped = FastAPI(lifespan=lc.lifespan(wrap=mine))
called = FastAPI(lifespan=lc.lifespan())
other = FastAPI()
