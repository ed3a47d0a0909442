"""The app the uvicorn end-to-end tests serve. Every event is printed, one per line."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import StreamingResponse

import tether


def say(event: str) -> None:
    print(f"EVENT {event}", flush=True)


lc = tether.Lifecycle(drain_timeout=10)


@lc.resource(scope="app")
async def pool() -> AsyncIterator[str]:
    say("pool open")
    yield "pool"
    say("pool close")


def session_factory(name: str) -> Any:
    async def open_session(pool: str) -> AsyncIterator[dict[str, Any]]:
        say(f"{name} open")
        tx: dict[str, Any] = {"closed": False}
        try:
            yield tx
        except BaseException as exc:
            say(f"{name} rollback {type(exc).__name__}")
            raise
        else:
            if tx.get("fail_commit"):
                say(f"{name} commit failed")
                raise RuntimeError("commit failed: duplicate key value violates unique constraint")
            say(f"{name} commit")
        finally:
            tx["closed"] = True
            say(f"{name} close")

    return open_session


session = lc.resource(name="session")(session_factory("session"))
stream_session = lc.resource(name="stream_session", release="response")(
    session_factory("stream_session")
)


app = FastAPI(lifespan=lc.lifespan)
# Two routes live on an included router, as most apps' routes do (FastAPI 0.137+ serves them
# through per-inclusion copies of their apps); the others on the app itself.
router = APIRouter()


@router.get("/commit-fails")
async def commit_fails(s: Annotated[dict[str, Any], Depends(session)]) -> dict[str, str]:
    s["fail_commit"] = True
    return {"status": "written"}


@app.get("/ok")
async def ok(s: Annotated[dict[str, Any], Depends(session)]) -> dict[str, str]:
    return {"status": "ok"}


@router.get("/stream")
async def stream(s: Annotated[dict[str, Any], Depends(stream_session)]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(5):
            await anyio.sleep(0.05)
            yield f"chunk {i} session {'closed' if s['closed'] else 'open'}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/long-stream")
async def long_stream(
    s: Annotated[dict[str, Any], Depends(stream_session)],
) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(3000):  # 30 s: the client goes away long before the end
            await anyio.sleep(0.01)
            yield f"chunk {i}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/slow")
async def slow(
    s: Annotated[dict[str, Any], Depends(session)], seconds: float = 1.0
) -> dict[str, str]:
    say("slow start")
    await anyio.sleep(seconds)
    say("slow end")
    return {"status": "done"}


app.include_router(router)
