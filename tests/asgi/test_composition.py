"""Apps composed of parts: FastAPI's frontend routes (``app.frontend``), routes that declare
no tether resource, mounted sub-apps with a Lifecycle of their own, background tasks, and a
second app served from one Lifecycle. tether takes over each route that uses its
resources, and where it cannot, its error names the composition and the fix."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient

import tether
import tether.fastapi
from tests.unit._messages import exactly

needs_frontend = pytest.mark.skipif(
    not hasattr(FastAPI, "frontend"), reason="app.frontend() is FastAPI 0.165+"
)


def recording(lc: tether.Lifecycle, events: list[str]) -> tether.Resource[str]:
    """A request resource that records how it ends: commit (success) or rollback."""

    @lc.resource
    async def conn() -> AsyncIterator[str]:
        events.append("open")
        try:
            yield "conn"
        except BaseException as exc:
            events.append(f"rollback {type(exc).__name__}")
            raise
        else:
            events.append("commit")

    return conn


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    """A frontend build: an index.html and an asset."""
    (tmp_path / "index.html").write_text("<h1>spa</h1>")
    (tmp_path / "app.js").write_text("console.log(1)")
    return tmp_path


# --------------------------------------------------------------------------- frontend


@needs_frontend
def test_frontend_routes_under_an_app_dependency_on_a_resource_are_taken_over(
    dist: Path,
) -> None:
    """``FastAPI(dependencies=[Depends(api_key)])`` with ``app.frontend``: the frontend
    routes solve the app's dependencies, which use a resource: one unit of work each,
    committed on a success, rolled back when the dependency refuses."""
    events: list[str] = []
    lc = tether.Lifecycle()
    conn = recording(lc, events)

    async def api_key(
        c: Annotated[str, Depends(conn)], x_key: Annotated[str, Header()] = ""
    ) -> str:
        events.append(f"key {c}")
        if x_key != "k":
            raise HTTPException(401)
        return x_key

    app = FastAPI(lifespan=lc.lifespan, dependencies=[Depends(api_key)])

    @app.get("/api/ping")
    async def ping() -> str:
        return "pong"

    app.frontend("/", directory=dist)
    with TestClient(app) as client:
        r = client.get("/api/ping", headers={"x-key": "k"})
        assert (r.status_code, r.json()) == (200, "pong")
        for path, body in [("/", "<h1>spa</h1>"), ("/app.js", "console.log(1)")]:
            events.clear()
            r = client.get(path, headers={"x-key": "k"})
            assert (r.status_code, r.text) == (200, body)
            assert events == ["open", "key conn", "commit"]
        events.clear()
        assert client.get("/").status_code == 401
        assert events == ["open", "key conn", "rollback HTTPException"]
        assert lc.stats().resources["conn"].in_use == 0


@needs_frontend
@pytest.mark.parametrize("where", ["router", "include_router"])
def test_frontend_routes_of_an_included_router_are_taken_over(dist: Path, where: str) -> None:
    """``router.frontend(...)`` on a router included in the app, the dependency on the
    router (``APIRouter(dependencies=...)``) or on its inclusion
    (``include_router(..., dependencies=...)``)."""
    events: list[str] = []
    lc = tether.Lifecycle()
    conn = recording(lc, events)

    async def user(c: Annotated[str, Depends(conn)]) -> str:
        events.append(f"user {c}")
        return "u"

    deps = [Depends(user)]
    router = APIRouter(dependencies=deps if where == "router" else [])
    router.frontend("/spa", directory=dist)
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(router, prefix="/r", dependencies=deps if where != "router" else [])
    with TestClient(app) as client:
        for path in ["/r/spa/", "/r/spa/index.html"]:
            events.clear()
            r = client.get(path)
            assert (r.status_code, r.text) == (200, "<h1>spa</h1>")
            assert events == ["open", "user conn", "commit"]
        assert lc.stats().resources["conn"].in_use == 0


@needs_frontend
def test_frontend_routes_of_a_mounted_sub_app_are_taken_over(dist: Path) -> None:
    events: list[str] = []
    lc = tether.Lifecycle()
    conn = recording(lc, events)

    async def user(c: Annotated[str, Depends(conn)]) -> str:
        return c

    sub = FastAPI(dependencies=[Depends(user)])
    sub.frontend("/", directory=dist)
    app = FastAPI(lifespan=lc.lifespan)
    app.mount("/sub", sub)
    with TestClient(app) as client:
        r = client.get("/sub/index.html")
        assert (r.status_code, r.text) == (200, "<h1>spa</h1>")
        assert events == ["open", "commit"]


@needs_frontend
def test_frontend_routes_that_use_no_resource_are_not_touched(dist: Path) -> None:
    lc = tether.Lifecycle()
    recording(lc, [])
    app = FastAPI(lifespan=lc.lifespan)
    app.frontend("/", directory=dist)
    with TestClient(app) as client:
        assert client.get("/").text == "<h1>spa</h1>"
        assert lc.stats().units_total == 0
    group = app.router._low_priority_routes[0]
    assert "handle" not in vars(group)


# --------------------------------------------------------------------------- overrides


def test_an_override_set_before_start_that_uses_a_resource_is_taken_over() -> None:
    """``app.dependency_overrides[get_user] = user_from_db``, where the route itself
    declares no resource: tether takes the route over at startup."""
    events: list[str] = []
    lc = tether.Lifecycle()
    conn = recording(lc, events)

    async def current_user() -> str:
        return "from a token"

    async def user_from_db(c: Annotated[str, Depends(conn)]) -> str:
        return f"from the {c}"

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/me")
    async def me(user: Annotated[str, Depends(current_user)]) -> str:
        return user

    app.dependency_overrides[current_user] = user_from_db
    with TestClient(app) as client:
        assert client.get("/me").json() == "from the conn"
        assert events == ["open", "commit"]


def test_an_override_set_while_running_that_uses_a_resource_is_named() -> None:
    lc = tether.Lifecycle()
    conn = recording(lc, [])

    async def current_user() -> str:
        return "from a token"

    async def user_from_db(c: Annotated[str, Depends(conn)]) -> str:
        return c

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/me")
    async def me(user: Annotated[str, Depends(current_user)]) -> str:
        return user

    with TestClient(app) as client:
        assert client.get("/me").json() == "from a token"
        app.dependency_overrides[current_user] = user_from_db
        with pytest.raises(tether.ScopeError, match=exactly(
            "Resource 'conn' was asked for on '/me': `app.dependency_overrides` now replaces "
            "`current_user` with a dependency that uses it, set after the app started: tether "
            "takes over the routes that use its resources when the app starts. Set the "
            "override before the app starts (before `with TestClient(app)`), or open a unit "
            "of work: `async with lc.scope() as s: value = await s.get(conn)`."
        )):  # fmt: skip
            client.get("/me")


def test_a_route_that_declares_no_resource_and_opens_one_lazily_is_told_to_declare_it() -> None:
    """A resolver (strawberry's GraphQLRouter, say) that opens a resource from the request:
    ``await conn(request)`` on a route whose dependencies name none."""
    lc = tether.Lifecycle()
    conn = recording(lc, [])
    app = FastAPI(lifespan=lc.lifespan)
    router = APIRouter()

    @router.post("")
    async def graphql(request: Request) -> str:
        return await conn(request)

    app.include_router(router, prefix="/graphql")
    with TestClient(app) as client:
        with pytest.raises(tether.ScopeError, match=exactly(
            "Resource 'conn' was asked for on '/graphql': POST /graphql declares no tether "
            "resource among its dependencies, so tether did not take it over when the app "
            "started, and it has no unit of work. Declare one: `dependencies=[Depends(conn)]` "
            "on the route, its router or `include_router(...)` (for strawberry's "
            "GraphQLRouter, `context_getter=...` with a `Depends(conn)` parameter), or open "
            "a unit of work: `async with lc.scope() as s: value = await s.get(conn)`."
        )):  # fmt: skip
            client.post("/graphql")


def test_a_mounted_asgi_app_without_routes_is_told_to_open_a_unit() -> None:
    lc = tether.Lifecycle()
    conn = recording(lc, [])

    async def graphql_app(scope: Any, receive: Any, send: Any) -> None:
        value = await conn(Request(scope))
        await PlainTextResponse(value)(scope, receive, send)

    app = FastAPI(lifespan=lc.lifespan)
    app.mount("/gql", graphql_app)
    with TestClient(app) as client:
        with pytest.raises(tether.ScopeError, match=exactly(
            "Resource 'conn' was asked for on '/gql/', in an ASGI app mounted at '/gql' "
            "(`app.mount('/gql', asgi_app)`) with no routes tether can see: tether does not "
            "take it over, so it has no unit of work. Open one where the resource is used: "
            "`async with lc.scope() as s: value = await s.get(conn)`; or serve it from a "
            "FastAPI route that declares `Depends(conn)` (strawberry's GraphQLRouter, with "
            "it in `context_getter`)."
        )):  # fmt: skip
            client.get("/gql/")


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("outer", ["own-lifecycle", "plain"])
def test_a_mounted_app_with_its_own_lifecycle_is_told_its_lifespan_does_not_run(
    outer: str,
) -> None:
    """``main.mount("/v2", FastAPI(lifespan=lc_v2.lifespan))``: Starlette never runs a
    mounted app's lifespan. The error says so, and the form that works does."""
    lc_main = tether.Lifecycle()
    lc_v2 = tether.Lifecycle()
    events: list[str] = []
    v2_conn = recording(lc_v2, events)
    v2 = FastAPI(lifespan=lc_v2.lifespan)

    @v2.get("/items")
    async def items(c: Annotated[str, Depends(v2_conn)]) -> str:
        return c

    main = FastAPI(lifespan=lc_main.lifespan) if outer == "own-lifecycle" else FastAPI()
    main.mount("/v2", v2)
    with TestClient(main) as client:
        with pytest.raises(tether.ScopeError, match=exactly(
            "Resource 'conn' was asked for on '/v2/items' before this Lifecycle started: the "
            "app that serves it is mounted at '/v2', and Starlette never runs a mounted app's "
            "lifespan, so its `lifespan=lc.lifespan` did not run. Run it from the outer app's "
            "lifespan: `FastAPI(lifespan=outer_lc.lifespan(wrap=lc.lifespan))`, outer_lc "
            "being the outer app's Lifecycle (or `FastAPI(lifespan=lc.lifespan)` for an outer "
            "app without one), or register these resources on the outer app's Lifecycle."
        )):  # fmt: skip
            client.get("/v2/items")
    fixed = FastAPI(lifespan=lc_main.lifespan(wrap=lc_v2.lifespan))
    fixed.mount("/v2", v2)
    with TestClient(fixed) as client:
        assert client.get("/v2/items").json() == "conn"
        assert events == ["open", "commit"]


def test_a_background_task_that_asks_for_a_resource_is_told_so() -> None:
    lc = tether.Lifecycle()
    conn = recording(lc, [])
    app = FastAPI(lifespan=lc.lifespan)
    seen: list[str] = []

    async def job(request: Request) -> None:
        try:
            await conn(request)
        except tether.ScopeError as exc:
            seen.append(str(exc))

    @app.post("/x")
    async def x(request: Request, tasks: BackgroundTasks, c: Annotated[str, Depends(conn)]) -> str:
        tasks.add_task(job, request)
        return c

    with TestClient(app) as client:
        assert client.post("/x").json() == "conn"
    assert seen == [
        "Resource 'conn' was asked for on '/x' in a background task (`BackgroundTasks`), "
        "which runs after the response is sent, once the route's unit of work has ended and "
        "its values are closed. Open a unit of work in the task: `async with lc.scope() as "
        "s: value = await s.get(conn)`."
    ]


def test_a_second_app_on_a_running_lifecycle_is_told_to_install_it() -> None:
    """A public and an admin app in one process, on one Lifecycle: the admin app, served
    without tether's lifespan, is told to ``install`` it; installed, it works."""
    events: list[str] = []
    lc = tether.Lifecycle()
    conn = recording(lc, events)
    public = FastAPI(lifespan=lc.lifespan)
    admin = FastAPI()

    @admin.get("/stats")
    async def stats(c: Annotated[str, Depends(conn)]) -> str:
        return c

    with TestClient(public), TestClient(admin) as admin_client:
        with pytest.raises(tether.ScopeError, match=exactly(
            "Resource 'conn' was asked for on '/stats', a route this Lifecycle does not own: "
            "the route was added after the app started, or the app's lifespan is not "
            "`lc.lifespan`. Use `FastAPI(lifespan=lc.lifespan)`, or call "
            "`tether.fastapi.install(app, lc)` after adding the routes. If this app is a "
            "second app served next to the one whose lifespan runs `lc` (an admin app), give "
            "it no lifespan of its own and call `tether.fastapi.install(admin, lc)` after "
            "adding its routes."
        )):  # fmt: skip
            admin_client.get("/stats")
        tether.fastapi.install(admin, lc)
        assert admin_client.get("/stats").json() == "conn"
        assert events == ["open", "commit"]


def test_routes_a_router_lifespan_adds_are_taken_over() -> None:
    """A plugin router whose own lifespan (``APIRouter(lifespan=...)``) adds a route:
    FastAPI runs it inside the app's, after tether took the routes over; tether takes over
    the routes it added once it has started."""
    events: list[str] = []
    lc = tether.Lifecycle()
    conn = recording(lc, events)

    @asynccontextmanager
    async def plugin_lifespan(app: FastAPI) -> AsyncIterator[None]:
        @app.get("/plugin")
        async def plugin(c: Annotated[str, Depends(conn)]) -> str:
            return c

        yield

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(APIRouter(lifespan=plugin_lifespan))
    app.include_router(APIRouter())  # another router, included last
    for _ in range(2):  # and at each start
        events.clear()
        with TestClient(app) as client:
            assert client.get("/plugin").json() == "conn"
            assert events == ["open", "commit"]


def test_a_route_using_another_lifecycles_resource_is_told_so() -> None:
    """An app factory that makes a Lifecycle per app, and a router built with another
    Lifecycle's resource: the request was told the app's lifespan had not run, which it had
    (trial 17)."""
    app_lc, other_lc = tether.Lifecycle(), tether.Lifecycle()

    @other_lc.resource
    def conn() -> str:
        return "conn"

    router = APIRouter()

    @router.get("/x")
    def x(c: Annotated[str, Depends(conn)]) -> str:
        return c

    app = FastAPI(lifespan=app_lc.lifespan)
    app.include_router(router)
    with TestClient(app) as client, pytest.raises(tether.ScopeError) as caught:
        client.get("/x")
    assert str(caught.value) == (
        "Resource 'conn' was asked for on '/x', and it is a resource of another Lifecycle "
        "than the one this app's lifespan runs: the app's has started, the resource's never "
        "has. Declare the route's resources on the app's Lifecycle: in an app factory, make "
        "the Lifecycle, its resources and the routers that use them in the factory (a router "
        "built by a function given the resources)."
    )
