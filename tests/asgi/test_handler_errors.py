"""Errors on the request-handler path: an app's own exception handler for
`ResourceUnavailable`, a `Depends(scope="function")` cleanup on the error path, and the
warning about a default-scope `yield` dependency on a request resource."""

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import fastapi
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

import tether
from tests.routes import WrappingRoute


def served(app: FastAPI, lc: tether.Lifecycle, path: str) -> httpx.Response:
    """One request from a plain asyncio task, as uvicorn serves it, with the lifespan."""

    async def main() -> httpx.Response:
        async with lc.lifespan(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await asyncio.get_running_loop().create_task(client.get(path))

    return asyncio.run(main())


class Busy(tether.ResourceUnavailable):
    pass


def unavailable_app(handled: type[BaseException] | None, wrapping: bool) -> Any:
    lc = tether.Lifecycle()

    @lc.resource(timeout=0.05, retry_after=7)
    async def slow() -> AsyncIterator[str]:
        await anyio.sleep(10)
        yield "never"

    app = FastAPI(lifespan=lc.lifespan)
    if wrapping:
        app.router.route_class = WrappingRoute
    if handled is not None:

        @app.exception_handler(handled)
        async def busy(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"error": type(exc).__name__}, status_code=429)

    @app.get("/")
    async def root(v: Annotated[str, Depends(slow)]) -> str:
        return v

    return app, lc


@pytest.mark.parametrize("wrapping", [False, True], ids=["handler", "handle"])
@pytest.mark.parametrize(
    "handled", [tether.ResourceUnavailable, tether.TetherError], ids=lambda c: c.__name__
)
def test_the_apps_handler_answers_resource_unavailable(
    handled: type[BaseException], wrapping: bool
) -> None:
    app, lc = unavailable_app(handled, wrapping)
    r = served(app, lc, "/")
    assert (r.status_code, r.json()) == (429, {"error": "ResourceUnavailable"})


@pytest.mark.parametrize("wrapping", [False, True], ids=["handler", "handle"])
def test_without_a_handler_tether_answers_503(wrapping: bool) -> None:
    app, lc = unavailable_app(None, wrapping)
    r = served(app, lc, "/")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"


@pytest.mark.parametrize("wrapping", [False, True], ids=["handler", "handle"])
def test_a_handler_for_exception_leaves_the_503_to_tether(wrapping: bool) -> None:
    """`@app.exception_handler(Exception)` is Starlette's server-error handler, for what
    nothing else handles: tether's 503 comes first, on both paths."""
    app, lc = unavailable_app(Exception, wrapping)
    r = served(app, lc, "/")
    assert r.status_code == 503


def test_the_apps_handler_for_a_subclass_answers_it() -> None:
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        yield "conn"

    app = FastAPI(lifespan=lc.lifespan)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "busy"}, status_code=429)

    @app.get("/busy")
    async def busy_route(c: Annotated[str, Depends(conn)]) -> str:
        raise Busy("busy", resource="conn", retry_after=3)

    @app.get("/other")
    async def other(c: Annotated[str, Depends(conn)]) -> str:
        raise tether.ResourceUnavailable("down", resource="conn", retry_after=3)

    assert served(app, lc, "/busy").status_code == 429
    assert served(app, lc, "/other").status_code == 503


def needs_function_scope() -> None:
    if "scope" not in inspect.signature(Depends).parameters:
        pytest.skip("Depends(scope=...) is FastAPI 0.121+")


def recorded_conn(
    events: list[str],
) -> tuple[tether.Lifecycle, tether.Resource[dict[str, bool]]]:
    """A lifecycle with a request resource `conn` that records its rollback and close."""
    lc = tether.Lifecycle()

    @lc.resource
    async def conn() -> AsyncIterator[dict[str, bool]]:
        c = {"open": True}
        try:
            yield c
        except BaseException as exc:
            events.append(f"conn rollback {type(exc).__name__}")
            raise
        finally:
            c["open"] = False
            events.append("conn close")

    return lc, conn


def test_function_scoped_cleanup_runs_before_the_release_on_the_error_path() -> None:
    """release-point.md: on a route with a `Depends(scope="function")` cleanup, tether
    closes after that cleanup; an endpoint that raises too."""
    needs_function_scope()
    events: list[str] = []
    lc, conn = recorded_conn(events)

    async def audit(c: Annotated[dict[str, bool], Depends(conn)]) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:
            events.append(f"audit of {type(exc).__name__}: open={c['open']}")
            raise

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/fail")
    async def fail(
        c: Annotated[dict[str, bool], Depends(conn)],
        _: Annotated[None, Depends(audit, scope="function")],  # type: ignore[call-arg]
    ) -> str:
        raise HTTPException(409, "conflict")

    r = served(app, lc, "/fail")
    assert r.status_code == 409
    assert events == [
        "audit of HTTPException: open=True",
        "conn rollback HTTPException",
        "conn close",
    ]
    assert lc.stats().units_in_flight == 0


def test_a_503_tether_answers_goes_out_after_the_values_close() -> None:
    """On a route with a `Depends(scope="function")` cleanup, the values wait for that
    cleanup; a 503 tether answers for the endpoint's `ResourceUnavailable` is sent after
    they close (before, it went out first, and the connection was given back after the
    client had its answer and could retry)."""
    needs_function_scope()
    events: list[str] = []
    lc, conn = recorded_conn(events)

    async def audit(c: Annotated[dict[str, bool], Depends(conn)]) -> AsyncIterator[None]:
        yield
        events.append(f"audit done: open={c['open']}")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/busy")
    async def busy(
        c: Annotated[dict[str, bool], Depends(conn)],
        _: Annotated[None, Depends(audit, scope="function")],  # type: ignore[call-arg]
    ) -> str:
        raise tether.ResourceUnavailable("pool busy", resource="conn", retry_after=2)

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                events.append(f"response {message['status']}")
            await send(message)

        await app(scope, receive, sending)

    async def main() -> httpx.Response:
        async with lc.lifespan(app):
            transport = httpx.ASGITransport(app=recording)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await asyncio.get_running_loop().create_task(client.get("/busy"))

    r = asyncio.run(main())
    assert (r.status_code, r.headers["retry-after"]) == (503, "2")
    assert r.json() == {"detail": "pool busy"}
    assert events == [
        "audit done: open=True",
        "conn rollback ResourceUnavailable",
        "conn close",
        "response 503",
    ]
    assert lc.stats().units_in_flight == 0


def fastapi_version() -> tuple[int, int]:
    major, minor = fastapi.__version__.split(".")[:2]
    return int(major), int(minor)


def late_cleanup_fix(dependency: str, resource: str) -> str:
    """What the warning about a `yield` dependency on a request resource says to do: with
    `scope="function"` where FastAPI has it (0.121+), else the resource itself (0.118 to
    0.120, where the warning said to declare a scope those versions do not take)."""
    if fastapi_version() >= (0, 121):
        return (
            f'Declare it Depends({dependency}, scope="function"), so that tether closes '
            f"{resource!r} after its cleanup; or do that work in the resource itself."
        )
    return (
        "Do that work in the resource itself (a generator resource's code after its `yield`), "
        f'or upgrade to FastAPI 0.121+ and declare it Depends({dependency}, scope="function").'
    )


WARNING = (
    "tether: GET / takes 'uow', a `yield` dependency on 'session': FastAPI runs its cleanup "
    "after the response is sent, after tether closed 'session', so the cleanup finds it "
    "closed. " + late_cleanup_fix("uow", "session")
)


def test_a_yield_dependency_on_a_request_resource_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource
    async def session() -> AsyncIterator[dict[str, bool]]:
        s = {"open": True}
        yield s
        s["open"] = False

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    async def uow(s: Annotated[dict[str, bool], Depends(session)]) -> AsyncIterator[Any]:
        yield s
        events.append(f"uow cleanup: open={s['open']}")

    async def on_pool(p: Annotated[str, Depends(pool)]) -> AsyncIterator[str]:
        yield p  # an app resource: open after the response, nothing to warn about

    def plain(s: Annotated[dict[str, bool], Depends(session)]) -> Any:
        return s  # no cleanup: nothing to warn about

    async def bare(s: Annotated[dict[str, bool], Depends(session)]) -> AsyncIterator[Any]:
        """Nothing after the yield: no cleanup to find the session closed (it was warned
        about)."""
        yield s

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(
        u: Annotated[Any, Depends(uow)],
        p: Annotated[str, Depends(on_pool)],
        q: Annotated[Any, Depends(plain)],
        b: Annotated[Any, Depends(bare)],
    ) -> str:
        return "ok"

    with caplog.at_level(logging.WARNING, logger="tether"):
        assert served(app, lc, "/").json() == "ok"
    warned = [r.getMessage() for r in caplog.records if "`yield` dependency" in r.getMessage()]
    if fastapi_version() >= (0, 118):
        assert warned == [WARNING]
        assert events == ["uow cleanup: open=False"]  # what the warning is about
    else:
        assert warned == []
        assert events == ["uow cleanup: open=True"]


def test_a_function_scoped_yield_dependency_is_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    needs_function_scope()
    events: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource
    async def session() -> AsyncIterator[dict[str, bool]]:
        s = {"open": True}
        yield s
        s["open"] = False

    async def uow(s: Annotated[dict[str, bool], Depends(session)]) -> AsyncIterator[Any]:
        yield s
        events.append(f"uow cleanup: open={s['open']}")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    async def root(
        u: Annotated[Any, Depends(uow, scope="function")],  # type: ignore[call-arg]
    ) -> str:
        return "ok"

    with caplog.at_level(logging.WARNING, logger="tether"):
        assert served(app, lc, "/").json() == "ok"
    assert [r for r in caplog.records if "`yield` dependency" in r.getMessage()] == []
    assert events == ["uow cleanup: open=True"]  # the fix the warning names


def test_the_yield_dependency_warning_on_included_and_websocket_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given at `include_router(..., dependencies=...)`, the `yield` dependency is warned
    about too, under the path it is served at (FastAPI 0.137+ keeps such dependencies out
    of the route's own: it was not); on a WebSocket route, whose cleanups run before its
    unit of work ends, it is not (it was, wrongly)."""
    from fastapi import APIRouter, WebSocket
    from fastapi.testclient import TestClient

    events: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource
    async def session() -> AsyncIterator[dict[str, bool]]:
        s = {"open": True}
        yield s
        s["open"] = False

    async def uow(s: Annotated[dict[str, bool], Depends(session)]) -> AsyncIterator[Any]:
        yield s
        events.append(f"uow cleanup: open={s['open']}")

    admin = APIRouter()

    @admin.post("/purge")
    async def purge() -> str:
        return "purged"

    sockets = APIRouter()

    @sockets.websocket("/ws")
    async def ws(websocket: WebSocket, u: Annotated[Any, Depends(uow)]) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(admin, prefix="/admin", dependencies=[Depends(uow)])
    app.include_router(sockets, prefix="/live")
    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        assert client.post("/admin/purge").json() == "purged"
        with client.websocket_connect("/live/ws") as socket:
            assert socket.receive_text() == "hi"
    warned = [r.getMessage() for r in caplog.records if "`yield` dependency" in r.getMessage()]
    if fastapi_version() >= (0, 118):
        assert warned == [
            "tether: POST /admin/purge takes 'uow', a `yield` dependency on 'session': "
            "FastAPI runs its cleanup after the response is sent, after tether closed "
            "'session', so the cleanup finds it closed. " + late_cleanup_fix("uow", "session")
        ]
        assert sorted(events) == ["uow cleanup: open=False", "uow cleanup: open=True"]
    else:
        assert warned == []


class NotLoggedIn(Exception):
    pass


@pytest.mark.parametrize("path", ["/api", "/wrapped/api", "/starlette"])
def test_an_exception_the_app_answers_with_a_redirect_rolls_back(path: str) -> None:
    """An endpoint writes, then raises what the app's handler turns into a 303 (to a login
    page): the write is rolled back on every way of serving a route, as when the exception
    escapes FastAPI's handler (before, a route served through `handle`, a route class
    wrapping its app or a plain Starlette route, committed it: only >= 400 counted)."""
    from fastapi import APIRouter
    from fastapi.responses import RedirectResponse

    events: list[str] = []
    lc = tether.Lifecycle()

    @lc.resource
    async def tx() -> AsyncIterator[str]:
        try:
            yield "tx"
        except BaseException as exc:
            events.append(f"rollback ({type(exc).__name__})")
            raise
        events.append("commit")

    app = FastAPI(lifespan=lc.lifespan)

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, exc: NotLoggedIn) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    async def write(t: Annotated[str, Depends(tx)]) -> str:
        raise NotLoggedIn

    app.add_api_route("/api", write)
    wrapped = APIRouter(route_class=WrappingRoute)
    wrapped.add_api_route("/api", write)
    app.include_router(wrapped, prefix="/wrapped")

    async def plain(request: Request) -> JSONResponse:
        await tx(request)
        raise NotLoggedIn

    app.add_route("/starlette", plain)
    r = served(app, lc, path)
    assert (r.status_code, r.headers["location"]) == (303, "/login")
    assert events == ["rollback (NotLoggedIn)"]
