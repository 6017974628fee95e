#!/usr/bin/env bash
# The main job: sets up the host, builds the built-in random-weight SD1.5-structured checkpoint, and runs the example
# edit workflow in a real ComfyUI, headless: generate + capture + store, then edit the prompt inside a user mask with
# the sparse sampler. Outputs land in out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
MODELS="$ROOT/.cache/models"
CKPT="$MODELS/sd15-small.safetensors"
if [ ! -f "$CKPT" ]; then
    mkdir -p "$MODELS"
    "$ROOT/.venv/bin/python" "$ROOT/scripts/make_test_checkpoint.py" "$CKPT" --arch sd15-small --seed 0
fi
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/run_workflow.py" "$ROOT/workflows/edit_user_mask_api.json" \
    --models "$MODELS" --out "${FISEDIT_DEMO_OUT:-$ROOT/out/demo}"
