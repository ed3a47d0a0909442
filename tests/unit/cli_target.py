"""A Lifecycle for the CLI tests."""

from collections.abc import AsyncIterator

import tether

lc = tether.Lifecycle()
healthy = {"db": True, "busy": False}


def probe(value: str) -> None:
    if not healthy["db"]:
        raise ConnectionError("connection refused")


@lc.resource(scope="app")
def settings() -> str:
    return "settings"


@lc.resource(scope="app", check=probe)
async def db(settings: str) -> AsyncIterator[str]:
    yield "db"


# What the pool integrations set: every connection in use, the check not run.
db.saturation = lambda value: (True, "busy: all 2 connections in use") if healthy["busy"] else None


@lc.resource
async def conn(db: str) -> AsyncIterator[str]:
    yield "conn"


# Not a Lifecycle: set to None (before, said to be missing).
nothing = None
