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
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
