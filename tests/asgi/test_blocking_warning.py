"""An `async def` endpoint that takes a sync resource opened in a thread (a sync SQLAlchemy
session) is named in a warning when the app starts: every call on it would block the event
loop, and every other request with it (pain.md T1.3)."""

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

import tether
from tether.integrations import sqlalchemy as tsa

WARNING = (
    "tether: GET /async is `async def` but takes 'session', a sync resource opened in a "
    "thread: each call on it there blocks the event loop, and every other request with it. "
    "Declare the endpoint with `def` (FastAPI runs it in a thread), or use an async resource; "
    "a sync resource that does no I/O can say thread=False."
)


def test_an_async_endpoint_on_a_sync_session_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, f"sqlite:///{tmp_path / 'db.sqlite'}", pool_size=2)
    session = tsa.sync_session(lc, engine)

    @lc.resource(thread=False)
    def settings() -> Iterator[dict[str, str]]:
        yield {"mode": "test"}  # no I/O: on the event loop, nothing to warn about

    @lc.resource(timeout=5)
    def flags() -> dict[str, bool]:
        return {"beta": True}  # made in a thread for its timeout only: nothing to warn about

    app = FastAPI(lifespan=lc.lifespan)
    S = Annotated[Session, Depends(session)]

    @app.get("/async")
    async def on_the_loop(s: S) -> int:
        return int(s.execute(text("SELECT 1")).scalar_one())

    @app.get("/sync")
    def in_a_thread(s: S) -> int:
        return int(s.execute(text("SELECT 1")).scalar_one())

    @app.get("/settings")
    async def read_settings(
        c: Annotated[Any, Depends(settings)], f: Annotated[Any, Depends(flags)]
    ) -> dict[str, str]:
        return dict(c)

    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        assert client.get("/async").json() == 1  # it works: the warning is about the loop
        assert client.get("/sync").json() == 1
        assert client.get("/settings").json() == {"mode": "test"}
    assert [r.getMessage() for r in caplog.records if "sync resource" in r.getMessage()] == [
        WARNING
    ]


def test_a_router_included_twice_is_warned_about_at_both_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning names the path the route is served at, for each inclusion of its router
    (on FastAPI 0.137+ it named the router's own path, once)."""
    from fastapi import APIRouter

    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, f"sqlite:///{tmp_path / 'db.sqlite'}", pool_size=2)
    session = tsa.sync_session(lc, engine)
    router = APIRouter()

    @router.get("/async")
    async def on_the_loop(s: Annotated[Session, Depends(session)]) -> int:
        return int(s.execute(text("SELECT 1")).scalar_one())

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v2")
    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        assert client.get("/v2/async").json() == 1
    assert [r.getMessage() for r in caplog.records if "sync resource" in r.getMessage()] == [
        WARNING.replace("GET /async", "GET /v1/async"),
        WARNING.replace("GET /async", "GET /v2/async"),
    ]


def test_a_def_endpoint_on_an_async_session_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror: a `def` endpoint taking an AsyncSession ran in a thread, where
    `s.execute(...)` returned a coroutine nothing awaited. It answered 200 with the
    coroutine's repr, and nothing was queried, with no word of why."""
    from sqlalchemy.ext.asyncio import AsyncSession

    lc = tether.Lifecycle()
    engine = tsa.engine(lc, f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", pool_size=2)
    session = tsa.session(lc, engine)

    @lc.resource
    async def settings() -> Any:
        return {"mode": "test"}  # async-made, a plain value: nothing to warn about

    app = FastAPI(lifespan=lc.lifespan)
    S = Annotated[AsyncSession, Depends(session)]

    @app.get("/def")
    def in_a_thread(s: S) -> str:
        return repr(s.execute(text("SELECT 1")))  # pragma: no cover - a coroutine, never run

    @app.get("/async")
    async def on_the_loop(s: S) -> int:
        return int((await s.execute(text("SELECT 1"))).scalar_one())

    @app.get("/settings")
    def read_settings(c: Annotated[Any, Depends(settings)]) -> dict[str, str]:
        return dict(c)

    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        assert client.get("/async").json() == 1
        assert client.get("/settings").json() == {"mode": "test"}
    warned = [r.getMessage() for r in caplog.records if "`def` but takes" in r.getMessage()]
    assert warned == [
        "tether: GET /def is `def` but takes 'session', an AsyncSession: its calls are "
        "coroutines, which a `def` endpoint cannot await (each returns a coroutine that never "
        "runs: nothing is queried, flushed or deleted; what its sync methods do, such as a "
        "session's add(), still happens, and is committed without the rest). Declare the "
        "endpoint `async def`, or give it a sync resource."
    ]


@pytest.mark.anyio
async def test_a_sync_session_called_on_the_event_loop_in_a_job_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job's `lc.scope()` is `async def`: a `sync_session`'s statements called there run
    in the event loop's thread, and every request waits. That was silent; it is named, once
    per engine, with where the job called it. Through `unit.run_sync` it is not."""
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(lc, f"sqlite:///{tmp_path / 'db.sqlite'}", pool_size=2)
    session = tsa.sync_session(lc, engine)
    caplog.set_level(logging.WARNING, logger="tether")
    async with lc.run():
        async with lc.scope("job") as unit:
            s = await unit.get(session)
            await unit.run_sync(s.execute, text("SELECT 1"))  # in a worker thread
            assert [r for r in caplog.records if "event loop's thread" in r.getMessage()] == []
            line = sys._getframe().f_lineno + 1
            s.execute(text("SELECT 2"))  # in the loop's thread
            s.execute(text("SELECT 3"))
    warned = [r.getMessage() for r in caplog.records if "event loop's thread" in r.getMessage()]
    assert warned == [
        f"tether: sync engine 'engine' ran a statement in the event loop's thread "
        f"({__file__}:{line} in test_a_sync_session_called_on_the_event_loop_in_a_job_is_warned_"
        f"about_once): the loop, and every other request with it, waits for the database "
        f"meanwhile. Run sync code in a worker thread: a `def` endpoint, or `await "
        f"unit.run_sync(fn, session)` in an `lc.scope()` job."
    ]
