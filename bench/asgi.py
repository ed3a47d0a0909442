"""An in-process ASGI driver: calls an app's ASGI callable with synthetic scope/receive/send.

It starts the app's lifespan the way a server does (the lifespan state is copied into each
request's scope), then runs requests one at a time (concurrency 1). Its own cost per request is
a few dicts and two closures, the same for every variant.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
ASGIApp = Callable[..., Awaitable[None]]

_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT: Message = {"type": "http.disconnect"}
_HEADERS = [(b"host", b"bench"), (b"user-agent", b"bench-asgi"), (b"accept", b"*/*")]


class LifespanError(RuntimeError):
    pass


class Driver:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self, timeout: float = 30.0) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.create_task(self.app(scope, self._to_app.get, self._events.put))
        self._to_app.put_nowait({"type": "lifespan.startup"})
        msg = await self._next_event(timeout)
        if msg["type"] != "lifespan.startup.complete":
            raise LifespanError(msg.get("message") or repr(msg))

    async def stop(self, timeout: float = 30.0) -> None:
        if self._task is None:
            return
        self._to_app.put_nowait({"type": "lifespan.shutdown"})
        msg = await self._next_event(timeout)
        if msg["type"] != "lifespan.shutdown.complete":
            raise LifespanError(msg.get("message") or repr(msg))
        await asyncio.wait_for(self._task, timeout)
        self._task = None

    async def _next_event(self, timeout: float) -> Message:
        assert self._task is not None
        get = asyncio.ensure_future(self._events.get())
        done, _ = await asyncio.wait(
            {get, self._task}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        if get in done:
            return get.result()
        get.cancel()
        if self._task in done:
            exc = self._task.exception()
            raise LifespanError(f"lifespan ended early: {exc!r}") from exc
        raise LifespanError(f"lifespan did not answer within {timeout} s")

    async def request(self, path: str) -> tuple[int, bytes]:
        """One GET request; returns the status and the body."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": list(_HEADERS),
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": self.state.copy(),
        }
        status = 0
        body: list[bytes] = []
        sent = False
        finished = False
        waiter: asyncio.Future[None] | None = None

        async def receive() -> Message:
            nonlocal sent, waiter
            if not sent:
                sent = True
                return _REQUEST
            if not finished:
                # like a server: the client is there until the response is complete
                waiter = asyncio.get_running_loop().create_future()
                await waiter
            return _DISCONNECT

        async def send(msg: Message) -> None:
            nonlocal status, finished
            kind = msg["type"]
            if kind == "http.response.start":
                status = msg["status"]
            elif kind == "http.response.body":
                chunk = msg.get("body", b"")
                if chunk:
                    body.append(chunk)
                if not msg.get("more_body", False):
                    finished = True
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)

        await self.app(scope, receive, send)
        return status, b"".join(body)

    async def check(self, path: str, expected: Any) -> str:
        """Runs one request; returns "" if it answered 200 with ``expected``, else why not."""
        try:
            status, body = await asyncio.wait_for(self.request(path), 30)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        if status != 200:
            return f"status {status}: {body[:200]!r}"
        try:
            got = json.loads(body)
        except ValueError:
            return f"not JSON: {body[:200]!r}"
        return "" if got == expected else f"answered {got!r}, expected {expected!r}"
