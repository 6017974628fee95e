#!/usr/bin/env bash
# The test suite: sets up the host if needed, then runs the unit, host and gpu tiers (gpu tests skip without CUDA).
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
