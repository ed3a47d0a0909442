"""`tether check` and `tether graph`: look at a Lifecycle from the command line.

tether graph myapp.main:lc      # resources, scopes, dependencies, in opening order
tether check myapp.main:lc      # open the app scope, run every check, close; exit 1 if any fails
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from . import _graph
from ._errors import TetherError, describe
from ._lifecycle import Lifecycle

__all__ = ["main"]


def load(target: str) -> Lifecycle:
    """Import ``module:attribute`` and return the Lifecycle it names."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        msg = f"{target!r} is not of the form module:attribute (for example myapp.main:lc)."
        raise SystemExit(msg)
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"Cannot import {module_name!r}: {describe(exc)}."
        raise SystemExit(msg) from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            msg = f"{module_name!r} has no attribute {attr!r}."
            raise SystemExit(msg)
    if not isinstance(obj, Lifecycle):
        msg = f"{target!r} is a {type(obj).__name__}, not a tether.Lifecycle: name the Lifecycle."
        raise SystemExit(msg)
    return obj


def graph(lc: Lifecycle, *, as_json: bool) -> int:
    lc.validate()
    app = _graph.app_order(lc._resources, lc._overrides)
    rows = [
        {"name": r.name, "scope": r.scope, "depends_on": [d.name for d in r.deps]}
        for r in [*app, *(r for r in lc._resources.values() if r.scope == "request")]
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        deps = ", ".join(row["depends_on"]) or "-"
        print(f"{row['scope']:8} {row['name']:24} <- {deps}")
    return 0


async def _check(lc: Lifecycle) -> dict[str, Any]:
    async with lc.run():
        report = await lc.health()
    return report.as_dict()


def check(lc: Lifecycle, *, as_json: bool) -> int:
    try:
        report = anyio.run(_check, lc)
    except TetherError as exc:
        print(f"tether: {describe(exc)}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for name, result in report["checks"].items():
            error = f"  {result['error']}" if "error" in result else ""
            print(f"{result['status']:8} {name:24} {result['latency_ms']:8.1f} ms{error}")
        print(report["status"])
    return 0 if report["status"] == "ok" else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("graph", "print the resources in opening order with their dependencies"),
        ("check", "open the app scope, run every check, close it; exit 1 if one fails"),
    ]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("target", help="module:attribute naming a tether.Lifecycle")
        cmd.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    lc = load(args.target)
    if args.command == "graph":
        return graph(lc, as_json=args.json)
    return check(lc, as_json=args.json)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
