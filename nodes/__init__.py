"""ComfyUI node classes; each execute() validates its inputs, makes one engine call, and returns the outputs."""
from . import cache_nodes, edit_nodes, toy_nodes

_FAMILIES = (cache_nodes, edit_nodes, toy_nodes)
NODE_CLASS_MAPPINGS = {k: v for m in _FAMILIES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _FAMILIES for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}
