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
from tests.serving import Server, free_port
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


class TestUnavailable:
    def test_unreachable_upstream_is_a_503_and_still_an_httpx_error(self) -> None:
        """Nothing listens upstream: 503 naming the client; `except httpx.ConnectError` works."""
        app, _, _ = make_app(base_url=f"http://user:pw-123@127.0.0.1:{free_port()}")
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
        app, _, _ = make_app(
            base_url=upstream.base_url,
            limits=httpx.Limits(max_connections=1),
            timeout=httpx.Timeout(5.0, pool=0.3),
        )
        with TestClient(app) as client, ThreadPoolExecutor(1) as executor:
            slow = executor.submit(client.get, "/slow?seconds=1.5")
            time.sleep(0.5)  # the slow request is in flight upstream
            t0 = time.monotonic()
            response = client.get("/echo/x")
            assert 0.25 < time.monotonic() - t0 < 1.2
            assert response.status_code == 503
            detail = response.json()["detail"]
            assert detail.startswith("Pool 'http' (size 1, in use 1, waiting 1)"), detail
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
