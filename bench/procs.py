"""Processes: CPU pinning, the venv's python, bounded waits, CPU time of a running process."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0  # uvicorn, and the in-process workers
LOAD_CPU = 1  # wrk, the slow clients and PostgreSQL
TICKS = os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when the harness dies, however it dies, so no
    server outlives a killed benchmark (Linux ``PR_SET_PDEATHSIG``; kept across exec)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """``argv`` run on one CPU, where ``taskset`` and that CPU exist."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (all its threads, live or ended)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def pin_tree(pid: int, cpu: int) -> None:
    """Pins a running process and its children (all threads) to one CPU; new children of
    ``pid`` inherit it."""
    if not shutil.which("taskset") or (os.cpu_count() or 1) <= cpu:
        return
    for p in [pid, *children(pid)]:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(p)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Polls ``url`` until it answers 200, the process dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# a cell is disturbed when other processes used more than this much of a CPU while it ran
DISTURBED = 0.10


class Others:
    """CPU time used by processes that are not ours, between two looks.

    Ours are this process, the roots added (PostgreSQL's postmaster) and all their descendants;
    kernel threads are not counted (they do our loopback networking too). On a shared 2-core
    machine another session's test run spoils throughput and wall time, so every cell records
    how much of a CPU others used while it ran, and the report can leave disturbed cells out.
    """

    def __init__(self) -> None:
        self.roots = {os.getpid()}

    def add_root(self, pid: int) -> None:
        self.roots.add(pid)

    def look(self) -> tuple[float, dict[int, int]]:
        table: dict[int, tuple[int, int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    rest = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
        foreign: dict[int, int] = {}
        for pid, (ppid, ticks) in table.items():
            if pid == 2 or ppid == 2:
                continue  # kernel threads
            p, seen = pid, 0
            while p > 1 and p not in self.roots and seen < 64:
                p, seen = table.get(p, (0, 0))[0], seen + 1
            if p not in self.roots:
                foreign[pid] = ticks
        return time.monotonic(), foreign

    @staticmethod
    def busiest(a: tuple[float, dict[int, int]], b: tuple[float, dict[int, int]]) -> str:
        """The name of the other process that used the most CPU between two looks."""
        used = {pid: t - a[1].get(pid, 0) for pid, t in b[1].items()}
        if not used or max(used.values()) <= 0:
            return ""
        pid = max(used, key=lambda p: used[p])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
        except OSError:
            return f"pid {pid}"

    def wait_quiet(self, threshold: float, max_wait: float, window: float = 0.25) -> float:
        """Waits (at most ``max_wait`` s) until others use at most ``threshold`` of a CPU over
        a ``window``; returns the seconds waited."""
        t0 = time.monotonic()
        a = self.look()
        while time.monotonic() - t0 < max_wait:
            time.sleep(window)
            b = self.look()
            if self.load(a, b) <= threshold:
                break
            a = b
        return time.monotonic() - t0

    @staticmethod
    def load(a: tuple[float, dict[int, int]], b: tuple[float, dict[int, int]]) -> float:
        """CPUs' worth of others' work between two looks (0.5 = half a CPU on average)."""
        ticks = sum(t - a[1].get(pid, 0) for pid, t in b[1].items() if t >= a[1].get(pid, 0))
        return ticks / TICKS / max(b[0] - a[0], 1e-3)
