"""Over HTTP: each variant under uvicorn (uvloop + httptools) pinned to CPU 0, wrk pinned to CPU 1
(with PostgreSQL), short runs interleaved across variants, throughput and p50/p99 latency.

All servers start first and wait idle (an idle server costs no CPU); then each round runs one wrk
run per (route, variant), the variants' order rotated each round. Beside wrk's figures the
server's own CPU time per request is read from /proc, the steadier figure.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import apps, common, procs

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """The figures of ``wrk --latency`` output."""
    res: dict[str, Any] = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return res


class Server:
    def __init__(self, variant: str, env: dict[str, str], log: Path, sndbuf: int = 0) -> None:
        self.variant = variant
        self.port = procs.free_port()
        self._log = open(log, "ab")
        self._gc_file = log.with_suffix(".gc.json")
        self._gc_seq = 0
        argv = procs.python(
            "-m",
            "bench.serve",
            apps.app_path(variant),
            str(self.port),
            "--gc-file",
            str(self._gc_file),
        )
        if sndbuf:
            argv += ["--sndbuf", str(sndbuf)]
        self.proc = subprocess.Popen(
            procs.pinned(procs.SERVER_CPU, argv),
            stdin=subprocess.PIPE,
            text=True,
            stdout=self._log,
            stderr=self._log,
            env=env,
            cwd=procs.ROOT,
            preexec_fn=procs.die_with_parent,
        )

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.port}{route}"

    def ready(self, timeout: float = 30.0) -> bool:
        return procs.wait_http(self.url("/none"), timeout, self.proc)

    def check(self, route: str) -> str:
        try:
            with urllib.request.urlopen(self.url(route), timeout=10) as r:
                body = json.loads(r.read())
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        want = common.EXPECTED[route]
        return "" if body == want else f"answered {body!r}, expected {want!r}"

    def warm(self, route: str, n: int) -> None:
        """``n`` requests on one keep-alive connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            for _ in range(n):
                conn.request("GET", route)
                conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    def cpu(self) -> float:
        return procs.cpu_seconds(self.proc.pid)

    def gc(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The server's garbage-collector counts and seconds so far (None if it does not say)."""
        self._gc_seq += 1
        seq = str(self._gc_seq)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(seq + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = json.loads(self._gc_file.read_text())
            except (OSError, ValueError):
                got = {}
            if got.get("seq") == seq:
                return got  # type: ignore[no-any-return]
            time.sleep(0.005)
        return None

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        procs.stop(self.proc)
        self._log.close()


def wrk(url: str, seconds: int, connections: int) -> tuple[dict[str, Any], str]:
    argv = procs.pinned(
        procs.LOAD_CPU,
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", url],
    )
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        preexec_fn=procs.die_with_parent,
        check=False,
    )
    return parse_wrk(proc.stdout), proc.stdout + proc.stderr


def measure(
    server: Server, route: str, seconds: int, connections: int, others: procs.Others
) -> dict[str, Any] | None:
    """One wrk run, with the server's CPU time and the others' load while it ran."""
    gc0 = server.gc()
    cpu0 = server.cpu()
    before = others.look()
    res, _ = wrk(server.url(route), seconds, connections)
    after = others.look()
    cpu1 = server.cpu()
    gc1 = server.gc()
    if "requests" not in res:
        return None
    n = max(res["requests"], 1)
    res["server_cpu_us"] = (cpu1 - cpu0) / n * 1e6
    if gc0 is not None and gc1 is not None:
        res["server_gc_us"] = (gc1["seconds"] - gc0["seconds"]) / n * 1e6
        res["gc_per_1k"] = [
            (b - a) / n * 1000 for a, b in zip(gc0["collections"], gc1["collections"], strict=True)
        ]
    res["others"] = procs.Others.load(before, after)
    if res["others"] > procs.DISTURBED:
        res["others_busiest"] = procs.Others.busiest(before, after)
    return res


def run(
    variants: list[str],
    routes: list[str],
    env: dict[str, str],
    logdir: Path,
    *,
    seconds: int,
    rounds: int,
    connections: int,
    budget_seconds: float,
    retry_seconds: float = 0.0,
    others: procs.Others | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Up to ``rounds`` rounds while they fit in ``budget_seconds`` (at least one). A run
    that other processes disturbed is run once more after waiting for the machine to be
    quiet, while the ``retry_seconds`` spent on that last."""
    others = others or procs.Others()
    retry_left = retry_seconds
    retried = 0
    if not shutil.which("wrk"):
        return {"error": "wrk is not installed (bash scripts/system-deps.sh)"}
    servers: dict[str, Server] = {}
    skipped: dict[str, str] = {}
    problems: dict[str, dict[str, str]] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    t0 = time.monotonic()
    try:
        for v in variants:
            module, why = apps.load(v)
            if module is None:
                skipped[v] = why
                continue
            servers[v] = Server(v, env, logdir / f"server-{v}.log")
        for v in list(servers):
            if not servers[v].ready():
                skipped[v] = f"server did not start (see {logdir / f'server-{v}.log'})"
                servers.pop(v).close()
                continue
            problems[v] = {r: servers[v].check(r) for r in routes}
            samples[v] = {}
        for v, why in skipped.items():
            log(f"  skip {v}: {why}")
        for v, per_route in problems.items():
            for r, why in per_route.items():
                if why:
                    log(f"  skip {v} {r}: {why}")
        cells = [(r, v) for r in routes for v in servers if not problems[v][r]]
        for r, v in cells:  # warm-up: every server's code paths and pools
            servers[v].warm(r, 200)
        log(f"  {len(servers)} servers ready and warm in {time.monotonic() - t0:.1f} s")
        order0 = list(servers)
        done = 0
        t_rounds = time.monotonic()
        for rnd in range(rounds):
            per_round = (time.monotonic() - t_rounds) / rnd if rnd else 0.0
            if rnd and time.monotonic() - t_rounds + per_round > budget_seconds:
                break
            shift = rnd % len(order0)
            order = order0[shift:] + order0[:shift]
            for r in routes:
                for v in order:
                    if (r, v) not in cells:
                        continue
                    res = measure(servers[v], r, seconds, connections, others)
                    if res is not None and res["others"] > procs.DISTURBED and retry_left > 0:
                        t_retry = time.monotonic()
                        others.wait_quiet(procs.DISTURBED, min(2.0, retry_left))
                        again = measure(servers[v], r, seconds, connections, others)
                        retry_left -= time.monotonic() - t_retry
                        retried += 1
                        if again is not None and again["others"] < res["others"]:
                            again["retried_from_others"] = res["others"]
                            res = again
                    if res is None:
                        log(f"  wrk failed for {v} {r}")
                        continue
                    res["round"] = rnd
                    samples[v].setdefault(r, []).append(res)
            done += 1
        log(
            f"  {done} rounds in {time.monotonic() - t_rounds:.1f} s"
            + (f" ({retried} disturbed runs retried)" if retried else "")
        )
    finally:
        for s in servers.values():
            s.close()
    return {
        "skipped": skipped,
        "route_problems": {v: {r: p for r, p in pr.items() if p} for v, pr in problems.items()},
        "seconds": seconds,
        "connections": connections,
        "rounds": done,
        "samples": samples,
    }
