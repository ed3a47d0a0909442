"""Scenario 5, slow clients on a stream: a pool of 5, many concurrent clients each reading a
streamed response slowly, against each way of releasing the connection.

Each configuration gets a fresh server (uvicorn on CPU 0, SO_SNDBUF pinned small) so what one
leaves checked out cannot spoil the next; the clients (CPU 1) read with a small receive buffer.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import apps, common, procs

# (case, configuration) -> (app module, route)
CONFIGS: dict[tuple[str, str], tuple[str, str]] = {
    ("A", "fastapi-default"): ("stream_fastapi", "/a/default"),
    ("A", "fastapi-function"): ("stream_fastapi", "/a/function"),
    ("A", "tether-handler"): ("stream_tether", "/a/handler"),
    ("A", "tether-response"): ("stream_tether", "/a/response"),
    ("B", "fastapi-default"): ("stream_fastapi", "/b/default"),
    ("B", "fastapi-function"): ("stream_fastapi", "/b/function"),
    ("B", "tether-handler"): ("stream_tether", "/b/handler"),
    ("B", "tether-response"): ("stream_tether", "/b/response"),
}
QUICK_CONFIGS = [
    ("A", "fastapi-default"),
    ("A", "tether-handler"),
    ("B", "fastapi-function"),
    ("B", "tether-response"),
]


def summarize(raw: dict[str, Any], acquire_timeout: float) -> dict[str, Any]:
    clients = raw["clients"]
    ok = [c for c in clients if c["status"] == 200 and c["complete"]]
    truncated = [c for c in clients if c["status"] == 200 and not c["complete"]]
    errors = [c for c in clients if c["status"] >= 500]
    other = [c for c in clients if c["status"] not in (200,) and c["status"] < 500]
    s503 = [c for c in errors if c["status"] == 503]
    fail_times = [c["t_status"] for c in errors if c["t_status"] is not None]
    fail_times += [c["t_end"] for c in truncated]
    by_status: dict[str, int] = {}
    for c in clients:
        by_status[str(c["status"])] = by_status.get(str(c["status"]), 0) + 1
    ok_times = [c["t_end"] for c in ok]
    return {
        "clients": len(clients),
        "completed": len(ok),
        "truncated": len(truncated),
        "status_5xx": len(errors),
        "status_503": len(s503),
        "status_503_retry_after_in_time": sum(
            1
            for c in s503
            if c["retry_after"] is not None
            and c["t_status"] is not None
            and c["t_status"] <= acquire_timeout + 1.0
        ),
        "other_failures": len(other),
        "by_status": by_status,
        "time_to_fail_median_s": statistics.median(fail_times) if fail_times else None,
        "time_to_fail_max_s": max(fail_times) if fail_times else None,
        "completed_time_median_s": statistics.median(ok_times) if ok_times else None,
        "wall_s": raw["wall"],
        "pg_max_busy": raw["pg"].get("max_busy"),
        "pg_max_connections": raw["pg"].get("max_total"),
        "pg_left_busy": raw["pg"].get("left_busy"),
        "client_errors": sorted({c["error"] for c in clients if c["error"]})[:5],
    }


def run(
    env: dict[str, str],
    logdir: Path,
    dsn: str,
    *,
    configs: list[tuple[str, str]],
    clients: int,
    body_bytes: int,
    rate: float,
    acquire_timeout: float,
    sndbuf: int,
    rcvbuf: int,
    others: procs.Others | None = None,
    log: Any = print,
) -> dict[str, Any]:
    others = others or procs.Others()
    env = {
        **env,
        "BENCH_ACQUIRE_TIMEOUT": str(acquire_timeout),
        "BENCH_STREAM_BYTES": str(body_bytes),
    }
    stream_seconds = body_bytes / rate
    deadline = acquire_timeout + 4 * stream_seconds + 10
    runs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for case, name in configs:
        module, route = CONFIGS[(case, name)]
        key = f"{case} {name}"
        mod, why = apps.load_module(module)
        if mod is None:
            skipped[key] = why
            log(f"  skip {key}: {why}")
            continue
        port = procs.free_port()
        logfile = open(logdir / f"stream-{case}-{name}.log", "ab")
        server = subprocess.Popen(
            procs.pinned(
                procs.SERVER_CPU,
                procs.python(
                    "-m",
                    "bench.serve",
                    f"bench.apps.{module}:app",
                    str(port),
                    "--sndbuf",
                    str(sndbuf),
                ),
            ),  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            env=env,
            cwd=procs.ROOT,
            preexec_fn=procs.die_with_parent,
        )
        try:
            if not procs.wait_http(f"http://127.0.0.1:{port}/none", 30, server):
                skipped[key] = f"server did not start (see {logfile.name})"
                log(f"  skip {key}: {skipped[key]}")
                continue
            argv = procs.python(
                "-m", "bench.slowclient", str(port), route,
                "--clients", str(clients),
                "--rate", str(rate),
                "--rcvbuf", str(rcvbuf),
                "--expect-bytes", str(body_bytes),
                "--deadline", str(deadline),
                "--dsn", dsn,
                "--app-name", common.STREAM_APP_NAME,
            )  # fmt: skip
            t0 = time.monotonic()
            before = others.look()
            proc = subprocess.run(
                procs.pinned(procs.LOAD_CPU, argv),
                capture_output=True,
                text=True,
                timeout=deadline + 60,
                env=env,
                cwd=procs.ROOT,
                preexec_fn=procs.die_with_parent,
                check=False,
            )
            if proc.returncode != 0:
                skipped[key] = f"slow clients failed: {proc.stderr[-500:]}"
                log(f"  {key}: {skipped[key]}")
                continue
            res = summarize(json.loads(proc.stdout), acquire_timeout)
            res["others"] = procs.Others.load(before, others.look())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as r:
                    app_stats = json.loads(r.read())
                res["app_held_max"] = app_stats["max"]
                res["app_held_after"] = app_stats["now"]
            except (OSError, ValueError) as exc:
                res["app_stats_error"] = str(exc)
            runs[key] = res
            log(
                f"  {key:22} {res['completed']:3} ok {res['truncated']:3} truncated "
                f"{res['status_5xx']:3} 5xx  pg busy max {res['pg_max_busy']} "
                f"left {res['pg_left_busy']}  ({time.monotonic() - t0:.1f} s)"
            )
        finally:
            procs.stop(server)
            logfile.close()
    return {
        "clients": clients,
        "body_bytes": body_bytes,
        "rate_bytes_per_s": rate,
        "acquire_timeout_s": acquire_timeout,
        "pool_size": common.STREAM_POOL_SIZE,
        "sndbuf": sndbuf,
        "rcvbuf": rcvbuf,
        "runs": runs,
        "skipped": skipped,
    }
