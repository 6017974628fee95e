"""One declarative description per node, from which both of ComfyUI's node APIs are built.

ComfyUI loads V1 nodes (`INPUT_TYPES`, `RETURN_TYPES`, ...) on every version, and V3 nodes (`comfy_api` `io.ComfyNode`
with `define_schema`) where the host has that API. A node's IDs, input names and order, types, defaults, ranges and
tooltips are written once, in a `NodeSpec`; `v1_class` and `v3_class` translate it, so both registrations present
the same node to the UI and to saved workflows (tests/host/test_node_experience.py compares them on the real host).

A node's behaviour is its spec's `run(inputs, hidden)`: `inputs` holds every declared input (an optional input that
was not connected holds its default, or None), `hidden` the hidden inputs the spec asks for; it returns the output
tuple, or a `Result` when the node also shows something in the UI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

CATEGORY = "FISEdit"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
HIDDEN_INPUTS = {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@dataclass(frozen=True)
class In:
    name: str
    type: str                          # a ComfyUI type ("MODEL", "FISEDIT_CACHE", ...), a widget type, or "COMBO"
    tooltip: str
    optional: bool = False
    default: Any = None                # for COMBO may be a function of the options list
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple | Callable[[], list] | None = None  # COMBO: the choices, or a function listing them (files)

    def choices(self) -> list:
        return list(self.options() if callable(self.options) else self.options)

    def default_for(self, choices: list | None = None):
        if callable(self.default):
            return self.default(self.choices() if choices is None else choices)
        return self.default

    def widget_options(self, choices: list | None = None) -> dict:
        """The widget's settings (no tooltip), in the order V1 nodes write them."""
        out = {}
        if self.type in WIDGET_TYPES:
            value = self.default_for(choices)
            if value is not None:
                out["default"] = value
            out.update({k: v for k, v in (("min", self.min), ("max", self.max), ("step", self.step)) if v is not None})
        return out


@dataclass(frozen=True)
class Out:
    name: str
    type: str
    tooltip: str


@dataclass
class Result:
    outputs: tuple
    ui: dict | None = None


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]
    run: Callable[[dict, dict], tuple | Result]
    output_node: bool = False
    hidden: tuple[str, ...] = ()       # keys of HIDDEN_INPUTS
    fingerprint: Callable[..., Any] | None = None  # IS_CHANGED / fingerprint_inputs, given the widget inputs
    category: str = CATEGORY
    extra: dict = field(default_factory=dict)

    def complete(self, given: dict) -> dict:
        """Every declared input: the given value, else the default (None for an unconnected optional link)."""
        return {i.name: given[i.name] if i.name in given else i.default_for() for i in self.inputs}

    def execute(self, given: dict, hidden: dict) -> Result:
        result = self.run(self.complete(given), {k: hidden.get(k) for k in self.hidden})
        result = result if isinstance(result, Result) else Result(tuple(result))
        if len(result.outputs) != len(self.outputs):
            raise RuntimeError(f"{self.node_id} returned {len(result.outputs)} outputs, its spec declares "
                               f"{len(self.outputs)}: a FISEdit bug, not a workflow error; please report it")
        return result


def v1_input_types(spec: NodeSpec) -> dict:
    """The V1 INPUT_TYPES dict: required then optional inputs, each in its declared order."""
    types: dict = {"required": {}}
    for i in spec.inputs:
        if i.type == "COMBO":
            choices = i.choices()
            entry = (choices, {**i.widget_options(choices), "tooltip": i.tooltip})
        else:
            entry = (i.type, {**i.widget_options(), "tooltip": i.tooltip})
        types.setdefault("optional" if i.optional else "required", {})[i.name] = entry
    if spec.hidden:
        types["hidden"] = {k: HIDDEN_INPUTS[k] for k in spec.hidden}
    return types


def v1_class(spec: NodeSpec) -> type:
    """A V1 node class for `spec`."""

    def input_types(cls):
        return v1_input_types(spec)

    def execute(self, **kwargs):
        hidden = {k: kwargs.pop(k, None) for k in spec.hidden}
        result = spec.execute(kwargs, hidden)
        return {"ui": result.ui, "result": result.outputs} if result.ui is not None else result.outputs

    attrs = {
        "SPEC": spec, "DESCRIPTION": spec.description, "CATEGORY": spec.category, "FUNCTION": "execute",
        "RETURN_TYPES": tuple(o.type for o in spec.outputs), "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in spec.outputs), "OUTPUT_NODE": spec.output_node,
        "INPUT_TYPES": classmethod(input_types), "execute": execute,
        "__doc__": spec.description, "__module__": __name__,
    }
    if spec.fingerprint is not None:
        attrs["IS_CHANGED"] = classmethod(lambda cls, **kwargs: spec.fingerprint(**kwargs))
    return type(spec.node_id, (), attrs)


def v3_class(spec: NodeSpec, io) -> type:
    """A V3 node class for `spec`, on the host's `comfy_api` `io` module."""

    def io_type(name: str):
        known = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "LATENT": io.Latent, "MASK": io.Mask,
                 "IMAGE": io.Image, "CONDITIONING": io.Conditioning, "INT": io.Int, "FLOAT": io.Float,
                 "STRING": io.String, "BOOLEAN": io.Boolean, "COMBO": io.Combo}
        return known[name] if name in known else io.Custom(name)

    def v3_input(i: In):
        kind = io_type(i.type)
        if i.type == "COMBO":
            choices = i.choices()
            return kind.Input(i.name, options=choices, optional=i.optional, tooltip=i.tooltip,
                              **i.widget_options(choices))
        return kind.Input(i.name, optional=i.optional, tooltip=i.tooltip, **i.widget_options())

    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
            description=spec.description, inputs=[v3_input(i) for i in spec.inputs],
            outputs=[io_type(o.type).Output(display_name=o.name, tooltip=o.tooltip) for o in spec.outputs],
            hidden=[io.Hidden(HIDDEN_INPUTS[k]) for k in spec.hidden] or None, is_output_node=spec.output_node)

    def execute(cls, **kwargs):
        holder = cls.hidden  # set by the executor on its per-run clone of the class; None when called directly
        hidden = {k: getattr(holder, k, None) if holder is not None else None for k in spec.hidden}
        result = spec.execute(kwargs, hidden)
        return io.NodeOutput(*result.outputs, ui=result.ui)

    combos = [i for i in spec.inputs if i.type == "COMBO"]

    def validate_inputs(cls, **kwargs):
        # ComfyUI 0.3.75 checks V1 combo values (a list type) before running, but not V3 ones ("COMBO" with
        # options); without this a wrong value would reach execute(). Newer hosts check both: then it is redundant.
        for i in combos:
            if i.name in kwargs and kwargs[i.name] is not None and kwargs[i.name] not in i.choices():
                return f"{i.name}: '{kwargs[i.name]}' is not one of {i.choices()}"
        return True

    attrs = {"SPEC": spec, "define_schema": classmethod(define_schema), "execute": classmethod(execute),
             "__doc__": spec.description, "__module__": __name__}
    if combos:
        validate_inputs.__signature__ = _keyword_signature(["cls"] + [i.name for i in combos])
        attrs["validate_inputs"] = classmethod(validate_inputs)
    if spec.fingerprint is not None:
        attrs["fingerprint_inputs"] = classmethod(lambda cls, **kwargs: spec.fingerprint(**kwargs))
    return type(spec.node_id, (io.ComfyNode,), attrs)


def _keyword_signature(names: list[str]):
    import inspect
    return inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
