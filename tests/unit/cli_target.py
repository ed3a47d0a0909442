"""A Lifecycle for the CLI tests."""

from collections.abc import AsyncIterator

import tether

lc = tether.Lifecycle()
healthy = {"db": True}


def probe(value: str) -> None:
    if not healthy["db"]:
        raise ConnectionError("connection refused")


@lc.resource(scope="app")
def settings() -> str:
    return "settings"


@lc.resource(scope="app", check=probe)
async def db(settings: str) -> AsyncIterator[str]:
    yield "db"


@lc.resource
async def conn(db: str) -> AsyncIterator[str]:
    yield "conn"
