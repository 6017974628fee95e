"""ComfyUI node classes, built from one declarative spec per node (spec.py); each node's run() validates its inputs,
makes one engine call, and returns the outputs.

Which node API registers them: V3 (`comfy_api`'s io.ComfyNode, via `comfy_entrypoint`) where the host has it, V1
(`NODE_CLASS_MAPPINGS`) otherwise; `FISEDIT_NODE_API=v1` or `v3` forces one. Never both for one node ID: ComfyUI
takes a module's NODE_CLASS_MAPPINGS and then ignores its comfy_entrypoint.
"""
from __future__ import annotations

import logging
import os

from fisedit_engine import comfy_adapter as host

from . import cache_nodes, edit_nodes, spec, toy_nodes

log = logging.getLogger("FISEdit")

NODE_API_ENV = "FISEDIT_NODE_API"
SPECS = cache_nodes.SPECS + edit_nodes.SPECS + toy_nodes.SPECS


def node_api() -> str:
    """'v3' or 'v1': which API the plugin registers its nodes with on this host."""
    wanted = os.environ.get(NODE_API_ENV, "").strip().lower()
    if wanted not in ("", "v1", "v3"):
        raise ValueError(f"{NODE_API_ENV}={wanted!r}: set it to 'v1' or 'v3', or unset it")
    if wanted == "v1":
        return "v1"
    if host.v3_node_api() is None:
        if wanted == "v3":
            raise ImportError(f"{NODE_API_ENV}=v3, but this ComfyUI has no V3 node API (comfy_api.latest): update "
                              f"ComfyUI, or unset {NODE_API_ENV}")
        log.info("FISEdit: this ComfyUI has no V3 node API; registering the nodes through NODE_CLASS_MAPPINGS (V1)")
        return "v1"
    return "v3"


def v1_classes() -> dict[str, type]:
    return {s.node_id: spec.v1_class(s) for s in SPECS}


def v3_classes() -> dict[str, type]:
    io, _ = host.v3_node_api()
    return {s.node_id: spec.v3_class(s, io) for s in SPECS}


def display_names() -> dict[str, str]:
    return {s.node_id: s.display_name for s in SPECS}


def comfy_entrypoint():
    """The V3 registration: a ComfyExtension listing every node."""
    io, extension_base = host.v3_node_api()
    classes = list(v3_classes().values())

    class FISEditExtension(extension_base):
        async def get_node_list(self) -> list[type]:
            return classes

    return FISEditExtension()
