"""tether.integrations.httpx against a real uvicorn upstream (tests/serving.py)."""

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.serving import Server, dead_port
from tests.unit._messages import exactly
from tests.wakeups import cancelled_at_turn, cancelled_at_wake_up
from tether.integrations import httpx as thttpx


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("tests.integration.app_upstream:app", tmp_path_factory.mktemp("upstream"))
    yield server
    server.stop()


def make_app(**kw: Any) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[httpx.AsyncClient]]:
    lc = tether.Lifecycle()
    http = thttpx.client(lc, **kw)
    H = Annotated[httpx.AsyncClient, Depends(http)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/echo/{word}")
    async def echo(word: str, c: H) -> Any:
        return (await c.get(f"/echo/{word}")).json()

    @app.get("/slow")
    async def slow(c: H, seconds: float = 1.0) -> Any:
        return (await c.get("/slow", params={"seconds": seconds})).json()

    @app.get("/caught")
    async def caught(c: H) -> dict[str, str]:
        try:
            await c.get("/echo/x")
        except httpx.ConnectError as exc:  # httpx's own type still catches it
            return {"caught": type(exc).__name__}
        return {"caught": "nothing"}

    return app, lc, http


class TestClientLifecycle:
    def test_get_through_the_app_client_and_closed_at_shutdown(self, upstream: Server) -> None:
        """Requests share one open client; its health check GETs the upstream; closed after."""
        app, lc, http = make_app(base_url=upstream.base_url, health_url="/health")
        with TestClient(app) as client:
            shared = lc.get(http)
            assert not shared.is_closed
            for word in ("a", "b", "c"):
                assert client.get(f"/echo/{word}").json() == {"echo": word}
            report = client.portal.call(lc.health)
            assert report["http"].ok
            assert lc.get(http) is shared  # one client for the app
        assert shared.is_closed

    def test_health_url_failing_fails_the_check(self, upstream: Server) -> None:
        """A health URL answering 404 makes the check fail."""
        app, lc, _ = make_app(base_url=upstream.base_url, health_url="/nope")
        with TestClient(app) as client:
            report = client.portal.call(lc.health)
            assert not report["http"].ok
            assert "404" in (report["http"].error or "")

    def test_a_health_url_that_does_not_answer_in_time_is_named_with_the_bound(
        self, upstream: Server
    ) -> None:
        """The check's report said only "ReadTimeout" (httpx's message is empty)."""
        app, lc, _ = make_app(base_url=upstream.base_url, health_url="/slow?seconds=3", timeout=0.5)
        with TestClient(app) as client:
            report = client.portal.call(lc.health)
        assert report["http"].error == (
            f"ReadTimeout: GET {upstream.base_url}/slow?seconds=3 got no answer within the "
            f"client's read timeout (0.5 s)"
        )


class TestUnavailable:
    def test_unreachable_upstream_is_a_503_and_still_an_httpx_error(self) -> None:
        """Nothing listens upstream: 503 naming the client; `except httpx.ConnectError` works."""
        with dead_port() as dead:  # nothing listens there, and nothing can meanwhile
            app, _, _ = make_app(base_url=f"http://user:pw-123@127.0.0.1:{dead}")
            with TestClient(app) as client:
                response = client.get("/echo/x")
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                detail = response.json()["detail"]
                assert detail.startswith("Pool 'http' (size 100, in use 0"), detail
                assert "cannot reach http://user:***@127.0.0.1:" in detail
                assert "pw-123" not in detail
                assert client.get("/caught").json() == {"caught": "ConnectUnavailable"}

    def test_pool_timeout_is_a_503(self, upstream: Server) -> None:
        """max_connections=1 held by a slow request: the next waits the pool timeout, 503."""
        app, lc, _ = make_app(
            base_url=upstream.base_url,
            limits=httpx.Limits(max_connections=1),
            timeout=httpx.Timeout(5.0, pool=0.3),
        )
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            slow = executor.submit(client.get, "/slow?seconds=3")
            # The slow request holds the one connection (a fixed sleep may end before it
            # does on a loaded machine: the next request would take the connection).
            deadline = time.monotonic() + 5
            while lc.stats().pools["http"].in_use != 1:
                assert time.monotonic() < deadline, lc.stats().pools["http"]
                time.sleep(0.01)
            t0 = time.monotonic()
            response = client.get("/echo/x")
            assert 0.25 < time.monotonic() - t0 < 2.5  # the timeout, not the 3 s hold
            assert response.status_code == 503
            detail = response.json()["detail"]
            assert detail.startswith("Pool 'http' (size 1, in use 1, waiting 0)"), detail
            assert slow.result().status_code == 200
            assert client.get("/echo/y").json() == {"echo": "y"}


def test_nothing_is_made_at_registration(tmp_path: Path) -> None:
    """Registering the client makes no client: it exists only while the app runs."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url="http://127.0.0.1:9")
    with pytest.raises(tether.ScopeError):
        lc.get(http)


@pytest.mark.anyio
async def test_a_request_cancelled_at_each_wake_up_leaves_the_pool_whole(
    upstream: Server,
) -> None:
    """A request to the upstream cancelled at each of its wake-ups (``tests/wakeups.py``):
    the cancellation is not swallowed, and the pool of two still serves two requests at once
    after each (a connection left checked out would make one wait for the pool timeout)."""
    lc = tether.Lifecycle()
    http = thttpx.client(
        lc,
        base_url=upstream.base_url,
        limits=httpx.Limits(max_connections=2),
        timeout=httpx.Timeout(5.0, pool=1.0),
    )
    async with lc.run():
        c = lc.get(http)
        _, wake_ups = await cancelled_at_wake_up(None, c.get("/echo/x"))
        fired_any = False
        for k in range(1, 3 * wake_ups + 6):
            fired, _ = await cancelled_at_wake_up(k, c.get("/echo/x"), keeps_message=True)
            fired_any |= fired
            with anyio.fail_after(5):
                both = await asyncio.gather(
                    c.get("/slow", params={"seconds": 0.05}),
                    c.get("/slow", params={"seconds": 0.05}),
                )
            assert [r.status_code for r in both] == [200, 200], f"wake-up {k}"
            if not fired:
                break
        assert fired_any

        # At each turn of the loop, whatever the request is doing then, both ways.
        for how in ("task.cancel", "cancel scope"):
            fired_count = 0
            for k in range(1, 2000):
                if not await cancelled_at_turn(k, c.get("/echo/x"), how=how):
                    break
                fired_count += 1
                with anyio.fail_after(5):
                    both = await asyncio.gather(
                        c.get("/slow", params={"seconds": 0.05}),
                        c.get("/slow", params={"seconds": 0.05}),
                    )
                assert [r.status_code for r in both] == [200, 200], f"{how} at turn {k}"
            assert 2 <= fired_count < 1999, (how, fired_count)


class _Proxy:
    """A tiny forward HTTP proxy on 127.0.0.1 that answers every request itself, after
    *seconds*, with the request line it received (what a proxy between the app and the
    upstream would see)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.seen: list[str] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> "_Proxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                self.seen.append(line.decode().strip())
                await asyncio.sleep(self.seconds)
                body = b'{"via": "proxy"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


UNRESOLVABLE = "http://upstream.example.invalid"  # only a proxy can reach it


class TestProxies:
    @pytest.mark.anyio
    async def test_the_environment_proxy_is_used(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """HTTP_PROXY (read by httpx when trust_env) routes the client's requests through
        the proxy, as for a plain httpx.AsyncClient; NO_PROXY hosts go straight there."""
        async with _Proxy() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "direct.example.invalid")
            lc = tether.Lifecycle()
            http = thttpx.client(lc)
            async with lc.run():
                c = lc.get(http)
                response = await c.get(f"{UNRESOLVABLE}/ping")
                assert response.json() == {"via": "proxy"}
                assert proxy.seen == [f"GET {UNRESOLVABLE}/ping HTTP/1.1"]
                with pytest.raises(thttpx.ConnectUnavailable):
                    await c.get("http://direct.example.invalid/ping")
                assert len(proxy.seen) == 1

    @pytest.mark.anyio
    async def test_an_explicit_proxy_gets_the_limits_and_the_503s(self) -> None:
        """proxy=: its route has the client's limits (a pool of 1: the second request waits
        the pool timeout, then 503, counted as a timeout), and a proxy that cannot be
        reached is a 503 naming it."""
        async with _Proxy(seconds=0.6) as proxy:
            lc = tether.Lifecycle()
            http = thttpx.client(
                lc,
                proxy=proxy.url,
                limits=httpx.Limits(max_connections=1),
                timeout=httpx.Timeout(5.0, pool=0.2),
            )
            async with lc.run():
                c = lc.get(http)
                first = asyncio.create_task(c.get(f"{UNRESOLVABLE}/a"))
                while not proxy.seen:
                    await asyncio.sleep(0.01)
                with pytest.raises(
                    thttpx.PoolUnavailable,
                    match=exactly(
                        "Pool 'http' (size 1, in use 1, waiting 0) could not give a connection: "
                        "no connection came free within the pool timeout (max_connections "
                        "reached). Retry shortly; if it persists, check the server it calls and "
                        "the pool size."
                    ),
                ) as info:
                    await c.get(f"{UNRESOLVABLE}/b")
                assert info.value.timed_out
                assert lc.stats().resources["http"].timeouts == 1
                assert (await first).json() == {"via": "proxy"}

        with dead_port() as port:  # nothing listens there, and nothing can meanwhile
            lc = tether.Lifecycle()
            http = thttpx.client(lc, proxy=f"http://user:pw-123@127.0.0.1:{port}")
            async with lc.run():
                with pytest.raises(
                    thttpx.ConnectUnavailable,
                    match=exactly(
                        f"Pool 'http' (size 100, in use 0, waiting 0) could not give a "
                        f"connection: cannot reach {UNRESOLVABLE}/ through the proxy "
                        f"http://127.0.0.1:{port}: ConnectError: All connection attempts "
                        f"failed. Retry shortly; if it persists, check that the server it "
                        f"calls runs and is reachable."
                    ),
                ):
                    await lc.get(http).get(f"{UNRESOLVABLE}/ping")
                assert lc.stats().resources["http"].timeouts == 0


class TestPoolFigures:
    @pytest.mark.anyio
    async def test_a_streamed_response_holds_its_connection(self, upstream: Server) -> None:
        """A response being streamed holds the one connection: the request that waited for
        it and timed out reports it in use, and itself waiting; counted as a timeout."""
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            base_url=upstream.base_url,
            limits=httpx.Limits(max_connections=1),
            timeout=httpx.Timeout(5.0, pool=0.3),
        )
        async with lc.run():
            c = lc.get(http)
            async with c.stream("GET", "/echo/held") as held:  # its body not read yet
                with pytest.raises(thttpx.PoolUnavailable, match=exactly(POOL_1)) as info:
                    await c.get("/echo/x")
                assert info.value.timed_out
                await held.aread()
            assert lc.stats().resources["http"].timeouts == 1
            assert (await c.get("/echo/y")).json() == {"echo": "y"}

    @pytest.mark.anyio
    async def test_the_figures_of_a_transport_given(self, upstream: Server) -> None:
        """transport= with a pool of 1: the message gives that pool's size, not tether's
        limits; a transport without an httpx pool gives no figures."""
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            base_url=upstream.base_url,
            transport=httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1)),
            timeout=httpx.Timeout(5.0, pool=0.3),
        )
        async with lc.run():
            c = lc.get(http)
            first = asyncio.create_task(c.get("/slow", params={"seconds": 1.0}))
            await asyncio.sleep(0.3)
            with pytest.raises(thttpx.PoolUnavailable, match=exactly(POOL_1)):
                await c.get("/echo/x")
            assert lc.stats().resources["http"].timeouts == 1
            assert (await first).status_code == 200

        class Refusing(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                raise httpx.ConnectError("refused", request=request)

        lc = tether.Lifecycle()
        http = thttpx.client(lc, base_url="http://127.0.0.1:9", transport=Refusing())
        async with lc.run():
            with pytest.raises(
                thttpx.ConnectUnavailable,
                match=exactly(
                    "Pool 'http' could not give a connection: cannot reach "
                    "http://127.0.0.1:9/: ConnectError: refused. Retry shortly; if it "
                    "persists, check that the server it calls runs and is reachable."
                ),
            ):
                await lc.get(http).get("/x")

    @pytest.mark.anyio
    async def test_a_pool_busy_with_traffic_is_ready_and_one_stuck_is_not(
        self, upstream: Server
    ) -> None:
        """Every connection held by responses being read: `lc.stats()` shows the pool full,
        and readiness answers at once from those figures (the check's GET would queue
        behind the traffic and fail while the server answers everyone): ready while
        requests get their connections within the pool timeout, however long ago the last
        response came; not ready once a request's wait timed out and none got a response
        since, for longer than the pool timeout."""
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            base_url=upstream.base_url,
            limits=httpx.Limits(max_connections=2),
            timeout=httpx.Timeout(5.0, pool=1.0),
            health_url="/echo/ok",
        )
        async with lc.run():
            c = lc.get(http)
            assert (await lc.health()).ok
            async with c.stream("GET", "/echo/a") as a, c.stream("GET", "/echo/b") as b:
                figures = lc.stats().pools["http"]
                assert (figures.max, figures.open, figures.in_use, figures.idle) == (2, 2, 2, 0)
                t0 = time.monotonic()
                report = await lc.health()
                assert time.monotonic() - t0 < 0.9  # a queued GET would wait the pool timeout
                check = report["http"]
                assert report.ok, report
                assert check.detail is not None
                assert check.detail.startswith(
                    "busy: all 2 connections in use; the last response came"
                )
                await asyncio.sleep(1.1)  # no response for longer than the pool timeout
                first = asyncio.create_task(c.get("/echo/x"))
                for _ in range(50):
                    if lc.stats().pools["http"].waiting == 1:
                        break
                    await asyncio.sleep(0.01)
                assert lc.stats().pools["http"].waiting == 1
                report = await lc.health()  # it waits less than the pool timeout: ready
                assert report.ok, report
                assert report["http"].detail is not None
                assert report["http"].detail.startswith(
                    "busy: all 2 connections in use, 1 waiting; the last response came"
                )
                with pytest.raises(thttpx.PoolUnavailable):
                    await first  # its wait timed out: the next one's fails too
                waiting = asyncio.create_task(c.get("/echo/c"))
                for _ in range(50):
                    if lc.stats().pools["http"].waiting == 1:
                        break
                    await asyncio.sleep(0.01)
                assert lc.stats().pools["http"].waiting == 1
                report = await lc.health()
                assert not report.ok
                assert report["http"].error is not None
                assert report["http"].error.startswith(
                    "saturated: all 2 connections in use, 1 waiting, and no response came for"
                )
                await a.aread()
                await b.aread()
            assert (await waiting).json() == {"echo": "c"}  # served once they were read
            assert (await lc.health()).ok


POOL_1 = (
    "Pool 'http' (size 1, in use 1, waiting 0) could not give a connection: no connection "
    "came free within the pool timeout (max_connections reached). Retry shortly; if it "
    "persists, check the server it calls and the pool size."
)
