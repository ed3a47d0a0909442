"""Server-sent events endpoints (a generator FastAPI 0.137+ runs in a task of its own, a
`def` one in a worker thread) over a real uvicorn: their values close after that task has
stopped, as a success only when the generator ran to its end.

Before, tether closed them when the response ended: a generator that raised had ended the
stream normally by then, and its writes were committed; a client that left mid-query had
them closed under the running generator (a sync session closed under its thread left a
connection idle in transaction for good; an asyncpg connection was terminated mid-query).
"""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.e2e.conftest import Server

pytest.importorskip("fastapi.sse", reason="FastAPI streams server-sent events from 0.137 on")

PATHS = pytest.mark.parametrize("path", ["/events", "/sync-events"], ids=["async", "def"])


@PATHS
def test_a_generator_that_ends_commits(serve: type[Server], path: str) -> None:
    server = serve("tests.e2e.app_sse:app")
    answer = httpx.get(server.base_url + path, timeout=10)
    assert answer.status_code == 200
    assert answer.text.count("data: ") == 3
    server.wait_for("commit running=False")
    assert server.events() == ["commit running=False"]


@PATHS
def test_a_generator_that_raises_rolls_back(serve: type[Server], path: str) -> None:
    server = serve("tests.e2e.app_sse:app")
    for fail_at in (0, 1):
        try:
            httpx.get(server.base_url + path, params={"fail_at": fail_at}, timeout=10)
        except httpx.RemoteProtocolError:
            pass  # the stream cut short: fine, the client can tell
    server.wait_for("rollback running=False")
    server.stop()
    assert server.events() == ["rollback running=False"] * 2


@PATHS
def test_a_client_leaving_mid_query_rolls_back_after_the_generator_stopped(
    serve: type[Server], path: str
) -> None:
    server = serve("tests.e2e.app_sse:app")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(f"GET {path}?work=1.0 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        got = b""
        while b"data: " not in got:  # the first event; the generator is in its next query
            got += client.recv(4096)
    server.wait_for("rollback running=False", timeout=10)
    server.stop()
    assert server.events() == ["rollback running=False"]
    assert "Exception in ASGI application" not in server.output()
