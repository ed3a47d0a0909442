"""A commit that fails after the response started, in an app with a catch-all error handler
(``@app.exception_handler(Exception)`` or ``(500)``, which Starlette's
``ServerErrorMiddleware`` calls for what nothing else handled, response started or not):
the handler gets the commit's own exception (an error reporter records what failed, not a
placeholder of tether's), the response stays aborted (its last body message is never sent,
so the client sees a truncated body), and tether logs the failure once. Without such a
handler the app raises tether's ``_Aborted`` as before (tests/e2e/test_response_abort.py).

The failing commit is a real one: a deferred foreign key that SQLite checks at ``COMMIT``
(tether's aiosqlite connection, ``release="response"``), under a streaming response, on
both ways tether serves a route (it wraps FastAPI's request handler; a route class that
wraps its own app gets ``handle`` and ``send``), on a mounted app (whose own handler sees
it, or the main app's, where the mounted one has none), behind a ``BaseHTTPMiddleware`` too, from
a plain asyncio task (as uvicorn serves) and from an anyio task group (as the TestClient);
and once under a real uvicorn, for what the client and the server's log see.
"""

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware

import tether
import tether.fastapi
from tests.inprocess import Exchange, http_scope
from tests.routes import WrappingRoute
from tests.serving import Server
from tether.integrations import aiosqlite as tsqlite

SCHEMA = """
CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE books (
    id INTEGER PRIMARY KEY,
    author_id INTEGER NOT NULL REFERENCES authors (id) DEFERRABLE INITIALLY DEFERRED,
    title TEXT NOT NULL
);
"""

FAILED = "tether: closing resource 'writer' failed: IntegrityError: FOREIGN KEY constraint failed"
ABORTED = (
    "GET /books: a cleanup failed after the response started (logged above): "
    "the response is aborted, its last body message not sent"
)


class Books:
    """GET /books streams a list while its transaction writes a book whose author does not
    exist: the foreign key fails at COMMIT, before the last body message. What the app's
    handlers saw is kept in ``seen``."""

    def __init__(
        self,
        path: Path,
        layout: str = "handler",
        *,
        handler: Any = Exception,
        middleware: bool = False,
        also: Any = None,
        report: bool = False,
    ) -> None:
        self.path = path
        with contextlib.closing(sqlite3.connect(path)) as setup:
            setup.executescript(SCHEMA)
        self.seen: list[BaseException] = []
        lc = self.lc = tether.Lifecycle()
        db = tsqlite.database(lc, path)
        writer = tsqlite.connection(lc, db, name="writer", release="response")
        app = self.app = FastAPI(lifespan=lc.lifespan)
        mounted = layout in ("mounted", "mounted-outer")
        routes = FastAPI() if mounted else app
        self.prefix = "/sub" if mounted else ""
        # "mounted-outer": the handler on the main app, the route on a mounted one (an
        # error reporter on the main app, versioned sub-apps mounted on it).
        handlers = app if layout == "mounted-outer" else routes
        if layout == "handle":
            app.router.route_class = WrappingRoute

        for cls in (handler, also):
            if cls is None:
                continue

            @handlers.exception_handler(cls)
            async def envelope(request: Request, exc: Exception) -> JSONResponse:
                self.seen.append(exc)
                if report:  # under uvicorn: in the server's output
                    print(f"handler saw {type(exc).__name__}: {exc}", flush=True)
                return JSONResponse({"error": type(exc).__name__}, status_code=500)

        if middleware:

            async def passthrough(request: Request, call_next: Any) -> Any:
                return await call_next(request)

            routes.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)

        @routes.get("/books")
        async def books(c: Annotated[Any, Depends(writer)]) -> StreamingResponse:
            await c.execute("INSERT INTO authors (name) VALUES ('ann')")
            await c.execute("INSERT INTO books (author_id, title) VALUES (42, 'orphan')")

            async def body() -> AsyncIterator[bytes]:
                for i in range(3):
                    yield f"book{i}\n".encode()

            return StreamingResponse(body(), media_type="text/plain")

        if routes is not app:
            app.mount("/sub", routes)

    def authors(self) -> list[str]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return [name for (name,) in conn.execute("SELECT name FROM authors")]


class Waiting(Exchange):
    """An exchange whose client, once it sent its request, waits (a StreamingResponse on
    ASGI before 2.4 listens for its disconnect while it streams)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = False

    async def receive(self) -> dict[str, Any]:
        if not self.asked:
            self.asked = True
            return await super().receive()
        await asyncio.Event().wait()  # cancelled when the response ends
        raise AssertionError("unreachable")


class Served:
    def __init__(self, sent: list[dict[str, Any]], raised: BaseException | None) -> None:
        self.sent = sent
        self.raised = raised


async def call(app: Any, runner: str, path: str = "/books") -> Served:
    """GET /books from *app*, as a server calls it: from a task of its own ("task", as
    uvicorn), or from a task of an anyio task group ("anyio", as the TestClient)."""
    exchange = Waiting()
    raised: list[BaseException] = []

    async def serve() -> None:
        try:
            await app(http_scope("GET", path), exchange.receive, exchange.send)
        except Exception as exc:
            raised.append(exc)

    if runner == "task":
        await asyncio.get_running_loop().create_task(serve())
    else:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
    return Served(exchange.sent, raised[0] if raised else None)


def serve(books: Books, runner: str) -> Served:
    async def main() -> Served:
        async with books.lc.lifespan(books.app):
            return await call(books.app, runner, books.prefix + "/books")

    return asyncio.run(main())


def tether_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tether" and r.levelno >= 40]


def assert_aborted(served: Served) -> None:
    """The response started (200) and its body was cut: no body message ends it."""
    start, *bodies = served.sent
    assert (start["type"], start["status"]) == ("http.response.start", 200)
    assert bodies, served.sent
    assert all(m["type"] == "http.response.body" for m in bodies), served.sent
    assert all(m.get("more_body", False) for m in bodies), served.sent


@pytest.mark.parametrize("layout", ["handler", "handle", "mounted", "mounted-outer"])
@pytest.mark.parametrize("runner", ["task", "anyio"])
@pytest.mark.parametrize("middleware", [False, True], ids=["plain", "base_http_middleware"])
@pytest.mark.parametrize("handler", [Exception, 500], ids=["Exception", "500"])
def test_the_catch_all_handler_gets_the_commits_own_exception(
    tmp_path: Path,
    layout: str,
    runner: str,
    middleware: bool,
    handler: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    books = Books(tmp_path / "app.db", layout, handler=handler, middleware=middleware)
    with caplog.at_level(logging.INFO, logger="tether"):
        served = serve(books, runner)
    assert [type(exc) for exc in books.seen] == [sqlite3.IntegrityError]
    assert str(books.seen[0]) == "FOREIGN KEY constraint failed"
    # Raised on to the server (which logs it), as Starlette does with an endpoint's error.
    assert served.raised is books.seen[0]
    if not middleware:
        # (Starlette's BaseHTTPMiddleware ends a streamed body itself when the app it calls
        # raises: tests/e2e/test_response_abort.py, test_behind_base_http_middleware_*.)
        assert_aborted(served)
    assert tether_errors(caplog) == [FAILED]
    assert books.authors() == []  # rolled back


@pytest.mark.parametrize("layout", ["handler", "handle"])
def test_a_handler_for_its_class_cannot_answer_a_started_response(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With a handler for the commit's class too, Starlette refuses to answer a response
    that has started, as for an endpoint's error: the catch-all gets its ``RuntimeError``,
    caused by the commit's exception."""
    books = Books(tmp_path / "app.db", layout, also=sqlite3.IntegrityError)
    with caplog.at_level(logging.INFO, logger="tether"):
        served = serve(books, "task")
    [seen] = books.seen
    assert isinstance(seen, RuntimeError)
    assert str(seen) == "Caught handled exception, but response already started."
    assert isinstance(seen.__cause__, sqlite3.IntegrityError)
    assert_aborted(served)
    assert tether_errors(caplog) == [FAILED]


@pytest.mark.parametrize("layout", ["handler", "handle"])
def test_without_a_catch_all_handler_the_app_raises_tethers_aborted(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No handler of the app's sees it: tether's ``_Aborted`` names the unit, without the
    commit's traceback (logged once, by tether)."""
    books = Books(tmp_path / "app.db", layout, handler=None)
    with caplog.at_level(logging.INFO, logger="tether"):
        served = serve(books, "task")
    assert isinstance(served.raised, tether.fastapi._Aborted)
    assert str(served.raised) == ABORTED
    assert served.raised.__cause__ is None
    assert served.raised.__suppress_context__
    assert_aborted(served)
    assert tether_errors(caplog) == [FAILED]


# --------------------------------------------------------------------------- uvicorn


def served_app() -> FastAPI:
    """The app the uvicorn test serves (``--factory``), on the file $BOOKS_DB."""
    return Books(Path(os.environ["BOOKS_DB"]), report=True).app


def test_under_uvicorn_the_client_gets_a_cut_body_and_the_handler_the_commits_error(
    tmp_path: Path,
) -> None:
    server = Server(
        "tests.asgi.test_aborted_handler:served_app",
        tmp_path,
        "--factory",
        env={"BOOKS_DB": str(tmp_path / "app.db")},
    )
    try:
        with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ends
            httpx.get(server.base_url + "/books", timeout=10)
    finally:
        server.stop()
    lines = server.output().splitlines()
    assert [line for line in lines if line.startswith("tether:")] == [FAILED]
    assert [line for line in lines if line.startswith("handler saw")] == [
        "handler saw IntegrityError: FOREIGN KEY constraint failed"
    ]
    assert lines.count("ERROR:    Exception in ASGI application") == 1
    # What the server logs is the commit's error (tether's line, then the server's).
    tails = [line for line in lines if line.startswith(("sqlite3.", "tether.fastapi."))]
    assert tails == ["sqlite3.IntegrityError: FOREIGN KEY constraint failed"] * 2
    assert "ASGI callable returned without completing response" not in server.output()


@pytest.mark.parametrize("layout", ["handler", "handle"])
def test_a_resource_unavailable_after_the_start_reaches_the_catch_all_too(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the start tether answers a ``ResourceUnavailable`` with its 503 rather than
    the catch-all; once the response started there is no 503 to send: the catch-all sees
    it, as it sees any other failure there."""
    lc = tether.Lifecycle()
    seen: list[BaseException] = []

    @lc.resource(release="response")
    async def ledger() -> AsyncIterator[str]:
        yield "ledger"
        raise tether.ResourceUnavailable(
            "the ledger lost its connection", resource="ledger", retry_after=7
        )

    app = FastAPI(lifespan=lc.lifespan)
    if layout == "handle":
        app.router.route_class = WrappingRoute

    @app.exception_handler(Exception)
    async def envelope(request: Request, exc: Exception) -> JSONResponse:
        seen.append(exc)
        return JSONResponse({"error": type(exc).__name__}, status_code=500)

    @app.get("/books")
    async def books(entry: Annotated[str, Depends(ledger)]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"book0\n"

        return StreamingResponse(body(), media_type="text/plain")

    async def main() -> Served:
        async with lc.lifespan(app):
            return await call(app, "task")

    with caplog.at_level(logging.INFO, logger="tether"):
        served = asyncio.run(main())
    [unavailable] = seen
    assert isinstance(unavailable, tether.ResourceUnavailable)
    assert served.raised is unavailable
    assert_aborted(served)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "tether: closing resource 'ledger': ResourceUnavailable: the ledger lost its connection"
    ]
