"""FISEdit for ComfyUI: fast, exact-outside-the-region prompt edits of a generated image.

Registers the nodes; nothing else happens at import.
"""
import os
import sys

# The engine is imported by its absolute name (`fisedit_engine`) from the node layer, the tests and the scripts, so
# there is one registry per process. Appended, never prepended: the host's own modules keep precedence.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:  # ComfyUI imports this folder as a package; pytest, in a clone whose folder name is no Python
    # identifier (ComfyUI-FISEdit), imports this file alone, with nothing to register
    from . import nodes as _nodes  # noqa: E402

    # One API per node ID: ComfyUI would take NODE_CLASS_MAPPINGS and ignore comfy_entrypoint if both were here.
    if _nodes.node_api() == "v3":
        comfy_entrypoint = _nodes.comfy_entrypoint
        __all__ = ["comfy_entrypoint"]
    else:
        NODE_CLASS_MAPPINGS = _nodes.v1_classes()
        NODE_DISPLAY_NAME_MAPPINGS = _nodes.display_names()
        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
