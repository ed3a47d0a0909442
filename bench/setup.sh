#!/usr/bin/env bash
# Creates the benchmark venv .venv-bench: the project with its dev extras, plus the peer
# libraries (installed here only, never in the project's own venv), matplotlib and pyinstrument.
# wrk and the servers come from `bash scripts/system-deps.sh` (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
VENV=.venv-bench
PIP_FLAGS=(--disable-pip-version-check -q)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  # keep the venv out of git whatever the top-level .gitignore says
  echo '*' > "$VENV/.gitignore"
fi
"$VENV/bin/pip" install "${PIP_FLAGS[@]}" --upgrade pip
PEERS=(dishka svcs wireup that-depends)
TOOLS=(matplotlib pyinstrument)
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f README.md ]; then
  rm -f "$site/tether-src.pth"
  "$VENV/bin/pip" install "${PIP_FLAGS[@]}" -e '.[dev]' "${PEERS[@]}" "${TOOLS[@]}"
else
  # The project cannot be built without its README (pyproject names it): install the
  # dependencies of '.[dev]' and put src/ on the path instead.
  echo "bench/setup.sh: README.md missing, installing tether's dependencies and src/ via a .pth" >&2
  DEPS=$("$VENV/bin/python" - <<'PYEOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = p["optional-dependencies"]
seen, out = set(), list(p["dependencies"])
def expand(name):
    if name in seen:
        return
    seen.add(name)
    for req in extras[name]:
        m = re.match(r"tether\[([^\]]+)\]", req)
        if m:
            for e in m.group(1).split(","):
                expand(e.strip())
        else:
            out.append(req)
expand("dev")
print("\n".join(out))
PYEOF
)
  mapfile -t DEPS_ARR <<<"$DEPS"
  "$VENV/bin/pip" install "${PIP_FLAGS[@]}" "${DEPS_ARR[@]}" "${PEERS[@]}" "${TOOLS[@]}"
  echo "$PWD/src" > "$site/tether-src.pth"
fi
if ! command -v wrk >/dev/null 2>&1; then
  echo "bench/setup.sh: wrk is missing; run 'bash scripts/system-deps.sh' (or apt-get install -y wrk)" >&2
fi
touch "$VENV/.installed"
