"""tether.integrations.httpx, the review's cases: proxy routes measured (readiness and
figures), mounts and proxy= with transport= answered 503, a relay cut short is no leak, a
refused certificate is no 503, a relative health_url needs a base_url. Against real
upstreams: uvicorn (plain and TLS, tests/serving.py), a forward proxy and servers that break
off mid-body on 127.0.0.1."""

import asyncio
import logging
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

import tether
from tests.serving import Server, dead_port
from tests.unit._messages import exactly, misconfigured
from tether.integrations import httpx as thttpx

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("tests.integration.app_upstream:app", tmp_path_factory.mktemp("upstream"))
    yield server
    server.stop()


def app_of(http: tether.Resource[httpx.AsyncClient], lc: tether.Lifecycle, url: str) -> FastAPI:
    """An app whose ``GET /go`` GETs *url* with the client and answers its status."""
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/go")
    async def go(c: Annotated[httpx.AsyncClient, Depends(http)]) -> dict[str, int]:
        return {"status": (await c.get(url)).status_code}

    return app


@asynccontextmanager
async def serving(app: FastAPI, lc: tether.Lifecycle) -> AsyncIterator[httpx.AsyncClient]:
    """*app* started, and a client of it in-process (an uncaught error answered 500)."""
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        yield client


# -- Bug 2: through a proxy, readiness and the figures read the proxy's pool --------------


class _ForwardProxy:
    """A forward HTTP proxy on 127.0.0.1: relays each absolute-form request to its host
    (HTTP/1.1, one request per connection to the upstream) and the answer back."""

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "_ForwardProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await _stop(self._server, self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, rest = head.split(b"\r\n", 1)
            method, target, version = line.split(b" ")
            url = httpx.URL(target.decode())
            self.seen.append(f"{method.decode()} {url}")
            upstream_reader, upstream_writer = await asyncio.open_connection(url.host, url.port)
            upstream_writer.write(b"%s %s %s\r\n%s" % (method, url.raw_path, version, rest))
            await upstream_writer.drain()
            both = (
                self._pipe(reader, upstream_writer),
                self._pipe(upstream_reader, writer),
            )
            await asyncio.gather(*both)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if upstream_writer is not None:
                upstream_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _stop(server: asyncio.Server, handlers: set[asyncio.Task[None]]) -> None:
    """Stop *server*: its connection handlers end (they swallow their cancellation)."""
    server.close()
    pending = [task for task in handlers if not task.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=5)
        for task in late:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await server.wait_closed()


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["proxy=", "HTTP_PROXY"])
async def test_through_a_proxy_readiness_and_figures_read_its_pool(
    upstream: Server, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A pool of two through a proxy (proxy=, or HTTP_PROXY from the environment), both
    connections held by slow requests: `lc.stats().pools` shows them (it read the direct
    route's empty pool), and readiness answers "busy" at once (its GET of health_url
    queued behind the traffic, failed the pool timeout, and counted a timeout)."""
    async with _ForwardProxy() as proxy:
        options: dict[str, Any] = {}
        if how == "proxy=":
            options["proxy"] = proxy.url
        else:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            base_url=upstream.base_url,
            health_url="/health",
            limits=httpx.Limits(max_connections=2),
            timeout=httpx.Timeout(10.0, pool=1.0),
            **options,
        )
        async with lc.run():
            c = lc.get(http)
            assert (await lc.health()).ok
            assert proxy.seen == [f"GET {upstream.base_url}/health"]
            load = [asyncio.create_task(c.get("/slow", params={"seconds": 2.5})) for _ in range(2)]
            await wait_until(lambda: lc.stats().pools["http"].in_use == 2)
            figures = lc.stats().pools["http"]
            assert (figures.max, figures.open, figures.in_use, figures.idle) == (2, 2, 2, 0)
            t0 = time.monotonic()
            report = await lc.health()
            assert time.monotonic() - t0 < 0.9  # a queued GET waits the pool timeout, 1 s
            assert report.ok, report
            assert report["http"].detail is not None
            assert report["http"].detail.startswith(
                "busy: all 2 connections in use; the last response came"
            )
            assert [r.status_code for r in await asyncio.gather(*load)] == [200, 200]
            assert lc.stats().resources["http"].timeouts == 0


async def test_without_base_url_the_figures_add_up_every_route(upstream: Server) -> None:
    """No base_url nor health_url: no one route to read, so the figures are the sum of
    every route's pool: the direct one and the proxy's, `max_connections` each."""
    async with _ForwardProxy() as proxy:
        lc = tether.Lifecycle()
        http = thttpx.client(lc, proxy=proxy.url, limits=httpx.Limits(max_connections=2))
        async with lc.run():
            c = lc.get(http)
            async with c.stream("GET", f"{upstream.base_url}/echo/a"):
                figures = lc.stats().pools["http"]
                assert (figures.max, figures.open, figures.in_use) == (4, 1, 1)
            assert lc.stats().pools["http"].in_use == 0


# -- Bug 4: mounts=, and proxy= with transport=, answer 503 --------------------------------


async def test_a_transport_given_in_mounts_answers_503() -> None:
    """An upstream that cannot be reached through a transport given in mounts=: 503 with
    Retry-After, as on every other route, not 500."""
    with dead_port() as dead:  # nothing listens there, and nothing can meanwhile
        url = f"http://127.0.0.1:{dead}/x"

        lc = tether.Lifecycle()
        http = thttpx.client(lc, mounts={f"http://127.0.0.1:{dead}": httpx.AsyncHTTPTransport()})
        async with serving(app_of(http, lc, url), lc) as client:
            response = await client.get("/go")
            assert (response.status_code, response.headers.get("retry-after")) == (503, "1")
            assert response.json()["detail"] == (
                f"Pool 'http' (size 100, in use 0, waiting 0) could not give a connection: cannot "
                f"reach http://127.0.0.1:{dead}/: ConnectError: All connection attempts failed. "
                f"Retry shortly; if it persists, check that the server it calls runs and is "
                f"reachable."
            )


async def test_a_proxy_with_transport_given_answers_503() -> None:
    """proxy= with transport= (httpx then sends every request through a proxy transport,
    not the one given): a proxy that cannot be reached is a 503 naming it, not 500; the
    proxy's transport has the client's limits."""
    with dead_port() as dead:  # nothing listens there, and nothing can meanwhile
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            proxy=f"http://127.0.0.1:{dead}",
            transport=httpx.AsyncHTTPTransport(),
            limits=httpx.Limits(max_connections=3),
        )
        async with serving(app_of(http, lc, "http://upstream.example.invalid/x"), lc) as client:
            response = await client.get("/go")
            assert (response.status_code, response.headers.get("retry-after")) == (503, "1")
            assert response.json()["detail"] == (
                f"Pool 'http' (size 3, in use 0, waiting 0) could not give a connection: cannot "
                f"reach http://upstream.example.invalid/ through the proxy "
                f"http://127.0.0.1:{dead}: ConnectError: All connection attempts failed. Retry "
                f"shortly; if it persists, check that the server it calls runs and is reachable."
            )


async def test_a_mount_of_none_and_the_environment_with_transport_given(
    upstream: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in httpx: with transport=, the environment's proxies are not used (the request
    goes straight to the upstream), and a mount of None routes to the direct transport."""
    with dead_port() as dead:  # nothing listens there, and nothing can meanwhile
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
        lc = tether.Lifecycle()
        http = thttpx.client(
            lc,
            base_url=upstream.base_url,
            transport=httpx.AsyncHTTPTransport(),
            mounts={"http://upstream.example.invalid": None},
        )
        async with lc.run():
            assert (await lc.get(http).get("/echo/a")).json() == {"echo": "a"}


# -- Bug 3: a relay cut short by the upstream, or cancelled, is no leak -----------------------


class _BreakingUpstream:
    """An HTTP server on 127.0.0.1 answering every request with a chunked body that it
    breaks off (closing the connection) after the first chunk, or never finishes
    (*hang*)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "_BreakingUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for task in self._tasks:
            task.cancel()
        await _stop(self._server, self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n6\r\npart1\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(30 if self.hang else 0.05)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def relay_app(
    base_url: str, dead: int | None = None
) -> tuple[FastAPI, tether.Lifecycle, tether.Resource[httpx.AsyncClient]]:
    """The docs' relay pattern, and a handler that leaves a stream unread and fails (when
    given *dead*, a port of `dead_port()`)."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url=base_url)
    H = Annotated[httpx.AsyncClient, Depends(http)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/relay")
    async def relay(c: H) -> StreamingResponse:
        upstream = await c.send(c.build_request("GET", "/body"), stream=True)
        return StreamingResponse(upstream.aiter_raw(), background=BackgroundTask(upstream.aclose))

    @app.get("/unread")
    async def unread(c: H) -> None:
        await c.send(c.build_request("GET", "/body"), stream=True)  # opened: unread
        assert dead is not None
        await c.get(f"http://127.0.0.1:{dead}/")  # a TransportError, the stream unread

    return app, lc, http


def tether_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tether" and r.levelno == level]


async def test_a_relay_the_upstream_breaks_off_is_no_leak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The docs' relay (`StreamingResponse(upstream.aiter_raw(), background=
    BackgroundTask(upstream.aclose))`) of an upstream that breaks off mid-body: the client
    gets the body cut short; tether closes the response (the background task does not run)
    with an INFO line, no leak warning, not counted in `leaks`. A stream left unread by a
    handler that failed with a TransportError is still a leak."""
    caplog.set_level(logging.INFO, logger="tether")
    with dead_port() as dead:  # for /unread: nothing listens there, nor can meanwhile
        async with _BreakingUpstream() as upstream:
            app, lc, _ = relay_app(upstream.url, dead)
            async with serving(app, lc) as client:
                response = await client.get("/relay")
                assert (response.status_code, response.content) == (200, b"part1\n")  # cut short
                assert lc.stats().resources["http"].leaks == 0
                assert lc.stats().pools["http"].in_use == 0
                assert tether_logs(caplog, logging.WARNING) == []
                assert (
                    f"tether: GET /relay ended (the server it calls failed mid-body: "
                    f"RemoteProtocolError) with a streamed response of httpx client 'http' still "
                    f"open (GET {upstream.url}/body): tether closed it."
                ) in tether_logs(caplog, logging.INFO)

                assert (await client.get("/unread")).status_code == 503
                assert lc.stats().resources["http"].leaks == 1
                [warning] = [w for w in tether_logs(caplog, logging.WARNING) if "streamed" in w]
                assert warning.startswith(
                    f"tether: GET /unread ended with a streamed response of httpx client 'http' "
                    f"still open (GET {upstream.url}/body, opened at {__file__}:"
                )


async def test_a_relay_cancelled_at_shutdown_is_no_leak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn (in-process) shutting down with a relay in flight: past its
    `timeout_graceful_shutdown` it cancels the request mid-body, and the background task
    that would close the upstream's response does not run: tether closes it, INFO, not
    counted as a leak."""
    caplog.set_level(logging.INFO, logger="tether")
    async with _BreakingUpstream(hang=True) as upstream:
        app, _, http = relay_app(upstream.url)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        serve = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await wait_until(lambda: server.started or serve.done())
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/relay"
            got = b""
            async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in response.aiter_raw():
                        got += chunk
                        server.should_exit = True  # while the body is being sent
            assert got == b"part1\n"
        finally:
            server.should_exit = True
            await serve
            sock.close()
    assert http.counters.leaks == 0
    assert tether_logs(caplog, logging.WARNING) == []
    assert (
        f"tether: GET /relay ended (cancelled while the body was being read) with a "
        f"streamed response of httpx client 'http' still open (GET "
        f"{upstream.url}/body): tether closed it."
    ) in tether_logs(caplog, logging.INFO)


# -- Bug 5: a certificate the client refuses is a configuration error, not a 503 -------------


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """uvicorn over TLS with a self-signed certificate for ``localhost`` only."""
    tmp = tmp_path_factory.mktemp("tls")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
    )
    server = Server(
        "tests.integration.app_upstream:app",
        tmp,
        "--ssl-keyfile",
        str(key),
        "--ssl-certfile",
        str(cert),
    )
    yield server, cert
    server.stop()


def tls_refused(where: str, refused: ssl.SSLError) -> str:
    return (
        f"HTTP client 'http': the TLS handshake with {where} failed: {type(refused).__name__}: "
        f"{str(refused).rstrip('. ')}. A retry will not mend it (no 503): it is the client's "
        f"TLS settings or the server's certificate. Give the client verify= (a CA bundle, or "
        f"an ssl.SSLContext, that trusts the server's certificate, issued for the URL's host) "
        f"and, if the server asks for a client certificate, cert=."
    )


def ssl_cause(exc: BaseException) -> ssl.SSLError:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None, exc
    return cause


async def test_a_certificate_refused_is_the_endpoints_error_naming_verify(
    tls_upstream: tuple[Server, Path],
) -> None:
    """A self-signed certificate with the default verify, and a certificate for another
    host name: an httpx.ConnectError (not ResourceUnavailable: no 503, no Retry-After, a
    500 if uncaught) naming verify= and cert=, not "retry shortly". With verify= trusting
    it and the right host name: served."""
    server, cert = tls_upstream
    by_ip = f"https://127.0.0.1:{server.port}"
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url=by_ip)
    async with serving(app_of(http, lc, "/health"), lc) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await lc.get(http).get("/health")
        assert not isinstance(info.value, tether.ResourceUnavailable)
        refused = ssl_cause(info.value)
        assert isinstance(refused, ssl.SSLCertVerificationError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused)
        assert str(info.value) == tls_refused(f"{by_ip}/", refused)
        response = await client.get("/go")
        assert (response.status_code, response.headers.get("retry-after")) == (500, None)

    trusting = ssl.create_default_context(cafile=str(cert))
    for base_url, served in ((by_ip, False), (f"https://localhost:{server.port}", True)):
        lc = tether.Lifecycle()
        http = thttpx.client(lc, base_url=base_url, verify=trusting)
        async with lc.run():
            c = lc.get(http)
            if served:
                assert (await c.get("/health")).json() == {"status": "ok"}
                continue
            with pytest.raises(httpx.ConnectError) as info:
                await c.get("/health")
            refused = ssl_cause(info.value)
            assert "IP address mismatch" in str(refused)
            assert str(info.value) == tls_refused(f"{by_ip}/", refused)


async def test_a_server_closing_during_the_handshake_is_still_a_503() -> None:
    """A peer that closes the connection during the TLS handshake (a server restarting):
    an outage, not the settings: 503 as before."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        lc = tether.Lifecycle()
        http = thttpx.client(lc, base_url=f"https://127.0.0.1:{port}")
        async with lc.run():
            with pytest.raises(thttpx.ConnectUnavailable) as info:
                await lc.get(http).get("/health")
            assert str(info.value).endswith(
                "Retry shortly; if it persists, check that the server it calls runs and is "
                "reachable."
            )
    finally:
        server.close()
        await server.wait_closed()


# -- Bug 10: a relative health_url needs a base_url --------------------------------------------


async def test_a_relative_health_url_without_base_url_is_refused(upstream: Server) -> None:
    """Refused at declaration (readiness would fail on every check), naming base_url; from
    a base_url function that returns "", at startup; an absolute health_url is fine."""
    with pytest.raises(
        ValueError,
        match=exactly(
            "HTTP client 'http': health_url '/health' is relative, and it has no base_url to "
            "resolve it against: every readiness check would fail. Pass base_url (e.g. "
            'base_url="https://api.example.com"), or an absolute health_url (e.g. '
            '"https://api.example.com/health").'
        ),
    ):
        thttpx.client(tether.Lifecycle(), health_url="/health")

    lc = tether.Lifecycle()
    thttpx.client(lc, base_url=lambda: "", health_url="health")
    with pytest.raises(
        tether.StartupError,
        match=misconfigured(
            "http",
            "ValueError: HTTP client 'http': health_url 'health' is relative, and its "
            'base_url function returned "" to resolve it against: every readiness check '
            'would fail. Pass base_url (e.g. base_url="https://api.example.com"), or an '
            'absolute health_url (e.g. "https://api.example.com/health")',
        ),
    ):
        async with lc.run():
            pass

    lc = tether.Lifecycle()
    thttpx.client(lc, health_url=f"{upstream.base_url}/health")
    async with lc.run():
        assert (await lc.health()).ok


class _RaisingTLS(httpx.AsyncBaseTransport):
    """A transport whose connect fails with an OpenSSL error of the given reason, as
    httpcore raises it (an ``httpx.ConnectError`` from the ``ssl.SSLError``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        error = ssl.SSLError(1, f"[SSL: {self.reason}] ({self.reason.lower()})")
        error.reason = self.reason
        raise httpx.ConnectError(str(error), request=request) from error


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reason", "mendable"),
    [
        ("TLSV1_ALERT_INTERNAL_ERROR", True),  # the server failed: try again
        ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", True),  # a corrupted record
        ("WRONG_VERSION_NUMBER", False),  # TLS spoken to a plain HTTP port
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", False),  # no client certificate given
        ("SSLV3_ALERT_BAD_CERTIFICATE", False),  # the client certificate refused
    ],
)
async def test_only_tls_failures_of_the_settings_lose_their_503(
    reason: str, mendable: bool
) -> None:
    """A refused certificate is no 503 (a retry cannot mend it), but a server that sends an
    internal-error alert, or a record corrupted on the way, is an outage like any other."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url="https://api.example.com", transport=_RaisingTLS(reason))
    async with lc.run():
        client = lc.get(http)
        with pytest.raises(httpx.ConnectError) as info:
            await client.get("/")
    assert isinstance(info.value, tether.ResourceUnavailable) is mendable
    assert ("verify=" in str(info.value)) is not mendable


@pytest.mark.anyio
async def test_a_stream_dropped_half_read_is_a_leak_when_another_call_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The relay exemption above is for the relayed response's own failure. A stream the
    code read in part and dropped, in a unit that then failed on another call's
    `ReadTimeout`, was logged at INFO as "failed mid-body" and not counted: a real leak,
    hidden."""

    async def lines() -> Any:
        for i in range(100):
            yield b"line %d\n" % i
            await asyncio.sleep(0)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            return httpx.Response(200, content=lines())
        raise httpx.ReadTimeout("upstream /other timed out", request=request)

    lc = tether.Lifecycle()
    api = thttpx.client(
        lc, base_url="http://api.test", name="api", transport=httpx.MockTransport(handler)
    )
    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            with pytest.raises(httpx.ReadTimeout):
                async with lc.scope("job") as unit:
                    c = await unit.get(api)
                    r = await c.send(c.build_request("GET", "/events"), stream=True)
                    async for _ in r.aiter_lines():  # the first line, then r is forgotten
                        break
                    await c.get("/other")
            assert lc.stats().resources["api"].leaks == 1
    (warning,) = [r for r in caplog.records if "still open" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "(GET http://api.test/events, opened at " in warning.getMessage()


async def test_a_health_url_that_cannot_be_connected_to_in_time_is_said_so() -> None:
    """A listener whose backlog is full drops the SYNs: the check's GET of `health_url`
    times out connecting. Its report was tether's own `TypeError` (`_Unavailable.__init__()
    missing 2 required keyword-only arguments`) where it names the URL and the bound."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filling = []
    for _ in range(4):  # the backlog, full
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        filling.append(s)
    try:
        lc = tether.Lifecycle(check_timeout=5)
        thttpx.client(
            lc,
            name="up",
            base_url=f"http://127.0.0.1:{port}",
            timeout=httpx.Timeout(1.0),
            health_url="/health",
        )
        async with lc.run():
            report = await lc.health()
        assert not report.ok
        assert report["up"].error == (
            f"ConnectTimeout: GET http://127.0.0.1:{port}/health could not connect within the "
            f"client's connect timeout (1 s)"
        )
    finally:
        for s in [*filling, listener]:
            s.close()
