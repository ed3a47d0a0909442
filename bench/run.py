"""The benchmark suite: ``python -m bench.run`` (under 10 minutes) or ``--quick`` (under 1 minute).

Scenarios, in this order (``--scenario`` picks some):

- ``inproc``: every variant × route through the in-process ASGI driver: CPU and wall µs/request.
- ``http``: uvicorn + wrk: requests/s, p50/p99, server CPU µs/request.
- ``memory``: RSS over many in-process requests of tether ``/null``; tracemalloc per request.
- ``stream``: slow clients reading a streamed response from a pool of 5 (scenario 5).

Raw data goes to ``bench/results/<time>-<mode>.json``; a full run (all scenarios, all variants)
also rewrites ``docs/benchmarks.md`` and its plots (``--report`` forces it for any run,
``--no-report`` skips it). ``--only tether,fastapi-manual`` limits the variants, ``--routes``
the routes; ``--profile tether:/null`` writes a pyinstrument profile of one route instead.

It runs in ``.venv-bench`` (made by ``bench/setup.sh``, which this creates if missing) and
refuses to run while another benchmark holds its lock: on 2 cores each would spoil the other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-bench"
RESULTS = ROOT / "bench" / "results"
LOCK = Path(tempfile.gettempdir()) / "tether-bench.lock"
SCENARIOS = ("inproc", "http", "memory", "stream")


@dataclasses.dataclass(frozen=True)
class Profile:
    # in-process
    cell_seconds: float
    inproc_budget: float
    inproc_min_rounds: int
    inproc_max_rounds: int
    # over HTTP
    http_routes: tuple[str, ...]
    http_seconds: int
    http_rounds: int
    http_budget: float
    http_retry: float
    http_connections: int
    # memory
    mem_checkpoints: tuple[int, ...]
    mem_seconds: float
    tm_requests: int
    # slow clients
    stream_configs: tuple[tuple[str, str], ...] | None  # None: all
    stream_clients: int
    stream_body: int
    stream_rate: float
    stream_timeout: float


FULL = Profile(
    cell_seconds=0.06,
    inproc_budget=110,
    inproc_min_rounds=5,
    inproc_max_rounds=80,
    http_routes=("/none", "/null", "/pg", "/sqlite", "/graph7"),
    http_seconds=1,
    http_rounds=5,  # the HTTP targets are ratios of medians: five rounds, not four
    http_budget=275,
    http_retry=40,
    http_connections=32,
    mem_checkpoints=(10_000, 100_000, 250_000, 500_000, 750_000, 1_000_000),
    mem_seconds=170,
    tm_requests=2000,
    stream_configs=None,
    stream_clients=100,
    stream_body=256 * 1024,
    stream_rate=128 * 1024,
    stream_timeout=5.0,
)
QUICK = Profile(
    cell_seconds=0.025,
    inproc_budget=5,
    inproc_min_rounds=3,
    inproc_max_rounds=20,
    http_routes=("/null", "/pg"),
    http_seconds=1,
    http_rounds=1,
    http_budget=20,
    http_retry=4,
    http_connections=32,
    mem_checkpoints=(5_000, 30_000),
    mem_seconds=6,
    tm_requests=300,
    stream_configs=(
        ("A", "fastapi-default"),
        ("A", "tether-handler"),
        ("B", "fastapi-function"),
        ("B", "tether-response"),
    ),
    stream_clients=50,
    stream_body=128 * 1024,
    stream_rate=128 * 1024,
    stream_timeout=2.0,
)


def log(msg: str) -> None:
    print(msg, flush=True)


def ensure_venv() -> None:
    """Re-executes under .venv-bench, made (or refreshed, when pyproject.toml is newer than
    its last install) by bench/setup.sh. BENCH_ANY_PYTHON=1 runs in the current interpreter."""
    if os.environ.get("BENCH_ANY_PYTHON"):
        return
    stamp = VENV / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        log("bench: setting up .venv-bench (bench/setup.sh)")
        subprocess.run(["bash", str(ROOT / "bench" / "setup.sh")], check=True)
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    os.execv(
        str(VENV / "bin" / "python"),
        [str(VENV / "bin" / "python"), "-m", "bench.run", *sys.argv[1:]],
    )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "asyncpg", "aiosqlite",
        "dishka", "svcs", "wireup", "that-depends",
    ):  # fmt: skip
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        out["tether"] = rev or "?"
    except OSError:
        pass
    if shutil.which("wrk"):
        v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        out["wrk"] = (v.stdout + v.stderr).split()[1] if (v.stdout + v.stderr).split() else "?"
    return out


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from bench.apps import ON_DEMAND, VARIANTS
    from bench.common import ROUTES

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run, under 1 minute")
    p.add_argument("--only", help=f"comma-separated variants ({', '.join(VARIANTS)})")
    p.add_argument("--scenario", help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    p.add_argument("--routes", help=f"comma-separated routes ({', '.join(ROUTES)})")
    p.add_argument("--report", action="store_true", help="write docs/benchmarks.md for any run")
    p.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--profile", metavar="VARIANT:ROUTE", help="write a pyinstrument profile")
    args = p.parse_args(argv)
    args.variants = [v for v in VARIANTS if v not in ON_DEMAND]
    if args.only:
        args.variants = [v.strip() for v in args.only.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.scenarios = list(SCENARIOS)
    if args.scenario:
        args.scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
        unknown = [s for s in args.scenarios if s not in SCENARIOS]
        if unknown:
            p.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    args.route_list = list(ROUTES)
    if args.routes:
        args.route_list = [r.strip() for r in args.routes.split(",") if r.strip()]
        unknown = [r for r in args.route_list if r not in ROUTES]
        if unknown:
            p.error(f"unknown routes {unknown}; known: {', '.join(ROUTES)}")
    return args


def memory_phase(
    variants: list[str], env: dict[str, str], logdir: Path, prof: Profile
) -> dict[str, Any]:
    from bench import apps, inproc

    route = "/null"
    out: dict[str, Any] = {"tracemalloc_route": route, "tracemalloc": {}}
    # RSS growth: tether's, or (until it imports) the closest stand-in, named as such
    candidates = [v for v in ("tether", "fastapi-yield", *variants) if v in variants]
    rss_variant = next((v for v in candidates if apps.load(v)[0] is not None), None)
    if rss_variant is None:
        out["rss"] = {"error": "no variant importable"}
    else:
        if rss_variant != "tether":
            log(f"  tether not importable: RSS measured on {rss_variant} instead")
        w, why = inproc.single_worker(rss_variant, route, env, logdir)
        if w is None:
            out["rss"] = {"variant": rss_variant, "error": why}
        else:
            try:
                w.call(cmd="cell", route=route, n=2000)
                res = w.call(
                    cmd="memory",
                    route=route,
                    checkpoints=list(prof.mem_checkpoints),
                    max_seconds=prof.mem_seconds,
                    timeout=prof.mem_seconds + 120,
                )
                out["rss"] = {"variant": rss_variant, "route": route, **res}
                pts = res["points"]
                log(
                    f"  RSS {rss_variant} {route}: {pts[0]['rss'] / 2**20:.1f} MiB after "
                    f"{pts[0]['requests']:,}, {pts[-1]['rss'] / 2**20:.1f} MiB after "
                    f"{pts[-1]['requests']:,}"
                )
            finally:
                w.close()
    for v in [v for v in ("tether", "fastapi-manual", "fastapi-yield") if v in variants]:
        w, why = inproc.single_worker(v, route, env, logdir)
        if w is None:
            out["tracemalloc"][v] = {"error": why}
            continue
        try:
            res = w.call(cmd="tracemalloc", route=route, n=prof.tm_requests, timeout=120)
            res.pop("ok", None)
            out["tracemalloc"][v] = res
            log(
                f"  tracemalloc {v}: peak {res['peak_bytes_per_request'] / 1024:.1f} KiB/request, "
                f"retained {res['retained_bytes_per_request']:+.2f} B/request"
            )
        finally:
            w.close()
    return out


def summary(res: dict[str, Any]) -> None:
    from bench.report import med, routes_in, values, variants_in

    sec = res.get("inproc")
    if sec and sec.get("samples"):
        rs = routes_in(sec)
        log("\nin-process CPU µs/request (median):")
        log("  " + "".join(f"{x:>16}" for x in ["", *rs]))
        for v in variants_in(sec):
            cells = [med(values(sec["samples"][v].get(r), "cpu_us")) for r in rs]
            log("  " + f"{v:>16}" + "".join(f"{c:16.1f}" if c else f"{'–':>16}" for c in cells))
    sec = res.get("http")
    if sec and sec.get("samples"):
        rs = routes_in(sec)
        log("\nHTTP requests/s (median):")
        log("  " + "".join(f"{x:>16}" for x in ["", *rs]))
        for v in variants_in(sec):
            cells = [med(values(sec["samples"][v].get(r), "rps")) for r in rs]
            log("  " + f"{v:>16}" + "".join(f"{c:16.0f}" if c else f"{'–':>16}" for c in cells))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from bench import common, inproc, pg, procs, report, stream, wrkbench

    # SIGTERM unwinds like Ctrl-C, so every server and worker is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    prof = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    lock = open(LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"bench: another benchmark is running (lock {LOCK}); never run two at once")
        return 2

    t0 = time.monotonic()
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    sqlite_path = workdir / "bench.sqlite3"
    common.make_sqlite_db(str(sqlite_path))
    env = {
        **os.environ,
        # The caller's PYTHONPATH after the checkout: a build of tether to measure, say.
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "BENCH_SQLITE_PATH": str(sqlite_path),
        "BENCH_PG_DSN": "",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    routes = args.route_list
    needs_pg = "/pg" in routes or "stream" in args.scenarios or args.profile
    postgres, pg_why = (None, "")
    others = procs.Others()
    if needs_pg:
        postgres, pg_why = pg.start(others=others)
        if postgres is None:
            log(f"bench: no PostgreSQL, /pg and the stream scenario are skipped: {pg_why}")
            routes = [r for r in routes if r != "/pg"]
        else:
            env["BENCH_PG_DSN"] = postgres.dsn
    res: dict[str, Any] = {
        "meta": {
            "mode": mode,
            "started": started.isoformat(),
            "argv": argv,
            "variants": args.variants,
            "routes": routes,
            "scenarios": args.scenarios,
            "cpu": cpu_model(),
            "nproc": os.cpu_count(),
            "versions": versions(),
            "profile": dataclasses.asdict(prof),
            "postgres": pg_why or "tests/servers.py Postgres, pinned to CPU 1",
        }
    }
    if postgres is not None:
        with contextlib.suppress(Exception):
            res["meta"]["versions"]["postgresql"] = postgres.sql("SHOW server_version")[0][0]
    ok = True
    try:
        if args.profile:
            return profile_one(args.profile, env, workdir)
        if "inproc" in args.scenarios:
            log(f"[inproc] {len(args.variants)} variants × {len(routes)} routes")
            res["inproc"] = inproc.run(
                args.variants,
                routes,
                env,
                workdir,
                cell_seconds=prof.cell_seconds,
                budget_seconds=prof.inproc_budget,
                min_rounds=prof.inproc_min_rounds,
                max_rounds=prof.inproc_max_rounds,
                others=others,
                log=log,
            )
            res["inproc"]["cell_seconds"] = prof.cell_seconds
        if "http" in args.scenarios:
            http_routes = [r for r in prof.http_routes if r in routes]
            log(f"[http] {len(args.variants)} variants × {len(http_routes)} routes")
            res["http"] = wrkbench.run(
                args.variants,
                http_routes,
                env,
                workdir,
                seconds=prof.http_seconds,
                rounds=prof.http_rounds,
                connections=prof.http_connections,
                budget_seconds=prof.http_budget,
                retry_seconds=prof.http_retry,
                others=others,
                log=log,
            )
        if "memory" in args.scenarios:
            log("[memory]")
            res["memory"] = memory_phase(args.variants, env, workdir, prof)
        if "stream" in args.scenarios:
            log("[stream]")
            if postgres is None:
                res["stream"] = {"error": f"no PostgreSQL: {pg_why}"}
            else:
                configs = list(prof.stream_configs or stream.CONFIGS)
                if args.only:  # FastAPI's configurations belong to fastapi-yield
                    owner = {"fastapi": "fastapi-yield", "tether": "tether"}
                    configs = [c for c in configs if owner[c[1].split("-")[0]] in args.variants]
                res["stream"] = stream.run(
                    env,
                    workdir,
                    postgres.dsn,
                    configs=configs,
                    clients=prof.stream_clients,
                    body_bytes=prof.stream_body,
                    rate=prof.stream_rate,
                    acquire_timeout=prof.stream_timeout,
                    sndbuf=16 * 1024,
                    rcvbuf=4096,
                    others=others,
                    log=log,
                )
    except Exception:
        ok = False
        raise
    finally:
        if postgres is not None:
            postgres.stop()
        duration = time.monotonic() - t0
        res["meta"]["duration_s"] = duration
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        partial = args.only or args.scenario or args.routes
        out = RESULTS / f"{stamp}-{mode}{'-partial' if partial else ''}.json"
        if not args.profile:
            out.write_text(json.dumps(res, indent=1))
            log(f"\nresults: {out.relative_to(ROOT)} ({duration:.0f} s)")
        if ok and not args.profile:
            summary(res)
            full_run = mode == "full" and not partial
            if not args.no_report and (args.report or full_run):
                log(f"report: {report.write(out).relative_to(ROOT)}")
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return 0


def profile_one(spec: str, env: dict[str, str], workdir: Path) -> int:
    from bench import inproc

    variant, _, route = spec.partition(":")
    w, why = inproc.single_worker(variant, route or "/null", env, workdir)
    if w is None:
        log(f"cannot profile {spec}: {why}")
        return 1
    try:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"profile-{variant}-{(route or '/null').strip('/')}.txt"
        w.call(cmd="cell", route=route or "/null", n=1000)
        w.call(cmd="profile", route=route or "/null", n=5000, out=str(out), timeout=300)
        log(f"profile: {out.relative_to(ROOT)}")
    finally:
        w.close()
    return 0


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        parse_args(sys.argv[1:])  # prints the help and exits, before any set-up
    ensure_venv()
    sys.exit(main(sys.argv[1:]))
