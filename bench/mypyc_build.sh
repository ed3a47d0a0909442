#!/usr/bin/env bash
# The ninth round of docs/benchmarks.md: builds a copy of tether with its request path compiled
# by mypyc, to measure what compiling would buy. An experiment, not a build of tether: the copy
# fails tests that need frames (acquirer stacks), weak references to units, or the guard proxy.
#
#   bash bench/mypyc_build.sh /tmp/tether-mypyc
#   PYTHONPATH=/tmp/tether-mypyc .venv-bench/bin/python -m bench.run --only \
#     fastapi-manual,handler-floor,features-floor,tether --scenario inproc --routes /none,/null --no-report
set -euo pipefail
out="${1:?usage: bash bench/mypyc_build.sh OUTDIR}"
root="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$out" && mkdir -p "$out"
cp -r "$root/src/tether" "$out/"
# mypyc's native classes take no weak references: hold the unit in the context strongly.
python3 - "$out/tether/fastapi.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
holder = '''class _Strong:
    __slots__ = ("unit",)

    def __init__(self, unit: Any) -> None:
        self.unit = unit

    def __call__(self) -> Any:
        return self.unit


_ref = _Strong
'''
assert "_ref = weakref.ref\n" in text
open(path, "w").write(text.replace("_ref = weakref.ref\n", holder, 1))
PY
# _lifecycle.py is left interpreted: mypyc does not compile its Protocol's overloads.
cd "$out"
"$root/.venv/bin/mypyc" tether/_stats.py tether/_resource.py tether/_scope.py tether/fastapi.py \
  tether/_graph.py >build.log 2>&1 || { tail -20 build.log; exit 1; }
ls tether/*.so
