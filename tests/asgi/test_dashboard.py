"""The dashboard: a page, and the JSON it polls, read from what tether tracks."""

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

import tether
import tether.fastapi
from tether._dashboard import snapshot
from tether.fastapi import dashboard_router, health_router


class Pool:
    def __init__(self, *, up: bool = True) -> None:
        self.up = up
        self.in_use = 0  # connections handed out (`conn`)

    async def ping(self) -> None:
        if not self.up:
            raise ConnectionError("the pool's server went away")


def notes_app(lc: tether.Lifecycle, **router: Any) -> FastAPI:
    """An app with an app resource, a request resource on it, and the dashboard."""

    @lc.resource(scope="app", check=lambda p: p.ping())
    async def pool() -> AsyncIterator[Pool]:
        yield Pool()

    # What an integration sets on a driver's pool: its own figures.
    pool.pool_stats = lambda p: tether.PoolStats(
        name="pool", max=10, open=2, in_use=p.in_use, idle=1, waiting=0, created=3, discarded=1
    )

    @lc.resource(check=lambda c: None)
    async def conn(pool: Pool) -> AsyncIterator[str]:
        pool.in_use += 1
        try:
            yield "conn"
        finally:
            pool.in_use -= 1

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/notes")
    async def notes(c: Annotated[str, Depends(conn)]) -> str:
        return c

    app.include_router(dashboard_router(lc, **router))
    return app


async def take_conn(unit: tether.Unit) -> Any:
    return await unit.get(unit.lc.resources["conn"])


@contextmanager
def job(client: TestClient, lc: tether.Lifecycle, label: str) -> Iterator[None]:
    """A unit of work outside a request that holds `conn` while the block runs."""
    with client.portal.wrap_async_context_manager(lc.scope(label)) as unit:
        client.portal.call(take_conn, unit)
        yield


def test_stats_follow_requests_and_units_in_flight() -> None:
    """The counters move with the requests; a unit in flight shows what it holds, and where
    it took it."""
    lc = tether.Lifecycle()
    app = notes_app(lc)
    with TestClient(app) as client:
        assert client.get("/notes").json() == "conn"
        assert client.get("/notes").json() == "conn"
        with job(client, lc, "nightly export"):
            held = client.get("/tether/stats.json")
        after = client.get("/tether/stats.json").json()

    assert held.headers["cache-control"] == "no-store"
    s = held.json()
    assert s["state"] == "running"
    assert s["units"] == {"in_flight": 1, "total": 3, "refused": 0}
    pool, conn = s["resources"]
    assert (pool["name"], pool["scope"], pool["opened"], pool["in_use"]) == ("pool", "app", 1, 1)
    assert (conn["name"], conn["scope"]) == ("conn", "request")
    assert (conn["opened"], conn["closed"], conn["in_use"], conn["max_in_use"]) == (3, 2, 1, 1)
    assert conn["leaks"] == conn["open_errors"] == conn["close_errors"] == 0
    assert conn["mean_hold_ms"] >= 0
    assert s["pools"] == [
        {"name": "pool", "max": 10, "open": 2, "in_use": 1, "idle": 1, "waiting": 0,
         "created": 3, "discarded": 1}
    ]  # fmt: skip
    [unit] = s["in_flight"]
    assert unit["label"] == "nightly export"
    assert isinstance(unit["id"], str)
    assert unit["age_s"] >= 0
    [holding] = unit["holding"]
    assert (holding["resource"], holding["leak"]) == ("conn", False)
    assert any(__file__ in line and "in take_conn" in line for line in holding["acquired_at"])

    assert after["units"] == {"in_flight": 0, "total": 3, "refused": 0}
    assert after["in_flight"] == []
    assert after["resources"][1]["closed"] == 3
    assert after["resources"][1]["in_use"] == 0


def test_stats_name_the_process_that_answered() -> None:
    """stats.json says which process answered (pid, host), and the page shows it: with
    several workers each read is one worker's own figures (before, successive reads
    alternated between workers' counters, "17 started" then "13", with nothing to tell)."""
    lc = tether.Lifecycle()
    app = notes_app(lc)
    with TestClient(app) as client:
        s = client.get("/tether/stats.json").json()
        page = client.get("/tether/").text
    assert (s["pid"], s["host"]) == (os.getpid(), socket.gethostname())
    assert '<b id="process">' in page
    assert "with several workers each refresh shows whichever one answers" in page


def test_a_leak_is_shown_with_where_it_was_acquired() -> None:
    """A value held past the leak threshold is flagged, counted, and shows the acquirer."""
    lc = tether.Lifecycle(leak_threshold=0.05, sweep_interval=0.02)
    app = notes_app(lc)
    with TestClient(app) as client, job(client, lc, "stuck job"):
        time.sleep(0.3)
        s = client.get("/tether/stats.json").json()
    assert s["leak_threshold_s"] == 0.05
    assert s["resources"][1]["leaks"] == 1
    [holding] = s["in_flight"][0]["holding"]
    assert holding["leak"] is True
    assert holding["held_s"] >= 0.05
    assert any("in take_conn" in line for line in holding["acquired_at"])


def test_a_unit_with_its_own_leak_threshold_is_judged_by_it() -> None:
    """A job that set a longer threshold of its own (`lc.scope(label, leak_threshold=...)`,
    as the docs advise for long jobs) is not flagged once it passes the Lifecycle's, which
    the sweeper does not report either; one that set a shorter one is flagged by it. Each
    unit's threshold is given for the page's text (it printed the Lifecycle's for all), and
    `tether stats` reads the same flag."""
    lc = tether.Lifecycle(leak_threshold=0.05, sweep_interval=0.02)
    app = notes_app(lc)

    @contextmanager
    def own_job(label: str, limit: float) -> Iterator[None]:
        with client.portal.wrap_async_context_manager(
            lc.scope(label, leak_threshold=limit)
        ) as unit:
            client.portal.call(take_conn, unit)
            yield

    with TestClient(app) as client, own_job("nightly import", 3600), own_job("quick", 0.01):
        time.sleep(0.3)
        s = client.get("/tether/stats.json").json()
    units = {u["label"]: u for u in s["in_flight"]}
    assert [h["leak"] for h in units["nightly import"]["holding"]] == [False]
    assert units["nightly import"]["leak_threshold_s"] == 3600
    assert [h["leak"] for h in units["quick"]["holding"]] == [True]
    assert units["quick"]["leak_threshold_s"] == 0.01
    assert s["resources"][1]["leaks"] == 1  # the sweeper's count agrees: the quick one only


def test_the_oldest_units_first_and_at_most_fifty() -> None:
    """Under load the page lists the oldest units (what holds the pool longest), bounded."""
    lc = tether.Lifecycle()
    app = notes_app(lc)
    with TestClient(app) as client:
        with job(client, lc, "oldest"):
            time.sleep(0.01)
            with job(client, lc, "newer"):
                s = client.get("/tether/stats.json").json()
            small = snapshot(lc, max_units=1)
    assert [u["label"] for u in s["in_flight"]] == ["oldest", "newer"]
    assert [u["label"] for u in small["in_flight"]] == ["oldest"]


def test_checks_report_every_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """checks.json runs every check: 200 while they pass, 503 with the error when one fails."""
    monkeypatch.setattr(tether.fastapi, "_CHECKS_REUSED", 0.0)
    lc = tether.Lifecycle()
    app = notes_app(lc)
    with TestClient(app) as client:
        ok = client.get("/tether/checks.json")
        lc.get(lc.resources["pool"]).up = False
        failing = client.get("/tether/checks.json")
    assert ok.status_code == 200
    assert ok.json()["status"] == "ok"
    assert set(ok.json()["checks"]) == {"pool", "conn"}
    assert failing.status_code == 503
    assert failing.json()["checks"]["pool"] == {
        "status": "failing",
        "latency_ms": failing.json()["checks"]["pool"]["latency_ms"],
        "error": "ConnectionError: the pool's server went away",
    }
    assert failing.json()["checks"]["conn"]["status"] == "ok"


def test_page_points_at_its_own_json_and_loads_nothing_from_elsewhere() -> None:
    """The page is served at the prefix (with or without the slash), from wherever the router
    is mounted, with no script or style from another host."""
    lc = tether.Lifecycle()
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(dashboard_router(lc, prefix="/ops", refresh=0.5), prefix="/admin")
    app.include_router(health_router(lc))
    with TestClient(app) as client:
        page = client.get("/admin/ops/")
        no_slash = client.get("/admin/ops")
        assert client.get("/admin/ops/stats.json").json()["resources"] == []
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert (
        'data-stats="/admin/ops/stats.json" data-checks="/admin/ops/checks.json" '
        'data-refresh="0.5"' in page.text
    )
    assert no_slash.text == page.text
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert " src=" not in page.text
    paths = app.openapi()["paths"]  # the routers' annotations resolve: /docs works
    assert "/admin/ops/" not in paths
    assert "/health/ready" in paths


def test_dependencies_guard_every_route() -> None:
    """`dependencies=` guard the page and both JSON endpoints."""

    def admin(x_token: Annotated[str, Header()] = "") -> None:
        if x_token != "let-me-in":
            raise HTTPException(401, "admins only")

    lc = tether.Lifecycle()
    app = notes_app(lc, dependencies=[Depends(admin)])
    with TestClient(app) as client:
        for path in ("/tether/", "/tether/stats.json", "/tether/checks.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"x-token": "let-me-in"}).status_code == 200, path


UNGUARDED = (
    "tether: the dashboard at GET /tether/ is served to whoever reaches the app, with no "
    "dependencies: it shows the resources' errors, the routes' paths and the source files of "
    "the code that holds values. Guard it: dashboard_router(lc, dependencies=[Depends("
    "require_admin)]) (or the app's or include_router's dependencies=); if a middleware or the "
    "network guards it already, pass dependencies=[] to say so"
)


@pytest.mark.parametrize(
    ("how", "warned"),
    [
        pytest.param("none", True, id="no dependencies anywhere: warned"),
        pytest.param("own", False, id="its own dependencies="),
        pytest.param("said", False, id="dependencies=[]: guarded elsewhere, said so"),
        pytest.param("app", False, id="the app's dependencies="),
        pytest.param("include", False, id="include_router's dependencies="),
    ],
)
def test_a_dashboard_nothing_guards_is_named_when_the_app_starts(
    how: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def admin() -> None:
        pass

    lc = tether.Lifecycle()
    guard = [Depends(admin)]
    app = FastAPI(lifespan=lc.lifespan, dependencies=guard if how == "app" else None)
    options: dict[str, Any] = {"own": {"dependencies": guard}, "said": {"dependencies": []}}
    app.include_router(
        dashboard_router(lc, **options.get(how, {})),
        dependencies=guard if how == "include" else None,
    )
    with caplog.at_level("WARNING", logger="tether"), TestClient(app) as client:
        assert client.get("/tether/").status_code == 200
    said = [r.getMessage() for r in caplog.records if "dashboard at" in r.getMessage()]
    assert said == ([UNGUARDED] if warned else [])


@pytest.mark.parametrize("refresh", [0, -1, float("nan")])
def test_refresh_must_be_a_positive_number(refresh: Any) -> None:
    """Out of range; a string or a bool is a TypeError (tests/unit/test_contract.py)."""
    with pytest.raises(ValueError) as info:
        dashboard_router(tether.Lifecycle(), refresh=refresh)
    assert str(info.value) == (
        f"dashboard_router(refresh={refresh!r}): refresh is how often the page polls its "
        f"stats, in seconds, and must be a positive number; e.g. refresh=2.0."
    )


def test_a_storm_of_checks_json_runs_one_round_of_checks() -> None:
    """Each checks.json ran every check, so a client hammering an unguarded dashboard made
    the database run a query per request (trial 19: 200 requests, about 350 transactions).
    A round is now reused for a second, as /health/ready's."""
    lc = tether.Lifecycle()
    pings: list[float] = []

    def check(pool: object) -> None:
        pings.append(time.monotonic())

    @lc.resource(scope="app", check=check)
    def pool() -> object:
        return object()

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(dashboard_router(lc, dependencies=[]))
    with TestClient(app) as client:
        started = time.monotonic()
        for _ in range(20):
            assert client.get("/tether/checks.json").status_code == 200
        took = time.monotonic() - started
    assert 1 <= len(pings) <= 2 + int(took), (len(pings), took)


def test_the_page_says_what_it_may_load_and_that_no_frame_may_show_it() -> None:
    """No CSP nor anti-framing header (trial 19): another site could frame the page (its
    "Run checks" button). Its policy allows its own inline style and script by their hashes
    (the browser tests run the page under it: a wrong hash fails them)."""
    lc = tether.Lifecycle()
    app = notes_app(lc)
    with TestClient(app) as client:
        page = client.get("/tether/")
    policy = page.headers["content-security-policy"]
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
    assert "; connect-src 'self';" in policy
    assert policy.endswith("frame-ancestors 'none'")
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
