"""Many requests in flight in-process: CPU per request and what the garbage collector costs.

    python -m bench.concurrent tether handler-floor wireup            # /null, 32 in flight
    python -m bench.concurrent tether wireup --route /pg --requests 6000   # needs BENCH_PG_DSN

The in-process scenario of ``python -m bench.run`` sends one request at a time. Under load a
server has many in flight, and objects each request keeps alive while it waits add up to work
for the garbage collector (young-generation collections are triggered by allocations, not by
garbage), which one request at a time never shows. Here each variant is served by the
in-process driver to ``--concurrency`` tasks sending requests back to back, one variant after
another, for ``--repeat`` passes; the output is CPU µs per request, the collector's µs per
request (from ``gc.callbacks``) and collections per 1,000 requests, per generation. Each
variant runs in a process of its own; the passes alternate the variants (A B C A B C).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.apps import VARIANTS, load
from bench.asgi import Driver


async def _measure(variant: str, route: str, concurrency: int, requests: int) -> dict[str, Any]:
    module, why = load(variant)
    if module is None:
        raise SystemExit(f"{variant}: {why}")
    driver = Driver(module.app)
    await driver.start()
    loop = asyncio.get_running_loop()

    async def worker(n: int) -> None:
        for _ in range(n):
            # Each request on a task of its own, as a server serves it.
            await loop.create_task(driver.request(route))

    try:
        await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm up
        spent = [0.0]
        started: list[float] = []

        def timing(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started.append(time.perf_counter())
            else:
                spent[0] += time.perf_counter() - started.pop()

        per_task = max(1, requests // concurrency)
        total = per_task * concurrency
        gc.callbacks.append(timing)
        before = [s["collections"] for s in gc.get_stats()]
        cpu0 = time.process_time()
        await asyncio.gather(*(worker(per_task) for _ in range(concurrency)))
        cpu = time.process_time() - cpu0
        after = [s["collections"] for s in gc.get_stats()]
        gc.callbacks.remove(timing)
    finally:
        await driver.stop()
    return {
        "variant": variant,
        "cpu_us": cpu / total * 1e6,
        "gc_us": spent[0] / total * 1e6,
        "collections_per_1k": [(b - a) / total * 1000 for a, b in zip(before, after, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrent", description=__doc__)
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--route", default="/null")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one variant
    args = parser.parse_args(argv)
    if args.one:
        result = asyncio.run(_measure(args.one, args.route, args.concurrency, args.requests))
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="tether-concurrent-") as tmp:
        if not os.environ.get("BENCH_SQLITE_PATH"):  # the apps' SQLite file, made once
            os.environ["BENCH_SQLITE_PATH"] = str(Path(tmp) / "bench.db")
            common.make_sqlite_db(os.environ["BENCH_SQLITE_PATH"])
        _compare(args)
    return 0


def _compare(args: argparse.Namespace) -> None:
    print(f"{args.route}, {args.concurrency} in flight, {args.requests:,} requests per run")
    header = f"{'variant':16s} {'CPU µs/req':>10s} {'GC µs/req':>10s}"
    print(f"{header}  collections per 1,000 (gen 0, 1, 2)")
    for _ in range(args.repeat):
        for variant in args.variants:
            child = [
                sys.executable,
                "-m",
                "bench.concurrent",
                variant,
                "--one",
                variant,
                "--route",
                args.route,
                "--concurrency",
                str(args.concurrency),
                "--requests",
                str(args.requests),
            ]
            out = subprocess.run(child, capture_output=True, text=True, env=os.environ, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per_gen = ", ".join(f"{c:.1f}" for c in r["collections_per_1k"])
            print(f"{variant:16s} {r['cpu_us']:10.1f} {r['gc_us']:10.2f}  {per_gen}")


if __name__ == "__main__":
    raise SystemExit(main())
