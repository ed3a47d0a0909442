"""`tether stats`: a running app's figures, read from its dashboard over HTTP."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.serving import Server, dead_port
from tests.unit._messages import exactly
from tether.cli import main

APP = "tests.e2e.app_dashboard:app"


def test_stats_prints_resources_and_what_is_in_flight(
    serve: type[Server], capsys: pytest.CaptureFixture[str]
) -> None:
    """The table shows each resource's counters and the request holding a connection."""
    server = serve(APP)
    held = threading.Thread(target=lambda: httpx.get(f"{server.base_url}/hold", timeout=30))
    held.start()
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.base_url}/tether/stats.json").json()["in_flight"] == []:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert main(["stats", f"{server.base_url}/tether/"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert main(["stats", f"{server.base_url}/tether/stats.json", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
    finally:
        httpx.post(f"{server.base_url}/release", timeout=10)
        held.join(10)
    assert table[0] == (
        f"running: 1 in flight, 1 started, 0 refused (pid {server.proc.pid} on "
        f"{socket.gethostname()})"
    )
    assert table[2].split() == [
        "resource", "scope", "in", "use", "max", "opened", "closed", "errors", "timeouts",
        "leaks", "wait", "ms", "mean/max", "hold", "ms", "mean/max",
    ]  # fmt: skip
    assert table[3].split()[:9] == ["pool", "app", "1", "1", "1", "0", "0", "0", "0"]
    assert table[4].split()[:9] == ["conn", "request", "1", "1", "1", "0", "0", "0", "0"]
    assert table[6].split() == [
        "pool", "max", "open", "in", "use", "idle", "waiting", "made", "discarded"
    ]  # fmt: skip
    assert table[7].split() == ["pool", "4", "2", "1", "1", "-", "5", "1"]
    assert table[9] == "in flight, oldest first:"
    assert table[10].split()[:4] == ["GET", "/hold", table[10].split()[2], "s"]
    assert table[10].split()[4] == "conn"
    assert [r["name"] for r in data["resources"]] == ["pool", "conn"]
    assert data["in_flight"][0]["label"] == "GET /hold"


@pytest.fixture
def dead() -> Iterator[int]:
    """A port where nothing listens, and nothing can meanwhile (a free port may be taken)."""
    with dead_port() as port:
        yield port


@pytest.fixture
def kept_port() -> Iterator[int]:
    """A port for `_dashboard`, kept while it is down: refused then, never taken meanwhile."""
    with dead_port(reuse_port=True) as port:
        yield port


def test_stats_says_what_is_wrong(serve: type[Server], dead: int) -> None:
    """Unreachable, not a dashboard, or guarded: each refusal names the cause and the fix."""
    server = serve(APP)
    base = server.base_url
    port = dead  # nothing listens there
    refusals = [
        (
            [f"{base}/nowhere"],
            f"tether stats: {base}/nowhere/stats.json answered 404 Not Found. Include "
            f"tether.fastapi.dashboard_router(lc) in the app, and give the URL of its page "
            f"(http://HOST:PORT/tether/ by default).",
        ),
        (
            [f"{base}/guarded/"],
            f"tether stats: {base}/guarded/stats.json answered 401 Unauthorized. The dashboard "
            f"is guarded: pass what it expects with --header 'Name: value'.",
        ),
        (
            [f"{base}/openapi.json"],
            f"tether stats: {base}/openapi.json did not answer with a tether dashboard's JSON. "
            f"Is the app running, and does it include tether.fastapi.dashboard_router(lc)?",
        ),
        (
            [f"{base}/guarded/", "--header", "X-Token"],
            "--header 'X-Token' is not of the form 'Name: value' (e.g. 'X-Token: abc').",
        ),
        (
            [f"http://127.0.0.1:{port}/tether/"],
            f"tether stats: cannot read http://127.0.0.1:{port}/tether/stats.json: [Errno 111] "
            f"Connection refused. Is the app running, and does it include "
            f"tether.fastapi.dashboard_router(lc)?",
        ),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit, match=exactly(message)):
            main(["stats", *args])
    assert main(["stats", f"{base}/guarded/", "--header", "X-Token: let-me-in"]) == 0


def test_stats_watch_prints_until_interrupted(serve: type[Server]) -> None:
    """--watch prints the table again every interval, and ^C ends it quietly."""
    server = serve(APP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "stats", f"{server.base_url}/tether/", "--watch",
         "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and a
        # Python started so never raises KeyboardInterrupt: give the child ^C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        # ^C once it has printed three tables (a fixed wait sent it, on a loaded machine,
        # while the interpreter was still importing: a KeyboardInterrupt before the CLI's
        # own handling, and the process killed by SIGINT).
        deadline = time.monotonic() + 30
        while sum("running: 0 in flight, " in line for line in list(lines)) < 3:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # as ^C
        proc.wait(timeout=10)
        reader.join(timeout=10)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0
    assert err == ""
    assert "".join(lines).count("running: 0 in flight, ") >= 3


def test_stats_watch_says_when_another_worker_answered(serve: type[Server]) -> None:
    """Against `uvicorn --workers 2` each read is answered by either worker, each with its
    own counters: the header names the process, and a read from another one says so (before,
    "17 started" then "13 started", as if the counters went backwards, with nothing said)."""
    server = serve(APP, "--workers", "2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "stats", f"{server.base_url}/tether/", "--watch",
         "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("another process answered: ") for line in list(lines)):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    host = socket.gethostname()
    headers = [line.rstrip("\n") for line in lines if line.startswith("running: ")]
    pids = [int(h.rsplit("(pid ", 1)[1].split()[0]) for h in headers]
    assert all(h.endswith(f" on {host})") for h in headers), headers
    assert server.proc.pid not in pids  # the workers answer, not uvicorn's parent
    at = next(i for i, line in enumerate(lines) if line.startswith("another process answered"))
    before = sum(line.startswith("running: ") for line in lines[:at]) - 1
    new, was = pids[before], pids[before - 1]
    assert new != was
    assert lines[at].rstrip("\n") == (
        f"another process answered: pid {new} on {host}, was pid {was}; each worker (and each "
        f"restart) has its own figures"
    )
    assert proc.returncode == 0


MINIMAL = {
    "state": "running",
    "units": {"in_flight": 0, "total": 0, "refused": 0},
    "resources": [],
    "pools": [],
    "in_flight": [],
}


class _Dashboard(http.server.BaseHTTPRequestHandler):
    """A dashboard's figures; under /q/, only for ?token=tok; under /shape/, JSON with the
    keys but not their shape; under /trickle/, an answer sent a byte every 0.2 s."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        figures = MINIMAL
        if self.path.startswith("/q/") and self.path != "/q/tether/stats.json?token=tok":
            self.send_error(403)
            return
        if self.path.startswith("/shape/"):
            figures = {**MINIMAL, "units": []}
        body = json.dumps(figures).encode()
        if self.path.startswith("/cut/"):  # 40 bytes fewer than it announces, then closed
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:-40])
            self.close_connection = True
            return
        if self.path.startswith("/chunkcut/"):  # chunked, closed mid-chunk
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % len(body) + body[:20])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/trickle-head/"):  # its status line and headers, slowly
            head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 40
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self.path.startswith("/trickle/"):
            self.wfile.write(body)
            return
        for byte in body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)

    def log_message(self, *args: object) -> None:
        pass


class _DashboardServer(http.server.ThreadingHTTPServer):
    allow_reuse_port = True  # SO_REUSEPORT: it may bind the port `kept_port` keeps


def _dashboard(port: int) -> http.server.ThreadingHTTPServer:
    server = _DashboardServer(("127.0.0.1", port), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_stats_refuses_what_no_retry_can_fix() -> None:
    """A URL that is not one, or has no scheme, a header value HTTP cannot carry, and a
    --watch interval that never comes: each said with the fix, never a traceback."""
    example = "http://127.0.0.1:8000/tether/"
    refusals = [
        (
            ["http://[::1/tether/"],
            # As given: a URL no parser can read is not extended.
            f"tether stats: 'http://[::1/tether/' is not a URL (Invalid IPv6 URL). "
            f"Give the dashboard's, e.g. {example}",
        ),
        (
            ["127.0.0.1:8000/tether/"],
            # As typed, not with the /stats.json it would be given (trial 16).
            f"tether stats: '127.0.0.1:8000/tether/' is not an http:// or https:// "
            f"URL. Give the dashboard's with its scheme, e.g. {example}",
        ),
        (
            [example, "--header", "X-Token: café€"],
            "--header 'X-Token: café€': an HTTP header's value must be Latin-1 text; encode it "
            "(e.g. percent- or base64-encoded) as the app expects.",
        ),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit, match=exactly(message)):
            main(["stats", *args])
    with pytest.raises(SystemExit) as raised:
        main(["stats", example, "--watch", "inf"])
    assert raised.value.code == 2


def test_stats_of_a_server_that_does_not_speak_http() -> None:
    """Something else listening there (an SSH server) is said, not traced."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def greet() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    threading.Thread(target=greet, daemon=True).start()
    try:
        with pytest.raises(
            SystemExit,
            match=exactly(
                f"tether stats: http://127.0.0.1:{port}/tether/stats.json did not answer as an "
                f"HTTP server (BadStatusLine 'SSH-2.0-OpenSSH_9.2'). Is the app running, and "
                f"does it include tether.fastapi.dashboard_router(lc)?"
            ),
        ):
            main(["stats", f"http://127.0.0.1:{port}/tether/"])
    finally:
        listener.close()


def test_stats_watch_outlasts_a_restart_of_the_app(kept_port: int) -> None:
    """--watch says a failed read and goes on: the table comes back when the app does
    (before, the first failed read ended the command with exit code 1)."""
    port = kept_port  # the app's while it is down too: refused then, and free to restart on
    server = _dashboard(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "stats", f"http://127.0.0.1:{port}/tether/",
         "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True),
        threading.Thread(target=lambda: err.extend(proc.stderr or ()), daemon=True),
    ]
    for reader in readers:
        reader.start()

    def tables() -> int:
        return sum(line.startswith("running: ") for line in list(out))

    def wait_for(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert proc.poll() is None, "".join(err)
            assert time.monotonic() < deadline, "".join(out + err)
            time.sleep(0.05)

    try:
        wait_for(lambda: tables() >= 1)
        server.shutdown()
        server.server_close()
        wait_for(lambda: any("Connection refused" in line for line in list(err)))
        seen = tables()
        server = _dashboard(port)
        wait_for(lambda: tables() > seen)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0
    assert err[0].startswith(f"tether stats: cannot read http://127.0.0.1:{port}/tether/")


@pytest.fixture
def dashboard() -> Iterator[str]:
    """The base URL of a `_Dashboard` on a free port."""
    server = _dashboard(0)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_stats_keeps_the_query_of_the_url(
    dashboard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dashboard guarded by `?token=`: the page's URL and its stats.json, each with the
    query, are read (before: `/stats.json` was put after the query, and the token sent as
    `tok/stats.json` got a 403); a fragment is not sent."""
    for url in [
        f"{dashboard}/q/tether/?token=tok",
        f"{dashboard}/q/tether?token=tok#figures",
        f"{dashboard}/q/tether/stats.json?token=tok",
    ]:
        assert main(["stats", url, "--json"]) == 0, url
        assert json.loads(capsys.readouterr().out) == MINIMAL
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"tether stats: {dashboard}/q/tether/stats.json?token=*** answered 403 Forbidden. "
            f"The dashboard is guarded: pass what it expects with --header 'Name: value'."
        ),
    ):
        main(["stats", f"{dashboard}/q/tether/?token=wrong"])


def test_stats_of_json_that_is_not_a_dashboards(
    dashboard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON with the dashboard's keys but not their shape is said, not traced (before: a
    TypeError from the table); --json prints it as read."""
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"tether stats: {dashboard}/shape/stats.json did not answer with a tether "
            f"dashboard's JSON. Is the app running, and does it include "
            f"tether.fastapi.dashboard_router(lc)?"
        ),
    ):
        main(["stats", f"{dashboard}/shape/"])
    assert main(["stats", f"{dashboard}/shape/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["units"] == []


def test_stats_gives_up_on_an_answer_that_never_ends(dashboard: str) -> None:
    """A server that sends its answer a byte every 0.2 s (about 25 s for this one) is given
    up at the read's deadline (before: the timeout bounded each socket read, and such a
    server held the command for as long as it sent)."""
    from tether.cli import fetch_stats

    for part in ["trickle", "trickle-head"]:  # its body; its status line and headers
        url = f"{dashboard}/{part}/stats.json"
        started = time.monotonic()
        with pytest.raises(
            SystemExit,
            match=exactly(
                f"tether stats: cannot read {url}: its answer did not end within 1 s. Is the "
                f"app running, and does it include tether.fastapi.dashboard_router(lc)?"
            ),
        ):
            fetch_stats(url, timeout=1)
        assert time.monotonic() - started < 8, part  # the whole answer takes 14 s or more


def test_reads_given_up_leave_no_thread_or_socket_behind(dashboard: str) -> None:
    """Each read given up at its deadline (as `--watch` retries one after another) ends its
    reader thread and closes its socket (before: both were left to the server's next byte,
    which a server trickling its headers sends for as long as it likes: they piled up)."""
    from tether.cli import fetch_stats

    for _ in range(3):
        with pytest.raises(SystemExit, match="did not end within 0.5 s"):
            fetch_stats(f"{dashboard}/trickle-head/stats.json", timeout=0.5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        readers = [t for t in threading.enumerate() if t.name == "tether-stats-read"]
        if not readers:
            break
        time.sleep(0.05)
    assert readers == []


def test_stats_says_a_chunked_answer_cut_short_with_what_was_read(dashboard: str) -> None:
    """A chunked answer whose connection ends mid-chunk: the bytes read are counted (before:
    "0 bytes read, None more expected")."""
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"tether stats: {dashboard}/chunkcut/stats.json cut its answer short (20 bytes "
            f"read): a proxy or the app ended the connection. Is the app running, and does it "
            f"include tether.fastapi.dashboard_router(lc)?"
        ),
    ):
        main(["stats", f"{dashboard}/chunkcut/"])


def test_stats_of_a_host_name_outside_ascii_is_sent_idna_encoded() -> None:
    """`http://пример.рф/`: the host is looked up IDNA-encoded, as a browser does, and a name
    IDNA cannot encode is said (before: a UnicodeEncodeError traceback from the Host
    header)."""
    with pytest.raises(SystemExit) as raised:
        main(["stats", "http://пример.invalid:9/tether/"])
    assert str(raised.value.code).startswith(
        "tether stats: cannot read http://xn--e1afmkfd.invalid:9/tether/stats.json: "
    )
    host = "ü" * 64  # a label IDNA cannot encode (over 63 characters)
    with pytest.raises(SystemExit) as raised:
        main(["stats", f"http://{host}/tether/"])
    assert str(raised.value.code).startswith(
        f"tether stats: 'http://{host}/tether/stats.json': its host {host!r} is not a valid name ("
    )


def test_a_header_with_a_line_break_is_refused() -> None:
    """--header $'X: a\\nb': said, with the fix (before: http.client's ValueError traceback)."""
    with pytest.raises(SystemExit) as raised:
        main(["stats", "http://127.0.0.1:9/tether/", "--header", "X-Token: a\nb"])
    assert str(raised.value.code) == (
        "--header 'X-Token: a\\nb': a header's name and value cannot hold a line break; pass "
        "each header with a --header of its own."
    )


def test_stats_into_a_pipe_closed_early_ends_quietly(dashboard: str) -> None:
    """`tether stats --watch 0.05 URL | head -1`: the reader leaves, and the command ends
    with the status SIGPIPE gives, nothing on stderr (before: a BrokenPipeError traceback)."""
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "stats", f"{dashboard}/tether/", "--watch", "0.05"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    try:
        with os.fdopen(read) as reader:
            assert reader.readline().startswith("running: 0 in flight, ")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (141, "")


def test_stats_interrupted_before_it_read_says_so() -> None:
    """^C during a single read of a server that never answers exits 130, as a shell says of
    an interrupted command (before: 0, as if it had printed the figures)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = threading.Event()
    kept: list[socket.socket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        kept.append(conn)  # held open, never answered
        accepted.set()

    threading.Thread(target=accept, daemon=True).start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "stats", f"http://127.0.0.1:{port}/tether/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert accepted.wait(30)
        proc.send_signal(signal.SIGINT)  # as ^C, while it waits for the answer
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for conn in kept:
            conn.close()
        listener.close()
    assert (proc.returncode, out, err) == (130, "", "")


def test_stats_reads_a_url_whose_password_holds_an_at(
    dashboard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several `@` before the first `/` (a password `p@ss`, read right by every parser) are
    not taken for an ambiguous password; nor is a query's `@` percent-encoded."""
    host = dashboard.removeprefix("http://")
    for url in [
        f"http://admin:p@ss@{host}/tether/",
        f"http://admin:secret@{host}/tether/?email=ops%40example.com",
    ]:
        assert main(["stats", url, "--json"]) == 0, url
        assert json.loads(capsys.readouterr().out) == MINIMAL


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        # urllib reads host 'ss' and port 'w0rd'.
        (
            "http://admin:p@ss:w0rd/x@127.0.0.1:8000/tether/",
            "'http://***@127.0.0.1:8000/tether/': where its user and password end is ambiguous",
        ),
        # urllib reads host '9': the password's first piece would go there as Basic auth.
        (
            "http://admin:Xk@9/qLm2@127.0.0.1:8000/tether/",
            "'http://***@127.0.0.1:8000/tether/': where its user and password end is ambiguous",
        ),
        # A '?' after the '@' (urllib reads host 't', the rest a query), or a '#' (the
        # fragment, dropped before the request was made): checked as given.
        (
            "http://admin:Xk@t?qLm2@127.0.0.1:8000/tether/",
            "'http://***@127.0.0.1:8000/tether/': where its user and password end is ambiguous",
        ),
        (
            "http://admin:Xk@t#qLm2@127.0.0.1:8000/tether/",
            "'http://***@127.0.0.1:8000/tether/': where its user and password end is ambiguous",
        ),
        # ... with no path after the host meant: urllib still reads host 't'.
        (
            "http://admin:Xk@t?qLm2@127.0.0.1:8000",
            "'http://***@127.0.0.1:8000': where its user and password end is ambiguous",
        ),
        # An '@' in the query, which cannot be told from one in a password.
        (
            "http://admin:Xk@127.0.0.1:8000/tether/?email=qLm2@example.com",
            "'http://***@example.com': where its user and password end is ambiguous",
        ),
    ],
)
def test_stats_refuses_a_password_with_an_unencoded_at_and_slash(url: str, cause: str) -> None:
    """A password with an unencoded `@` and then `/`: refused before any request, the URL
    shown without anything before its last `@` (before: most of the password shown, and a
    request sent to the host a parser read in it)."""
    with pytest.raises(SystemExit) as raised:
        main(["stats", url])
    message = str(raised.value.code)
    assert message == (
        f"tether stats: {cause}. Percent-encode an '@' in the user or password as %40, and a "
        f"'/', '?' or '#' as %2F, %3F or %23 (http://user:p%40ss%2Fword@host:8000/tether/), "
        f"and an '@' in the path or query as %40."
    )
    for piece in ["p@ss", "w0rd/x", "Xk", "qLm2"]:
        assert piece not in message


def test_stats_says_an_answer_cut_short(dashboard: str) -> None:
    """A server that ends the connection before the body it announced: said as such (before
    the deadline change, too: an `IncompleteRead`; with it, for a moment, taken for JSON that
    is not a dashboard's)."""
    size = len(json.dumps(MINIMAL).encode())
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"tether stats: {dashboard}/cut/stats.json cut its answer short ({size - 40} bytes "
            f"read, 40 more expected): a proxy or the app ended the connection. Is the app "
            f"running, and does it include tether.fastapi.dashboard_router(lc)?"
        ),
    ):
        main(["stats", f"{dashboard}/cut/"])


def test_stats_sends_a_url_with_characters_outside_ascii(
    dashboard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token or a path with a character outside ASCII, or a space, is sent percent-encoded,
    as a browser does (before: a UnicodeEncodeError traceback, or http.client's InvalidURL
    with the token in it)."""
    for url in [f"{dashboard}/tether/?token=café", f"{dashboard}/tether/?token=a b"]:
        assert main(["stats", url, "--json"]) == 0, url
        assert json.loads(capsys.readouterr().out) == MINIMAL
