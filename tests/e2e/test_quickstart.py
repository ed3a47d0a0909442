"""The README's quick start (`examples/quickstart.py`), on a real uvicorn."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.serving import ROOT, free_port


def test_quickstart_prints_the_tutorial_sequence() -> None:
    """Two requests print connect/close around each, inside the app's start and stop."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "examples/quickstart.py", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the quick start did not listen within 20 s"
                assert proc.poll() is None, "the quick start exited at startup"
                time.sleep(0.05)
        for _ in range(2):
            response = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            assert response.json() == {"message": "Hello with DB"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    lines = [line for line in out.splitlines() if line]
    assert lines == [
        "Starting app",
        "DB connected",
        "DB closed",
        "DB connected",
        "DB closed",
        "Stopping app",
    ]
