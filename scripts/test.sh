#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then runs the fast test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
