"""tether.integrations.redis against a real Redis: ground truth from CLIENT LIST."""

import importlib.util
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import pytest
import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.integration.drivers import health_at_once
from tests.servers import Redis, dead_port
from tests.unit._messages import exactly
from tether.integrations import redis as tredis

pytestmark = pytest.mark.servers

_REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:2])


def unique(request: pytest.FixtureRequest) -> str:
    return f"tt-{request.node.name[:30]}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def own_redis() -> Iterator[Redis]:
    """A Redis of this test only (the test stops it)."""
    with Redis() as server:
        yield server


def make_app(url: str, **kw: object) -> tuple[FastAPI, tether.Lifecycle]:
    lc = tether.Lifecycle()
    cache = tredis.client(lc, url, **kw)  # type: ignore[arg-type]
    R = Annotated[aioredis.Redis, Depends(cache)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/incr/{key}")
    async def incr(key: str, r: R) -> dict[str, int]:
        return {"value": await r.incr(key)}

    @app.get("/block/{key}")
    async def block(key: str, r: R, seconds: float = 1.0) -> dict[str, str]:
        await r.blpop([key], timeout=seconds)  # holds one connection that long
        return {"status": "unblocked"}

    @app.post("/slow/{key}")
    async def slow(key: str, r: R, seconds: float = 0.8) -> int:
        """Increments *key*, then keeps the server busy for *seconds*."""
        return int(await r.eval(SLOW_SCRIPT, 1, key, int(seconds * 1_000_000)))  # type: ignore[misc]

    return app, lc


SLOW_SCRIPT = (
    "redis.call('INCR', KEYS[1]) local t0 = redis.call('TIME') "
    "repeat local t = redis.call('TIME') "
    "until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1]) "
    "return 1"
)


class TestClientLifecycle:
    def test_opens_pings_and_closes(
        self, redis_server: Redis, request: pytest.FixtureRequest
    ) -> None:
        """The client is in CLIENT LIST while the app runs, and gone after shutdown."""
        name = unique(request)
        app, lc = make_app(redis_server.url, client_name=name)
        assert redis_server.client_list(name) == []  # nothing at import or registration
        with TestClient(app) as client:
            # The startup PING left one connection open, named after the test.
            assert len(redis_server.client_list(name)) == 1
            report = client.portal.call(lc.health)
            assert report["redis"].ok
            assert client.post(f"/incr/{name}").json() == {"value": 1}
            assert client.post(f"/incr/{name}").json() == {"value": 2}
            assert len(redis_server.client_list(name)) == 1  # the same connection, reused
        assert redis_server.client_list(name) == []

    def test_check_fails_and_requests_get_503_when_the_server_stops(
        self, own_redis: Redis, request: pytest.FixtureRequest
    ) -> None:
        """Server stopped: the PING check fails, and a command is a 503 with Retry-After."""
        name = unique(request)
        app, lc = make_app(own_redis.url, client_name=name)
        with TestClient(app) as client:
            assert client.portal.call(lc.health)["redis"].ok
            own_redis.stop()
            report = client.portal.call(lc.health)
            assert not report["redis"].ok
            assert "Connection" in (report["redis"].error or "")
            t0 = time.monotonic()
            response = client.post(f"/incr/{name}")
            assert time.monotonic() - t0 < 2
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["detail"].startswith("Pool 'redis'")
            assert "cannot reach redis://127.0.0.1:" in response.json()["detail"]

    def test_a_command_in_flight_when_the_server_stops_is_a_503(
        self, own_redis: Redis, request: pytest.FixtureRequest
    ) -> None:
        """A BLPOP waiting when the server stops: redis-py reconnects inside the command (its
        retry), which fails; the request is a 503 with Retry-After, not a 500, and the
        next one too."""
        name = unique(request)
        app, _ = make_app(own_redis.url, client_name=name, max_connections=5)
        port = own_redis.port
        detail = (
            f"Pool 'redis' (size 5, in use 0) could not give a connection: cannot reach "
            f"redis://127.0.0.1:{port}/0: ConnectionError: Error 111 connecting to "
            f"127.0.0.1:{port}. Connect call failed ('127.0.0.1', {port}). Retry shortly; "
            f"if it persists, check that the Redis server runs and is reachable."
        )
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            blocked = executor.submit(client.get, f"/block/{name}-list?seconds=3")
            deadline = time.monotonic() + 5
            while not any(c["cmd"] == "blpop" for c in own_redis.client_list(name)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            own_redis.stop()
            response = blocked.result()
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["detail"] == detail
            response = client.post(f"/incr/{name}")
            assert response.status_code == 503
            assert response.json()["detail"] == detail

    def test_a_pooled_connection_the_server_closed_costs_no_failed_command(
        self, own_redis: Redis, request: pytest.FixtureRequest
    ) -> None:
        """The server closes the idle pooled connection (CLIENT KILL, as a restart or an
        idle timeout does): the next command reconnects and succeeds."""
        name = unique(request)
        app, _ = make_app(own_redis.url, client_name=name, max_connections=2)
        with TestClient(app) as client:
            assert client.post(f"/incr/{name}").json() == {"value": 1}
            own_redis.command("CLIENT", "KILL", "TYPE", "normal")
            deadline = time.monotonic() + 5
            while own_redis.client_list(name):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            response = client.post(f"/incr/{name}")
            assert (response.status_code, response.json()) == (200, {"value": 2})

    def test_a_command_whose_reply_is_late_is_not_sent_again(
        self, own_redis: Redis, request: pytest.FixtureRequest
    ) -> None:
        """A script that increments a key and then runs past `socket_timeout`: the request
        fails (its outcome is not known: a 500), and the script ran once. redis-py 6+
        retries a timed-out command by default, which ran it twice (the key at 2)."""
        name = unique(request)
        app, _ = make_app(own_redis.url, client_name=name, socket_timeout=0.5)
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.post(f"/slow/{name}", params={"seconds": 0.8})
            assert response.status_code == 500
            time.sleep(1.5)  # a second run, had there been one, has ended by now
            assert own_redis.command("GET", name) in ("1", b"1")

    @pytest.mark.parametrize("password", ["hunter2-pw", "hunter@2-pw"])
    def test_unreachable_at_startup_is_a_startup_error_without_the_password(
        self, password: str
    ) -> None:
        """Nothing listens there: StartupError naming the client, its password hidden (all
        of it, one with an unencoded ``@`` too, which redis-py reads whole)."""
        with dead_port() as port:  # nothing listens there, and nothing can meanwhile
            url = f"redis://:{password}@127.0.0.1:{port}/0"
            app, _ = make_app(url)
            with pytest.raises(tether.StartupError) as info, TestClient(app):
                pass
        assert info.value.resource == "redis"
        assert f"cannot reach redis://:***@127.0.0.1:{port}/0: " in str(info.value)
        chain: BaseException | None = info.value
        while chain is not None:
            assert "hunter" not in str(chain)
            assert "2-pw" not in str(chain)
            chain = chain.__cause__ or chain.__context__
        cause = info.value.__cause__
        assert isinstance(cause, redis.ConnectionError)  # still redis-py's error type
        assert isinstance(cause, tether.ResourceUnavailable)


class TestPool:
    def test_no_connection_free_in_time_is_a_503(
        self, redis_server: Redis, request: pytest.FixtureRequest
    ) -> None:
        """max_connections=1 held by BLPOP: the next command waits pool_timeout, then 503."""
        name = unique(request)
        app, lc = make_app(redis_server.url, client_name=name, max_connections=1, pool_timeout=0.3)
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            blocked = executor.submit(client.get, f"/block/{name}-list?seconds=3")
            deadline = time.monotonic() + 5
            while not any(c["cmd"] == "blpop" for c in redis_server.client_list(name)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            t0 = time.monotonic()
            response = client.post(f"/incr/{name}")
            assert 0.25 < time.monotonic() - t0 < 2.5  # the timeout, not the 3 s BLPOP
            assert response.status_code == 503
            detail = response.json()["detail"]
            assert detail.startswith("Pool 'redis' (size 1, in use 1)"), detail
            assert "no connection came free" in detail
            # Counted: the resource's timeouts (db.client.connection.timeouts).
            assert lc.stats().resources["redis"].timeouts == 1
            assert blocked.result().status_code == 200
            assert client.post(f"/incr/{name}").status_code == 200
            assert len(redis_server.client_list(name)) == 1  # never more than max_connections


class TestCancellation:
    @pytest.mark.anyio
    async def test_a_cancelled_command_never_answers_the_next_one(
        self, redis_server: Redis, request: pytest.FixtureRequest
    ) -> None:
        """A command cancelled after it was sent, before its reply (a client that went away
        during BLPOP): its reply, arriving later, is never read as the answer to the next
        command on the same pooled connection (CVE-2023-28858). With one connection in
        the pool, 20 rounds: every GET answers its own key."""
        import asyncio

        name = unique(request)
        lc = tether.Lifecycle()
        cache = tredis.client(lc, redis_server.url, client_name=name, max_connections=1)
        admin = redis.Redis.from_url(redis_server.url)
        async with lc.run():
            r = lc.get(cache)
            for i in range(20):
                await r.set(f"{name}-own-{i}", f"own-{i}")
                waits_on = f"{name}-list-{i}"
                blocked = asyncio.ensure_future(r.blpop([waits_on], timeout=2))
                deadline = time.monotonic() + 5
                while not any(c["cmd"] == "blpop" for c in redis_server.client_list(name)):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                blocked.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await blocked
                # The reply the cancelled BLPOP would get, if its connection were reused.
                admin.rpush(waits_on, f"stale-{i}")
                assert await r.get(f"{name}-own-{i}") == f"own-{i}".encode()
                assert len(redis_server.client_list(name)) <= 1
                admin.delete(waits_on)
                # The next round must find its own BLPOP, not this one's closing connection.
                while any(c["cmd"] == "blpop" for c in redis_server.client_list(name)):
                    assert time.monotonic() < deadline + 5
                    await asyncio.sleep(0.01)
        admin.close()


@pytest.mark.anyio
async def test_pool_figures_follow_the_connections(redis_server: Redis) -> None:
    """Two BLPOPs hold both connections of a pool of 2 and a third command waits: the pool's
    figures say so, and match the server's CLIENT LIST; afterwards both are idle."""
    import asyncio

    name = f"tt-figures-{uuid.uuid4().hex[:6]}"
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, max_connections=2, pool_timeout=5,
                          client_name=name)  # fmt: skip
    async with lc.run():
        r = lc.get(cache)
        first = lc.stats().pools["redis"]
        assert (first.max, first.open, first.in_use, first.idle) == (2, 1, 0, 1)  # the PING's
        key = f"k-{name}"
        blocked = [asyncio.create_task(r.blpop([key], timeout=1)) for _ in range(2)]
        third = asyncio.create_task(r.incr(f"n-{name}"))
        for _ in range(200):
            if lc.stats().pools["redis"].waiting == 1:
                break
            await asyncio.sleep(0.01)
        full = lc.stats().pools["redis"]
        assert full == tether.PoolStats(name="redis", max=2, open=2, in_use=2, idle=0, waiting=1)
        assert len(redis_server.client_list(name)) == 2
        await asyncio.gather(*blocked)
        assert await third == 1
        done = lc.stats().pools["redis"]
        assert (done.open, done.in_use, done.idle, done.waiting) == (2, 0, 2, 0)


@pytest.mark.anyio
async def test_readiness_reads_a_full_pool_instead_of_queueing_behind_it(
    redis_server: Redis,
) -> None:
    """Two BLPOPs hold both connections of a pool of 2. The check's PING would wait for one
    (up to ``pool_timeout``); instead readiness answers at once: busy while nobody waits, and
    saturated once commands wait and none has been handed out for longer than
    ``pool_timeout``."""
    import asyncio
    import re

    lc = tether.Lifecycle(check_timeout=3.0)
    cache = tredis.client(lc, redis_server.url, max_connections=2, pool_timeout=1.0)
    async with lc.run():
        r = lc.get(cache)
        key = f"k-ready-{uuid.uuid4().hex[:6]}"
        blocked = [asyncio.create_task(r.blpop([key], timeout=4)) for _ in range(2)]
        for _ in range(200):  # both taken, and connected (a task connecting one still waits)
            figures = lc.stats().pools["redis"]
            if (figures.in_use, figures.waiting) == (2, 0):
                break
            await asyncio.sleep(0.01)
        served_at = time.monotonic()

        report = await health_at_once(lc)
        assert report.ok, report.as_dict()
        detail = report["redis"].detail or ""
        assert re.fullmatch(
            r"busy: all 2 connections in use; one was handed out \d+\.\d s ago" + ASIDE, detail
        ), detail

        asking = True

        async def ask(delay: float) -> None:  # waits for a connection, times out, asks again
            await asyncio.sleep(delay)
            while asking:
                with pytest.raises(tredis.RedisUnavailable):
                    await r.get(key)

        waiters = [asyncio.create_task(ask(delay)) for delay in (0.0, 0.25)]
        await asyncio.sleep(max(0.0, served_at + 1.3 - time.monotonic()))
        report = await health_at_once(lc)
        assert not report.ok
        error = report["redis"].error or ""
        assert re.fullmatch(
            r"saturated: all 2 connections in use, \d waiting, and none handed out for "
            r"\d+\.\d s \(longer than pool_timeout=1 s\): the commands holding them are "
            r"stuck, or the Redis server stopped answering",
            error,
        ), error

        asking = False
        await asyncio.gather(*waiters)
        for task in blocked:
            task.cancel()
        await asyncio.gather(*blocked, return_exceptions=True)
        report = await lc.health()  # the pool has room again: PING runs, and passes
        assert report.ok, report.as_dict()
        assert report["redis"].detail is None


#: What a busy pool's readiness adds when nothing was handed out for longer than the check's
#: timeout (a slow machine may take that long to fill the pool).
ASIDE = r"(; the server answers a connection outside the pool)?"


@pytest.mark.anyio
async def test_a_frozen_server_fails_readiness_though_its_pool_reads_busy() -> None:
    """A Redis that stops answering (``SIGSTOP``, as a network partition that drops packets)
    fills the pool with commands waiting on it. Readiness read it as busy, so ready, until a
    wait for a connection timed out (``pool_timeout``, here 30 s; trial 14 saw 8.8 s more of
    200s): a busy pool that has handed nothing out for longer than the check's timeout is
    checked on a connection of its own, outside the pool, and fails when that gets no
    answer. A busy pool of a server that answers stays ready, said so."""
    import asyncio
    import os
    import re
    import signal

    with Redis() as srv:
        lc = tether.Lifecycle(check_timeout=0.5)
        cache = tredis.client(lc, srv.url, max_connections=4, pool_timeout=30.0)
        async with lc.run():
            r = lc.get(cache)
            key = f"k-{uuid.uuid4().hex[:6]}"
            blocked = [asyncio.create_task(r.blpop([key], timeout=3)) for _ in range(4)]
            while lc.stats().pools["redis"].in_use < 4:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.7)  # nothing handed out for longer than check_timeout
            report = await lc.health()
            assert report.ok, report.as_dict()
            assert re.fullmatch(
                r"busy: all 4 connections in use; one was handed out \d+\.\d s ago; the "
                r"server answers a connection outside the pool",
                report["redis"].detail or "",
            ), report.as_dict()
            await asyncio.gather(*blocked)

            os.kill(srv.pid, signal.SIGSTOP)
            try:
                hung = [asyncio.create_task(r.get(key)) for _ in range(6)]
                started = time.monotonic()
                while True:
                    figures = lc.stats().pools["redis"]
                    if (figures.in_use, figures.waiting) == (4, 2):
                        break
                    await asyncio.sleep(0.02)
                while (report := await lc.health()).ok:
                    assert time.monotonic() - started < 10, report.as_dict()  # 30 s before
                    await asyncio.sleep(0.1)
                assert re.fullmatch(
                    r"the server stopped answering: a connection of the check's own, outside "
                    r"the pool, got no answer within 0\.5 s \(all 4 connections in use, 2 "
                    r"waiting; one was handed out \d+\.\d s ago\)",
                    report["redis"].error or "",
                ), report.as_dict()
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            await asyncio.gather(*hung)  # answered once the server runs again
            report = await lc.health()
            assert report.ok, report.as_dict()


@pytest.mark.anyio
async def test_figures_count_connected_connections_only(redis_server: Redis) -> None:
    """Five BLPOPs cancelled (clients that went away): redis-py drops their connections,
    and the pool's figures say none is open or idle, as CLIENT LIST does."""
    import asyncio

    name = f"tt-connected-{uuid.uuid4().hex[:6]}"
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, max_connections=10, client_name=name)
    async with lc.run():
        r = lc.get(cache)
        key = f"k-{name}"
        blocked = [asyncio.create_task(r.blpop([key], timeout=5)) for _ in range(5)]
        deadline = time.monotonic() + 5
        while len(redis_server.client_list(name)) < 5 or lc.stats().pools["redis"].in_use < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        for task in blocked:
            task.cancel()
        await asyncio.gather(*blocked, return_exceptions=True)
        while redis_server.client_list(name):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        figures = lc.stats().pools["redis"]
        assert (figures.open, figures.in_use, figures.idle) == (0, 0, 0)
        assert await r.incr(f"n-{name}") == 1  # a connection made again on use
        figures = lc.stats().pools["redis"]
        assert (figures.open, figures.in_use, figures.idle) == (1, 0, 1)
        assert len(redis_server.client_list(name)) == 1


@pytest.mark.anyio
async def test_the_default_pool_is_read_when_full_and_refuses_at_once(
    redis_server: Redis,
) -> None:
    """Without max_connections, redis-py 8 caps its pool at 100 and refuses a command at
    once when all are in use: readiness reads the full pool (busy, ready) instead of a PING
    refused at once, and the refusal says what happened, without counting a timeout.
    (redis-py 5's pool has no cap: no figures, and readiness PINGs.)"""
    import asyncio
    import re

    name = f"tt-default-{uuid.uuid4().hex[:6]}"
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, client_name=name)
    async with lc.run():
        r = lc.get(cache)
        if r.connection_pool.max_connections >= 2**31:  # redis-py 5: no cap
            assert lc.stats().pools["redis"].max is None
            report = await health_at_once(lc)
            assert report.ok
            assert report["redis"].detail is None
            return
        assert lc.stats().pools["redis"].max == 100
        key = f"k-{name}"
        blocked = [asyncio.create_task(r.blpop([key], timeout=4)) for _ in range(100)]
        deadline = time.monotonic() + 10
        while len(redis_server.client_list(name)) < 100 or lc.stats().pools["redis"].waiting:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        report = await health_at_once(lc)
        assert report.ok, report.as_dict()
        detail = report["redis"].detail or ""
        assert re.fullmatch(
            r"busy: all 100 connections in use; one was handed out \d+\.\d s ago" + ASIDE,
            detail,
        ), detail
        t0 = time.monotonic()
        with pytest.raises(
            tredis.RedisUnavailable,
            match=exactly(
                "Pool 'redis' (size 100, in use 100) could not give a connection: every "
                "connection is in use (max_connections=100), and this pool does not wait for "
                "one: pass max_connections= to wait up to pool_timeout. Retry shortly; if it "
                "persists, check the Redis server and the pool size."
            ),
        ) as info:
            await r.get(key)
        assert time.monotonic() - t0 < 0.5
        assert not info.value.timed_out
        assert lc.stats().resources["redis"].timeouts == 0
        for task in blocked:
            task.cancel()
        await asyncio.gather(*blocked, return_exceptions=True)


def test_an_idempotent_route_runs_again_when_its_watched_key_changed(
    redis_server: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis's optimistic lock: a key watched before MULTI changed before EXEC, and redis-py
    raises WatchError: the transaction did not run, which is the server asking to run it
    again, as a serialization failure is. An @idempotent route ran into a 500 (trial 15);
    it now runs again."""
    from tether.fastapi import idempotent

    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url)
    app = FastAPI(lifespan=lc.lifespan)
    key = f"k-watch-{uuid.uuid4().hex[:6]}"
    runs: list[int] = []

    @app.post("/reserve")
    @idempotent(retries=2)
    async def reserve(r: Annotated[aioredis.Redis, Depends(cache)]) -> int:
        runs.append(1)
        async with r.pipeline() as pipe:
            await pipe.watch(key)
            seats = int(await pipe.get(key) or 0)
            if len(runs) == 1:  # another client changes it
                async with redis.asyncio.from_url(redis_server.url) as other:
                    await other.incr(key)
            pipe.multi()
            pipe.set(key, seats + 10)
            await pipe.execute()
        return seats + 10

    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        response = client.post("/reserve")
    assert (response.status_code, response.json(), len(runs)) == (200, 11, 2)
    assert any(
        "had its Redis transaction not run: a key it watched changed (WatchError" in m
        for m in caplog.messages
    ), caplog.messages


def test_an_idempotent_route_that_conflicts_every_time_says_it_gave_up(
    redis_server: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The last run failing as the others did ended in a bare 500, with nothing after the
    "running it again" lines (trial 18)."""
    from tether.fastapi import idempotent

    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url)
    app = FastAPI(lifespan=lc.lifespan)
    key = f"k-watch-{uuid.uuid4().hex[:6]}"

    @app.post("/reserve")
    @idempotent(retries=1)
    async def reserve(r: Annotated[aioredis.Redis, Depends(cache)]) -> None:
        async with r.pipeline() as pipe:
            await pipe.watch(key)
            async with redis.asyncio.from_url(redis_server.url) as other:
                await other.incr(key)  # another client, every time
            pipe.multi()
            pipe.set(key, 0)
            await pipe.execute()

    with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
        with pytest.raises(redis.exceptions.WatchError):
            client.post("/reserve")
    said = [m for m in caplog.messages if "POST /reserve" in m]
    assert len(said) == 2, said
    assert said[1].startswith(
        "tether: POST /reserve had its Redis transaction not run: a key it watched changed "
        "(WatchError"
    ), said
    assert said[1].endswith("again, after 1 retry (idempotent): not run again; it fails as it is")


@pytest.mark.anyio
@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})])
async def test_connections_the_network_reset_are_made_again_on_uvloop() -> None:
    """The network resets the pool's connections (an RST): the next commands get their
    replies, redis-py's retry making a connection again. On uvloop, uvicorn's default loop,
    the first command on each reset connection raised `RuntimeError: unable to perform
    operation on <TCPTransport closed=True ...>; the handler is closed`: a 500 (trial 22)."""
    import asyncio

    from tests.faultproxy import FaultProxy

    with Redis() as srv, FaultProxy(int(srv.url.rsplit(":", 1)[1].split("/")[0])) as proxy:
        lc = tether.Lifecycle()
        cache = tredis.client(lc, f"redis://127.0.0.1:{proxy.port}/0", max_connections=2)
        async with lc.run():
            r = lc.get(cache)
            await r.set("k", "v")
            await asyncio.gather(r.get("k"), r.get("k"))  # both connections made
            proxy.cut()
            await asyncio.sleep(0.3)
            assert [await r.get("k") for _ in range(3)] == [b"v"] * 3


@pytest.mark.anyio
async def test_a_pipeline_that_loses_its_connection_while_watching_is_a_503(
    redis_server: Redis,
) -> None:
    """The connection of a pipeline watching keys is killed: the transaction did not run,
    and the route gets the 503 `r.client()` gives for it (`lost`, which `@idempotent` runs
    again), not redis-py's `WatchError` read as a key that changed (a 500, trial 27)."""
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, max_connections=4, client_name="tt-watching")
    key = f"tt-watch-{uuid.uuid4().hex[:6]}"
    admin = aioredis.from_url(redis_server.url)
    try:
        async with lc.run():
            r = lc.get(cache)
            async with r.pipeline() as pipe:
                await pipe.watch(key)
                await admin.client_kill_filter(_type="normal", skipme=True)
                pipe.multi()
                pipe.incr(key)
                with pytest.raises(tredis.RedisUnavailable) as caught:
                    await pipe.execute()
            assert caught.value.lost
            assert str(caught.value).startswith(
                "Redis client 'redis': the connection of a pipeline was lost while watching keys"
            )
            assert await r.get(key) is None  # nothing ran
    finally:
        await admin.aclose()
