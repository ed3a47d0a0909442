"""What tether says when a test holds the app scope the wrong way."""

from __future__ import annotations

import asyncio
import pathlib
import re

import pytest

import tether

pytestmark = pytest.mark.anyio


async def test_the_app_scope_left_in_another_task_says_to_use_running() -> None:
    """`lc.run()` entered in one task and left in another (a pytest-asyncio fixture) raises a
    ScopeError naming the cause and `tether.testing.running`, from anyio's error; the app
    scope is closed all the same."""
    lc = tether.Lifecycle()
    held = lc.run()
    await asyncio.create_task(held.__aenter__())
    expected = re.escape(
        "The app scope of this Lifecycle (`async with lc.run():`, or `lc.lifespan(app)`) was "
        "entered in one task and left in another, and the task group it holds open can only "
        "be left by the task that entered it: pytest-asyncio sets up and tears down an async "
        "fixture in two different tasks. Use `async with tether.testing.running(lc):` in the "
        "fixture (`running(lc, app)` for the app's lifespan), which holds the app scope in a "
        "task of its own (docs/testing.md)."
    )
    with pytest.raises(tether.ScopeError, match=rf"^{expected}$") as raised:
        await asyncio.create_task(held.__aexit__(None, None, None))
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert "different task" in str(raised.value.__cause__)
    assert lc.state is tether.State.CLOSED


def _refused_again(site: str) -> str:
    return "^" + re.escape(
        f"The app scope of this Lifecycle is already running (entered at {site}: a session- "
        f"or module-scoped fixture still holds it?). One Lifecycle runs one app scope at a "
        f"time: use the one that runs (in a test, take the fixture that holds it), or a new "
        f"Lifecycle. To serve a second app (an admin app) from this Lifecycle's resources, "
        f"give it no lifespan of its own and call `tether.fastapi.install(admin, lc)` after "
        f"adding its routes."
    )


def _line_of(text: str) -> int:
    return next(
        n
        for n, line in enumerate(pathlib.Path(__file__).read_text().splitlines(), 1)
        if line.endswith(text)
    )


async def test_a_second_app_scope_names_where_the_first_was_entered() -> None:
    """A second `lc.run()` while `tether.testing.running(lc)` holds the first (a session
    fixture) names the line that entered the first."""
    lc = tether.Lifecycle()
    async with tether.testing.running(lc):  # the first
        site = f"{__file__}:{_line_of('# the first')} in {_a_second_site()}"
        with pytest.raises(tether.ScopeError, match=_refused_again(site)):
            async with lc.run():
                pass  # pragma: no cover
    async with lc.run():  # the second, plain
        site = f"{__file__}:{_line_of('# the second, plain')} in {_a_second_site()}"
        with pytest.raises(tether.ScopeError, match=_refused_again(site)):
            async with lc.run():
                pass  # pragma: no cover


def _a_second_site() -> str:
    return "test_a_second_app_scope_names_where_the_first_was_entered"


def test_a_second_app_scope_names_the_test_client_that_holds_the_first() -> None:
    """Under TestClient the app scope is entered on the portal's thread: the line named is the
    `with TestClient(app)` of the thread waiting for it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    lc = tether.Lifecycle()
    app = FastAPI(lifespan=lc.lifespan)

    async def again() -> None:
        async with lc.run():
            pass  # pragma: no cover

    with TestClient(app):  # holds it
        name = "test_a_second_app_scope_names_the_test_client_that_holds_the_first"
        site = f"{__file__}:{_line_of('# holds it')} in {name}"
        with pytest.raises(tether.ScopeError, match=_refused_again(site)):
            asyncio.run(again())
