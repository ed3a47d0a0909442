"""A plain upstream HTTP service, served by uvicorn for the httpx integration tests."""

import asyncio

from fastapi import FastAPI

app = FastAPI()


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/echo/{word}")
async def echo(word: str) -> dict[str, str]:
    return {"echo": word}


@app.get("/slow")
async def slow(seconds: float = 1.0) -> dict[str, str]:
    await asyncio.sleep(seconds)
    return {"status": "slow"}
