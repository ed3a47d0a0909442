"""tether.integrations.psycopg against a real PostgreSQL (and PgBouncer).

Ground truth comes from the server: pg_stat_activity rows of the application_name each
test gives its pool.
"""

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

import tether
from tests.servers import PG_PASSWORD, PgBouncer, Postgres, dead_port
from tether.integrations import psycopg as tpsy

pytestmark = pytest.mark.servers

BUSY = {"active", "idle in transaction", "idle in transaction (aborted)"}
Conn = psycopg.AsyncConnection[Any]


def unique(request: pytest.FixtureRequest) -> str:
    return f"tt-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"


def make_app(
    dsn: str, app_name: str, *, transaction: bool = False, **pool_kw: Any
) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[tpsy.Pool]]:
    lc = tether.Lifecycle()
    pool = tpsy.pool(lc, dsn, kwargs={"application_name": app_name}, **pool_kw)
    conn = tpsy.connection(lc, pool, transaction=transaction)
    C = Annotated[Conn, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)

    async def backend(c: Conn) -> int:
        row = await (await c.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        return int(row[0])

    async def first(c: C) -> int:
        return await backend(c)

    async def second(c: C, pid: Annotated[int, Depends(first)]) -> int:
        assert await backend(c) == pid
        return id(c)

    @app.get("/pid")
    async def pid(
        c: C, pid: Annotated[int, Depends(first)], conn_id: Annotated[int, Depends(second)]
    ) -> dict[str, Any]:
        return {"pids": [await backend(c), pid], "same_object": conn_id == id(c)}

    @app.get("/hold")
    async def hold(c: C, seconds: float = 1.0) -> dict[str, str]:
        await c.execute("SELECT 1")
        await asyncio.sleep(seconds)
        return {"status": "held"}

    @app.get("/sleep")
    async def sleep(c: C, seconds: float = 5.0) -> dict[str, str]:
        await c.execute("SELECT pg_sleep(%s)", [seconds])
        return {"status": "slept"}

    @app.post("/rows/{table}/{key}")
    async def insert(c: C, table: str, key: int, fail: int = 0) -> dict[str, str]:
        await c.execute(f"INSERT INTO {table} (k) VALUES (%s)", [key])
        if fail:
            raise HTTPException(409, "conflict, after writing")
        return {"status": "written"}

    return app, lc, pool


class TestConnectionPerRequest:
    def test_endpoint_and_two_dependencies_share_one_connection(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """The endpoint and both dependencies get one connection: one backend, one object."""
        name = unique(request)
        app, lc, _ = make_app(postgres.dsn, name, min_size=1, max_size=5)
        with TestClient(app) as client:
            for _ in range(5):
                body = client.get("/pid").json()
                assert body["same_object"] is True
                assert len(set(body["pids"])) == 1
            rows = postgres.activity(name)
            assert len(rows) == 1
            assert rows[0]["state"] == "idle"
            stats = lc.stats().resources["conn"]
            assert (stats.opened, stats.closed, stats.in_use) == (5, 5, 0)
        assert postgres.activity_after_close(name) == []

    def test_transaction_commits_before_200_and_rolls_back_on_http_exception(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """Commit happens before the response: a commit that fails is a 500, never a 200."""
        name = unique(request)
        table = f"t_{uuid.uuid4().hex[:8]}"
        postgres.sql(
            f"CREATE TABLE {table} (k int, CONSTRAINT {table}_k UNIQUE (k) "
            f"DEFERRABLE INITIALLY DEFERRED)"
        )
        app, _, _ = make_app(postgres.dsn, name, transaction=True)

        def keys() -> list[int]:
            return sorted(k for (k,) in postgres.sql(f"SELECT k FROM {table}"))

        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.post(f"/rows/{table}/1").status_code == 200
            assert keys() == [1]
            assert client.post(f"/rows/{table}/2?fail=1").status_code == 409
            assert keys() == [1]
            assert client.post(f"/rows/{table}/1").status_code == 500  # fails at COMMIT
            assert keys() == [1]
            assert all(r["state"] == "idle" for r in postgres.activity(name))

    def test_autocommit_by_default(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """transaction=False: each statement commits on its own, even if the endpoint fails."""
        table = f"t_{uuid.uuid4().hex[:8]}"
        postgres.sql(f"CREATE TABLE {table} (k int)")
        app, _, _ = make_app(postgres.dsn, unique(request))
        with TestClient(app) as client:
            assert client.post(f"/rows/{table}/7?fail=1").status_code == 409
        assert postgres.sql(f"SELECT k FROM {table}") == [(7,)]


class TestCancellation:
    @pytest.mark.anyio
    async def test_cancelled_query_is_cancelled_on_the_server(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """A unit of work cancelled mid-query: the server stops it, the connection is clean."""
        name = unique(request)
        lc = tether.Lifecycle()
        pool = tpsy.pool(
            lc, postgres.dsn, min_size=1, max_size=1, kwargs={"application_name": name}
        )
        tx = tpsy.connection(lc, pool, transaction=True)
        async with lc.run():

            async def work() -> None:
                async with lc.scope() as s:
                    c = await s.get(tx)
                    await c.execute("SELECT pg_sleep(5)")

            task = asyncio.ensure_future(work())
            await asyncio.sleep(0.3)
            task.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 2.5  # not the 5 s of the query
            rows = await asyncio.to_thread(postgres.activity, name)
            assert not any(r["state"] in BUSY for r in rows), rows
            async with lc.scope() as s:
                c = await s.get(tx)
                row = await (await c.execute("SELECT 1")).fetchone()
                assert row == (1,)


class TestExhaustion:
    def test_pool_timeout_is_a_503_naming_the_pool(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """max_size=1, one request holding it: the next waits `timeout`, then 503."""
        app, lc, _ = make_app(postgres.dsn, unique(request), max_size=1, timeout=0.3)
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            holding = executor.submit(client.get, "/hold?seconds=3")
            deadline = time.monotonic() + 5
            while lc.stats().resources["conn"].in_use != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            t0 = time.monotonic()
            response = client.get("/pid")
            assert 0.25 < time.monotonic() - t0 < 2.5  # the timeout, not the 3 s hold
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            detail = response.json()["detail"]
            assert detail.startswith("Pool 'pool' (size 1, in use 1, waiting "), detail
            assert "within timeout=0.3 s" in detail
            assert holding.result().status_code == 200
            assert client.get("/pid").status_code == 200


class TestLostConnection:
    def test_idle_connections_killed_together_are_replaced_at_once(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """An idle timeout (the server's, a proxy's) closed every connection of a pool of 4:
        psycopg_pool waited 1, 2, 4 s after each dead one it checked, and the next request
        got a 503 after `timeout` with the database up (trial 18). Now they are checked one
        after the other, and the request is served."""
        name = unique(request)
        app, lc, _ = make_app(postgres.dsn, name, min_size=4, max_size=4)
        with TestClient(app) as client:
            assert client.get("/pid").status_code == 200
            deadline = time.monotonic() + 5
            while len(postgres.activity(name)) < 4:  # the pool's 4, idle
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert postgres.terminate(name) == 4
            started = time.monotonic()
            assert client.get("/pid").status_code == 200
            assert time.monotonic() - started < 2.0  # (before: a 503 after 5 s)

    def test_backend_killed_mid_transaction_is_a_503_then_recovers(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """The server ends the backend mid-query: nothing was committed, so 503; then 200s."""
        name = unique(request)
        app, lc, _ = make_app(postgres.dsn, name, transaction=True, max_size=1)
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            sleeping = executor.submit(client.get, "/sleep?seconds=5")
            deadline = time.monotonic() + 5
            while not any(r["state"] == "active" for r in postgres.activity(name)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert postgres.terminate(name) == 1
            response = sleeping.result(timeout=5)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "the connection was lost mid-transaction" in response.json()["detail"]
            for _ in range(5):
                assert client.get("/pid").status_code == 200

    @pytest.mark.anyio
    @pytest.mark.parametrize("failing", [True, False], ids=["rollback", "reset"])
    async def test_a_backend_that_stops_answering_is_given_up_within_reset_timeout(
        self, postgres: Postgres, request: pytest.FixtureRequest, failing: bool
    ) -> None:
        """The backend stops answering (SIGSTOP: a frozen host) just before the unit of work
        ends. The rollback (after a failure) or the session reset (after a success) gives up
        at `reset_timeout`, not 5 s later (psycopg waits that long for a cancelled query's
        confirmation): the connection is closed, and the pool serves the next unit on a new
        one."""
        name = unique(request)
        lc = tether.Lifecycle()
        pool = tpsy.pool(lc, postgres.dsn, min_size=1, max_size=2,
                         kwargs={"application_name": name})  # fmt: skip
        # With a transaction, the failure's rollback; without one, the reset after success.
        conn = tpsy.connection(lc, pool, transaction=failing, reset_timeout=0.5)
        async with lc.run():
            pid = 0
            try:
                with pytest.raises(RuntimeError) if failing else contextlib.nullcontext():
                    async with lc.scope() as s:
                        c = await s.get(conn)
                        pid = c.info.backend_pid
                        await c.execute("SELECT 1")
                        try:
                            os.kill(pid, signal.SIGSTOP)
                        except PermissionError:
                            pytest.skip("cannot signal the server's processes")
                        t0 = time.monotonic()
                        if failing:
                            raise RuntimeError("the endpoint failed")
                took = time.monotonic() - t0
            finally:
                if pid:
                    os.kill(pid, signal.SIGCONT)
            assert took < 2.5, took  # reset_timeout=0.5 s; it was 5.5 s
            assert lc.stats().pools["pool"].discarded >= 1
            async with lc.scope() as s:
                c = await s.get(conn)
                assert c.info.backend_pid != pid
                assert await (await c.execute("SELECT 2")).fetchone() == (2,)


class TestPgBouncer:
    def test_transaction_mode_runs_repeated_parameterised_queries(
        self, pgbouncer: PgBouncer, request: pytest.FixtureRequest
    ) -> None:
        """pgbouncer=True: 500 requests repeating parameterised queries, no prepared statements."""
        lc = tether.Lifecycle()
        pool = tpsy.pool(
            lc,
            pgbouncer.dsn,
            pgbouncer=True,
            max_size=4,
            kwargs={"application_name": unique(request)},
        )
        conn = tpsy.connection(lc, pool)
        tx = tpsy.connection(lc, pool, name="tx", transaction=True)
        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/q/{n}")
        async def q(n: int, c: Annotated[Conn, Depends(conn)]) -> dict[str, Any]:
            a = await (await c.execute("SELECT %s::int + 1", [n])).fetchone()
            rows = await (await c.execute("SELECT generate_series(1, %s)", [n % 5 + 1])).fetchall()
            return {"a": a, "rows": len(rows)}

        @app.get("/tx/{n}")
        async def in_tx(n: int, c: Annotated[Conn, Depends(tx)]) -> dict[str, Any]:
            a = await (await c.execute("SELECT %s::int * 2", [n])).fetchone()
            b = await (await c.execute("SELECT %s::text || 'x'", [str(n)])).fetchone()
            return {"a": a, "b": b}

        def one(i: int) -> tuple[int, str]:
            response = client.get(f"/q/{i}" if i % 2 else f"/tx/{i}")
            return response.status_code, response.text

        with TestClient(app, raise_server_exceptions=False) as client:
            with ThreadPoolExecutor(8) as executor:
                results = list(executor.map(one, range(500)))
        assert [text for status, text in results if status != 200] == []


class TestStartup:
    def test_unreachable_database_is_a_startup_error_without_the_password(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Nothing listens there: StartupError at once, naming the pool, hiding the password."""
        with dead_port() as port:  # nothing listens there, and nothing can meanwhile
            conninfo = f"host=127.0.0.1 port={port} user=tether password={PG_PASSWORD} dbname=x"
            lc = tether.Lifecycle()
            tpsy.pool(lc, lambda: conninfo)
            app = FastAPI(lifespan=lc.lifespan)
            caplog.set_level(logging.DEBUG)
            t0 = time.monotonic()
            with pytest.raises(tether.StartupError) as info, TestClient(app):
                pass
            assert time.monotonic() - t0 < 3
        text = str(info.value)
        assert "'pool' cannot reach host=127.0.0.1" in text
        assert "password=***" in text
        assert "Connection refused" in text
        chain: BaseException | None = info.value
        while chain is not None:
            assert PG_PASSWORD not in str(chain)
            assert PG_PASSWORD not in repr(chain)
            chain = chain.__cause__ or chain.__context__
        assert PG_PASSWORD not in caplog.text

    @pytest.mark.anyio
    async def test_a_configure_that_fails_is_named_not_an_unreachable_server(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """The server lets tether's first connection in, but the pool's `configure=` fails on
        every connection it makes: the startup error says so, and does not send the user
        checking an address and credentials that work."""

        async def configure(conn: Any) -> None:
            await conn.execute("SET search_path TO app")
            raise RuntimeError("a bug in configure")

        name = unique(request)
        lc = tether.Lifecycle()
        tpsy.pool(lc, postgres.dsn, open_timeout=0.5, configure=configure,
                  kwargs={"application_name": name})  # fmt: skip
        with pytest.raises(tether.StartupError) as info:
            async with lc.run():
                pass
        shown = postgres.dsn.replace(PG_PASSWORD, "***")
        assert str(info.value) == (
            f"App resource 'pool' failed to open: ResourceUnavailable: Pool 'pool' did not "
            f"open 1 connection(s) in 0.5 s, although a connection made just before to "
            f"{shown} got in. So the pool's own setup of a connection fails: a configure= "
            f"that raises or leaves a transaction open, or kwargs the server refuses (psycopg "
            f"logs each attempt as \"error connecting in 'pool'\"); or the server is slow to "
            f"accept more connections: give open_timeout= more seconds. The resources already "
            f"open were closed. Fix the cause above, or give 'pool' retries= or a longer "
            f"open_timeout= if it is slow to come up."
        )
        assert postgres.activity_after_close(name) == []

    @pytest.mark.anyio
    async def test_pool_used_from_another_event_loop_is_a_scope_error(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """A pool opened on one loop refuses another loop with a clear ScopeError."""
        lc = tether.Lifecycle()
        pool = tpsy.pool(lc, postgres.dsn, kwargs={"application_name": unique(request)})
        async with lc.run():
            p = lc.get(pool)

            def elsewhere() -> None:
                async def use() -> None:
                    async with p.connection() as c:
                        await c.execute("SELECT 1")

                asyncio.run(use())

            with pytest.raises(tether.ScopeError, match="opened on another event loop"):
                await asyncio.to_thread(elsewhere)
            async with p.connection() as c:
                assert await (await c.execute("SELECT 2")).fetchone() == (2,)

    @pytest.mark.anyio
    async def test_logs_and_reprs_show_no_password(
        self, postgres: Postgres, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
    ) -> None:
        """The startup log names the conninfo with ***; pool and connection reprs too."""
        caplog.set_level(logging.INFO, logger="tether")
        conninfo = f"{postgres.dsn}?application_name={unique(request)}"
        lc = tether.Lifecycle()
        pool = tpsy.pool(lc, conninfo)
        conn = tpsy.connection(lc, pool)
        async with lc.run(), lc.scope() as s:
            c = await s.get(conn)
            shown = [repr(pool), repr(conn), repr(lc.get(pool)), repr(c)]
        assert "open on postgresql://tether:***@127.0.0.1" in caplog.text
        assert PG_PASSWORD not in caplog.text
        assert not [text for text in shown if PG_PASSWORD in text]

    def test_budget_over_max_connections_fails_with_budget_error(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """30 workers x 10 + 3 > max_connections=100 with budget="error": StartupError."""
        name = unique(request)
        app, _, _ = make_app(postgres.dsn, name, workers=30, budget="error")
        with (
            pytest.raises(tether.StartupError, match=r"30 workers x 10 connections"),
            TestClient(app),
        ):
            pass
        assert postgres.activity_after_close(name) == []


def test_health_check_runs_select_1(postgres: Postgres, request: pytest.FixtureRequest) -> None:
    """The default check passes on a live pool."""
    app, lc, _ = make_app(postgres.dsn, unique(request))
    with TestClient(app) as client:
        report = client.portal.call(lc.health)
        assert report["pool"].ok
