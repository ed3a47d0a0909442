"""The release point through FastAPI's TestClient; run on every FastAPI version of the matrix."""

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, WebSocket, WebSocketException
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import tether
from tests.inprocess import Exchange, http_scope
from tests.unit._messages import exactly
from tether.fastapi import _installed, _TetherRoute, _walk, health_router


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, event: str) -> None:
        self.events.append(event)


def recorded_conn(lc: tether.Lifecycle, rec: Recorder) -> Any:
    """A request resource "conn" that records its opening and closing."""

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        rec("open")
        yield "conn"
        rec("close")

    return conn


# Where make_app puts its routes: on the app itself, on an included APIRouter, or on a
# router included in a router (FastAPI 0.137+ includes routers by reference: their routes
# are served through per-inclusion copies of their apps). "custom": on the app, made by a
# route class that wraps the app FastAPI builds, which tether cannot rebuild: it wraps the
# route's `handle` (and `send`) instead of FastAPI's request handler. "custom-router": the
# same route class, on an included router. "task": on the app, each request served from a
# task of its own, as uvicorn serves it (TestClient runs the app in an anyio task group,
# where tether closes under an anyio shield: "task" takes the path uvicorn's requests take).
LAYOUTS = ("app", "router", "nested", "custom", "custom-router", "task")


class OwnTask:
    """ASGI middleware: serve each HTTP request from a new asyncio task."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import asyncio

        await asyncio.get_running_loop().create_task(self.app(scope, receive, send))


class TimedRoute(APIRoute):
    """A route class that wraps its own ASGI app (as per-route timing or tracing does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = self.app

        async def timed(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("state", {})["timed"] = True
            await inner(scope, receive, send)

        self.app = timed


_layout = {"now": "app"}


@pytest.fixture(autouse=True, params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> Iterator[str]:
    _layout["now"] = request.param
    yield request.param
    _layout["now"] = "app"


def layout_app(**kwargs: Any) -> tuple[FastAPI, Any]:
    """An app for the current layout, and where its routes go (the app itself, or a router
    that `include_routes` then includes)."""
    root = FastAPI(**kwargs)
    target: Any = root
    now = _layout["now"]
    if now == "custom":
        root.router.route_class = TimedRoute
    elif now == "custom-router":
        target = APIRouter(route_class=TimedRoute)
    elif now == "task":
        root.add_middleware(OwnTask)
    elif now != "app":
        target = APIRouter()
    return root, target


def include_routes(root: FastAPI, target: Any) -> None:
    """Include *target*'s routes in *root* as the layout says (once more for "nested")."""
    if _layout["now"] == "nested":
        outer = APIRouter()
        outer.include_router(target)
        target = outer
    if target is not root:
        root.include_router(target)


def make_app(release: str = "handler") -> tuple[FastAPI, tether.Lifecycle, Recorder]:
    rec = Recorder()
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        rec("pool open")
        yield "pool"
        rec("pool close")

    @lc.resource(release=release)  # type: ignore[call-overload]
    async def session(pool: str) -> AsyncIterator[dict[str, Any]]:
        rec("session open")
        tx: dict[str, Any] = {"pool": pool}
        try:
            yield tx
        except BaseException as exc:
            rec(f"rollback {type(exc).__name__}")
            raise
        else:
            if tx.get("fail_commit"):
                rec("commit failed")
                raise RuntimeError("commit failed: duplicate key")
            rec("commit")
        finally:
            rec("session close")

    root, app = layout_app(lifespan=lc.lifespan)
    Session = Annotated[dict[str, Any], Depends(session)]

    def repo(s: Session) -> dict[str, Any]:
        return s

    async def other(s: Session) -> dict[str, Any]:
        return s

    @app.get("/ok")
    async def ok(s: Session) -> dict[str, str]:
        rec("endpoint")
        return {"pool": s["pool"]}

    @app.get("/three")
    async def three(
        s: Session,
        r: Annotated[dict[str, Any], Depends(repo)],
        o: Annotated[dict[str, Any], Depends(other)],
    ) -> dict[str, bool]:
        return {"same": s is r is o}

    @app.get("/fail-commit")
    async def fail_commit(s: Session) -> dict[str, str]:
        s["fail_commit"] = True
        return {"status": "written"}

    @app.get("/http-error")
    async def http_error(s: Session) -> None:
        raise HTTPException(status_code=404, detail="nope")

    @app.get("/error-status")
    async def error_status(s: Session) -> JSONResponse:
        return JSONResponse({"detail": "conflict"}, status_code=409)

    @app.get("/boom")
    async def boom(s: Session) -> None:
        raise ValueError("boom")

    @app.get("/sync")
    def sync_endpoint(s: Session) -> dict[str, str]:
        rec("sync endpoint")
        return {"pool": s["pool"]}

    @app.get("/none")
    async def none() -> dict[str, str]:
        return {"none": "yes"}

    @app.get("/stream")
    async def stream(s: Session) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                rec(f"chunk {i} session={'closed' if 'session close' in rec.events else 'open'}")
                yield f"{i}\n".encode()
                await anyio.sleep(0)

        return StreamingResponse(body())

    # A repository over the session, declared once (default release), used by a route that
    # streams from it (marked: the session stays open for the body) and one that does not.
    @lc.resource
    async def repository(session: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"session": session}

    Repo = Annotated[dict[str, Any], Depends(repository)]

    def rows(label: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                state = "closed" if "session close" in rec.events else "open"
                rec(f"{label} {i} session={state}")
                yield f"{i}\n".encode()
                await anyio.sleep(0)

        return StreamingResponse(body())

    @app.get("/rows-streamed")
    @tether.fastapi.release("response")
    async def rows_streamed(r: Repo) -> StreamingResponse:
        return rows("row")

    @app.get("/rows-computed")
    async def rows_computed(r: Repo) -> StreamingResponse:
        return rows("row")

    @app.get("/rows-refused")
    @tether.fastapi.release("response")
    async def rows_refused(r: Repo) -> JSONResponse:
        return JSONResponse({"detail": "conflict"}, status_code=409)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, s: Session) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"{text} via {s['pool']}")
        await websocket.close()

    @app.websocket("/ws-refused")
    async def ws_refused(websocket: WebSocket, s: Session) -> None:
        await websocket.accept()
        await websocket.receive_text()
        raise WebSocketException(code=1008, reason="not allowed")

    @app.websocket("/ws-handled")
    async def ws_handled(websocket: WebSocket, s: Session) -> None:
        await websocket.accept()
        await websocket.receive_text()
        raise Refused

    @app.websocket("/ws-idle")
    async def ws_idle(websocket: WebSocket, s: Session) -> None:
        import asyncio

        await websocket.accept()
        await websocket.receive_text()
        try:
            await asyncio.wait_for(websocket.receive_text(), 0.1)
        except TimeoutError:  # caught here: an idle client closed, no failure
            await websocket.close(code=1000)

    async def refused(websocket: WebSocket, exc: Exception) -> None:
        await websocket.close(code=4000)

    root.add_exception_handler(Refused, refused)  # type: ignore[arg-type]
    include_routes(root, app)
    return root, lc, rec


class Refused(Exception):
    pass


class TestHandlerRelease:
    def test_commit_before_response(self) -> None:
        """The session commits and closes before the response; app resources at shutdown."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/ok").json() == {"pool": "pool"}
            assert rec.events == [
                "pool open",
                "session open",
                "endpoint",
                "commit",
                "session close",
            ]
        assert rec.events[-1] == "pool close"

    def test_opened_once_per_request(self) -> None:
        """The endpoint and two dependencies asking for the session share one value."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/three").json() == {"same": True}
            assert rec.events.count("session open") == 1
            client.get("/three")
            assert rec.events.count("session open") == 2

    def test_failing_commit_turns_the_response_into_500(self) -> None:
        """A commit that fails in cleanup gives a 500, never a 200."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            response = client.get("/fail-commit")
        assert response.status_code == 500
        assert response.text == '{"detail":"Internal Server Error"}'
        assert "commit failed" in rec.events

    def test_http_exception_rolls_back(self) -> None:
        """An HTTPException raised by the endpoint reaches the cleanup, which rolls back."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            response = client.get("/http-error")
        assert response.status_code == 404
        assert "rollback HTTPException" in rec.events
        assert "commit" not in rec.events

    def test_error_status_rolls_back(self) -> None:
        """An endpoint answering 409 without raising still takes the failure path."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/error-status").status_code == 409
        assert "rollback FailedResponse" in rec.events

    def test_exception_rolls_back_before_the_500(self) -> None:
        """An unhandled exception rolls back, then answers 500."""
        app, _, rec = make_app()
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/boom").status_code == 500
        assert "rollback ValueError" in rec.events

    def test_exception_propagates_to_the_server(self) -> None:
        """tether does not swallow the endpoint's exception."""
        app, _, _ = make_app()
        with TestClient(app) as client, pytest.raises(ValueError, match="^boom$"):
            client.get("/boom")

    def test_sync_endpoint(self) -> None:
        """A `def` endpoint gets the request resource too."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/sync").json() == {"pool": "pool"}
        assert rec.events[1:5] == ["session open", "sync endpoint", "commit", "session close"]

    def test_stream_after_handler_release(self) -> None:
        """With release="handler" the session is closed before a streaming body runs."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/stream").text == "0\n1\n2\n"
        assert "chunk 0 session=closed" in rec.events

    def test_route_without_resources_is_untouched(self) -> None:
        """A route that uses no resource opens nothing and is not wrapped."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/none").json() == {"none": "yes"}
        assert "session open" not in rec.events
        wrapped = {
            getattr(r, "path", ""): _installed(r)
            for r, _, _, _ in _walk(app.routes, included=False, extra=())
        }
        assert wrapped["/none"] is False
        assert wrapped["/ok"] is True

    def test_which_wrapper(self) -> None:
        """FastAPI's request handler is wrapped where tether can rebuild the route's app the
        way FastAPI built it; a route class that wraps that app gets its `handle` wrapped."""
        app, _, _ = make_app()
        with TestClient(app) as client:
            assert client.get("/ok").json() == {"pool": "pool"}
        routes = {
            getattr(r, "path", ""): r for r, _, _, _ in _walk(app.routes, included=False, extra=())
        }
        by_handle = isinstance(vars(routes["/ok"]).get("handle"), _TetherRoute)
        assert by_handle is _layout["now"].startswith("custom")

    def test_websocket_scope_per_connection(self) -> None:
        """A WebSocket route gets one unit of work per connection, closed when it ends."""
        app, _, rec = make_app()
        with TestClient(app) as client:
            for _ in range(2):
                with client.websocket_connect("/ws") as ws:
                    ws.send_text("hi")
                    assert ws.receive_text() == "hi via pool"
        assert rec.events.count("session open") == 2
        assert rec.events.count("session close") == 2
        assert rec.events.count("commit") == 2

    @pytest.mark.parametrize(
        ("path", "code", "failure"),
        [("/ws-refused", 1008, "WebSocketException"), ("/ws-handled", 4000, "Refused")],
    )
    def test_websocket_refused_by_an_exception_rolls_back(
        self, path: str, code: int, failure: str
    ) -> None:
        """An endpoint that writes, then raises `WebSocketException` (Starlette's way to
        refuse a client) or an exception the app's handler answers with a close: the
        route's app swallows it, and the session rolls back all the same, seeing it
        (before, it committed on a route of the app)."""
        from starlette.websockets import WebSocketDisconnect

        app, _, rec = make_app()
        with TestClient(app) as client, client.websocket_connect(path) as ws:
            ws.send_text("write")
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert closed.value.code == code
        assert f"rollback {failure}" in rec.events
        assert "commit" not in rec.events
        assert rec.events.count("session close") == 1

    def test_websocket_closed_from_the_endpoints_own_except_commits(self) -> None:
        """A close the endpoint sends from an `except` block of its own (an idle client,
        timed out) is no failure: its writes commit."""
        from starlette.websockets import WebSocketDisconnect

        app, _, rec = make_app()
        with TestClient(app) as client, client.websocket_connect("/ws-idle") as ws:
            ws.send_text("write")
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert closed.value.code == 1000
        assert "commit" in rec.events
        assert not [e for e in rec.events if e.startswith("rollback")]


def test_generator_endpoints_keep_their_values_until_the_stream_ends() -> None:
    """FastAPI 0.137+ streams what an endpoint yields (JSON Lines; server-sent events with
    `EventSourceResponse`): its body runs while the response streams, after the handler
    returned. tether keeps its values open until the last chunk, then commits, as under
    `@release("response")` (before, the endpoint got a session already closed and the
    client a 200 cut short)."""
    sse = pytest.importorskip("fastapi.sse", reason="generator endpoints are FastAPI 0.137+")
    app, lc, rec = make_app()
    Session = Annotated[dict[str, Any], Depends(lc.resources["session"])]

    def state() -> str:
        opened = rec.events.count("session open") > rec.events.count("session close")
        return "open" if opened else "closed"

    @app.get("/rows.jsonl")
    async def rows_jsonl(s: Session) -> Any:
        for i in range(2):
            rec(f"row {i} session={state()}")
            yield {"row": i}

    @app.get("/rows.sse", response_class=sse.EventSourceResponse)
    async def rows_sse(s: Session) -> Any:
        for i in range(2):
            rec(f"event {i} session={state()}")
            yield {"row": i}

    with TestClient(app) as client:
        lines = client.get("/rows.jsonl").text.splitlines()
        assert [json.loads(line) for line in lines] == [{"row": 0}, {"row": 1}]
        events = client.get("/rows.sse").text.split("\n\n")
        assert [json.loads(e.removeprefix("data: ")) for e in events if e] == [
            {"row": 0},
            {"row": 1},
        ]
    streamed = [e for e in rec.events if e.startswith(("row", "event"))]
    assert streamed == [
        "row 0 session=open",
        "row 1 session=open",
        "event 0 session=open",
        "event 1 session=open",
    ]
    assert rec.events.count("commit") == 2


class TestRouteRelease:
    """`@tether.fastapi.release("response")` on a route (pain.md T2.5): a resource shared by
    routes that stream from the database and routes that do not is declared once."""

    def test_marked_route_keeps_every_value_until_the_last_chunk(self) -> None:
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/rows-streamed").text == "0\n1\n2\n"
        rows = [e for e in rec.events if e.startswith("row")]
        assert rows == [f"row {i} session=open" for i in range(3)]
        assert rec.events.index("commit") > rec.events.index("row 2 session=open")
        assert rec.events.index("session close") > rec.events.index("commit")

    def test_unmarked_route_releases_the_same_resource_at_the_handler(self) -> None:
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/rows-computed").text == "0\n1\n2\n"
        rows = [e for e in rec.events if e.startswith("row")]
        assert rows == [f"row {i} session=closed" for i in range(3)]

    def test_marked_route_with_an_error_status_rolls_back_after_the_response(self) -> None:
        app, _, rec = make_app()
        with TestClient(app) as client:
            assert client.get("/rows-refused").status_code == 409
        assert "rollback FailedResponse" in rec.events
        assert "commit" not in rec.events

    def test_only_response_is_a_route_release_point(self) -> None:
        with pytest.raises(ValueError) as caught:
            tether.fastapi.release("handler")
        assert str(caught.value) == (
            "tether.fastapi.release('handler'): a route can only keep its resources until its "
            'response ends: release("response"). Each resource\'s own release= (default '
            '"handler") applies to routes without it.'
        )


class TestResponseRelease:
    def test_stream_uses_the_session_until_the_last_chunk(self) -> None:
        """With release="response" the session stays open for the whole body."""
        app, _, rec = make_app(release="response")
        with TestClient(app) as client:
            assert client.get("/stream").text == "0\n1\n2\n"
        chunks = [e for e in rec.events if e.startswith("chunk")]
        assert chunks == [f"chunk {i} session=open" for i in range(3)]
        assert rec.events.index("session close") > rec.events.index("chunk 2 session=open")

    def test_generator_endpoints_stream_with_the_session_open(self) -> None:
        """FastAPI's generator endpoints (0.135+) (SSE, JSON lines) run their items with a
        release="response" session open, and it commits after the last one."""
        sse = pytest.importorskip("fastapi.sse")
        rec = Recorder()
        lc = tether.Lifecycle()

        @lc.resource(release="response")
        async def session() -> AsyncIterator[str]:
            rec("open")
            yield "s"
            rec("commit")

        app = FastAPI(lifespan=lc.lifespan)
        Session = Annotated[str, Depends(session)]

        @app.get("/events", response_class=sse.EventSourceResponse)
        async def events(s: Session) -> AsyncIterator[int]:
            for i in range(2):
                rec(f"item {i} committed={'commit' in rec.events}")
                yield i

        @app.get("/lines")
        async def lines(s: Session) -> AsyncIterator[int]:
            for i in range(2):
                rec(f"item {i} committed={'commit' in rec.events}")
                yield i

        one = ["open", "item 0 committed=False", "item 1 committed=False", "commit"]
        with TestClient(app) as client:
            assert client.get("/events").text == "data: 0\n\ndata: 1\n\n"
            assert rec.events == one
            rec.events.clear()
            assert client.get("/lines").text == "0\n1\n"
            assert rec.events == one


class TestUnavailable:
    def test_open_timeout_answers_503_with_retry_after(self) -> None:
        """A resource that cannot open in time gives 503 with Retry-After, not a hang."""
        lc = tether.Lifecycle()

        @lc.resource(timeout=0.05, retry_after=3)
        async def slow() -> AsyncIterator[int]:
            await anyio.sleep(10)
            yield 1

        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        async def root(v: Annotated[int, Depends(slow)]) -> int:
            return v

        with TestClient(app) as client:
            response = client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert response.json() == {
            "detail": "Resource 'slow' did not open within 0.05 s (its timeout=). Check that "
            "its backend is reachable and not saturated, or raise the timeout."
        }


class TestOverrides:
    def test_override_app_resource_for_a_test(self) -> None:
        """Overriding an app resource changes what the request resources get, and is undone."""
        app, lc, _ = make_app()
        pool = lc.resources["pool"]
        with lc.override(pool, "fake-pool"), TestClient(app) as client:
            assert client.get("/ok").json() == {"pool": "fake-pool"}
        with TestClient(app) as client:
            assert client.get("/ok").json() == {"pool": "pool"}

    def test_fastapi_dependency_overrides_still_work(self) -> None:
        """FastAPI's own dependency_overrides can replace a tether resource."""
        app, lc, rec = make_app()
        app.dependency_overrides[lc.resources["session"]] = lambda: {"pool": "overridden"}
        with TestClient(app) as client:
            assert client.get("/ok").json() == {"pool": "overridden"}
        assert "session open" not in rec.events

    def test_fastapi_dependency_overrides_set_while_the_app_runs(self) -> None:
        """An override set once the app has started (a test client open in a fixture) takes
        effect from the next request, as in FastAPI: a generator override (FastAPI's testing
        pattern) runs its cleanup, and an endpoint parameter and a sub-dependency asking for
        the same resource get one value. Cleared, the resource is used again."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def session() -> AsyncIterator[dict[str, bool]]:
            yield {"real": True}

        @lc.resource
        def kind(session: dict[str, bool]) -> str:  # tether's graph: the real session
            return "real" if "real" in session else "fake"

        class Repo:
            def __init__(self, s: Annotated[dict[str, bool], Depends(session)]) -> None:
                self.s = s

        def fake() -> Iterator[dict[str, bool]]:
            events.append("open")
            try:
                yield {"fake": True}
            finally:
                events.append("close")

        app, router = layout_app(lifespan=lc.lifespan)

        @router.get("/x")
        async def x(
            repo: Annotated[Repo, Depends()],
            s: Annotated[dict[str, bool], Depends(session)],
            k: Annotated[str, Depends(kind)],
        ) -> dict[str, Any]:
            return {"same": repo.s is s, "s": s, "kind": k}

        include_routes(app, router)
        with TestClient(app) as client:
            real = {"same": True, "s": {"real": True}, "kind": "real"}
            assert client.get("/x").json() == real
            app.dependency_overrides[session] = fake
            assert client.get("/x").json() == {"same": True, "s": {"fake": True}, "kind": "real"}
            assert events == ["open", "close"]
            app.dependency_overrides.clear()
            assert client.get("/x").json() == real
        assert events == ["open", "close"]

    def test_override_set_while_a_request_is_being_solved(self) -> None:
        """A request FastAPI was already solving when an override took effect keeps the
        resource itself (no error, no value missing); the next ones get the override."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import anyio.to_thread

        lc = tether.Lifecycle()

        @lc.resource
        async def session() -> AsyncIterator[dict[str, bool]]:
            yield {"real": True}

        reached, go = threading.Event(), threading.Event()
        calls: list[int] = []

        async def slow() -> None:
            calls.append(1)
            if len(calls) == 1:  # the first request waits here, mid-solve
                reached.set()
                await anyio.to_thread.run_sync(go.wait, 5)

        app, router = layout_app(lifespan=lc.lifespan)

        @router.get("/x")
        async def x(
            _: Annotated[None, Depends(slow)], s: Annotated[dict[str, bool], Depends(session)]
        ) -> dict[str, bool]:
            return s

        include_routes(app, router)
        with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.get, "/x")
            assert reached.wait(5)
            app.dependency_overrides[session] = lambda: {"fake": True}
            assert client.get("/x").json() == {"fake": True}  # this one gives them back
            go.set()
            assert first.result(5).json() == {"real": True}


class TestHealth:
    def test_ready_and_live(self) -> None:
        """/health/ready is 200 while checks pass and 503 with the report when one fails."""
        lc = tether.Lifecycle()
        state = {"up": True}

        def probe(value: str) -> None:
            if not state["up"]:
                raise ConnectionError("connection refused")

        @lc.resource(scope="app", check=probe)
        def db() -> str:
            return "db"

        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(health_router(lc, cache=0))  # every probe runs the checks
        with TestClient(app) as client:
            assert client.get("/health/live").json() == {"status": "alive", "state": "running"}
            ready = client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["checks"]["db"]["status"] == "ok"
            state["up"] = False
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.headers["retry-after"] == "5"
            assert ready.json()["checks"]["db"] == {
                "status": "failing",
                "latency_ms": ready.json()["checks"]["db"]["latency_ms"],
                "error": "ConnectionError: connection refused",
            }

    def test_health_routes_appear_in_openapi(self) -> None:
        """An app with the health routes still serves /docs: their annotations resolve."""
        lc = tether.Lifecycle()
        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(health_router(lc))
        with TestClient(app) as client:
            schema = client.get("/openapi.json")
        assert schema.status_code == 200
        assert {"/health/live", "/health/ready"} <= set(schema.json()["paths"])


class TestStarlette:
    def test_plain_starlette_route(self) -> None:
        """A plain Starlette app gets values with `await res(request)`, released the same way."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        rec = Recorder()
        lc = tether.Lifecycle()

        @lc.resource
        def conn() -> Iterator[str]:
            rec("open")
            yield "conn"
            rec("close")

        async def home(request: Request) -> PlainTextResponse:
            value = await conn(request)
            rec("endpoint")
            return PlainTextResponse(value)

        app = Starlette(routes=[Route("/", home)], lifespan=lc.lifespan)
        with TestClient(app) as client:
            assert client.get("/").text == "conn"
        assert rec.events == ["open", "endpoint", "close"]


class TestMiddleware:
    def test_behind_base_http_middleware(self) -> None:
        """With a BaseHTTPMiddleware in the stack, commit, rollback and commit failure hold."""
        from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
        from starlette.requests import Request
        from starlette.responses import Response

        app, _, rec = make_app()

        async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
            response = await call_next(request)
            response.headers["x-mw"] = "1"
            return response

        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
        with TestClient(app) as client:
            ok = client.get("/ok")
            assert (ok.status_code, ok.headers["x-mw"]) == (200, "1")
            assert client.get("/http-error").status_code == 404
            assert client.get("/fail-commit").status_code == 500
        assert rec.events.count("commit") == 1
        assert "rollback HTTPException" in rec.events
        assert "commit failed" in rec.events


class TestIncludedRouters:
    def test_router_included_twice_serves_both_paths(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One router included under two prefixes: each path gets its own unit of work, and
        what tether logs names the path that was served."""
        rec = Recorder()
        lc = tether.Lifecycle()

        conn = recorded_conn(lc, rec)

        @lc.resource(timeout=0.05, retry_after=2)
        async def slow() -> AsyncIterator[str]:
            await anyio.sleep(10)
            yield "never"

        items = APIRouter(prefix="/items")

        @items.get("/one")
        async def one(c: Annotated[str, Depends(conn)]) -> str:
            rec("endpoint")
            return c

        @items.get("/slow")
        async def slow_route(v: Annotated[str, Depends(slow)]) -> str:
            return v

        v1, v2 = APIRouter(prefix="/v1"), APIRouter(prefix="/v2")
        v1.include_router(items)
        v2.include_router(items)
        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(v1)
        app.include_router(v2)
        with TestClient(app) as client:
            assert client.get("/v1/items/one").json() == "conn"
            assert client.get("/v2/items/one").json() == "conn"
            with caplog.at_level("WARNING", logger="tether"):
                assert client.get("/v2/items/slow").status_code == 503
        assert rec.events == ["open", "endpoint", "close"] * 2
        assert "tether: GET /v2/items/slow answered 503" in caplog.text

    def test_resources_named_where_the_router_is_included(self) -> None:
        """A resource asked for by `include_router(..., dependencies=...)` (directly, or by a
        dependency of it) is opened and closed around the routes of that inclusion only."""
        rec = Recorder()
        lc = tether.Lifecycle()

        conn = recorded_conn(lc, rec)

        async def audited(c: Annotated[str, Depends(conn)]) -> None:
            rec(f"audit via {c}")

        router = APIRouter()

        @router.get("/x")
        async def x() -> str:
            rec("endpoint")
            return "x"

        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(router, prefix="/direct", dependencies=[Depends(conn)])
        app.include_router(router, prefix="/nested", dependencies=[Depends(audited)])
        app.include_router(router, prefix="/plain")
        with TestClient(app) as client:
            for prefix in ("/direct", "/nested", "/plain"):
                assert client.get(f"{prefix}/x").json() == "x"
        assert rec.events == [
            *("open", "endpoint", "close"),
            *("open", "audit via conn", "endpoint", "close"),
            "endpoint",
        ]

    def test_plain_starlette_route_on_an_included_router(self) -> None:
        """A Starlette route added to an APIRouter gets its values and releases them."""
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse

        rec = Recorder()
        lc = tether.Lifecycle()

        conn = recorded_conn(lc, rec)

        async def plain(request: Request) -> PlainTextResponse:
            value = await conn(request)
            rec("endpoint")
            return PlainTextResponse(value)

        router = APIRouter()
        router.add_route("/plain", plain)
        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(router)
        with TestClient(app) as client:
            assert client.get("/plain").text == "conn"
        assert rec.events == ["open", "endpoint", "close"]


class TestInstall:
    def test_route_added_after_startup_says_how_to_fix(self) -> None:
        """A resource asked for on a route tether never saw gives a ScopeError naming the fix."""
        app, lc, _ = make_app()
        session = lc.resources["session"]
        with TestClient(app) as client:

            @app.get("/late")
            async def late(s: Annotated[dict[str, Any], Depends(session)]) -> dict[str, str]:
                return {"late": "yes"}

            with pytest.raises(
                tether.ScopeError,
                match=exactly(
                    "Resource 'session' was asked for on '/late', a route this Lifecycle does not "
                    "own: the route was added after the app started, or the app's lifespan is "
                    "not `lc.lifespan`. Use `FastAPI(lifespan=lc.lifespan)`, or call "
                    "`tether.fastapi.install(app, lc)` after adding the routes."
                ),
            ):
                client.get("/late")

    def test_a_client_that_never_ran_the_lifespan_says_how_to_fix(self) -> None:
        """`TestClient(app)` without `with` runs no lifespan: the error says so, not that the
        route is unknown (the commonest mistake in tests)."""
        app, lc, rec = make_app()
        session = lc.resources["session"]

        @app.get("/s")
        async def s(value: Annotated[dict[str, Any], Depends(session)]) -> dict[str, str]:
            return {"ok": "yes"}

        client = TestClient(app)
        with pytest.raises(
            tether.ScopeError,
            match=exactly(
                "Resource 'session' was asked for on '/s' before this Lifecycle started: the "
                "app's lifespan is `lc.lifespan`, but it has not run. In tests, enter the "
                "client (`with TestClient(app) as client:`), or, with httpx's `ASGITransport`, "
                "which never runs a lifespan, wrap the client in `async with "
                "lc.lifespan(app):`. Under a server, it was started without the ASGI lifespan "
                "(`uvicorn --lifespan off`, `granian --interface asginl`) or does not run one "
                "(daphne): enable it (`uvicorn --lifespan on`, `granian --interface asgi`)."
            ),
        ):
            client.get("/s")
        # The same on a WebSocket route (before, on FastAPI 0.120+: a bare TypeError from
        # the factory, called without the app resource it needs).
        with (
            pytest.raises(tether.ScopeError, match="on '/ws' before this Lifecycle started"),
            client.websocket_connect("/ws"),
        ):
            pass  # pragma: no cover
        assert rec.events == []  # nothing opened
        with client:  # the fix the message names
            assert client.get("/s").json() == {"ok": "yes"}
        assert rec.events[0] == "pool open"
        assert rec.events[-1] == "pool close"

    def test_asgi_transport_in_the_lifespan_the_error_names(self) -> None:
        """httpx's `ASGITransport` never runs a lifespan: `async with lc.lifespan(app):`, the
        fix the error above names, opens the app scope and owns the routes."""
        import httpx

        rec = Recorder()
        lc = tether.Lifecycle()
        conn = recorded_conn(lc, rec)
        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        async def root(c: Annotated[str, Depends(conn)]) -> str:
            rec("endpoint")
            return c

        async def main() -> list[str]:
            transport = httpx.ASGITransport(app=app)
            async with (
                lc.lifespan(app),
                httpx.AsyncClient(transport=transport, base_url="http://t") as client,
            ):
                return [(await client.get("/")).json() for _ in range(2)]

        assert anyio.run(main) == ["conn", "conn"]
        assert rec.events == ["open", "endpoint", "close"] * 2
        assert lc.state is tether.State.CLOSED

    def test_explicit_install_for_an_app_with_its_own_lifespan(self) -> None:
        """`install(app, lc)` plus `lc.run()` in the app's own lifespan gives the same release point."""
        from contextlib import asynccontextmanager

        from tether.fastapi import install

        rec = Recorder()
        lc = tether.Lifecycle()

        conn = recorded_conn(lc, rec)

        @asynccontextmanager
        async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with lc.run():
                yield

        app = FastAPI(lifespan=own_lifespan)

        @app.get("/")
        async def root(c: Annotated[str, Depends(conn)]) -> str:
            rec("endpoint")
            return c

        install(app, lc)
        install(app, lc)  # harmless twice
        with TestClient(app) as client:
            assert client.get("/").json() == "conn"
        assert rec.events == ["open", "endpoint", "close"]


def test_request_before_the_lifecycle_started_names_the_fix(layout: str) -> None:
    """`install(app, lc)` on an app whose lifespan never runs `lc`: a resource that needs
    an app resource says the app scope is not open and how to open it (it used to fail
    with a bare TypeError from its factory, missing the pool), and opens nothing."""
    from tether.fastapi import install

    lc = tether.Lifecycle()
    opened: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"  # pragma: no cover

    @lc.resource
    async def conn(pool: str) -> AsyncIterator[str]:
        opened.append("conn")  # pragma: no cover
        yield pool  # pragma: no cover

    app, router = layout_app()

    @router.get("/x")
    async def x(c: Annotated[str, Depends(conn)]) -> str:
        return c  # pragma: no cover

    include_routes(app, router)
    install(app, lc)
    expected = (
        "App resource 'pool' is not open: the app scope has not started. Start it with "
        "`FastAPI(lifespan=lc.lifespan)` (and `with TestClient(app):` in tests) or "
        "`async with lc.run():`."
    )
    with pytest.raises(tether.ScopeError, match=exactly(expected)):
        TestClient(app).get("/x")
    assert opened == []


def test_callbacks_scheduled_during_a_request_do_not_keep_it_alive() -> None:
    """A timer set during a request copies the request's context (uvicorn's keep-alive timer
    does, so does asyncpg's idle-connection timer): the request's unit of work, with its
    send and receive, is still freed as soon as the request ends."""
    import asyncio
    import weakref

    lc = tether.Lifecycle()
    units: list[Any] = []
    timers: list[asyncio.TimerHandle] = []

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/x")
    async def x(c: Annotated[str, Depends(conn)]) -> dict[str, str]:
        (unit,) = lc._units
        units.append(weakref.ref(unit))
        timers.append(asyncio.get_running_loop().call_later(3600, lambda: None))
        return {"c": c}

    with TestClient(app) as client:
        assert client.get("/x").json() == {"c": "conn"}
        try:
            assert units[0]() is None
        finally:
            client.portal.call(lambda: timers[0].cancel())  # type: ignore[union-attr]


@pytest.mark.parametrize("layout", list(LAYOUTS), indirect=True)
def test_cleanups_run_outside_the_request_context(layout: str) -> None:
    """What a cleanup schedules copies the context it runs in (asyncpg sets its idle-connection
    timer when a connection is released): the request's unit of work is no longer in it, so
    such a timer holds nothing of the request (under load those timers outlive thousands of
    requests, and what they hold is work for the garbage collector)."""
    import contextvars

    lc = tether.Lifecycle()
    seen: dict[str, set[str]] = {}

    def holding() -> set[str]:
        # The context variables a timer scheduled now would keep a value of (a stream's
        # task of its own, on ASGI before 2.4, has a copy of the context; tether sets the
        # unit's to None there).
        return {var.name for var, value in contextvars.copy_context().items() if value is not None}

    def recorded(name: str, release: Any) -> Any:
        @lc.resource(name=name, release=release)
        async def conn() -> AsyncIterator[str]:
            seen[f"{name} open"] = holding()
            yield name
            await anyio.sleep(0)  # a release that waits, as a pool's does
            seen[f"{name} close"] = holding()

        return conn

    conn = recorded("conn", "handler")
    feed = recorded("feed", "response")  # a stream's: closed as its body ends
    app, router = layout_app(lifespan=lc.lifespan)

    @router.get("/x")
    async def x(c: Annotated[str, Depends(conn)]) -> dict[str, str]:
        return {"c": c}

    @router.get("/stream")
    async def stream(f: Annotated[str, Depends(feed)]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield f.encode()

        return StreamingResponse(body())

    sock = recorded("sock", "handler")

    @router.websocket("/ws")
    async def ws(websocket: WebSocket, s: Annotated[str, Depends(sock)]) -> None:
        await websocket.accept()
        await websocket.send_text(s)
        await websocket.close()

    include_routes(app, router)
    with TestClient(app) as client:
        assert client.get("/x").json() == {"c": "conn"}
        assert client.get("/stream").text == "feed"
        with client.websocket_connect("/ws") as connection:
            assert connection.receive_text() == "sock"
    for name in ("conn", "feed", "sock"):
        assert "tether_unit" in seen[f"{name} open"]
        assert "tether_unit" not in seen[f"{name} close"]


def test_graph_of_request_resources_opens_each_once_and_closes_in_reverse() -> None:
    """Endpoint parameters that depend on each other (sync and async, with and without
    cleanup) open once each, in dependency order, and close in reverse before the response."""
    lc = tether.Lifecycle()
    rec = Recorder()

    @lc.resource
    async def c() -> str:
        rec("open c")
        return "c"

    @lc.resource
    def d(c: str) -> str:
        rec("open d")
        return c + "d"

    @lc.resource(thread=False)
    def h(c: str, d: str) -> Iterator[str]:
        rec("open h")
        yield c + d + "h"
        rec("close h")

    @lc.resource
    async def i(d: str, h: str) -> AsyncIterator[str]:
        rec("open i")
        yield h + "i"
        rec("close i")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/graph")
    async def graph(
        i: Annotated[str, Depends(i)],
        c: Annotated[str, Depends(c)],
        h: Annotated[str, Depends(h)],
        cc: Annotated[str, Depends(c)],
    ) -> dict[str, str]:
        rec("endpoint")
        return {"v": i + c + h + cc}

    with TestClient(app) as client:
        assert client.get("/graph").json() == {"v": "ccdhi" + "c" + "ccdh" + "c"}
        assert rec.events == [
            "open c",
            "open d",
            "open h",
            "open i",
            "endpoint",
            "close i",
            "close h",
        ]
        stats = lc.stats().resources
        assert [(stats[n].opened, stats[n].closed, stats[n].in_use) for n in "cdhi"] == [
            (1, 1, 0)
        ] * 4


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_generator_resource_that_does_not_yield_fails_the_request(kind: str) -> None:
    """A generator resource that returns without yielding answers 500, with the reason."""
    lc = tether.Lifecycle()

    if kind == "async":

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            if False:  # pragma: no cover
                yield "never"

    else:

        @lc.resource(thread=False)
        def conn() -> Iterator[str]:
            if False:  # pragma: no cover
                yield "never"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/x")
    async def x(c: Annotated[str, Depends(conn)]) -> dict[str, str]:
        return {"c": c}  # pragma: no cover

    with TestClient(app) as client:
        with pytest.raises(
            RuntimeError,
            match=r"^Resource 'conn': its generator returned without yielding a value\. ",
        ):
            client.get("/x")
        assert client.__class__(app, raise_server_exceptions=False).get("/x").status_code == 500
        stats = lc.stats().resources["conn"]
        assert (stats.opened, stats.open_errors, stats.in_use) == (0, 2, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["during the commit", "before the close"])
async def test_cancel_scope_around_a_request_keeps_its_cancellation_inside(when: str) -> None:
    """An anyio cancel scope around a request (a server-side timeout, a cancelled task
    group) is cancelled while the request's cleanup waits: the cleanup runs to its end,
    and the cancellation stays inside the scope; none fires at the caller's next await."""
    import asyncio

    from tether.fastapi import install

    lc = tether.Lifecycle()
    events: list[str] = []
    scopes: list[anyio.CancelScope] = []

    @lc.resource
    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        except BaseException as exc:
            await anyio.sleep(0.05)  # a rollback on the wire
            events.append(f"rolled back ({type(exc).__name__})")
            raise
        await anyio.sleep(0.05)  # a commit on the wire
        events.append("committed")

    app = FastAPI()

    @app.get("/work")
    async def work(s: Annotated[str, Depends(session)]) -> dict[str, str]:
        if when == "before the close":
            scopes[0].cancel()
            await anyio.sleep(1)
        else:
            asyncio.get_running_loop().call_later(0.01, scopes[0].cancel)
        return {"s": s}

    install(app, lc)
    exchange = Exchange()

    async with lc.run():
        with anyio.CancelScope() as cs:
            scopes.append(cs)
            await app(http_scope("GET", "/work"), exchange.receive, exchange.send)
        await asyncio.sleep(0)  # a cancellation left pending would fire here
        await asyncio.sleep(0.01)
    if when == "during the commit":
        assert events == ["committed"]
        assert exchange.statuses == [200]
    else:
        assert events == ["rolled back (CancelledError)"]
        assert exchange.statuses == []
        assert cs.cancelled_caught
    assert lc.stats().resources["session"].in_use == 0


@pytest.mark.anyio
async def test_cleanup_using_anyio_threads_in_a_cancelled_scope_finishes() -> None:
    """A cleanup that hands work to a thread (``anyio.to_thread.run_sync``: a sync client's
    ``close()``) while the request's anyio scope is cancelled (a streaming response's task
    group after the client left, a timeout middleware): the cleanup runs to its end,
    promptly, and the cancellation stays inside the scope."""
    import asyncio
    import time

    from tether.fastapi import install

    lc = tether.Lifecycle()
    events: list[str] = []
    scopes: list[anyio.CancelScope] = []

    @lc.resource
    async def client() -> AsyncIterator[str]:
        yield "client"
        scopes[0].cancel()  # cancelled while the cleanup runs
        await anyio.to_thread.run_sync(time.sleep, 0.02)  # close() of a sync client
        await anyio.to_thread.run_sync(time.sleep, 0.02)
        events.append("closed")

    app = FastAPI()

    @app.get("/work")
    async def work(c: Annotated[str, Depends(client)]) -> dict[str, str]:
        return {"c": c}

    install(app, lc)
    exchange = Exchange()

    async def request() -> None:
        with anyio.CancelScope() as cs:
            scopes.append(cs)
            await app(http_scope("GET", "/work"), exchange.receive, exchange.send)

    async with lc.run():
        task = asyncio.ensure_future(request())
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the cleanup did not finish within 5 s"
        assert not task.cancelled()
        task.result()
    assert events == ["closed"]


@pytest.mark.anyio
async def test_a_cleanup_keeps_its_own_timeout() -> None:
    """A cleanup that bounds one of its own waits (``anyio.move_on_after`` around a slow
    close) gets that timeout, under tether's shield: the request ends after the cleanup's
    0.05 s, not after the 5 s wait it gave up on."""
    import asyncio
    import time

    from tether.fastapi import install

    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource
    async def client() -> AsyncIterator[str]:
        yield "client"
        with anyio.move_on_after(0.05) as cs:
            await asyncio.sleep(5)  # a peer that never answers the goodbye
        events.append("gave up" if cs.cancelled_caught else "waited")

    app = FastAPI()

    @app.get("/work")
    async def work(c: Annotated[str, Depends(client)]) -> dict[str, str]:
        return {"c": c}

    install(app, lc)
    exchange = Exchange()

    async with lc.run():
        t0 = time.monotonic()
        await app(http_scope("GET", "/work"), exchange.receive, exchange.send)
        took = time.monotonic() - t0
    assert events == ["gave up"]
    assert exchange.statuses == [200]
    assert took < 2.0, took


def needs_function_scope() -> None:
    import inspect

    if "scope" not in inspect.signature(Depends).parameters:
        pytest.skip("Depends(scope=...) is FastAPI 0.121+")


class TestHandlerWrapper:
    """What wrapping FastAPI's request handler (not `send`) has to get right."""

    def test_response_values_close_when_the_response_is_never_sent(self) -> None:
        """A `release="response"` value whose response FastAPI never sends (a dependency's
        cleanup failed after the handler returned) still closes, seeing that failure."""
        needs_function_scope()
        rec = Recorder()
        lc = tether.Lifecycle()

        @lc.resource(release="response")
        async def conn() -> AsyncIterator[str]:
            rec("open")
            try:
                yield "conn"
            except BaseException as exc:
                rec(f"rollback {type(exc).__name__}")
                raise
            rec("commit")

        def audit() -> Iterator[None]:
            yield
            raise RuntimeError("audit failed")

        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        async def root(
            c: Annotated[str, Depends(conn)],
            _: Annotated[None, Depends(audit, scope="function")],  # type: ignore[call-arg]
        ) -> StreamingResponse:
            return StreamingResponse(iter([c]))

        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/").status_code == 500
            assert lc.stats().units_in_flight == 0
        assert rec.events == ["open", "rollback RuntimeError"]

    def test_function_scoped_cleanup_runs_before_the_release(self) -> None:
        """A `Depends(scope="function")` cleanup (FastAPI 0.121+) runs after the request
        handler returns, and may still use the request's resources: they close after it,
        before the response."""
        needs_function_scope()
        rec = Recorder()
        lc = tether.Lifecycle()
        conn = recorded_conn(lc, rec)

        async def audit(c: Annotated[str, Depends(conn)]) -> AsyncIterator[None]:
            yield
            rec(f"audit with {c}")

        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        async def root(
            c: Annotated[str, Depends(conn)],
            _: Annotated[None, Depends(audit, scope="function")],  # type: ignore[call-arg]
        ) -> str:
            rec("endpoint")
            return c

        with TestClient(app) as client:
            assert client.get("/").json() == "conn"
        assert rec.events == ["open", "endpoint", "audit with conn", "close"]

    def test_guarded_value_is_closed_when_its_commit_fails(self) -> None:
        """A `guard=True` value whose cleanup fails at the release point: the client gets
        500, and the value kept past the request refuses to be used. (Served from a plain
        asyncio task, as uvicorn serves: TestClient's requests run in an anyio task group,
        which takes tether's other path.)"""
        import asyncio

        import httpx

        from tether.fastapi import install

        lc = tether.Lifecycle()
        kept: list[Any] = []

        @lc.resource(guard=True)
        async def session() -> AsyncIterator[dict[str, str]]:
            yield {"state": "open"}
            raise RuntimeError("commit failed")

        app = FastAPI()

        @app.get("/")
        async def root(s: Annotated[dict[str, str], Depends(session)]) -> str:
            kept.append(s)
            return "ok"

        async def get() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get("/")

        async def main() -> httpx.Response:
            install(app, lc)
            async with lc.run():
                return await asyncio.get_running_loop().create_task(get())

        response = asyncio.run(main())
        assert response.status_code == 500
        assert response.json() == {"detail": "Internal Server Error"}
        with pytest.raises(tether.ResourceClosedError, match=r"^Resource 'session' was used"):
            kept[0].get("state")

    def test_install_after_requests_were_served(self) -> None:
        """`install` after the app served requests (FastAPI 0.160+ has built its apps for
        each inclusion of a router by then): the routes of routers are still tether's."""
        from contextlib import asynccontextmanager

        from tether.fastapi import install

        rec = Recorder()
        lc = tether.Lifecycle()
        conn = recorded_conn(lc, rec)
        router = APIRouter()

        @router.get("/none")
        async def none() -> str:
            return "none"

        @router.get("/conn")
        async def with_conn(c: Annotated[str, Depends(conn)]) -> str:
            rec("endpoint")
            return c

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with lc.run():
                yield

        app = FastAPI(lifespan=lifespan)
        app.include_router(router, prefix="/r")
        with TestClient(app) as client:
            assert client.get("/r/none").json() == "none"
            install(app, lc)
            assert client.get("/r/conn").json() == "conn"
        assert rec.events == ["open", "endpoint", "close"]
