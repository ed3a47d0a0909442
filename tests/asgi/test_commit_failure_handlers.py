"""A commit that fails at the release point, before the response starts, is answered by the
app's catch-all error handling as any other server error is: its server-error handler
(``@app.exception_handler(Exception)`` or ``(500)``, which Starlette's
``ServerErrorMiddleware`` calls for what nothing else handled) answers with its envelope, an
HTTP middleware's ``except`` around ``call_next`` sees the exception on its way, and
Starlette raises it on to the server, which logs it. Everything is closed and rolled back
first. Without such a handler tether answers its own 500, and a ``ResourceUnavailable``
stays tether's 503 (``Retry-After``) whatever the handler.

The failing commit is a real one: a deferred foreign key that SQLite checks at ``COMMIT``
(tether's aiosqlite connection), on each way tether serves a route (it wraps FastAPI's
request handler; a route class that wraps its own app gets ``handle`` and ``send``; a route
with a ``Depends(scope="function")`` cleanup closes when the response starts; a mounted
app's route), each from a plain asyncio task (as uvicorn serves) and from a task in an
anyio task group (as Starlette's TestClient serves: the other release path); and once under
a real uvicorn, for what the server logs.

Also here: a file the server sends itself (``http.response.pathsend``, which Starlette's
``FileResponse`` uses where the server offers that extension, as granian does) is the last
body message: ``release="response"`` values close before it, and a failing commit aborts it.
"""

import asyncio
import contextlib
import inspect
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
import starlette.responses
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.testclient import TestClient

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

# What tether logs for the failed commit, once, whatever answers it.
FAILED = "tether: closing resource 'writer' failed: IntegrityError: FOREIGN KEY constraint failed"


def function_scope() -> bool:
    return "scope" in inspect.signature(Depends).parameters


# How tether serves the route: "handler" (it wraps FastAPI's request handler), "handle" (a
# route class wrapping its own app), "function" (a `Depends(scope="function")` cleanup: the
# values close when the response starts), "mounted" (on a FastAPI app mounted under /sub,
# whose own handlers answer).
LAYOUTS = pytest.mark.parametrize("layout", ["handler", "handle", "function", "mounted"])
RUNNERS = pytest.mark.parametrize("runner", ["task", "anyio"])


class Books:
    """An app whose POST {prefix}/books writes a book whose author does not exist (the
    foreign key is checked at COMMIT, after the endpoint) and POST {prefix}/authors one
    that commits; what its catch-all handler and middleware saw."""

    def __init__(
        self,
        path: Path,
        layout: str = "handler",
        *,
        handler: Any = None,
        middleware: bool = False,
        unavailable: bool = False,
    ) -> None:
        if layout == "function" and not function_scope():
            pytest.skip("Depends(scope=...) is FastAPI 0.121+")
        self.path = path
        with contextlib.closing(sqlite3.connect(path)) as setup:
            setup.executescript(SCHEMA)
        self.seen: list[BaseException] = []
        self.middleware_saw: list[BaseException] = []
        lc = self.lc = tether.Lifecycle()
        db = tsqlite.database(lc, path)
        writer = tsqlite.connection(lc, db, name="writer")
        app = self.app = FastAPI(lifespan=lc.lifespan)
        routes = FastAPI() if layout == "mounted" else app
        self.prefix = "/sub" if layout == "mounted" else ""
        if layout == "handle":
            app.router.route_class = WrappingRoute

        if handler is not None:

            @routes.exception_handler(handler)
            async def envelope(request: Request, exc: Exception) -> JSONResponse:
                self.seen.append(exc)
                error = {"code": "internal", "type": type(exc).__name__, "path": request.url.path}
                return JSONResponse({"error": error}, status_code=500)

        if middleware:

            @routes.middleware("http")
            async def catch_all(request: Request, call_next: Any) -> Any:
                try:
                    return await call_next(request)
                except Exception as exc:
                    self.middleware_saw.append(exc)
                    return JSONResponse({"middleware": type(exc).__name__}, status_code=500)

        @lc.resource
        async def ledger() -> AsyncIterator[str]:
            yield "ledger"
            if unavailable:
                raise tether.ResourceUnavailable(
                    "the ledger lost its connection", resource="ledger", retry_after=7
                )

        depends = Depends(writer)
        if layout == "function":

            async def audited(c: Annotated[Any, Depends(writer)]) -> AsyncIterator[Any]:
                yield c  # its cleanup writes with the request's connection
                await c.execute("INSERT INTO authors (name) VALUES ('audit')")

            depends = Depends(audited, scope="function")
        Writer = Annotated[Any, depends]

        @routes.post("/books")
        async def add_book(c: Writer, ledger: Annotated[str, Depends(ledger)]) -> dict[str, int]:
            await c.execute("INSERT INTO authors (name) VALUES ('ann')")
            cur = await c.execute("INSERT INTO books (author_id, title) VALUES (42, 'orphan')")
            return {"id": cur.lastrowid or 0}  # the endpoint succeeds: COMMIT fails after

        @routes.post("/authors")
        async def add_author(c: Writer) -> dict[str, int]:
            cur = await c.execute("INSERT INTO authors (name) VALUES ('bob')")
            return {"id": cur.lastrowid or 0}

        if routes is not app:
            app.mount("/sub", routes)

    def authors(self) -> list[str]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return [name for (name,) in conn.execute("SELECT name FROM authors ORDER BY id")]

    def books(self) -> list[Any]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return conn.execute("SELECT * FROM books").fetchall()


class Served:
    """What one in-process request got: the messages the app sent, and the exception it
    raised to the server, if any."""

    def __init__(self, sent: list[dict[str, Any]], raised: BaseException | None) -> None:
        self.sent = sent
        self.raised = raised

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


class Recording(Exchange):
    """An exchange that also notes the type of each message sent in *events*."""

    def __init__(self, events: list[str] | None) -> None:
        super().__init__()
        self.events = events

    async def send(self, message: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.append(message["type"])
        await super().send(message)


async def call(
    app: Any, path: str, runner: str, method: str = "POST", events: list[str] | None = None
) -> Served:
    """Send *app* a request for *path*, as a server calls it: from a task of its own
    ("task", as uvicorn), or from a task of an anyio task group ("anyio", as Starlette's
    TestClient). *events*: note each message type sent there (`Recording`); then the
    scope offers ``http.response.pathsend``, as granian's does."""
    scope = http_scope(method, path)
    if events is not None:
        scope["extensions"] = {"http.response.pathsend": {}}
    exchange = Recording(events)
    raised: list[BaseException] = []

    async def serve() -> None:
        try:
            await app(scope, exchange.receive, exchange.send)
        except Exception as exc:
            raised.append(exc)

    if runner == "task":
        await asyncio.get_running_loop().create_task(serve())
    else:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
    return Served(exchange.sent, raised[0] if raised else None)


def serve_all(books: Books, runner: str, *paths: str) -> list[Served]:
    async def main() -> list[Served]:
        async with books.lc.lifespan(books.app):
            return [await call(books.app, books.prefix + path, runner) for path in paths]

    return asyncio.run(main())


def tether_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tether" and r.levelno >= 40]


@LAYOUTS
@RUNNERS
@pytest.mark.parametrize("handler", [Exception, 500], ids=["Exception", "500"])
def test_the_apps_server_error_handler_answers_a_failed_commit(
    tmp_path: Path, layout: str, runner: str, handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    books = Books(tmp_path / "app.db", layout, handler=handler)
    with caplog.at_level(logging.INFO, logger="tether"):
        failed, next_one = serve_all(books, runner, "/books", "/authors")
    # The app's envelope, made by its handler from the commit's own exception.
    assert (failed.status, failed.body) == (
        500,
        b'{"error":{"code":"internal","type":"IntegrityError","path":"%s/books"}}'
        % books.prefix.encode(),
    )
    assert [type(e) for e in books.seen] == [sqlite3.IntegrityError]
    assert str(books.seen[0]) == "FOREIGN KEY constraint failed"
    # Starlette raises it on to the server after the handler answered (the server logs it,
    # as it logs the endpoint's own errors); tether logged its line, once.
    assert failed.raised is books.seen[0]
    assert failed.raised.__context__ is None  # the server's traceback shows no tether internals
    assert tether_errors(caplog) == [FAILED]
    # Closed and rolled back before the handler ran: nothing of the unit was committed
    # (with a function-scope cleanup: its audit row neither), and the next unit commits.
    assert (next_one.status, next_one.raised) == (200, None)
    assert books.authors() == (["bob", "audit"] if layout == "function" else ["bob"])
    assert books.books() == []
    assert books.lc.stats().resources["writer"].in_use == 0


@LAYOUTS
@RUNNERS
def test_without_a_server_error_handler_a_failed_commit_is_still_tethers_500(
    tmp_path: Path, layout: str, runner: str, caplog: pytest.LogCaptureFixture
) -> None:
    books = Books(tmp_path / "app.db", layout)
    with caplog.at_level(logging.INFO, logger="tether"):
        (failed,) = serve_all(books, runner, "/books")
    assert (failed.status, failed.body) == (500, b'{"detail":"Internal Server Error"}')
    assert failed.raised is None  # answered: nothing reaches the server but tether's log
    assert tether_errors(caplog) == [FAILED]
    assert books.authors() == []


@LAYOUTS
@RUNNERS
def test_resource_unavailable_at_the_release_point_stays_tethers_503(
    tmp_path: Path, layout: str, runner: str
) -> None:
    """A handler for ``Exception`` is for what nothing else handled: tether's 503 comes
    first (a handler for ``ResourceUnavailable`` itself is
    tests/integration/test_commit_handlers.py's)."""
    books = Books(tmp_path / "app.db", layout, handler=Exception, unavailable=True)
    (answer,) = serve_all(books, runner, "/books")
    assert answer.status == 503
    assert answer.headers["retry-after"] == "7"
    assert answer.raised is None
    assert books.seen == []
    assert books.authors() == []


@RUNNERS
def test_an_http_middleware_sees_a_failed_commit_as_it_sees_the_endpoints_errors(
    tmp_path: Path, runner: str
) -> None:
    """With a server-error handler, a failed commit passes an ``@app.middleware("http")``
    on its way out, whose ``except`` answers it, as it does an endpoint's exception (the
    handler is then not called: nothing reached it)."""
    books = Books(tmp_path / "app.db", handler=Exception, middleware=True)
    (failed,) = serve_all(books, runner, "/books")
    assert (failed.status, failed.body, failed.raised) == (
        500,
        b'{"middleware":"IntegrityError"}',
        None,
    )
    assert [type(e) for e in books.middleware_saw] == [sqlite3.IntegrityError]
    assert books.seen == []
    assert books.authors() == []


@RUNNERS
def test_without_a_server_error_handler_an_http_middleware_gets_tethers_500(
    tmp_path: Path, runner: str
) -> None:
    """Without one, tether answers the failed commit itself: the middleware's
    ``call_next`` returns that 500, it raises nothing."""
    books = Books(tmp_path / "app.db", middleware=True)
    (failed,) = serve_all(books, runner, "/books")
    assert (failed.status, failed.body) == (500, b'{"detail":"Internal Server Error"}')
    assert books.middleware_saw == []


def test_testclient_raises_a_failed_commit_the_apps_handler_answered(tmp_path: Path) -> None:
    """As for the endpoint's own errors, Starlette's TestClient raises what the server got
    (``raise_server_exceptions=True``, its default); with ``False`` it returns the
    handler's answer."""
    books = Books(tmp_path / "app.db", handler=Exception)
    with TestClient(books.app) as client:
        with pytest.raises(sqlite3.IntegrityError, match="^FOREIGN KEY constraint failed$"):
            client.post("/books")
    with TestClient(books.app, raise_server_exceptions=False) as client:
        assert client.post("/books").json()["error"]["type"] == "IntegrityError"
    assert books.authors() == []


# --------------------------------------------------------------------------- uvicorn


def served_app() -> FastAPI:
    """The app the uvicorn test serves (``--factory``), on the file $BOOKS_DB."""
    path = Path(os.environ["BOOKS_DB"])
    books = Books(path, handler=Exception)

    @books.app.post("/crash")
    async def crash() -> None:
        raise RuntimeError("the endpoint failed")

    return books.app


def test_under_uvicorn_a_failed_commit_is_answered_and_logged_as_the_endpoints_errors_are(
    tmp_path: Path,
) -> None:
    """The client gets the app's envelope; the log has tether's line (naming the resource),
    and the server's ``Exception in ASGI application`` traceback, as for an exception the
    endpoint raised."""
    server = Server(
        "tests.asgi.test_commit_failure_handlers:served_app",
        tmp_path,
        "--factory",
        env={"BOOKS_DB": str(tmp_path / "app.db")},
    )
    try:
        # A connection each: uvicorn closes one whose app raised, the response sent or not.
        failed, crashed, ok = [
            httpx.post(server.base_url + path, timeout=10)
            for path in ("/books", "/crash", "/authors")
        ]
    finally:
        server.stop()
    assert (failed.status_code, failed.json()) == (
        500,
        {"error": {"code": "internal", "type": "IntegrityError", "path": "/books"}},
    )
    assert crashed.json()["error"]["type"] == "RuntimeError"
    assert ok.status_code == 200
    lines = server.output().splitlines()
    assert [line for line in lines if line.startswith("tether:")] == [FAILED]
    assert lines.count("ERROR:    Exception in ASGI application") == 2  # /books and /crash
    tails = [line for line in lines if line.startswith(("sqlite3.", "RuntimeError:"))]
    assert tails == [
        "sqlite3.IntegrityError: FOREIGN KEY constraint failed",  # tether's line
        "sqlite3.IntegrityError: FOREIGN KEY constraint failed",  # the server's
        "RuntimeError: the endpoint failed",
    ]


# --------------------------------------------------------------------------- pathsend


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "report.csv"
    path.write_bytes(b"id,title\n" * 50)
    return path


def file_app(path: Path, serving: str) -> tuple[FastAPI, tether.Lifecycle, list[str]]:
    """GET /file answers a `FileResponse` with a ``release="response"`` transaction open;
    GET /file-fails the same, whose commit fails."""
    events: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource(release="response")
    async def tx() -> AsyncIterator[dict[str, bool]]:
        state: dict[str, bool] = {}
        yield state
        if state.get("fail"):
            events.append("commit failed")
            raise RuntimeError("commit failed: deferred constraint")
        events.append("commit")

    app = FastAPI(lifespan=lc.lifespan)
    if serving == "handle":
        app.router.route_class = WrappingRoute

    @app.get("/file")
    async def file(t: Annotated[dict[str, bool], Depends(tx)]) -> FileResponse:
        return FileResponse(path)

    @app.get("/file-fails")
    async def file_fails(t: Annotated[dict[str, bool], Depends(tx)]) -> FileResponse:
        t["fail"] = True
        return FileResponse(path)

    return app, lc, events


@pytest.mark.skipif(
    "http.response.pathsend" not in inspect.getsource(starlette.responses.FileResponse),
    reason="this Starlette's FileResponse never sends http.response.pathsend",
)
@pytest.mark.parametrize("serving", ["handler", "handle"])
@RUNNERS
def test_a_file_the_server_sends_commits_before_it_and_a_failed_commit_aborts_it(
    a_file: Path, serving: str, runner: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, lc, events = file_app(a_file, serving)

    async def main() -> list[tuple[list[str], Served]]:
        out = []
        async with lc.lifespan(app):
            for path in ("/file", "/file-fails"):
                events.clear()
                served = await call(app, path, runner, "GET", events)
                out.append((list(events), served))
        return out

    with caplog.at_level(logging.INFO, logger="tether"):
        ok, failed = asyncio.run(main())
    assert ok[0] == ["http.response.start", "commit", "http.response.pathsend"]
    assert ok[1].raised is None
    assert ok[1].sent[1] == {"type": "http.response.pathsend", "path": str(a_file)}
    # The commit failed before the file went: the file is not sent, the app raises (the
    # server closes the connection), and the failure is logged once, by tether.
    assert failed[0] == ["http.response.start", "commit failed"]
    assert isinstance(failed[1].raised, tether.fastapi._Aborted)
    assert str(failed[1].raised) == (
        "GET /file-fails: a cleanup failed after the response started (logged above): "
        "the response is aborted, its last body message not sent"
    )
    assert tether_errors(caplog) == [
        "tether: closing resource 'tx' failed: RuntimeError: commit failed: deferred constraint"
    ]


@pytest.mark.parametrize("route", ["/failed-commit", "/not-found", "/committed"])
def test_background_tasks_run_only_after_a_commit_that_went_through(route: str) -> None:
    """recipes.md ("Work that must follow the commit"): Starlette's `BackgroundTasks` run after
    the response, so only when the endpoint succeeded and the commit at the release point went
    through; not after a failed commit (a 500), nor after an error answer (trial 38: the
    recipe's whole point, pinned by nothing)."""
    from fastapi import BackgroundTasks, HTTPException

    ran: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource
    async def session() -> AsyncIterator[str]:
        yield "s"

    @lc.resource
    async def failing() -> AsyncIterator[str]:
        yield "s"
        raise RuntimeError("COMMIT failed")  # the commit fails at the release point

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/failed-commit")
    async def failed_commit(
        s: Annotated[str, Depends(failing)], after: BackgroundTasks
    ) -> dict[str, str]:
        after.add_task(ran.append, "failed-commit")
        return {"s": s}

    @app.post("/{name}")
    async def other(
        name: str, s: Annotated[str, Depends(session)], after: BackgroundTasks
    ) -> dict[str, str]:
        after.add_task(ran.append, name)
        if name == "not-found":
            raise HTTPException(404)
        return {"s": s}

    with TestClient(app, raise_server_exceptions=False) as client:
        status = client.post(route).status_code
    expected = {"/failed-commit": 500, "/not-found": 404, "/committed": 200}[route]
    assert status == expected
    assert ran == (["committed"] if route == "/committed" else [])
