"""The app scope under pytest-asyncio, on a session loop and on per-test loops (pain.md T6.4).

Each test runs pytest on a suite of its own, as a user's suite would be, with a pool that
belongs to the loop it was opened on, as asyncpg's and psycopg's do.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator

import pytest

import tether
from tether.testing import running

APP = '''
import asyncio

import tether

lc = tether.Lifecycle()


class Pool:
    """Bound to the loop it was opened on, like asyncpg's pool."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()

    async def acquire(self):
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("Task got Future attached to a different loop")
        return "conn"


@lc.resource(scope="app")
async def pool():
    yield Pool()


@lc.resource
async def conn(pool):
    yield await pool.acquire()
'''

INI = """[pytest]
filterwarnings = error
asyncio_default_fixture_loop_scope = function
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(app=APP)
    pytester.makeini(INI)
    return pytester


def test_a_session_app_scope_serves_tests_on_the_session_loop(suite: pytest.Pytester) -> None:
    """The recipe of docs/testing.md: the app scope opens once, in a session fixture on the
    session loop, and tests on that loop share its pool; a test on a loop of its own is told
    what to change, instead of failing in the driver."""
    suite.makeconftest(
        textwrap.dedent(
            """
            import pytest_asyncio

            import tether.testing
            from app import lc


            @pytest_asyncio.fixture(scope="session", loop_scope="session")
            async def app_scope():
                async with tether.testing.running(lc):
                    yield lc
            """
        )
    )
    suite.makepyfile(
        test_session=textwrap.dedent(
            """
            import pytest

            from app import conn, lc


            @pytest.mark.asyncio(loop_scope="session")
            async def test_one(app_scope):
                async with lc.scope("one") as s:
                    assert await s.get(conn) == "conn"


            @pytest.mark.asyncio(loop_scope="session")
            async def test_two(app_scope):
                async with lc.scope("two") as s:
                    assert await s.get(conn) == "conn"


            @pytest.mark.asyncio
            async def test_on_a_loop_of_its_own(app_scope):
                async with lc.scope("own loop") as s:
                    await s.get(conn)
            """
        )
    )
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E *tether._errors.ScopeError: lc.scope('own loop') was entered on another event loop than "
            "the one this Lifecycle's app scope runs on (the loop of `lc.run()` or of the app's "
            "lifespan), and its app resources (pools, clients) belong to that loop. Run the unit "
            "of work there: in pytest-asyncio, give the test the loop of the fixture that starts "
            'the app (`@pytest.mark.asyncio(loop_scope="session")` for a session fixture, or '
            "`asyncio_default_test_loop_scope = session` in the ini file for every test); from "
            "another thread, use `anyio.from_thread.run` (with TestClient, `client.portal.call`, "
            "or `client.portal.wrap_async_context_manager(...)` for a context manager).",
        ]
    )
    assert "attached to a different loop" not in result.stdout.str()


def test_an_app_scope_per_test_on_per_test_loops(suite: pytest.Pytester) -> None:
    """With pytest-asyncio's default loop per test, a function fixture opens the app scope on
    each test's loop, and closes it after."""
    suite.makeconftest(
        textwrap.dedent(
            """
            import pytest_asyncio

            import tether.testing
            from app import lc


            @pytest_asyncio.fixture
            async def app_scope():
                async with tether.testing.running(lc):
                    yield lc
                assert lc.state.value == "closed"
            """
        )
    )
    suite.makepyfile(
        test_function=textwrap.dedent(
            """
            import pytest

            from app import conn, lc


            @pytest.mark.asyncio
            @pytest.mark.parametrize("n", range(3))
            async def test_each(app_scope, n):
                async with lc.scope(f"test {n}") as s:
                    assert await s.get(conn) == "conn"
            """
        )
    )
    suite.runpytest_subprocess().assert_outcomes(passed=3)


def test_running_with_the_app_serves_httpx_asgi_transport(suite: pytest.Pytester) -> None:
    """`running(lc, app)` runs the app's lifespan, so httpx's ASGITransport (which never
    sends one) reaches routes that use tether's resources."""
    suite.makepyfile(
        web=textwrap.dedent(
            """
            from typing import Annotated

            from fastapi import Depends, FastAPI

            from app import conn, lc

            app = FastAPI(lifespan=lc.lifespan)


            @app.get("/")
            async def root(c: Annotated[str, Depends(conn)]) -> str:
                return c
            """
        ),
        test_web=textwrap.dedent(
            """
            import httpx
            import pytest
            import pytest_asyncio

            import tether.testing
            from app import lc
            from web import app


            @pytest_asyncio.fixture
            async def client():
                transport = httpx.ASGITransport(app=app)
                async with (
                    tether.testing.running(lc, app),
                    httpx.AsyncClient(transport=transport, base_url="http://test") as client,
                ):
                    yield client


            @pytest.mark.asyncio
            async def test_root(client):
                assert (await client.get("/")).json() == "conn"
                assert lc.stats()["conn"].closed == 1
            """
        ),
    )
    suite.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.mark.anyio
async def test_running_raises_a_startup_failure_on_entering() -> None:
    """A resource that fails to open fails `running` at once, with what opened closed."""
    lc = tether.Lifecycle()
    closed: list[str] = []

    @lc.resource(scope="app")
    async def first() -> AsyncIterator[str]:
        yield "first"
        closed.append("first")

    @lc.resource(scope="app")
    async def second(first: str) -> AsyncIterator[str]:
        raise ConnectionError("refused")
        yield "second"

    with pytest.raises(
        tether.StartupError, match="^App resource 'second' failed to open: ConnectionError: refused"
    ):
        async with running(lc):
            pytest.fail("entered")
    assert closed == ["first"]
    assert lc.state.value == "closed"
