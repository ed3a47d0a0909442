"""The app tests/integration/test_sqlalchemy.py serves with uvicorn (a real socket).

Its database URL and application_name come from the environment, read when the app starts.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import tether
from tether.integrations import sqlalchemy as tsa

lc = tether.Lifecycle(drain_timeout=2)
engine = tsa.engine(
    lc,
    lambda: os.environ["TETHER_SA_URL"],
    application_name=os.environ.get("TETHER_SA_APP_NAME", "tether-sa-served"),
    pool_size=2,
)
session = tsa.session(lc, engine)
streaming = tsa.session(lc, engine, name="streaming", release="response")
app = FastAPI(lifespan=lc.lifespan)

Session = Annotated[AsyncSession, Depends(session)]


@app.get("/ok")
async def ok(s: Session) -> int:
    return int((await s.execute(text("SELECT 1"))).scalar_one())


@app.get("/sleep")
async def sleep(s: Session) -> str:
    await s.execute(text("SELECT pg_sleep(5)"))
    return "slept"


@app.get("/sse")
async def sse(s: Session) -> StreamingResponse:
    pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()

    async def events() -> AsyncIterator[str]:
        for i in range(300):  # 30 s of events; the session is released before the first
            yield f"data: {i} {pid}\n\n"
            await anyio.sleep(0.1)

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/cursor")
async def cursor(s: Annotated[AsyncSession, Depends(streaming)]) -> StreamingResponse:
    """Writes a row, then streams rows from a server-side cursor as they are read, slowly
    (pain.md T4.5): committed if the whole body goes out, rolled back if it does not."""
    await s.execute(text("INSERT INTO cursor_marks VALUES (1)"))

    async def rows() -> AsyncIterator[str]:
        result = await s.stream_scalars(text("SELECT generate_series(1, 100000)"))
        async for n in result:
            yield f"data: {n}\n\n"
            await anyio.sleep(0.01)

    return StreamingResponse(rows(), media_type="text/event-stream")


@app.get("/pool")
async def pool(eng: Annotated[AsyncEngine, Depends(engine)]) -> dict[str, int]:
    return {
        "checked_out": eng.sync_engine.pool.checkedout(),  # type: ignore[attr-defined]
        "sessions_in_use": lc.stats().resources["session"].in_use
        + lc.stats().resources["streaming"].in_use,
    }
