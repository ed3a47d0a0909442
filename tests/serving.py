"""A real uvicorn subprocess on 127.0.0.1, for end-to-end and integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A uvicorn process serving `target` (module:attr); its output goes to a file.

    `env` adds (or overrides) environment variables of the server process, e.g. the DSN
    the app module reads when its lifespan starts.
    """

    def __init__(
        self, target: str, tmp: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"uvicorn-{self.port}.log"
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-level", "warning", *args]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=child_env
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited at startup:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"uvicorn did not listen within 20 s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[str]:
        return [line[6:] for line in self.output().splitlines() if line.startswith("EVENT ")]

    def wait_for(self, event: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if event in self.events():
                return
            time.sleep(0.02)
        raise AssertionError(f"{event!r} not seen within {timeout} s; events: {self.events()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
