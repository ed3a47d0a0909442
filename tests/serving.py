"""A real uvicorn subprocess on 127.0.0.1, for end-to-end and integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tests.servers import dead_port, free_port

__all__ = ["ROOT", "Server", "dead_port", "free_port", "group_listens", "listens"]

ROOT = Path(__file__).resolve().parents[1]


def listens(pid: int, port: int) -> bool:
    """Whether process *pid* itself has a socket listening on 127.0.0.1:*port* (Linux /proc).

    A free port can be taken by another process (a database of another test) before uvicorn
    binds it; uvicorn then exits, and a connection test would have reached the other one."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def group_listens(pgid: int, port: int) -> bool:
    """Whether a process of the process group *pgid* (a command started with
    ``start_new_session=True``, as `make demo` with its uvicorn child) listens on *port*."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and listens(int(entry), port):
            return True
    return False


class Server:
    """A uvicorn process serving `target` (module:attr); its output goes to a file.

    `env` adds (or overrides) environment variables of the server process, e.g. the DSN
    the app module reads when its lifespan starts.
    """

    def __init__(
        self, target: str, tmp: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for attempt in range(3):
            self.port = free_port()
            self.base_url = f"http://127.0.0.1:{self.port}"
            self.log_path = tmp / f"uvicorn-{self.port}.log"
            self._log = self.log_path.open("wb")
            cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1"]
            cmd += ["--port", str(self.port), "--log-level", "warning", *args]
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=child_env
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if "address already in use" in self.output() and attempt < 2:
                        self._log.close()
                        break  # the port was taken before uvicorn bound it: another
                    self._log.close()  # else collected in a later test: an unraisable warning
                    raise RuntimeError(f"uvicorn exited at startup:\n{self.output()}")
                if listens(self.proc.pid, self.port):
                    return
                time.sleep(0.05)
            else:
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
