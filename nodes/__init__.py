"""ComfyUI node classes; each execute() validates its inputs, makes one engine call, and returns the outputs."""
from . import cache_nodes, edit_nodes

NODE_CLASS_MAPPINGS = {**cache_nodes.NODE_CLASS_MAPPINGS, **edit_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**cache_nodes.NODE_DISPLAY_NAME_MAPPINGS, **edit_nodes.NODE_DISPLAY_NAME_MAPPINGS}
