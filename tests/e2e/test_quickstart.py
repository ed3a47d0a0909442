"""The README's quick start (`examples/quickstart.py`), on a real uvicorn."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.serving import ROOT, free_port, listens


def _start() -> tuple[subprocess.Popen[str], int]:
    """The quick start on a free port; on another if a process of another test takes it
    before uvicorn binds it (a free port is only free when it is looked up)."""
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "examples/quickstart.py", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 20
        while True:
            if listens(proc.pid, port):  # the quick start itself, not another test's server
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                return proc, port
            if proc.poll() is not None:
                out, _ = proc.communicate(timeout=15)
                if "address already in use" in out.lower():
                    break  # taken meanwhile: another port
                raise AssertionError(f"the quick start exited at startup:\n{out}") from None
            if time.monotonic() > deadline:
                proc.kill()
                out, _ = proc.communicate(timeout=15)
                raise AssertionError(f"the quick start did not listen within 20 s:\n{out}")
            time.sleep(0.05)
    raise AssertionError("three free ports in a row were taken before uvicorn bound them")


def test_quickstart_prints_the_tutorial_sequence() -> None:
    """Two requests print connect/close around each, inside the app's start and stop."""
    proc, port = _start()
    try:
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
