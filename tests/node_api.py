"""Reading and running registered node classes the same way whether the plugin registered them through ComfyUI's V1
or V3 node API (nodes/spec.py builds both from one description)."""
from __future__ import annotations


def combo_options(entry: tuple) -> list | None:
    """The choices of an INPUT_TYPES entry: V1 writes ([choices], {...}), V3 ("COMBO", {"options": [...]})."""
    kind, extra = entry[0], entry[1] if len(entry) > 1 else {}
    if isinstance(kind, (list, tuple)):
        return list(kind)
    return list(extra["options"]) if kind == "COMBO" else None


def run_node(cls: type, **inputs) -> tuple[tuple, dict | None]:
    """Runs a node class's function as ComfyUI would call it (outside the executor: no hidden inputs); returns the
    outputs and the UI dict."""
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(out, dict):  # V1 with a UI part
        return tuple(out["result"]), out.get("ui")
    if isinstance(out, tuple):  # V1
        return out, None
    return tuple(out.args), out.ui  # V3 NodeOutput
