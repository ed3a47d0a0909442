"""The release point, disconnects and drain on a real socket (uvicorn subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx

from tests.serving import Server

APP = "tests.e2e.app_release:app"


class TestReleasePointOnTheWire:
    def test_failing_commit_is_a_500_never_a_200(self, serve: type[Server]) -> None:
        """A commit failing in cleanup reaches the client as a 500, and nothing says 200."""
        server = serve(APP)
        response = httpx.get(f"{server.base_url}/commit-fails", timeout=10)
        assert response.status_code == 500
        assert response.json() == {"detail": "Internal Server Error"}
        assert server.events()[-3:] == ["session open", "session commit failed", "session close"]
        assert "200" not in response.text

    def test_stream_uses_the_resource_until_the_last_chunk(self, serve: type[Server]) -> None:
        """With release="response" a StreamingResponse body sees the session open to the end."""
        server = serve(APP)
        with httpx.stream("GET", f"{server.base_url}/stream", timeout=10) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines == [f"chunk {i} session open" for i in range(5)]
        server.wait_for("stream_session close")
        assert server.events()[-2:] == ["stream_session commit", "stream_session close"]


class TestDisconnect:
    def test_a_stream_cut_short_by_its_client_rolls_back(self, serve: type[Server]) -> None:
        """The client reads two chunks of a release="response" stream and goes away: the
        session sees ClientDisconnected (rolls back), never a commit, within a second.
        (A StreamingResponse on uvicorn stops quietly when its client goes away.)"""
        server = serve(APP)
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /long-stream HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b"chunk") < 2:
            received += sock.recv(4096)
        sock.close()
        server.wait_for("stream_session close", timeout=2)
        events = server.events()
        assert events[-2:] == ["stream_session rollback ClientDisconnected", "stream_session close"]
        assert "stream_session commit" not in events

    def test_client_going_away_cancels_the_work_and_rolls_back(self, serve: type[Server]) -> None:
        """A client that disconnects mid-request ends its unit of work within a second."""
        server = serve(APP)
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /slow?seconds=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_for("slow start")
        sock.close()
        started = time.monotonic()
        server.wait_for("session rollback ClientDisconnected", timeout=3)
        assert time.monotonic() - started < 1.5
        assert "slow end" not in server.events()
        server.wait_for("session close")
        # The server is fine afterwards.
        for _ in range(20):
            assert httpx.get(f"{server.base_url}/ok", timeout=5).status_code == 200


class TestGracefulShutdown:
    def test_sigterm_drains_in_flight_requests_then_closes_app_resources(
        self, serve: type[Server]
    ) -> None:
        """On SIGTERM an in-flight request completes, then app resources close, in order."""
        server = serve(APP)
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /slow?seconds=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_for("slow start")
        server.terminate()
        sock.settimeout(10)
        reply = sock.recv(65536)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200")
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.wait() in (0, -15)
        assert "Traceback" not in server.output()
        events = server.events()
        assert events.index("slow end") < events.index("session close") < events.index("pool close")
        assert events[-1] == "pool close"

    def test_sigterm_fails_readiness_for_drain_delay_while_the_app_serves(
        self, serve: type[Server]
    ) -> None:
        """With `drain_delay=3`: SIGTERM turns /health/ready to 503 at once, while the
        listener stays open and requests are served as before; then the server shuts down
        as on any SIGTERM. Load balancers take the instance out of rotation first."""
        server = serve("tests.e2e.app_drain_delay:app")
        ready = httpx.get(f"{server.base_url}/health/ready", timeout=5)
        assert ready.status_code == 200
        server.terminate()
        signalled = time.monotonic()
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            while (ready := http.get("/health/ready")).status_code == 200:
                assert time.monotonic() - signalled < 1.5, "readiness still passes"
                time.sleep(0.02)
            assert ready.status_code == 503
            assert ready.headers["retry-after"] == "5"
            assert ready.json()["state"] == "stopping"
            assert http.get("/ok").json() == {"conn": "conn of pool"}  # still serving
            assert http.get("/health/live").status_code == 200
            # All of the above within the delay (3 s: room for a loaded machine).
            assert time.monotonic() - signalled < 2.5
        assert server.wait() in (0, -15)
        assert time.monotonic() - signalled > 2.8  # the delay, then uvicorn's shutdown
        output = server.output()
        assert "Traceback" not in output
        assert "tether: SIGTERM: /health/ready fails for drain_delay=3 s" in output
        assert server.events() == ["pool open", "pool close"]

    def test_a_sigterm_to_the_process_group_of_workers_keeps_drain_delay(
        self, serve: type[Server]
    ) -> None:
        """`uvicorn --workers 2` stopped as systemd stops it: SIGTERM to every process of
        the group at once. Each worker got it twice (directly, and from uvicorn's parent),
        took the second for an operator's second SIGTERM, and handed over at once: the
        listener closed after 0.5 s of the 3 s delay, refusing the load balancer."""
        server = serve("tests.e2e.app_drain_delay:app", "--workers", "2")
        pid = server.proc.pid
        deadline = time.monotonic() + 20
        while len(workers := _children(pid)) < 2 or not _both_serve(server.base_url):
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        for each in [pid, *workers]:  # as `kill -TERM -PGID` does
            os.kill(each, signal.SIGTERM)
        signalled = time.monotonic()
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            while time.monotonic() - signalled < 1.5:  # was refused from about 0.5 s
                assert http.get("/ok").status_code == 200
                time.sleep(0.05)
        assert server.wait() in (0, -15)
        assert time.monotonic() - signalled > 2.8  # the delay, then uvicorn's shutdown


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _both_serve(base_url: str) -> bool:
    """Whether the workers answer (a few requests, which the kernel spreads over them)."""
    try:
        return all(httpx.get(f"{base_url}/ok", timeout=2).status_code == 200 for _ in range(6))
    except httpx.HTTPError:
        return False


def test_lifespan_off_is_named_in_the_error(serve: type[Server]) -> None:
    """`uvicorn --lifespan off` never runs `lc.lifespan`: the log said to use
    `FastAPI(lifespan=lc.lifespan)`, which the app already did. It names the server option."""
    server = serve(APP, "--lifespan", "off")
    response = httpx.get(f"{server.base_url}/commit-fails", timeout=10)
    assert response.status_code == 500
    deadline = time.monotonic() + 5
    while "--lifespan off" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    output = server.output()
    assert (
        "the app's lifespan is `lc.lifespan`, but it has not run. In tests, enter the client"
        in output
    )
    assert "(`uvicorn --lifespan off`, `granian --interface asginl`)" in output
