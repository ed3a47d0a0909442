"""The FastAPI tutorial pattern (a lifespan, a per-request DB), written with tether.

Run it with `python examples/quickstart.py [PORT]`, then
`curl http://127.0.0.1:8000/`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI

import tether


class FakeDB:
    def __init__(self) -> None:
        print("DB connected", flush=True)

    def close(self) -> None:
        print("DB closed", flush=True)


lc = tether.Lifecycle()


@lc.resource  # a request resource: opened on first use, closed before the response
async def db() -> AsyncIterator[FakeDB]:
    conn = FakeDB()
    try:
        yield conn
    finally:
        conn.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    print("Starting app", flush=True)
    yield
    print("Stopping app", flush=True)


app = FastAPI(lifespan=lc.lifespan(wrap=lifespan))


@app.get("/")
async def root(conn: Annotated[FakeDB, Depends(db)]) -> dict[str, str]:
    return {"message": "Hello with DB"}


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
