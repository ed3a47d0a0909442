"""tether.integrations.asyncpg against a real PostgreSQL (and PgBouncer, and uvicorn).

Ground truth comes from the server: pg_stat_activity rows of the application_name each
test gives its pool.
"""

import asyncio
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

import tether
from tests.servers import PG_PASSWORD, PgBouncer, Postgres, dead_port
from tests.serving import Server
from tether.integrations import asyncpg as tpg

pytestmark = pytest.mark.servers

BUSY = {"active", "idle in transaction", "idle in transaction (aborted)"}


def unique(request: pytest.FixtureRequest) -> str:
    """An application_name of this test only (pg_stat_activity filters on it)."""
    return f"tt-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"


def wait_until(check: Any, timeout: float, interval: float = 0.02) -> float:
    """Poll *check* until true; return the seconds it took (fail after *timeout*)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(interval)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def own_pg() -> Iterator[Postgres]:
    """A PostgreSQL of this module only: password auth, small max_connections, restarted."""
    with Postgres(max_connections=20, auth="scram-sha-256") as pg:
        yield pg


def make_app(
    dsn: str, app_name: str, *, transaction: bool = False, **pool_kw: Any
) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[asyncpg.Pool]]:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, dsn, server_settings={"application_name": app_name}, **pool_kw)
    conn = tpg.connection(lc, pool, transaction=transaction)
    Conn = Annotated[asyncpg.Connection, Depends(conn)]
    app = FastAPI(lifespan=lc.lifespan)

    async def first(c: Conn) -> int:
        return int(await c.fetchval("SELECT pg_backend_pid()"))

    async def second(c: Conn, pid: Annotated[int, Depends(first)]) -> int:
        assert await c.fetchval("SELECT pg_backend_pid()") == pid
        return id(c)

    @app.get("/pid")
    async def pid(
        c: Conn,
        pid: Annotated[int, Depends(first)],
        conn_id: Annotated[int, Depends(second)],
    ) -> dict[str, Any]:
        own = await c.fetchval("SELECT pg_backend_pid()")
        return {"pids": [own, pid], "same_object": conn_id == id(c)}

    @app.get("/hold")
    async def hold(c: Conn, seconds: float = 1.0) -> dict[str, str]:
        await c.execute("SELECT 1")
        await asyncio.sleep(seconds)
        return {"status": "held"}

    @app.get("/sleep")
    async def sleep(c: Conn, seconds: float = 5.0) -> dict[str, str]:
        await c.execute("SELECT pg_sleep($1)", seconds)
        return {"status": "slept"}

    @app.post("/rows/{table}/{key}")
    async def insert(c: Conn, table: str, key: int, fail: int = 0) -> dict[str, str]:
        await c.execute(f"INSERT INTO {table} (k) VALUES ($1)", key)
        if fail:
            raise HTTPException(409, "conflict, after writing")
        return {"status": "written"}

    return app, lc, pool


# --------------------------------------------------------------------------- per request


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
            assert len(rows) == 1  # sequential requests: one backend serves them all
            assert rows[0]["state"] == "idle"
            stats = lc.stats().resources["conn"]
            assert (stats.opened, stats.closed, stats.in_use) == (5, 5, 0)
        assert postgres.activity_after_close(name) == []  # closed at shutdown

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
            # The endpoint wrote, then raised HTTPException: rolled back.
            assert client.post(f"/rows/{table}/2?fail=1").status_code == 409
            assert keys() == [1]
            # The unique constraint is checked at COMMIT: the commit fails, so the client
            # gets a 500 (it would get 200 if the commit ran after the response).
            response = client.post(f"/rows/{table}/1")
            assert response.status_code == 500
            assert keys() == [1]
            assert all(r["state"] == "idle" for r in postgres.activity(name))


# --------------------------------------------------------------------------- disconnects


MIDDLEWARE = pytest.mark.parametrize(
    "middleware", [False, True], ids=["plain", "BaseHTTPMiddleware"]
)


def serve_asyncpg_app(
    postgres: Postgres, tmp_path: Path, name: str, *, middleware: bool = False
) -> Server:
    env = {"TETHER_TEST_DSN": postgres.dsn, "TETHER_TEST_APP_NAME": name}
    if middleware:
        env["TETHER_TEST_MIDDLEWARE"] = "1"
    return Server("tests.integration.app_asyncpg:app", tmp_path, env=env)


class TestDisconnect:
    @MIDDLEWARE
    def test_client_going_away_cancels_the_query_on_the_server(
        self, postgres: Postgres, tmp_path: Path, request: pytest.FixtureRequest, middleware: bool
    ) -> None:
        """A client leaving during pg_sleep(5) (GET, and POST with a JSON body), with and
        without a BaseHTTPMiddleware in the stack: within 2.5 s no backend is busy, then
        100 OK."""
        name = unique(request)
        server = serve_asyncpg_app(postgres, tmp_path, name, middleware=middleware)
        try:
            body = b'{"seconds": 5}'
            requests = {
                "/sleep": b"GET /sleep?seconds=5 HTTP/1.1\r\nHost: x\r\n\r\n",
                "/sleep-tx": b"GET /sleep-tx?seconds=5 HTTP/1.1\r\nHost: x\r\n\r\n",
                "/sleep-body": b"POST /sleep-body HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            }
            for path, raw in requests.items():
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(raw)
                wait_until(
                    lambda: any(
                        r["state"] == "active" and "pg_sleep" in r["query"]
                        for r in postgres.activity(name)
                    ),
                    timeout=5,
                )
                sock.close()
                took = wait_until(
                    lambda: not any(r["state"] in BUSY for r in postgres.activity(name)),
                    timeout=4,
                )
                # Left running, the query would hold its backend seconds more; each poll
                # is a new connection, slow on a loaded machine.
                assert took < 2.5, f"{path}: backends busy for {took:.2f} s after the disconnect"
            with httpx.Client(base_url=server.base_url, timeout=5) as http:
                for _ in range(100):
                    response = http.get("/pid")
                    assert response.status_code == 200, response.text
                    assert response.json()["fresh_tx"] is True  # no transaction left open
            assert len(postgres.activity(name)) <= 2  # max_size=2: nothing leaked
            assert "Traceback" not in server.output()
        finally:
            server.stop()

    @MIDDLEWARE
    def test_a_stream_cut_short_rolls_back_its_transaction(
        self, postgres: Postgres, tmp_path: Path, request: pytest.FixtureRequest, middleware: bool
    ) -> None:
        """A write, then a body streamed in the same transaction (release="response"); the
        client reads a few chunks and goes away, with and without a BaseHTTPMiddleware: the
        row is rolled back and no backend is busy within 2.5 s; a client that reads the whole
        of a short stream gets its row committed."""
        name = unique(request)
        table = f"cut_{uuid.uuid4().hex[:8]}"
        postgres.sql(f"CREATE TABLE {table} (k int PRIMARY KEY)")
        server = serve_asyncpg_app(postgres, tmp_path, name, middleware=middleware)
        try:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"GET /write-then-stream/{table}/1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            while received.count(b"chunk") < 3:
                received += sock.recv(4096)
            assert any(r["state"] in BUSY for r in postgres.activity(name))
            sock.close()
            took = wait_until(
                lambda: not any(r["state"] in BUSY for r in postgres.activity(name)), timeout=4
            )
            assert took < 2.5, f"backends busy for {took:.2f} s after the disconnect"
            assert postgres.sql(f"SELECT count(*) FROM {table}") == [(0,)]
            assert "Traceback" not in server.output()
        finally:
            server.stop()

    def test_client_leaving_at_any_moment_leaves_nothing_behind(
        self, postgres: Postgres, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """Clients of a real uvicorn that leave at moments spread over a request (a write,
        then pg_sleep(0.3), in one transaction committed at the end): a client that got
        200 has its row; within 1.5 s no backend is busy; the connections stay clean."""
        name = unique(request)
        table = f"leave_{uuid.uuid4().hex[:8]}"
        postgres.sql(f"CREATE TABLE {table} (k int PRIMARY KEY)")
        server = Server(
            "tests.integration.app_asyncpg:app",
            tmp_path,
            env={"TETHER_TEST_DSN": postgres.dsn, "TETHER_TEST_APP_NAME": name},
        )
        try:
            answered = 0
            for key in range(14):
                leave_after = 0.05 * key  # 0 to 0.65 s, across the 0.3 s of the request
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(
                    f"POST /write-slow/{table}/{key} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: 0\r\n\r\n".encode()
                )
                sock.settimeout(max(leave_after, 0.001))
                try:
                    reply = sock.recv(4096)
                except (TimeoutError, OSError):
                    reply = b""
                sock.close()
                if reply.startswith(b"HTTP/1.1 200"):
                    answered += 1
                    rows = postgres.sql(f"SELECT count(*) FROM {table} WHERE k = {key}")
                    assert rows[0][0] == 1, f"left after {leave_after:.2f} s: 200, not committed"
                wait_until(
                    lambda: not any(r["state"] in BUSY for r in postgres.activity(name)),
                    timeout=1.5,
                )
            assert 0 < answered < 14  # some left before the answer, some after it
            with httpx.Client(base_url=server.base_url, timeout=5) as http:
                for _ in range(20):
                    response = http.get("/pid")
                    assert response.status_code == 200, response.text
                    assert response.json()["fresh_tx"] is True
            assert len(postgres.activity(name)) <= 2
            assert "Traceback" not in server.output()
        finally:
            server.stop()

    def test_sigterm_lets_in_flight_queries_finish_then_closes_every_connection(
        self, postgres: Postgres, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """Ten requests each in a 2 s query on their own connection; SIGTERM at 0.5 s: all
        ten are answered 200, the process exits cleanly and leaves no backend on the server
        (pain.md T7.3, reliability.md test 9)."""
        name = unique(request)
        server = Server(
            "tests.integration.app_asyncpg:app",
            tmp_path,
            env={"TETHER_TEST_DSN": postgres.dsn, "TETHER_TEST_APP_NAME": name,
                 "TETHER_TEST_MAX_SIZE": "10"},
        )  # fmt: skip
        socks = []
        try:
            for _ in range(10):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(b"GET /sleep-tx?seconds=2 HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(sock)
            wait_until(
                lambda: sum("pg_sleep" in r["query"] for r in postgres.activity(name)) == 10,
                timeout=5,
            )
            server.terminate()
            replies = []
            for sock in socks:
                sock.settimeout(10)
                replies.append(sock.recv(4096))
            assert [r.split(b"\r\n", 1)[0] for r in replies] == [b"HTTP/1.1 200 OK"] * 10
            # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
            assert server.wait(15) in (0, -15)
            assert postgres.activity_after_close(name) == []  # the pool closed every one
            output = server.output()
            for noise in ("Traceback", "Task was destroyed", "ResourceWarning", "unclosed"):
                assert noise not in output
        finally:
            for sock in socks:
                sock.close()
            server.stop()

    @pytest.mark.parametrize("middleware", [False, True], ids=["plain", "base-http-middleware"])
    def test_past_the_graceful_shutdown_timeout_the_query_is_ended_on_the_server(
        self, postgres: Postgres, tmp_path: Path, request: pytest.FixtureRequest, middleware: bool
    ) -> None:
        """A 60 s query and `--timeout-graceful-shutdown 1`: the process exits within a
        few seconds of SIGTERM, and the backend is gone (pain.md T7.4). Behind a
        BaseHTTPMiddleware too, which answered 500 (trial 17)."""
        name = unique(request)
        env = {"TETHER_TEST_DSN": postgres.dsn, "TETHER_TEST_APP_NAME": name,
               "TETHER_TEST_DRAIN": "2"}  # fmt: skip
        if middleware:
            env["TETHER_TEST_MIDDLEWARE"] = "1"
        server = Server(
            "tests.integration.app_asyncpg:app",
            tmp_path,
            "--timeout-graceful-shutdown",
            "1",
            env=env,
        )
        sock = socket.create_connection(("127.0.0.1", server.port))
        try:
            sock.sendall(b"GET /sleep-tx?seconds=60 HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(
                lambda: any("pg_sleep" in r["query"] for r in postgres.activity(name)),
                timeout=5,
            )
            started = time.monotonic()
            server.terminate()
            server.wait(15)
            assert time.monotonic() - started < 6
            took = wait_until(lambda: postgres.activity(name) == [], timeout=3)
            assert took < 2.0, postgres.activity(name)
            # Answered 503 with Retry-After, which a load balancer retries elsewhere, where
            # uvicorn answers 500; tether's line says why.
            sock.settimeout(5)
            head = sock.recv(65536).split(b"\r\n\r\n", 1)[0].decode().lower()
            assert head.startswith("http/1.1 503 "), head
            assert "\r\nretry-after: 5" in head, head
            assert (
                "tether: GET /sleep-tx answered 503: the server cancelled it as it shut down "
                "(uvicorn's --timeout-graceful-shutdown ran out); its values closed with the "
                "cancellation (rolled back)"
            ) in server.output()
        finally:
            sock.close()
            server.stop()

    @pytest.mark.anyio
    async def test_cancelled_query_then_reused_connection_is_clean(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """A unit of work cancelled mid-query leaves its connection reset, or discarded."""
        name = unique(request)
        lc = tether.Lifecycle()
        pool = tpg.pool(
            lc, postgres.dsn, min_size=1, max_size=1, server_settings={"application_name": name}
        )
        conn = tpg.connection(lc, pool)
        async with lc.run():
            for statement in ("SELECT pg_sleep(5)", "BEGIN; SELECT pg_sleep(5)"):

                async def work(statement: str = statement) -> None:
                    async with lc.scope() as s:
                        c = await s.get(conn)
                        if statement.startswith("BEGIN"):
                            await c.execute("BEGIN")  # a transaction the endpoint leaves open
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
                    c = await s.get(conn)
                    assert not c.is_in_transaction()
                    assert await c.fetchval("SELECT pg_current_xact_id_if_assigned() IS NULL")

    @pytest.mark.anyio
    async def test_connection_still_in_use_is_terminated_with_its_backend(
        self, postgres: Postgres, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A query still running at release (a task the endpoint forgot): state unknown, so
        the connection is terminated, its backend too, and the pool goes on."""
        name = unique(request)
        lc = tether.Lifecycle()
        pool = tpg.pool(
            lc, postgres.dsn, min_size=1, max_size=1, server_settings={"application_name": name}
        )
        conn = tpg.connection(lc, pool)
        async with lc.run():
            async with lc.scope() as s:
                c = await s.get(conn)
                pid = c.get_server_pid()
                orphan = asyncio.ensure_future(c.execute("SELECT pg_sleep(5)"))
                await asyncio.sleep(0.2)  # running on the server now
            assert (  # named: the `lc.scope()` is the unit its code runs in
                "a task still ran a query on the connection when its unit of work (scope) ended"
                in caplog.text
            )
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):  # closed under it
                await orphan
            t0 = time.monotonic()
            while any(r["pid"] == pid for r in await asyncio.to_thread(postgres.activity, name)):
                assert time.monotonic() - t0 < 2.5, "the backend outlived its connection"
                await asyncio.sleep(0.02)
            async with lc.scope() as s:
                c = await s.get(conn)
                assert c.get_server_pid() != pid
                assert await c.fetchval("SELECT 1") == 1


# --------------------------------------------------------------------------- back-pressure


class TestExhaustion:
    def test_pool_exhausted_is_a_503_naming_the_pool(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """max_size=1, one request holding it: the next waits acquire_timeout, then 503."""
        name = unique(request)
        app, lc, _ = make_app(postgres.dsn, name, max_size=1, acquire_timeout=0.3)
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            holding = executor.submit(client.get, "/hold?seconds=3")
            wait_until(lambda: lc.stats().resources["conn"].in_use == 1, timeout=5)
            t0 = time.monotonic()
            response = client.get("/pid")
            assert 0.25 < time.monotonic() - t0 < 2.5  # the timeout, not the 3 s hold
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            detail = response.json()["detail"]
            assert detail.startswith("Pool 'pool' (size 1, in use 1, waiting 0)"), detail
            assert "acquire_timeout=0.3 s" in detail
            assert holding.result().status_code == 200
            assert client.get("/pid").status_code == 200  # and it recovers at once


# --------------------------------------------------------------------------- PgBouncer


class TestPgBouncer:
    def test_a_pool_not_declared_pgbouncer_says_so_when_its_statements_go_missing(
        self, pgbouncer: PgBouncer, request: pytest.FixtureRequest
    ) -> None:
        """Without pgbouncer=True behind PgBouncer in transaction mode, a statement asyncpg
        prepared on one server connection is later sent to another: the error's traceback
        carries a note naming the fix (the error alone says only that the statement does
        not exist)."""
        lc = tether.Lifecycle()
        pool = tpg.pool(
            lc,
            pgbouncer.dsn,
            max_size=1,
            budget="off",
            server_settings={"application_name": unique(request)},
        )
        conn = tpg.connection(lc, pool)
        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/q")
        async def q(c: Annotated[asyncpg.Connection, Depends(conn)]) -> int:
            assert await c.fetchval("SELECT $1::int", 1) == 1  # prepared, and cached
            other = await asyncpg.connect(pgbouncer.dsn, statement_cache_size=0)
            try:
                # PgBouncer hands out the server connection used last: the other client's
                # transaction now holds the one the statement was prepared on.
                await other.execute("BEGIN; SELECT 1")
                return int(await c.fetchval("SELECT $1::int", 2))
            finally:
                await other.close()

        with TestClient(app) as client:
            with pytest.raises(asyncpg.InvalidSQLStatementNameError) as info:
                client.get("/q")
        assert info.value.__notes__ == [
            "tether: the server does not have a prepared statement the driver cached, or has "
            "it already. Behind PgBouncer in transaction (or statement) mode, each transaction "
            "may run on another server connection, which breaks the driver's statement cache: "
            "pass pgbouncer=True to the pool (tether then configures the driver for it)."
        ]

    def test_transaction_mode_runs_repeated_parameterised_queries(
        self, pgbouncer: PgBouncer, request: pytest.FixtureRequest
    ) -> None:
        """pgbouncer=True: 500 requests of repeated parameterised queries, no errors."""
        lc = tether.Lifecycle()
        pool = tpg.pool(
            lc,
            pgbouncer.dsn,
            pgbouncer=True,
            max_size=4,
            server_settings={"application_name": unique(request)},
        )
        conn = tpg.connection(lc, pool)
        tx = tpg.connection(lc, pool, name="tx", transaction=True)
        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/q/{n}")
        async def q(
            n: int,
            c: Annotated[asyncpg.Connection, Depends(conn)],
        ) -> dict[str, Any]:
            a = await c.fetchval("SELECT $1::int + 1", n)
            rows = await c.fetch("SELECT generate_series(1, $1::int) AS i", n % 5 + 1)
            return {"a": a, "rows": len(rows)}

        @app.get("/tx/{n}")
        async def in_tx(n: int, c: Annotated[asyncpg.Connection, Depends(tx)]) -> dict[str, Any]:
            a = await c.fetchval("SELECT $1::int * 2", n)
            b = await c.fetchval("SELECT $1::text || 'x'", str(n))
            return {"a": a, "b": b}

        def one(i: int) -> tuple[int, str]:
            response = client.get(f"/q/{i}" if i % 2 else f"/tx/{i}")
            return response.status_code, response.text

        with TestClient(app, raise_server_exceptions=False) as client:
            with ThreadPoolExecutor(8) as executor:
                results = list(executor.map(one, range(500)))
        failures = [text for status, text in results if status != 200]
        assert failures == []
        assert "prepared statement" not in " ".join(text for _, text in results)


# --------------------------------------------------------------------------- restart


class TestRestart:
    def test_requests_after_a_restart_succeed_on_new_backends(
        self, own_pg: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """pg_ctl restart mid-traffic: from 1 s after it is back, every request succeeds."""
        name = unique(request)
        app, lc, pool = make_app(own_pg.dsn, name, min_size=2, max_size=4, acquire_timeout=2)
        # (sent at, answered at, status)
        results: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                t = time.monotonic()
                status = client.get("/pid").status_code
                results.append((t, time.monotonic(), status))
                time.sleep(0.005)

        with TestClient(app, raise_server_exceptions=False) as client:
            threads = [threading.Thread(target=traffic) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                time.sleep(0.5)
                restart_begins = time.monotonic()
                own_pg.restart()
                back = time.monotonic()
                restarted_at = own_pg.sql("SELECT pg_postmaster_start_time()")[0][0]
                # Enough requests from 1 s after it is back, however slow the machine is.
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if len([1 for t, _, _ in list(results) if t >= back + 1.0]) > 20:
                        break
                    time.sleep(0.1)
            finally:
                stop.set()
                for t in threads:
                    t.join()
            # Answered before the restart began: a slow machine may still be answering a
            # request sent well before it when the server goes down.
            before = [s for _, done, s in results if done < restart_begins]
            late = [s for t, _, s in results if t >= back + 1.0]
            assert before
            assert all(s == 200 for s in before)
            assert len(late) > 20
            assert all(s == 200 for s in late), late

            # The pool holds only connections to the new server: every one of them works,
            # and each is a backend started after the restart.
            p = lc.get(pool)

            async def hold_all() -> list[int]:
                conns = [await p.acquire() for _ in range(p.get_size())]
                try:
                    return [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
                finally:
                    for c in conns:
                        await p.release(c)

            pids = client.portal.call(hold_all)
            rows = own_pg.activity(name)
            assert sorted(pids) == sorted(r["pid"] for r in rows)
            assert all(r["backend_start"] >= restarted_at for r in rows)


# --------------------------------------------------------------------------- startup


class TestLostConnection:
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


class TestStartup:
    def test_unreachable_database_is_a_startup_error_without_the_password(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Nothing listens at the DSN: StartupError names the pool, never the password."""
        with dead_port() as dead:  # nothing listens there, and nothing can meanwhile
            dsn = f"postgresql://tether:{PG_PASSWORD}@127.0.0.1:{dead}/tether"
            lc = tether.Lifecycle()
            pool = tpg.pool(lc, lambda: dsn)  # read when the app starts, not now
            tpg.connection(lc, pool)
            app = FastAPI(lifespan=lc.lifespan)
            caplog.set_level(logging.DEBUG)
            with pytest.raises(tether.StartupError) as info, TestClient(app):
                pass
        error = info.value
        assert error.resource == "pool"
        text = str(error)
        port = dsn.rsplit(":", 1)[1].split("/")[0]
        reason = re.escape(  # the socket's own words, which vary: anything up to the fix
            f"App resource 'pool' failed to open: ResourceUnavailable: 'pool' cannot reach "
            f"postgresql://tether:***@127.0.0.1:{port}/tether: "
        )
        fix = re.escape(
            ". Check that the server runs and is reachable from here, and the address and "
            "credentials in its DSN. The resources already open were closed. Fix the cause "
            "above, or give 'pool' retries= or a longer connect_timeout= if it is slow to come "
            "up."
        )
        assert re.fullmatch(f"{reason}(ConnectionRefusedError|OSError): .+{fix}", text), text
        chain: BaseException | None = error
        while chain is not None:
            assert PG_PASSWORD not in str(chain)
            assert PG_PASSWORD not in repr(chain)
            chain = chain.__cause__ or chain.__context__
        assert PG_PASSWORD not in caplog.text

    def test_wrong_password_is_a_startup_error_without_it(self, own_pg: Postgres) -> None:
        """A server refusing the password: the error says so, and hides the password."""
        wrong = "not-the-pw-42"
        lc = tether.Lifecycle()
        tpg.pool(lc, own_pg.dsn.replace(PG_PASSWORD, wrong))
        app = FastAPI(lifespan=lc.lifespan)
        with pytest.raises(tether.StartupError) as info, TestClient(app):
            pass
        assert "password authentication failed" in str(info.value)
        assert wrong not in str(info.value)
        assert wrong not in repr(info.value.__cause__)

    def test_a_refused_password_is_not_retried(
        self, own_pg: Postgres, caplog: pytest.LogCaptureFixture
    ) -> None:
        """`retries=` are for a server slow to come up: a server refusing the password (or
        the role, or the database) refuses it again, and each try risks a lockout. The
        start fails on the first refusal, and says why it made no retry."""
        wrong = "not-the-pw-42"
        lc = tether.Lifecycle()
        tpg.pool(lc, own_pg.dsn.replace(PG_PASSWORD, wrong), retries=3, backoff=5.0)
        app = FastAPI(lifespan=lc.lifespan)
        t0 = time.monotonic()
        with pytest.raises(tether.StartupError) as info, TestClient(app):
            pass
        assert time.monotonic() - t0 < 4  # a retry would have waited 5 s first
        assert str(info.value).endswith(
            "The resources already open were closed. The server refused the credentials or "
            "the database (SQLSTATE 28P01), which no retry mends, so none was made: fix the "
            "user, password or database name it connects with."
        )
        assert "retrying" not in caplog.text
        db = own_pg.dsn.rsplit("/", 1)[0] + "/no_such_db"
        lc = tether.Lifecycle()
        tpg.pool(lc, db, retries=3, backoff=5.0)
        t0 = time.monotonic()
        with (
            pytest.raises(tether.StartupError, match=r"\(SQLSTATE 3D000\)"),
            TestClient(FastAPI(lifespan=lc.lifespan)),
        ):
            pass
        assert time.monotonic() - t0 < 4

    @pytest.mark.anyio
    async def test_pool_used_from_another_event_loop_is_a_scope_error(
        self, postgres: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """A pool opened on one loop refuses another loop with a clear ScopeError."""
        lc = tether.Lifecycle()
        pool = tpg.pool(lc, postgres.dsn, server_settings={"application_name": unique(request)})
        async with lc.run():
            p = lc.get(pool)
            assert await p.fetchval("SELECT 1") == 1

            def elsewhere() -> None:
                asyncio.run(p.fetchval("SELECT 1"))

            with pytest.raises(tether.ScopeError, match="opened on another event loop"):
                await asyncio.to_thread(elsewhere)
            assert await p.fetchval("SELECT 2") == 2  # and it still works on its own loop

    def test_nothing_connects_at_import_or_registration(self, postgres: Postgres) -> None:
        """Registering resources touches nothing: the DSN callable is not even called."""
        calls: list[str] = []

        def dsn() -> str:
            calls.append("dsn")
            return postgres.dsn

        lc = tether.Lifecycle()
        pool = tpg.pool(lc, dsn)
        tpg.connection(lc, pool)
        assert calls == []
        assert "s3cret" not in repr(pool)

    @pytest.mark.anyio
    async def test_logs_and_reprs_show_no_password(
        self, own_pg: Postgres, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
    ) -> None:
        """The startup log names the DSN with ***; pool, connection and resource reprs too."""
        caplog.set_level(logging.INFO, logger="tether")
        lc = tether.Lifecycle()
        pool = tpg.pool(lc, own_pg.dsn, server_settings={"application_name": unique(request)})
        conn = tpg.connection(lc, pool)
        async with lc.run(), lc.scope() as s:
            c = await s.get(conn)
            shown = [repr(pool), repr(conn), repr(lc.get(pool)), repr(c), str(lc.stats())]
        assert "open on postgresql://tether:***@127.0.0.1" in caplog.text
        assert PG_PASSWORD not in caplog.text
        assert not [text for text in shown if PG_PASSWORD in text]


class TestBudget:
    def test_budget_over_max_connections_warns(
        self, own_pg: Postgres, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
    ) -> None:
        """4 workers x max_size 10 + 3 reserved > max_connections=20: a warning at startup."""
        app, _, _ = make_app(own_pg.dsn, unique(request), workers=4, max_size=10)
        with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
            assert client.get("/pid").status_code == 200
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (
            "tether: Connection budget of 'pool' does not fit: 4 workers x 10 connections + 3 "
            "reserved = 43, but the server allows max_connections=20. Lower the pool size or "
            "the number of workers (-w/--workers, or WEB_CONCURRENCY), put PgBouncer in front, "
            "or raise max_connections."
        ) in warnings

    def test_budget_error_fails_startup_and_closes_the_pool(
        self, own_pg: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """budget="error": StartupError, and the pool opened to read max_connections is closed."""
        name = unique(request)
        app, _, _ = make_app(own_pg.dsn, name, workers=4, max_size=10, budget="error")
        with pytest.raises(tether.StartupError, match="does not fit") as info, TestClient(app):
            pass
        assert info.value.resource == "pool"
        assert own_pg.activity_after_close(name) == []

    def test_budget_error_is_not_retried(
        self, own_pg: Postgres, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
    ) -> None:
        """A budget that does not fit is the configuration's: `retries=` are not spent on it
        (each failed boot paid the backoff, 5 s for 3 retries), nor advised."""
        app, _, _ = make_app(
            own_pg.dsn, unique(request), workers=4, max_size=10, budget="error", retries=3
        )
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="tether"):
            with pytest.raises(tether.StartupError) as info, TestClient(app):
                pass
        assert time.monotonic() - started < 2
        assert "retrying in" not in caplog.text
        assert str(info.value).endswith(
            "Fix the cause above: a mistake in the configuration or the code, which no retry mends."
        )

    def test_no_slot_left_on_the_server_says_so(
        self, own_pg: Postgres, request: pytest.FixtureRequest
    ) -> None:
        """Every connection slot taken (a reload's old workers, another app): the error
        points at max_connections and the pools' sizes, not at the server's address."""
        held = hold_every_slot(own_pg.dsn)
        try:
            app, _, _ = make_app(own_pg.dsn, unique(request), min_size=1, max_size=1)
            with pytest.raises(tether.StartupError) as info, TestClient(app):
                pass
        finally:
            for conn in held:
                conn.close()
        assert "sorry, too many clients already" in str(info.value)
        assert ("The server has no connection slot left (SQLSTATE 53300, max_connections)") in str(
            info.value
        )

    def test_budget_that_fits_says_nothing(
        self, own_pg: Postgres, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
    ) -> None:
        """2 workers x 5 + 3 <= 20: no warning."""
        app, _, _ = make_app(own_pg.dsn, unique(request), workers=2, max_size=5)
        with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app):
            pass
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def hold_every_slot(dsn: str) -> list[Any]:
    """Connections (psycopg's: sync, outside the app's loop) taking every slot the role may
    have, until the server refuses one."""
    import psycopg

    held: list[Any] = []
    while len(held) < 200:
        try:
            held.append(psycopg.connect(dsn))
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) and "reserved" not in str(exc):
                raise
            return held
    raise AssertionError("the server took 200 connections")
