"""An app whose `release="response"` commit fails after its response started, served by
the uvicorn tests as `app`, and as `behind_middleware` behind a `BaseHTTPMiddleware`."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware

import tether

lc = tether.Lifecycle()


@lc.resource(release="response")
async def session() -> AsyncIterator[dict[str, str]]:
    yield {}
    raise RuntimeError("commit failed")


def make(middleware: bool) -> FastAPI:
    app = FastAPI(lifespan=lc.lifespan)
    if middleware:

        async def passthrough(request: Request, call_next: Any) -> Any:
            return await call_next(request)

        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)

    @app.get("/stream")
    async def stream(s: Annotated[dict[str, str], Depends(session)]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk{i}\n".encode()

        return StreamingResponse(body())

    @app.get("/json")
    async def json(s: Annotated[dict[str, str], Depends(session)]) -> JSONResponse:
        return JSONResponse({"ok": True})

    return app


app = make(middleware=False)
behind_middleware = make(middleware=True)
