#!/usr/bin/env bash
# A virtual environment for running this plugin's tests against another ComfyUI tree (an upstream release, or your
# own checkout), CPU only, without the web frontend:
#
#   bash scripts/setup_upstream_host.sh COMFYUI_DIR VENV_DIR [--clone TAG]
#   COMFYUI_PATH=COMFYUI_DIR VENV_DIR/bin/python -m pytest -p no:cacheprovider tests
#
# --clone TAG first clones that tag of github.com/comfyanonymous/ComfyUI into COMFYUI_DIR (needs network access to
# GitHub). Installs: torch (the torch==2.13.0 CPU wheel, or the torch already importable by $PYTHON), the tree's
# requirements.txt without the frontend packages (comfyui-*: server only) and without torch, torchvision and
# torchaudio (no CPU builds here; the test harness stands in for the last two, see scripts/comfy_host.py), and the
# test requirements and Triton (for the kernel tests under its interpreter). Of the "non essential" block only
# kornia and pydantic(-settings) are installed (spandrel needs torchvision; the rest serves nodes the tests never use).
# Idempotent: a second run only checks a stamp.
set -euo pipefail

usage() { echo "usage: $0 COMFYUI_DIR VENV_DIR [--clone TAG]" >&2; exit 2; }
[ $# -ge 2 ] || usage
COMFY="$1"; VENV="$2"; shift 2
TAG=""
if [ $# -gt 0 ]; then
    [ "$1" = "--clone" ] && [ $# -eq 2 ] || usage
    TAG="$2"
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
log() { printf '[setup-upstream] %s\n' "$*" >&2; }

if [ -n "$TAG" ] && [ ! -e "$COMFY" ]; then
    log "cloning ComfyUI $TAG into $COMFY"
    git clone --quiet --depth 1 --branch "$TAG" https://github.com/comfyanonymous/ComfyUI "$COMFY"
fi
[ -f "$COMFY/comfy/model_patcher.py" ] && [ -f "$COMFY/requirements.txt" ] || {
    log "error: $COMFY is not a ComfyUI tree (no comfy/model_patcher.py or requirements.txt)"; exit 2; }

reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
# everything above the "non essential" marker, less the frontend packages and torch's own family; of the optional
# block, kornia (v0.33's comfy_extras/nodes_post_processing, with ImageBlur, imports it; 0.3.75's did not) and
# pydantic(-settings)
sed '/^#non essential/,$d' "$COMFY/requirements.txt" \
    | grep -v -E '^\s*(#|$)' \
    | grep -v -i -E '^(comfyui[-_]|torch(vision|audio)?\s*([<>=~!;].*)?$)' > "$reqs"
sed -n '/^#non essential/,$p' "$COMFY/requirements.txt" | grep -i -E '^(kornia|pydantic)' >> "$reqs" || true
stamp="$VENV/.fisedit-upstream-$(cat "$reqs" "$ROOT/scripts/requirements-test.txt" "$ROOT/scripts/requirements-triton.txt" "$0" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    log "ready: $VENV (ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null))"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        log "creating $VENV on top of the torch already present in $PYTHON"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        log "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "installing $TORCH_PIN"
    "$VENV/bin/pip" install -q "$TORCH_PIN"
fi
log "installing $(wc -l < "$reqs") requirements of $COMFY and the test requirements"
"$VENV/bin/pip" install -q -r "$reqs" -r "$ROOT/scripts/requirements-test.txt"
if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then  # keep the Triton a CUDA torch came with
    log "installing Triton (kernel tests under its interpreter)"
    "$VENV/bin/pip" install -q -r "$ROOT/scripts/requirements-triton.txt"
fi
rm -f "$VENV"/.fisedit-upstream-*
touch "$stamp"
log "ready: $VENV; run: COMFYUI_PATH=$COMFY $VENV/bin/python -m pytest -p no:cacheprovider tests"
