"""Boots a real ComfyUI backend in this process, headless, with this plugin loaded as a custom node.

Used by scripts/run_workflow.py, the demo and the host tests. Which ComfyUI: `COMFYUI_PATH` if set; else the
ComfyUI this checkout sits in (…/ComfyUI/custom_nodes/<this>); else `.comfyui/` made by scripts/setup_host.sh.

Host quirks handled here (see the README's "Host" section):
- torchvision/torchaudio have no CPU build on some machines, and some GPU images lack PyAV; ComfyUI imports them
  at module level for model families and video types we never load, so when one is missing an import-time
  placeholder is registered (calling into it raises). This happens only in this harness, never in the plugin.
- `comfy.cli_args.args` must be set before `comfy.model_management` is imported (CPU mode, SDPA attention).
- `utils.extra_config` is imported before `nodes`, which puts `comfy/` first on sys.path.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_LINK_NAME = "comfyui-fisedit"

_booted: dict = {}


def resolve_comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser().resolve()
    parent = REPO_ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "comfy" / "model_patcher.py").is_file():
        return parent.parent
    return REPO_ROOT / ".comfyui"


class _Placeholder(types.ModuleType):
    """A module whose every attribute is another placeholder; calling one says what is missing."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        child = _Placeholder(f"{self.__name__}.{name}")
        setattr(self, name, child)
        return child

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is a placeholder: this machine has no working build of it")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            # transformers calls find_spec("torchvision") and needs a real spec.
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _install_placeholders():
    missing = []
    for name in ("torchvision", "torchaudio", "av"):
        try:
            importlib.import_module(name)
        except Exception:  # absent, or a CUDA build that fails to load its ops on this machine
            sys.modules.pop(name, None)
            missing.append(name)
    if missing:
        sys.meta_path.append(_PlaceholderFinder(missing))


def boot(work_dir: str | os.PathLike | None = None, load_plugin: bool = True):
    """Imports ComfyUI once per process, registers its nodes and this plugin; returns the `nodes` module."""
    if _booted:
        return _booted["nodes"]
    host = resolve_comfyui_path()
    if not (host / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"No ComfyUI at {host}: run scripts/setup_host.sh, or set COMFYUI_PATH to a ComfyUI checkout.")
    sys.path.insert(0, str(host))
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    _install_placeholders()

    import torch
    import comfy.options  # noqa: F401  (argument parsing stays off: args keep their defaults)
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    args.use_pytorch_cross_attention = True  # what GPUs use, and ~2x faster than sub-quadratic on CPU
    args.disable_all_custom_nodes = False

    import utils.extra_config  # noqa: F401  (before `nodes`, which shadows `utils` with comfy/utils.py)
    import folder_paths
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fisedit-host-"))
    for sub, setter in (("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory),
                        ("input", folder_paths.set_input_directory)):
        (work / sub).mkdir(parents=True, exist_ok=True)
        setter(str(work / sub))
    folder_paths.folder_names_and_paths["custom_nodes"] = ([], set())

    import nodes
    import logging
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # optional comfy_extras nodes log IMPORT FAILED for absent extras
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        logging.getLogger().setLevel(level)
    if load_plugin:
        link = _plugin_link()
        if not asyncio.run(nodes.load_custom_node(str(link), module_parent="custom_nodes")):
            raise SystemExit(f"ComfyUI failed to import the plugin from {link}; see the log above.")
    _booted.update(nodes=nodes, host=host, work=work)
    return nodes


def _plugin_link() -> Path:
    """A stable, import-safe directory name for this checkout (the checkout itself may be called anything)."""
    link_dir = REPO_ROOT / ".cache" / "custom_nodes"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / PLUGIN_LINK_NAME
    if not link.is_symlink():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def add_model_folder(kind: str, path: str | os.PathLike):
    """Puts `path` first in ComfyUI's search list for `kind` (checkpoints, loras, vae, ...)."""
    import folder_paths
    folder_paths.add_model_folder_path(kind, str(path), is_default=True)


class StubServer:
    """What PromptExecutor and the progress handler touch on PromptServer."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


class WorkflowError(RuntimeError):
    pass


@dataclass
class PromptRun:
    outputs: dict                        # node id -> list of output slots (each a list of items)
    ui: dict                             # node id -> UI dict (images written, ...)
    seconds: dict = field(default_factory=dict)


def validate(prompt: dict, prompt_id: str = "fisedit") -> list[str]:
    import execution
    valid, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    # `valid` is True as soon as one output validates; any node error is a failure here.
    if not valid or node_errors:
        details = [f"{error.get('message', error)}" if isinstance(error, dict) else str(error)] if not valid else []
        for node_id, info in (node_errors or {}).items():
            for e in info.get("errors", []):
                details.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
        raise WorkflowError("workflow failed validation:\n  " + "\n  ".join(details))
    return list(good_outputs)


def run_prompt(prompt: dict, prompt_id: str = "fisedit", executor=None, outputs: list[str] | None = None) -> PromptRun:
    """Validates and executes an API-format prompt; returns every node's outputs. Raises WorkflowError on failure.

    Pass the same `executor` (from `new_executor()`) to keep ComfyUI's output cache between prompts, as a
    server does."""
    from fisedit_engine import comfy_adapter
    to_run = validate(prompt, prompt_id) if outputs is None else outputs
    ex = executor or new_executor()
    timings = _NodeTimer()
    ex.server.send_sync = timings.on_event
    # A client id makes the executor emit its per-node 'executing' events, which time the nodes.
    ex.execute(prompt, prompt_id, extra_data={"client_id": "fisedit-harness"}, execute_outputs=to_run)
    if not ex.success:
        failure = next((d for e, d in reversed(ex.status_messages) if e in ("execution_error", "execution_interrupted")), {})
        raise WorkflowError(f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: "
                            f"{failure.get('exception_type', 'interrupted')}: {failure.get('exception_message', '')}")
    results = {}
    for node_id in prompt:
        entry = comfy_adapter.cached_output(ex.caches.outputs, node_id)
        if entry is not None:
            results[node_id] = entry.outputs
    timings.finish()
    return PromptRun(outputs=results, ui=ex.history_result.get("outputs", {}), seconds=timings.seconds)


def new_executor(lru: int = 0):
    """A PromptExecutor with ComfyUI's default (classic) output cache, or with `lru` > 0 the LRU cache of that size
    that `--cache-lru N` gives a server: it keeps outputs of earlier prompts' nodes."""
    import execution
    cache_type = execution.CacheType.LRU if lru > 0 else execution.CacheType.CLASSIC
    return execution.PromptExecutor(StubServer(), cache_type=cache_type,
                                    cache_args={"lru": lru, "ram": 0, "ram_inactive": 0})


class _NodeTimer:
    """Per-node wall time from the executor's 'executing' events."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._current = None
        self._t0 = 0.0

    def on_event(self, event, data, sid=None):
        if event == "executing":
            self.finish()
            self._current = (data or {}).get("node")
            self._t0 = time.perf_counter()

    def finish(self):
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + time.perf_counter() - self._t0
        self._current = None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-path", action="store_true", help="print the ComfyUI path that would be used")
    parser.add_argument("--no-boot", action="store_true", help="do not import ComfyUI")
    a = parser.parse_args()
    if a.print_path:
        print(resolve_comfyui_path())
    if not a.no_boot:
        boot()
        print("ComfyUI booted with the FISEdit plugin")
