"""A/B two versions of the tether library in one process: is a change to tether faster?

    python -m bench.libab HEAD /none,/null           # the working tree against HEAD
    python -m bench.libab HEAD~3 /null --rounds 40   # against an older commit

``python -m bench.run`` compares variants, each in a process of its own; that cannot resolve
a change of a few tenths of a µs in tether itself, as this machine drifts by more than that
between processes. Here tether at *REV* (``git archive`` of ``src/tether``, imported as
``tether_a``) and the working tree's ``src/tether`` (imported as ``tether_b``) serve the
benchmark's tether app (``bench/apps/tether_app.py``, one copy bound to each) in the same
process, through the in-process driver, interleaved round by round. The output is each
route's median CPU µs per request and the paired differences (candidate minus base, round by
round) as median and p25..p75. Two copies of the same code measure within about ±0.2 µs.

``/pg`` needs ``BENCH_PG_DSN`` (a running PostgreSQL); the SQLite file is made in a temporary
directory unless ``BENCH_SQLITE_PATH`` names one. ``/wait`` (alone) serves an app of its own: one
resource whose release waits a turn of the loop, as a pool's does, so the shielded close is
measured without a database's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from bench import common
from bench.asgi import Driver

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "apps" / "tether_app.py"


def _packages(rev: str, into: Path) -> None:
    """``tether_a``: src/tether at *rev*; ``tether_b``: the working tree's."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src/tether"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "src" / "tether").rename(into / "tether_a")
    shutil.copytree(ROOT / "src" / "tether", into / "tether_b")


def _app(package: str) -> Any:
    """The benchmark's tether app, bound to *package* (its imports of tether are relative)."""
    source = APP.read_text()
    if "import tether\n" not in source:
        sys.exit(f"{APP} no longer has the line 'import tether': update bench/libab.py")
    module = types.ModuleType(f"tether_app_{package}")
    module.__file__ = str(APP)
    code = compile(source.replace("import tether\n", f"import {package} as tether\n"), APP, "exec")
    exec(code, module.__dict__)
    return module.app


def _waiting_app(package: str) -> Any:
    """``/wait``: one request resource whose release waits one turn of the loop, as a pool's
    does when it hands the connection back (asyncpg's goes through a task of its own): the
    shielded close, without a database's noise."""
    tether = importlib.import_module(package)
    from fastapi import Depends, FastAPI

    lc = tether.Lifecycle()

    async def conn() -> Any:
        yield 1
        loop = asyncio.get_running_loop()
        released = loop.create_future()
        loop.call_soon(released.set_result, None)
        await released

    resource = lc.resource(name="conn")(conn)
    app = FastAPI(lifespan=lc.lifespan)

    async def wait(c: int = Depends(resource)) -> dict[str, int]:  # noqa: B008
        return {"c": c}

    app.get("/wait")(wait)
    return app


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    n = len(values)
    return values[n // 4], values[n // 2], values[(3 * n) // 4]


async def _run(routes: list[str], rounds: int, requests: int) -> None:
    drivers = {}
    for package in ("tether_a", "tether_b"):
        app = _waiting_app(package) if routes == ["/wait"] else _app(package)
        driver = Driver(app)
        await driver.start()
        drivers[package] = driver
    cells = [(package, route) for route in routes for package in drivers]
    cpu: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    try:
        for k in range(rounds):
            for package, route in cells[k % len(cells) :] + cells[: k % len(cells)]:
                request = drivers[package].request
                for _ in range(200):  # warm up this cell
                    await request(route)
                t0 = time.process_time()
                for _ in range(requests):
                    await request(route)
                cpu[package, route].append((time.process_time() - t0) / requests * 1e6)
    finally:
        for driver in drivers.values():
            await driver.stop()
    print(f"{'route':10s} {'base':>8s} {'candidate':>10s}   paired difference (median, p25..p75)")
    for route in routes:
        base, cand = cpu["tether_a", route], cpu["tether_b", route]
        low, mid, high = _quartiles([b - a for a, b in zip(base, cand, strict=True)])
        print(
            f"{route:10s} {statistics.median(base):8.2f} {statistics.median(cand):10.2f}"
            f"   {mid:+6.2f} µs  ({low:+.2f}..{high:+.2f})"
        )


def main() -> None:
    summary = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.libab", description=summary)
    parser.add_argument("rev", help="the base: a commit, tag or branch")
    parser.add_argument("routes", help="comma-separated routes, e.g. /none,/null")
    parser.add_argument("--rounds", type=int, default=24, help="interleaved rounds (default 24)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per cell and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-libab-") as tmp:
        if not os.environ.get("BENCH_SQLITE_PATH"):
            os.environ["BENCH_SQLITE_PATH"] = str(Path(tmp) / "bench.db")
            common.make_sqlite_db(os.environ["BENCH_SQLITE_PATH"])
        _packages(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        asyncio.run(_run(args.routes.split(","), args.rounds, args.requests))


if __name__ == "__main__":
    main()
