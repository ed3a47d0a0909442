"""SIGTERM and Ctrl-C while app resources still retry at startup (a real uvicorn).

uvicorn never cancels a lifespan's startup: before, it exited about 19 s after the signal,
once every retry of a backend that was not up had run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serving import ROOT, free_port

APP = "tests.e2e.app_startup_signals:app"


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "uvicorn.log"
    cmd = [sys.executable, "-u", "-m", "uvicorn", APP, "--host", "127.0.0.1"]
    # Never bound, so never taken meanwhile: uvicorn binds its port once the lifespan has
    # started, and these tests stop it before.
    cmd += ["--port", str(free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def _wait_for(proc: subprocess.Popen[bytes], log: Path, event: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if f"EVENT {event}" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise AssertionError(f"{event!r} not seen:\n{log.read_text(errors='replace')}")


@pytest.mark.parametrize(
    ("sig", "times"),
    [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGINT, 2)],
    ids=["SIGTERM", "SIGINT", "SIGINT-twice"],
)
def test_a_signal_during_startup_retries_stops_the_start(
    tmp_path: Path, sig: signal.Signals, times: int
) -> None:
    """The signal stops the retries, closes what opened and the process exits within a few
    seconds (before: about 19 s, every retry run), saying why. It exits as on any signal,
    not as a failed startup (3: gunicorn takes that for a worker that cannot boot, and
    its master halts with the other workers' requests in flight)."""
    proc, log = _start(tmp_path)
    try:
        _wait_for(proc, log, "backend attempt 1")
        sent = time.monotonic()
        for _ in range(times):
            proc.send_signal(sig)
            time.sleep(0.2)
        try:
            code = proc.wait(6)
        except subprocess.TimeoutExpired:
            pytest.fail(f"uvicorn still running 6 s after {sig.name} during startup")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    output = log.read_text(errors="replace")
    assert took < 6, output
    assert code in (0, -sig), output  # uvicorn raises the signal again once it has stopped
    assert (
        f"tether: The start was interrupted by {sig.name} while app resource 'backend' "
        f"was still opening: the opens were stopped (no more retries) and the app resources "
        f"already open were closed, in reverse order; nothing was served."
    ) in output, output
    assert f"The server stops as on any {sig.name}." in output, output
    events = [line[6:] for line in output.splitlines() if line.startswith("EVENT ")]
    assert events[-1] == "settings close", output  # what opened was closed
    assert "backend attempt 3" not in events, output  # the retries stopped
    if times == 2 and "Traceback" in output:
        # A second Ctrl-C that reaches uvicorn soon after the first (seen on a loaded CI) is
        # its force exit: it skips the lifespan's shutdown, raises KeyboardInterrupt, and
        # asyncio cancels the lifespan task at its `await receive()`, which is logged with
        # a traceback (for any app). What had opened was closed at the first signal
        # (above); that traceback, and none through tether, may be there.
        tail = output[output.index("Traceback") :]
        assert "KeyboardInterrupt" in tail, output
        assert "lifespan/on.py" in tail, output
        assert tail.rstrip().endswith("CancelledError"), output
        assert "/tether/" not in tail, output
    else:
        assert "Traceback" not in output
    assert "Application startup failed" not in output
