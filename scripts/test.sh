#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs them.
#   bash scripts/test.sh [pytest arguments]
# - headless Chromium for the report page test (tests/test_report.py), from the system's
#   package manager when it is missing (.ci/install-chromium.sh: apt-get, as root or via sudo);
# - a virtualenv .venv with twist and its test extras (pip install -e '.[test]');
# - pytest -q.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    bash .ci/install-chromium.sh
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
