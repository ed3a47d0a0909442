"""One benchmark variant in its own process, driven in-process over a line-based JSON protocol.

``python -m bench.worker VARIANT ROUTE...`` imports the variant's app, starts its lifespan,
checks each route once and answers ``{"ok": ..., "routes": {route: problem-or-""}}``. Then it
reads one command per line on stdin and answers one JSON line on its protocol channel (the
original stdout; anything the app prints goes to stderr):

- ``{"cmd": "cell", "route": R, "n": N}``: N requests, C=1; process CPU and wall time.
- ``{"cmd": "memory", "route": R, "checkpoints": [...], "max_seconds": S}``: RSS at checkpoints.
- ``{"cmd": "tracemalloc", "route": R, "n": N}``: memory retained and peak per request.
- ``{"cmd": "profile", "route": R, "n": N, "out": PATH}``: a pyinstrument text profile.
- ``{"cmd": "quit"}``: shuts the lifespan down and exits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
from typing import Any, TextIO

from bench import apps, common
from bench.asgi import Driver

PAGE = os.sysconf("SC_PAGE_SIZE")


def short(path: str) -> str:
    """A source location without the site-packages or checkout prefix."""
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Worker:
    def __init__(self, driver: Driver, out: TextIO) -> None:
        self.driver = driver
        self.out = out

    def reply(self, msg: dict[str, Any]) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    async def cell(self, route: str, n: int) -> dict[str, Any]:
        request = self.driver.request
        errors = 0
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            status, _ = await request(route)
            if status != 200:
                errors += 1
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return {"n": n, "cpu": cpu, "wall": wall, "errors": errors}

    async def memory(
        self, route: str, checkpoints: list[int], max_seconds: float
    ) -> dict[str, Any]:
        request = self.driver.request
        deadline = time.monotonic() + max_seconds
        t0 = time.perf_counter()
        c0 = time.process_time()
        done = 0
        points = []
        errors = 0
        stopped_early = False
        for target in sorted(checkpoints):
            while done < target:
                batch = min(target - done, 1000)
                for _ in range(batch):
                    status, _ = await request(route)
                    if status != 200:
                        errors += 1
                done += batch
                if time.monotonic() > deadline:
                    stopped_early = True
                    break
            gc.collect()
            points.append(
                {
                    "requests": done,
                    "rss": rss_bytes(),
                    "wall": time.perf_counter() - t0,
                    "cpu": time.process_time() - c0,
                }
            )
            if stopped_early:
                break
        return {"points": points, "errors": errors, "stopped_early": stopped_early}

    async def tracemalloc(self, route: str, n: int) -> dict[str, Any]:
        request = self.driver.request
        for _ in range(200):  # warm caches before tracing
            await request(route)
        gc.collect()
        tracemalloc.start(10)
        try:
            # peak while one request runs, above what was live before it
            peaks = []
            for _ in range(20):
                gc.collect()
                base, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                await request(route)
                _, peak = tracemalloc.get_traced_memory()
                peaks.append(peak - base)
            gc.collect()
            before = tracemalloc.take_snapshot()
            blocks0 = sys.getallocatedblocks()
            for _ in range(n):
                await request(route)
            gc.collect()
            blocks1 = sys.getallocatedblocks()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        own = [tracemalloc.Filter(False, tracemalloc.__file__)]  # the snapshots' own memory
        stats = after.filter_traces(own).compare_to(before.filter_traces(own), "lineno")
        grown = sum(s.size_diff for s in stats)
        count = sum(s.count_diff for s in stats)
        top = [
            {
                "where": short(str(s.traceback[0])),
                "size_diff": s.size_diff,
                "count_diff": s.count_diff,
            }
            for s in sorted(stats, key=lambda s: -s.size_diff)[:5]
            if s.size_diff > 0
        ]
        peaks.sort()
        return {
            "n": n,
            "retained_bytes_per_request": grown / n,
            "retained_blocks_per_request": count / n,
            "allocated_blocks_delta_per_request": (blocks1 - blocks0) / n,
            "peak_bytes_per_request": peaks[len(peaks) // 2],
            "top_growth": top,
        }

    async def profile(self, route: str, n: int, out: str) -> dict[str, Any]:
        from pyinstrument import Profiler

        request = self.driver.request
        profiler = Profiler(interval=0.0002, async_mode="enabled")
        profiler.start()
        for _ in range(n):
            await request(route)
        profiler.stop()
        with open(out, "w") as f:
            f.write(profiler.output_text(unicode=True, color=False, short_mode=True))
        return {"out": out}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            msg = json.loads(line)
            cmd = msg.pop("cmd")
            if cmd == "quit":
                return
            try:
                handler = getattr(self, cmd)
                limit = float(msg.pop("timeout", 600))
                self.reply({"ok": True, **await asyncio.wait_for(handler(**msg), limit)})
            except Exception as exc:
                self.reply({"ok": False, "reason": f"{type(exc).__name__}: {exc}"})


async def main(variant: str, routes: list[str], out: TextIO) -> None:
    module, why = apps.load(variant)
    if module is None:
        out.write(json.dumps({"ok": False, "reason": why}) + "\n")
        out.flush()
        return
    driver = Driver(module.app)
    try:
        await driver.start()
    except Exception as exc:
        out.write(json.dumps({"ok": False, "reason": f"lifespan: {exc}"}) + "\n")
        out.flush()
        return
    try:
        problems = {r: await driver.check(r, common.EXPECTED[r]) for r in routes}
        worker = Worker(driver, out)
        worker.reply({"ok": True, "routes": problems, "pid": os.getpid()})
        await worker.serve()
    finally:
        await driver.stop()


def run() -> None:
    variant, *routes = sys.argv[1:]
    # keep the protocol channel to ourselves: whatever the app prints goes to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main(variant, routes, out))


if __name__ == "__main__":
    run()
