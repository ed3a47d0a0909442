"""A WebSocket app on an asyncpg pool of one connection (DATABASE_URL), served by uvicorn for
tests/integration/test_websocket_pools.py: `/ws/hold` (an app's route) and `/r/ws/hold` (a
route of an included router) keep the connection until the client leaves."""

import os
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, WebSocket, WebSocketDisconnect

import tether
from tether.integrations import asyncpg as tpg

lc = tether.Lifecycle()
pool = tpg.pool(lc, lambda: os.environ["DATABASE_URL"], min_size=1, max_size=1, acquire_timeout=0.3)
conn = tpg.connection(lc, pool, transaction=True)

app = FastAPI(lifespan=lc.lifespan)
router = APIRouter()


async def hold(websocket: WebSocket, c: Annotated[asyncpg.Connection, Depends(conn)]) -> None:
    await websocket.accept()
    await websocket.send_text(str(await c.fetchval("SELECT 1")))
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass


app.add_api_websocket_route("/ws/hold", hold)
router.add_api_websocket_route("/ws/hold", hold)
app.include_router(router, prefix="/r")
