#!/usr/bin/env bash
# Installs the Debian packages the integration tests need (redis, pgbouncer) when missing.
set -euo pipefail
