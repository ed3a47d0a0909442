"""A client that goes away while a `def` endpoint runs in a worker thread, against a real
PostgreSQL: no cancel stops a thread, so the endpoint runs to its end and its work is rolled
back then. Before, tether cancelled the request's task, FastAPI's wait for the thread ended,
and the values closed under the running thread: a psycopg connection went back to the pool
while the thread still wrote on it (the next request committed those rows), and a SQLAlchemy
session could not close and kept both connections of its pool for good."""

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Annotated, Any

import anyio
import anyio.to_thread
import psycopg
import psycopg_pool
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.orm import Session

import tether
from tests.inprocess import timeout_middleware
from tests.routes import WrappingRoute
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

ROWS = 200  # the abandoned endpoint's inserts, 5 ms apart: about 1 s


@pytest.fixture
def table(postgres: Postgres) -> Iterator[None]:
    postgres.sql("DROP TABLE IF EXISTS gone_rows")
    postgres.sql("CREATE TABLE gone_rows (n int, who text)")
    postgres.sql("GRANT ALL ON gone_rows TO tether")
    yield
    postgres.sql("DROP TABLE IF EXISTS gone_rows")


def psycopg_app(postgres: Postgres, name: str) -> tuple[FastAPI, tether.Lifecycle, Any]:
    """The docs' sync resource: a `def` generator over psycopg_pool's sync pool."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def pool() -> Iterator[psycopg_pool.ConnectionPool]:
        dsn = f"{postgres.dsn}?application_name={name}"
        with psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, timeout=5) as p:
            yield p

    @lc.resource(concurrency=1)
    def conn(pool: psycopg_pool.ConnectionPool) -> Iterator[psycopg.Connection[Any]]:
        with pool.connection() as c:  # commits on success, rolls back on an exception
            yield c

    def insert(c: psycopg.Connection[Any], n: int, who: str) -> None:
        c.execute("INSERT INTO gone_rows VALUES (%s, %s)", (n, who))

    return FastAPI(lifespan=lc.lifespan), lc, (conn, insert)


def sqlalchemy_app(postgres: Postgres, name: str) -> tuple[FastAPI, tether.Lifecycle, Any]:
    lc = tether.Lifecycle()
    engine = tsa.sync_engine(
        lc, postgres.url("postgresql+psycopg"), pool_size=1, max_overflow=0,
        application_name=name,
    )  # fmt: skip
    session = tsa.sync_session(lc, engine)

    def insert(s: Session, n: int, who: str) -> None:
        s.execute(text("INSERT INTO gone_rows VALUES (:n, :who)"), {"n": n, "who": who})

    return FastAPI(lifespan=lc.lifespan), lc, (session, insert)


def recorded_tx() -> tuple[tether.Lifecycle, tether.Resource[str], list[str]]:
    """A Lifecycle with a request resource `tx` that records its commit or rollback."""
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource
    async def tx() -> AsyncIterator[str]:
        try:
            yield "tx"
            events.append("commit")
        except BaseException as exc:
            events.append(f"rollback ({type(exc).__name__})")
            raise

    return lc, tx, events


class NoCoroTask(asyncio.Task):  # type: ignore[type-arg]
    """granian's ``--task-impl rust`` tasks: an ``asyncio.Task`` whose ``get_coro()``
    crashed the worker process (a segfault) when tether looked where a request waits."""

    def get_coro(self) -> Any:
        raise RuntimeError("get_coro() of a task that cannot give it")


async def call(
    app: FastAPI, path: str, leave_after: float | None, task: type[asyncio.Task[Any]] | None = None
) -> list[int]:
    """One POST to *app*, as uvicorn serves it (in a *task* of that class, if given); the
    client goes away after *leave_after* seconds (never if None). The statuses the app
    answered."""
    sent: list[dict[str, Any]] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600 if leave_after is None else leave_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test")], "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    await (loop.create_task if task is None else partial(task, loop=loop))(
        app(scope, receive, send)
    )
    return [m["status"] for m in sent if m["type"] == "http.response.start"]


@pytest.mark.parametrize("make", [psycopg_app, sqlalchemy_app], ids=["psycopg_pool", "tsa"])
async def test_a_def_endpoint_whose_client_left_runs_to_its_end_and_rolls_back(
    postgres: Postgres, table: None, make: Any
) -> None:
    name = f"gone-{uuid.uuid4().hex[:10]}"
    app, lc, (resource, insert) = make(postgres, name)
    Value = Annotated[Any, Depends(resource)]
    ended: list[str] = []
    in_thread = threading.Event()

    @app.post("/long")
    def long(v: Value) -> dict[str, str]:
        in_thread.set()
        for i in range(ROWS):
            insert(v, i, "abandoned")
            time.sleep(0.005)
        ended.append("returned")
        return {"status": "done"}

    @app.post("/one")
    def one(v: Value) -> dict[str, str]:
        insert(v, -1, "next")
        return {"status": "done"}

    async with lc.lifespan(app):
        started = time.monotonic()
        assert await call(app, "/long", leave_after=0.3) == [499]
        assert ended == ["returned"]  # the thread ran to its end, the values closed after
        assert time.monotonic() - started < 30
        for _ in range(3):
            assert await call(app, "/one", leave_after=None) == [200]
    assert postgres.sql("SELECT who, count(*) FROM gone_rows GROUP BY who") == [("next", 3)]
    assert postgres.activity_after_close(name) == []


@pytest.mark.parametrize("task", [None, NoCoroTask], ids=["task", "no-get_coro"])
async def test_a_client_that_left_during_a_def_dependency_is_cancelled_after_it(
    task: type[asyncio.Task[Any]] | None,
) -> None:
    """The client leaves while a `def` dependency (an auth check) runs in its thread: the
    request is cancelled once that thread returns, at the endpoint's first await, and what
    it opened rolls back (before, the deferred cancel never came: the endpoint ran in full
    and committed; an endpoint that never awaits runs to its end, and rolls back). The same
    in a task whose `get_coro()` fails, as granian's rust tasks' does."""
    lc, tx, events = recorded_tx()

    def auth() -> str:
        time.sleep(0.8)  # the client leaves at 0.3 s
        return "user"

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/long")
    async def long(user: Annotated[str, Depends(auth)], t: Annotated[str, Depends(tx)]) -> str:
        await anyio.sleep(0.5)  # cancelled here, at its first await
        events.append("endpoint ended")
        return t

    async with lc.lifespan(app):
        assert await call(app, "/long", leave_after=0.3, task=task) == [499]
    assert events == ["rollback (ClientDisconnected)"]


async def test_a_client_that_left_during_run_in_executor_is_cancelled_after_the_thread() -> None:
    """An async endpoint that hands blocking work to an executor itself (`await
    loop.run_in_executor(...)`): the request is cancelled once the thread returns, and what
    it opened rolls back after it (before, it rolled back at once, under the running thread).
    Work still queued for a busy executor is cancelled at once: it never runs."""
    import concurrent.futures

    lc, tx, events = recorded_tx()
    app = FastAPI(lifespan=lc.lifespan)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def work(n: int) -> None:
        time.sleep(0.8)  # the client leaves at 0.3 s
        events.append(f"thread {n} ended")

    @app.post("/long/{n}")
    async def long(n: int, t: Annotated[str, Depends(tx)]) -> str:
        await asyncio.get_running_loop().run_in_executor(executor, work, n)
        await anyio.sleep(0.5)  # cancelled here
        events.append("endpoint ended")
        return t

    try:
        async with lc.lifespan(app):
            first = asyncio.ensure_future(call(app, "/long/1", leave_after=0.3))
            await asyncio.sleep(0.1)  # the first has the executor's one thread
            assert await call(app, "/long/2", leave_after=0.2) == [499]
            assert events == ["rollback (ClientDisconnected)"]  # the queued one, at once
            assert await first == [499]
    finally:
        executor.shutdown()
    assert events == ["rollback (ClientDisconnected)", "thread 1 ended"] + [
        "rollback (ClientDisconnected)"
    ]


async def test_requests_queued_for_a_worker_thread_are_still_cancelled() -> None:
    """With every worker thread taken, `def` endpoints whose clients left while they waited
    for one are cancelled there: nothing of theirs runs (a request waiting for a thread
    token is not in a thread)."""
    lc = tether.Lifecycle()
    ran: list[int] = []

    @lc.resource
    async def tx() -> Any:
        yield "tx"

    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/long")
    def long(t: Annotated[str, Depends(tx)]) -> str:
        ran.append(1)
        time.sleep(0.5)
        return t

    limiter = anyio.to_thread.current_default_thread_limiter()
    async with lc.lifespan(app):
        tokens = limiter.total_tokens
        limiter.total_tokens = 1
        try:
            started = time.monotonic()
            statuses = await asyncio.gather(
                *(call(app, "/long", leave_after=0.2) for _ in range(6))
            )
            took = time.monotonic() - started
        finally:
            limiter.total_tokens = tokens
    assert statuses == [[499]] * 6
    assert len(ran) == 1  # the one that had the thread ran to its end, the others never ran
    assert took < 3.0  # six bodies in turn would take 3 s


async def test_a_def_endpoint_on_a_route_served_through_handle_rolls_back_too() -> None:
    """The same on a route tether serves through its `handle` (a route class that wraps its
    app): the response the endpoint makes after its client left does not turn the unit's
    failure back into a success (it committed, when that response started)."""
    from fastapi import APIRouter

    lc, tx, events = recorded_tx()

    router = APIRouter(route_class=WrappingRoute)

    @router.post("/long")
    def long(t: Annotated[str, Depends(tx)]) -> str:
        time.sleep(0.8)  # the client leaves at 0.3 s
        events.append("endpoint ended")
        return t

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(router)
    async with lc.lifespan(app):
        await call(app, "/long", leave_after=0.3)
    assert events == ["endpoint ended", "rollback (ClientDisconnected)"]


@pytest.mark.parametrize("make", [psycopg_app, sqlalchemy_app], ids=["psycopg_pool", "tsa"])
async def test_a_def_endpoint_cancelled_by_a_timeout_runs_to_its_end_and_rolls_back(
    postgres: Postgres, table: None, make: Any
) -> None:
    """The same for a cancel from outside tether: a timeout middleware's (review sync,
    defect 1; uvicorn's ``--timeout-graceful-shutdown`` cancels the same way). The values
    closed at the cancel, under the running thread: the next request got its connection and
    committed the timed-out request's rows (124 of them in the review's run)."""
    name = f"timed-{uuid.uuid4().hex[:10]}"
    app, lc, (resource, insert) = make(postgres, name)
    Value = Annotated[Any, Depends(resource)]
    ended: list[str] = []

    @app.post("/long")
    def long(v: Value) -> dict[str, str]:
        for i in range(ROWS):
            insert(v, i, "timed out")
            time.sleep(0.005)
        ended.append("returned")
        return {"status": "done"}

    @app.post("/one")
    def one(v: Value) -> dict[str, str]:
        insert(v, -1, "next")
        return {"status": "done"}

    timed = timeout_middleware(app, 0.3)
    async with lc.lifespan(app):
        assert await call(timed, "/long", leave_after=None) == [504]
        assert ended == ["returned"]  # the values closed once the thread returned
        for _ in range(3):
            assert await call(app, "/one", leave_after=None) == [200]
    assert postgres.sql("SELECT who, count(*) FROM gone_rows GROUP BY who") == [("next", 3)]
    assert postgres.activity_after_close(name) == []
