#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (Debian / Ubuntu package), installed only when missing.
# Needs root (CI containers run as root) or sudo.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-chromium: the report page test needs headless Chromium; run this as root, or install" \
         "Chromium yourself (or set TWIST_SKIP_BROWSER=1 to skip that test, reported as skipped)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no apt-get here; install Chromium with your package manager" \
         "(or set TWIST_SKIP_BROWSER=1 to skip the report page test, reported as skipped)" >&2
    exit 1
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
