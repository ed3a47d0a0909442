"""`make demo`: the reference service on its embedded SQLite file, as the README says."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serving import ROOT, free_port

pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "python").exists(), reason="make demo runs in .venv"
)


def test_make_demo_serves_the_notes_service_on_sqlite(tmp_path: Path) -> None:
    """The service starts, creates its database file, keeps notes, and reports ready."""
    port = free_port()
    db = tmp_path / "demo" / "notes.db"
    proc = subprocess.Popen(
        ["make", "-s", "demo", f"DEMO_PORT={port}", f"DEMO_DB={db}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "make demo did not listen within 60 s"
                assert proc.poll() is None, "make demo exited at startup"
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        created = httpx.post(f"{base}/notes", json={"text": "hi"}, timeout=5)
        assert created.status_code == 201
        assert httpx.get(f"{base}/notes", timeout=5).json() == [created.json()]
        assert httpx.get(f"{base}/health/ready", timeout=5).status_code == 200
        stats = httpx.get(f"{base}/tether/stats.json", timeout=5).json()
        opened = {r["name"]: r["opened"] for r in stats["resources"]}
        assert (opened["writer"], opened["reader"]) == (1, 1)
        [pool] = stats["pools"]  # the SQLite file's connection slots, none in use now
        assert (pool["name"], pool["max"], pool["in_use"]) == ("database", 32, 0)
        assert (
            httpx.get(f"{base}/tether/", timeout=5).headers["content-type"].startswith("text/html")
        )
        assert db.exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out
