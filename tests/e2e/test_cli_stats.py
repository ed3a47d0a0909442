"""`tether stats`: a running app's figures, read from its dashboard over HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving import Server, free_port
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
    assert table[0] == "running: 1 in flight, 1 started, 0 refused"
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


def test_stats_says_what_is_wrong(serve: type[Server]) -> None:
    """Unreachable, not a dashboard, or guarded: each refusal names the cause and the fix."""
    server = serve(APP)
    base = server.base_url
    port = free_port()  # nothing listens there
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
