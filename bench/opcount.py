"""Count the bytecode a request runs, per function: a profile that machine noise cannot move.

    python -m bench.opcount                          # tether:/none against tether:/null
    python -m bench.opcount wrapper-floor:/none wrapper-floor:/null
    python -m bench.opcount tether:/null --top 30    # one route: its busiest functions

CPU time on this machine drifts by 2x in phases; the number of bytecode instructions a request
executes does not. After warming up, one request per route runs under ``sys.settrace`` with
opcode events on, and every instruction is counted against its function. With two routes, the
output is what the second runs more than the first, function by function. At about 10 ns of
CPU per instruction here (37 µs for the 3,654 of FastAPI's `/none`), 100 instructions are
about 1 µs. Instructions are not all alike (a C call counts one), so this points at where the
cost is; `python -m bench.run` measures how much it is.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from typing import Any

from bench.apps import VARIANTS, load
from bench.asgi import Driver

Counts = dict[str, tuple[int, int]]  # function -> (instructions, calls)


def _where(frame: Any) -> str:
    path = frame.f_code.co_filename
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/src/" in path:
        path = path.split("/src/", 1)[1]
    elif "/lib/python3." in path:
        path = path.split("/lib/python3.", 1)[1].split("/", 1)[-1]  # the standard library
    else:
        path = "/".join(path.rsplit("/", 3)[-3:])  # bench/apps/x.py
    return f"{path}:{frame.f_code.co_name}"


async def count(driver: Driver, route: str, warmup: int = 300) -> Counts:
    for _ in range(warmup):
        await driver.request(route)
    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        key = _where(frame)
        if event == "call":
            calls[key] += 1
        elif event == "opcode":
            ops[key] += 1
        return tracer

    sys.settrace(tracer)
    try:
        await driver.request(route)
    finally:
        sys.settrace(None)
    return {key: (ops[key], calls[key]) for key in ops.keys() | calls.keys()}


async def run(specs: list[tuple[str, str]], top: int) -> None:
    drivers: dict[str, Driver] = {}
    results = []
    for variant, route in specs:
        if variant not in drivers:
            module, why = load(variant)
            if module is None:
                raise SystemExit(f"cannot load {variant}: {why}")
            drivers[variant] = Driver(module.app)
            await drivers[variant].start()
        results.append(await count(drivers[variant], route))
    for driver in drivers.values():
        await driver.stop()
    for (variant, route), counts in zip(specs, results, strict=True):
        total = sum(o for o, _ in counts.values())
        print(
            f"{variant}:{route}: {total} instructions, {sum(c for _, c in counts.values())} calls"
        )
    if len(results) == 1:
        rows = sorted(((o, c, k) for k, (o, c) in results[0].items()), reverse=True)[:top]
        for o, c, k in rows:
            print(f"  {o:6d} {c:4d}  {k}")
        return
    first, second = results[0], results[-1]
    print(f"what {specs[-1][0]}:{specs[-1][1]} runs more than {specs[0][0]}:{specs[0][1]}:")
    print("  instr  calls  function")
    diff = []
    for key in first.keys() | second.keys():
        o1, c1 = first.get(key, (0, 0))
        o2, c2 = second.get(key, (0, 0))
        if (o2 - o1, c2 - c1) != (0, 0):
            diff.append((o2 - o1, c2 - c1, key))
    for o, c, k in sorted(diff, reverse=True)[:top]:
        print(f"  {o:+5d} {c:+5d}  {k}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.opcount", description=__doc__.split("\n")[0])
    p.add_argument(
        "specs", nargs="*", metavar="VARIANT:ROUTE", default=["tether:/none", "tether:/null"]
    )
    p.add_argument("--top", type=int, default=25, help="rows to print (default 25)")
    args = p.parse_args(argv)
    specs = []
    for spec in args.specs:
        variant, _, route = spec.partition(":")
        if variant not in VARIANTS or not route.startswith("/"):
            p.error(f"{spec!r}: expected VARIANT:/route, VARIANT one of {', '.join(VARIANTS)}")
        specs.append((variant, route))
    asyncio.run(run(specs, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
