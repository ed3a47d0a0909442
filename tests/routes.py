"""Route classes for tests of how tether serves a route."""

from typing import Any

from fastapi.routing import APIRoute


class WrappingRoute(APIRoute):
    """A route class that wraps its own app: tether serves it through its route wrapper (its
    `handle`, and `send`), not through FastAPI's request handler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = self.app

        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            await inner(scope, receive, send)

        self.app = wrapped
