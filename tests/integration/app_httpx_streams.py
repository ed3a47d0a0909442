"""An upstream that streams its body in chunks, served by uvicorn for
tests/integration/test_httpx_streams.py."""

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/chunks")
async def chunks(n: int = 20, seconds: float = 0.005) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(n):
            await asyncio.sleep(seconds)
            yield b"%04d;" % i

    return StreamingResponse(body(), media_type="text/plain")
