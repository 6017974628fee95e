#!/usr/bin/env bash
# The main job: sets up the host and runs the example edit workflow in a real ComfyUI, headless, on the built-in toy
# model (toyworld/weights, trained for it): generate + capture + store, then edit the prompt with an automatic mask,
# the sparse sampler and FISEditDecode, next to a stock regenerate; prints a short report. Outputs land in out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
OUT="${FISEDIT_DEMO_OUT:-$ROOT/out/demo}"
"$ROOT/.venv/bin/python" "$ROOT/scripts/run_workflow.py" "$ROOT/workflows/edit_auto_toy_api.json" \
    --out "$OUT" --summary "$OUT/summary.json"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo_report.py" "$OUT/summary.json"
