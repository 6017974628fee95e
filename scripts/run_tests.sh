#!/usr/bin/env bash
# The test suite: sets up the host if needed, then runs the unit, host and gpu tiers (gpu tests skip without CUDA).
# Extra arguments go to pytest. With FISEDIT_PYTHON set (the python of another ComfyUI's environment, e.g. one made by
# scripts/setup_upstream_host.sh), nothing is set up and that python runs the tests against COMFYUI_PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${FISEDIT_PYTHON:-}" ]; then
    [ -n "${COMFYUI_PATH:-}" ] || { echo "FISEDIT_PYTHON needs COMFYUI_PATH: the ComfyUI tree of that environment" >&2; exit 2; }
    exec "$FISEDIT_PYTHON" -m pytest "$@"
fi
bash "$ROOT/scripts/setup_host.sh"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
