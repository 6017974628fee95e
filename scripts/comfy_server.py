"""Runs the host's own ComfyUI server (its main.py) with this plugin as its only custom node, isolated in a folder.

    python scripts/comfy_server.py --base-directory DIR [--port 8188] [main.py options ...]

DIR gets `custom_nodes/comfyui-fisedit` (a link to this checkout) and is ComfyUI's base directory: models, input,
output, temp and user data live there. Which ComfyUI: as for scripts/comfy_host.py (`COMFYUI_PATH`, the ComfyUI
this checkout sits in, or `.comfyui/`). The web frontend is ComfyUI's usual one, the `comfyui-frontend-package`
installed in this Python (scripts/setup_host.sh installs the version the host's requirements.txt names).

Two differences from `python main.py`, both for isolation:
- main.py reads `extra_model_paths.yaml` from the folder main.py lives in. A user's file there adds their model
  and custom-node folders (other packs would load), and the pinned host's is horde's, pointing at a folder the
  wheel does not ship (main.py then fails listing it). So main.py runs as `__main__` with its `__file__` placed
  in DIR, where no such file is: every other path it uses comes from `--base-directory`.
- The import placeholders of comfy_host.py for torchvision/torchaudio/PyAV where this machine has no working
  build (ComfyUI imports them at module level for model families and video types the plugin never loads).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402


def prepare_base_directory(base: Path) -> Path:
    """DIR with custom_nodes/ holding only this checkout (as comfyui-fisedit); returns DIR."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / comfy_host.PLUGIN_LINK_NAME
    if not link.is_symlink():
        link.symlink_to(comfy_host.REPO_ROOT, target_is_directory=True)
    elif link.resolve() != comfy_host.REPO_ROOT:
        raise SystemExit(f"{link} points at {link.resolve()}, not at this checkout ({comfy_host.REPO_ROOT})")
    return base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--base-directory", type=Path, required=True)
    a, rest = parser.parse_known_args(argv)
    base = prepare_base_directory(a.base_directory.resolve())
    host = comfy_host.resolve_comfyui_path()
    main_py = host / "main.py"
    if not main_py.is_file():
        raise SystemExit(f"No ComfyUI server at {host} (no main.py): run scripts/setup_host.sh, or set COMFYUI_PATH.")
    sys.path.insert(0, str(host))
    comfy_host._install_placeholders()
    sys.argv = [str(main_py), "--base-directory", str(base), *rest]
    os.chdir(base)
    code = compile(main_py.read_text(encoding="utf-8"), str(main_py), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(base / "main.py"), "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
