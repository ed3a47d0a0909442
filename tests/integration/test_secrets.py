"""Passwords never reach a log line, an exception, a 503 body, /health/ready or `tether
stats`' messages, against a real PostgreSQL (and a real upstream, a real dashboard): a URL
password with '#' (valid for libpq), an `sslpassword=`, an unencoded '/', credentials in
an httpx URL's query or in `tether stats`' URL."""

import base64
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI

import tether
import tether._errors
import tether.fastapi
from tests.servers import Postgres
from tests.serving import Server, dead_port
from tests.unit._messages import exactly
from tether.cli import main
from tether.integrations import asyncpg as tasyncpg
from tether.integrations import httpx as thttpx
from tether.integrations import psycopg as tpsycopg

pytestmark = pytest.mark.anyio

SECRETS = ("hunter2", "ssl-hunter2", "tok-hunter2")


@pytest.fixture(autouse=True)
def no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """No password remembered by an earlier test hides one here."""
    monkeypatch.setattr(tether._errors, "_secrets", ())


def leaks(*texts: str) -> list[str]:
    return [t for t in texts if any(s in t for s in SECRETS)]


@pytest.fixture
def dead() -> Iterator[int]:
    """A port where nothing listens, and nothing can meanwhile (a free port may be taken)."""
    with dead_port() as port:
        yield port


async def test_a_hash_password_and_an_sslpassword_are_never_shown(
    postgres: Postgres, dead: int, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq reads `postgresql://u:hunter2#x@host/db` (its password runs to the '@'), and
    `sslpassword=`: the open log, the 503 body, /health/ready and the StartupError show
    `***` for both."""
    port = postgres.port
    hashed = "postgresql://tether:hunter2#x@127.0.0.1:{}/tether"
    keyed = "host=127.0.0.1 port={} user=tether password=x sslpassword=ssl-hunter2 dbname=tether"
    # The URL is valid for libpq: the server takes it (trust auth).
    async with await psycopg.AsyncConnection.connect(hashed.format(port)) as conn:
        assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)

    lc = tether.Lifecycle()
    tpsycopg.pool(lc, hashed.format(port), name="good", min_size=1, max_size=2)
    tpsycopg.pool(lc, keyed.format(port), name="keyed", min_size=1, max_size=2)
    down = tpsycopg.pool(lc, hashed.format(dead), name="down", required=False)
    ssl_down = tpsycopg.pool(lc, keyed.format(dead), name="ssl_down", required=False)
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(tether.fastapi.health_router(lc, cache=0))
    down_conn = tpsycopg.connection(lc, down, name="down_conn")
    ssl_conn = tpsycopg.connection(lc, ssl_down, name="ssl_conn")

    @app.get("/down")
    async def use_down(c: Annotated[Any, Depends(down_conn)]) -> None:
        pass  # pragma: no cover

    @app.get("/ssl")
    async def use_ssl(c: Annotated[Any, Depends(ssl_conn)]) -> None:
        pass  # pragma: no cover

    caplog.set_level(logging.INFO, logger="tether")
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
    ):
        bodies = [(await client.get(path)).text for path in ("/down", "/ssl", "/health/ready")]
    opened = sorted(r.getMessage() for r in caplog.records if " open on " in r.getMessage())
    assert opened == [
        f"tether: psycopg pool 'good' open on postgresql://tether:***@127.0.0.1:{port}/tether "
        f"(min_size=1, max_size=2)",
        f"tether: psycopg pool 'keyed' open on host=127.0.0.1 port={port} user=tether "
        f"password=*** sslpassword=*** dbname=tether (min_size=1, max_size=2)",
    ]
    assert f"cannot reach postgresql://tether:***@127.0.0.1:{dead}/tether: " in bodies[0]
    assert "user=tether password=*** sslpassword=*** dbname=tether: " in bodies[1]
    assert f"cannot reach postgresql://tether:***@127.0.0.1:{dead}/tether: " in bodies[2]
    assert leaks(caplog.text, *bodies) == []

    # Required: the start fails, naming the DSN with its password hidden.
    for dsn in (hashed.format(dead), keyed.format(dead)):
        lc = tether.Lifecycle()
        tpsycopg.pool(lc, dsn)
        with pytest.raises(tether.StartupError) as info:
            async with lc.run():
                pass  # pragma: no cover
        shown = tether._errors.redact(dsn)
        assert f"'pool' cannot reach {shown}: " in str(info.value)
        assert "***" in shown
        assert leaks(str(info.value), caplog.text) == []


async def test_an_unencoded_slash_in_a_password(postgres: Postgres) -> None:
    """A generated (base64) password pasted unencoded: asyncpg reads its first piece as the
    port. Refused where the pool is declared, saying to encode the password, quoting none
    of it (it was asyncpg's "invalid literal for int() with base 10: 'hunter2'" as the app
    started, the piece hidden by redaction)."""
    lc = tether.Lifecycle()
    dsn = f"postgresql://tether:hunter2/Xk9+q=@127.0.0.1:{postgres.port}/tether"
    with pytest.raises(ValueError, match="must be URL-encoded") as info:
        tasyncpg.pool(lc, dsn)
    assert "hunter2" not in str(info.value)
    assert "Xk9" not in str(info.value)


async def test_asyncpg_sslpassword_in_the_query(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    dsn = f"{postgres.dsn}?sslpassword=ssl-hunter2"
    tasyncpg.pool(lc, dsn, min_size=1, max_size=2)
    caplog.set_level(logging.INFO, logger="tether")
    async with lc.run():
        pass
    shown = f"postgresql://tether:***@127.0.0.1:{postgres.port}/tether?sslpassword=***"
    assert any(shown in r.getMessage() for r in caplog.records)
    assert leaks(caplog.text) == []


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("tests.integration.app_httpx_streams:app", tmp_path_factory.mktemp("up"))
    yield server
    server.stop()


async def test_httpx_logs_urls_without_their_query(
    upstream: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """An access token, an API key or a signature travels in a URL's query: the client's
    open log and the stream-left-open warning show the URL without it."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url=upstream.base_url)
    thttpx.client(lc, name="keyed", base_url=f"{upstream.base_url}/v1?api_key=tok-hunter2")
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/leak")
    async def leak(c: Annotated[httpx.AsyncClient, Depends(http)]) -> None:
        await c.send(c.build_request("GET", "/chunks?n=3&access_token=tok-hunter2"), stream=True)

    caplog.set_level(logging.INFO, logger="tether")
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
    ):
        assert (await client.get("/leak")).status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "tether"]
    assert f"tether: httpx client 'keyed' open (base_url={upstream.base_url}/v1)" in messages
    warned = [m for m in messages if "still open" in m]
    assert len(warned) == 1
    assert f"(GET {upstream.base_url}/chunks, opened at " in warned[0]
    assert leaks(caplog.text) == []


class _Dashboard(http.server.BaseHTTPRequestHandler):
    """A dashboard's stats.json behind Basic auth (admin / hunter2-pw)."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(b"admin:hunter2-pw").decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"state": "running", "units": {}, "resources": [], "in_flight": []})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboard() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def test_stats_sends_the_urls_credentials_and_never_shows_them(
    dashboard: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether stats http://user:password@host/tether/` sends them as Basic auth; a refusal
    names the URL without them."""
    base = f"127.0.0.1:{dashboard}/tether"
    assert main(["stats", f"http://admin:hunter2-pw@{base}/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "running"
    refused = (
        f"tether stats: http://{base}/stats.json answered 401 Unauthorized. The dashboard "
        f"refused the URL's user and password (sent as Basic auth): check them, or pass what "
        f"it expects with --header 'Name: value'."
    )
    with pytest.raises(SystemExit, match=exactly(refused)):
        main(["stats", f"http://admin:hunter2-wrong@{base}/"])
    not_a_url = (
        "tether stats: 'ftp://admin:***@host/tether/' is not an http:// or "
        "https:// URL. Give the dashboard's with its scheme, e.g. http://127.0.0.1:8000/tether/"
    )
    with pytest.raises(SystemExit, match=exactly(not_a_url)):
        main(["stats", "ftp://admin:hunter2-pw@host/tether/"])
    # As typed: it showed 'notaurl/stats.json', what it made of it (trial 16).
    with pytest.raises(SystemExit, match="^tether stats: 'notaurl' is not an http"):
        main(["stats", "notaurl"])
