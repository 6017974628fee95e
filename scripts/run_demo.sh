#!/usr/bin/env bash
# The main job: sets up the host, builds the built-in random-weight SD1.5-structured checkpoint, and runs the example
# edit workflow in a real ComfyUI, headless: generate + capture + store, then edit the prompt with an automatic mask,
# the sparse sampler and FISEditDecode, next to a stock regenerate; prints a short report. Outputs land in out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
MODELS="$ROOT/.cache/models"
CKPT="$MODELS/sd15-small.safetensors"
if [ ! -f "$CKPT" ]; then
    mkdir -p "$MODELS"
    "$ROOT/.venv/bin/python" "$ROOT/scripts/make_test_checkpoint.py" "$CKPT" --arch sd15-small --seed 0
fi
OUT="${FISEDIT_DEMO_OUT:-$ROOT/out/demo}"
"$ROOT/.venv/bin/python" "$ROOT/scripts/run_workflow.py" "$ROOT/workflows/edit_auto_api.json" \
    --models "$MODELS" --out "$OUT" --summary "$OUT/summary.json"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo_report.py" "$OUT/summary.json"
