#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package for tests/test_prometheus.py.
# The package's service is not started (the test starts its own Prometheus); idempotent.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus
