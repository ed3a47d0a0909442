#!/usr/bin/env bash
# Installs the Debian packages the integration tests need (redis, pgbouncer) when missing.
set -euo pipefail
# Also Chromium for the dashboard's browser test (driven by Playwright, which never downloads
# a browser of its own here), wrk for the benchmarks, openssl for the httpx TLS tests'
# throwaway certificates, and PostgreSQL should the machine image lack it.
# Instant when everything is present. The services of the packages it installs are never
# left running: tests/servers.py starts throwaway servers on free 127.0.0.1 ports itself,
# and a system redis/pgbouncer/postgresql on the default ports must not be started by the
# install (nor linger after it). Services of packages that were already there are left alone.

# package -> binary it provides
declare -A BINARIES=(
  [redis-server]=redis-server
  [pgbouncer]=pgbouncer
  [wrk]=wrk
  [chromium]=chromium
  [openssl]=openssl
)
# packages that ship a system service
SERVICES=(redis-server pgbouncer postgresql)

installed() { # PKG: is the Debian package installed?
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for pkg in redis-server pgbouncer wrk chromium openssl; do
  # the binary may be outside PATH for a non-login shell (e.g. /usr/sbin): ask dpkg too
  if command -v "${BINARIES[$pkg]}" >/dev/null 2>&1 || installed "$pkg"; then
    continue
  fi
  missing+=("$pkg")
done
# PostgreSQL (initdb, pg_ctl, postgres) normally comes with the machine image; tests/servers.py
# uses the newest /usr/lib/postgresql/*/bin.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  missing+=(postgresql)
fi

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing Debian packages: ${missing[*]}" >&2
  echo "system-deps: not root, so cannot install them; run as root:" >&2
  echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo "  (or run 'sudo bash scripts/system-deps.sh')" >&2
  exit 1
fi

echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive

# Forbid the packages' postinst from starting their services (exit 101 = action not allowed).
# Keep an existing policy-rc.d aside and put it back afterwards.
policy=/usr/sbin/policy-rc.d
policy_backup=""
if [ -e "$policy" ]; then
  policy_backup="$(mktemp)"
  cp -p "$policy" "$policy_backup"
fi
restore_policy() {
  if [ -n "$policy_backup" ]; then
    mv -f "$policy_backup" "$policy"
  else
    rm -f "$policy"
  fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 0755 "$policy"

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Belt and braces: if a service got started anyway (e.g. by systemd), stop it and keep it
# from starting at boot. Failures here are fine (no systemd in containers, service absent).
for svc in "${SERVICES[@]}"; do
  case " ${missing[*]} " in *" $svc "*) ;; *) continue ;; esac
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop "$svc" >/dev/null 2>&1 || true
    systemctl disable "$svc" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$svc" ]; then
    "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
  fi
done

for pkg in "${missing[@]}"; do
  if ! installed "$pkg"; then
    echo "system-deps: $pkg did not install" >&2
    exit 1
  fi
done
echo "system-deps: done" >&2
