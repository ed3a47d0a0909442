"""`make demo` and `tether demo`: the reference service on its embedded SQLite file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.serving import ROOT, free_port, group_listens

pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "python").exists(), reason="make demo runs in .venv"
)


class _PortTaken(Exception):
    """The command exited at startup because something else took its port meanwhile."""


def start(command: list[str], port: int, cwd: Path = ROOT) -> subprocess.Popen[str]:
    """Run *command* in a session of its own and wait until it listens on *port*."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        if group_listens(proc.pid, port):  # its own server, not another test's on the port
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # the group may have ended
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=20)
            if proc.returncode != 0 and "address already in use" in out.lower():
                raise _PortTaken(out) from None
            pytest.fail(f"{command} did not listen on {port} within 60 s:\n{out}")
        time.sleep(0.1)


def start_on_a_free_port(
    command: Callable[[int], list[str]], cwd: Path = ROOT
) -> tuple[subprocess.Popen[str], int]:
    """`start` on a port free now, and on another if a process of another test takes it
    before the command binds it (a free port is only free when it is looked up)."""
    for attempt in range(3):
        port = free_port()
        try:
            return start(command(port), port, cwd), port
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as a service manager stops it; what it printed."""
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    return out


def test_make_demo_serves_the_notes_service_on_sqlite(tmp_path: Path) -> None:
    """The service starts, creates its database file, keeps notes, and reports ready."""
    db = tmp_path / "demo" / "notes.db"
    proc, port = start_on_a_free_port(
        lambda port: [
            "make",
            "-s",
            "-o",
            ".venv/bin/.demo-installed",
            "demo",
            f"DEMO_PORT={port}",
            f"DEMO_DB={db}",
        ]
    )
    try:
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
        out = stop(proc)
    assert "Traceback" not in out, out


def test_tether_demo_keeps_its_notes_across_a_restart(tmp_path: Path) -> None:
    """The installed command says where everything is, stops cleanly on SIGTERM, and the notes
    are still there when it starts again on the same file."""
    tether = ROOT / ".venv" / "bin" / "tether"

    def command(port: int) -> list[str]:
        return [str(tether), "demo", "--port", str(port), "--db", "kept/notes.db"]

    proc, port = start_on_a_free_port(command, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        created = httpx.post(f"{base}/notes", json={"text": "still here"}, timeout=5)
        assert created.json() == {"id": 1, "text": "still here"}
    finally:
        out = stop(proc)
    # uvicorn shuts down, then ends by the signal it caught, as a service manager expects
    # (older uvicorns exit 0).
    assert proc.returncode in (0, -signal.SIGTERM), out
    db = tmp_path / "kept" / "notes.db"
    assert out.splitlines()[:2] == [
        f"tether demo: the notes API at {base}/notes, tether's dashboard at {base}/tether/,",
        f"readiness at {base}/health/ready; notes kept in {db}. ^C stops it.",
    ]
    assert "Application shutdown complete." in out
    assert "Traceback" not in out, out
    # On a port free now: the first one may have been taken since (by another test's server).
    proc, port = start_on_a_free_port(command, cwd=tmp_path)
    try:
        notes = httpx.get(f"http://127.0.0.1:{port}/notes", timeout=5).json()
        assert notes == [created.json()]
    finally:
        out = stop(proc)
    assert "Application shutdown complete." in out, out
