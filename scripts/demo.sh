#!/usr/bin/env bash
# The main job: sets itself up on a fresh machine, then runs the embedded demo (`kp-rl demo`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/kp-rl demo "$@"
