#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (Debian's package). Needs root (CI containers run as root).
set -euo pipefail
command -v chromium >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
