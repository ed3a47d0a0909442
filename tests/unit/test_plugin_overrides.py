"""tether's pytest plugin and FastAPI's `app.dependency_overrides` of a module-level app not
served yet: what the test adds before serving it is compared with the overrides the app had
when the test started, not when it was first served. Run on test files with pytester."""

from __future__ import annotations

import textwrap

import pytest

APP = """
from typing import Annotated

from fastapi import Depends, FastAPI

import tether

lc = tether.Lifecycle()


@lc.resource
async def conn():
    yield "real"


@lc.resource
async def settings():
    yield "real settings"


app = FastAPI(lifespan=lc.lifespan)


@app.get("/")
async def root(c: Annotated[str, Depends(conn)], s: Annotated[str, Depends(settings)]) -> list:
    return [c, s]
"""

LEFT = (
    "tether: the test left app.dependency_overrides of 'conn' in place on an app that other "
    "tests use, now removed so later tests see the real resource (and `lc.override`). Remove "
    "it when the test ends (`app.dependency_overrides.pop(...)` in a `finally`, or a fixture "
    "that clears it after `yield`), or use `with lc.override(...):`."
)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(app=APP)
    pytester.makeini(
        "[pytest]\naddopts = -p no:asyncio\nfilterwarnings =\n    error\n"
        # Starlette < 0.47 (FastAPI 0.115's) imports a name anyio >= 4.16 deprecates.
        "    ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning\n"
    )
    return pytester


def test_an_override_set_before_the_app_is_first_served_is_removed_and_reported(
    suite: pytest.Pytester,
) -> None:
    """FastAPI's usual pattern, in the first test that serves a module-level app: set the
    override, then `with TestClient(app)`, and never clear it. The plugin compared with the
    overrides the app had when it was first served, which included it: the test passed, and
    the next one got the fake. It is compared with those when the test started now: the test
    errors, the override is removed. One set at import (the conftest's, for every test) is the
    app's own: kept, never reported."""
    suite.makeconftest(
        textwrap.dedent(
            """
            from app import app, settings

            app.dependency_overrides[settings] = lambda: "test settings"
            """
        )
    )
    suite.makepyfile(
        test_before_serving=textwrap.dedent(
            """
            import pytest
            from fastapi.testclient import TestClient

            from app import app, conn

            def test_first_sets_one_then_serves() -> None:
                app.dependency_overrides[conn] = lambda: "leaked"
                with TestClient(app) as client:
                    assert client.get("/").json() == ["leaked", "test settings"]

            def test_next_sees_the_real_one() -> None:
                with TestClient(app) as client:
                    assert client.get("/").json() == ["real", "test settings"]

            @pytest.fixture
            def faked():
                app.dependency_overrides[conn] = lambda: "faked"
                yield
                app.dependency_overrides.pop(conn)

            def test_cleared_in_a_fixture(faked) -> None:
                with TestClient(app) as client:
                    assert client.get("/").json() == ["faked", "test settings"]
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_first_sets_one_then_serves*", LEFT])
    # Once, for the one test: counted as whole report lines, since the short summary repeats the
    # message when the terminal is wide enough (CI's is).
    reports = [line for line in result.stdout.lines if line.startswith("tether: the test left")]
    assert len(reports) == 1


def test_a_module_scoped_client_and_per_test_apps_are_not_reported(
    suite: pytest.Pytester,
) -> None:
    """An override a module-scoped fixture set before serving the app is there when each test
    starts: not the tests' doing. An app the test made for itself (not held by a module)
    goes with it: nothing checked. An app no module held when the test started (imported in
    the test) is compared with its overrides when first served, as before."""
    suite.makepyfile(
        other=APP.replace('"real"', '"other real"'),
        test_scopes=textwrap.dedent(
            """
            import importlib

            import pytest
            from fastapi import FastAPI
            from fastapi.testclient import TestClient

            from app import app, conn, lc

            def test_own_app() -> None:
                own = FastAPI(lifespan=lc.lifespan)
                own.dependency_overrides[conn] = lambda: "mine"
                with TestClient(own):
                    pass

            @pytest.fixture(scope="module")
            def client():
                app.dependency_overrides[conn] = lambda: "module fake"
                with TestClient(app) as c:
                    yield c
                app.dependency_overrides.pop(conn)

            def test_one(client) -> None:
                assert client.get("/").json()[0] == "module fake"

            def test_two(client) -> None:
                assert client.get("/").json()[0] == "module fake"

            def test_imported_in_the_test_then_left() -> None:
                other = importlib.import_module("other")
                with TestClient(other.app) as c:
                    other.app.dependency_overrides[other.conn] = lambda: "leaked"
                    assert c.get("/").json()[0] == "leaked"
            """
        ),
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_imported_in_the_test_then_left*", LEFT]
    )
