"""Linear layers that read the same input, run as one GEMM with their weights joined along the outputs.

A sparse step runs a transformer block's projections on the few hundred active tokens, where a GEMM costs its launch
more than its arithmetic: on an H200, SD2.1@768 with a 5% edit, each of them took 5-15 us of a 7 ms step
(benchmarks/graph_kernels.py --dump). Joined: a block's self-attention query, key and value (three GEMMs, one); and,
once per model call for every sparse block (edit.EditState.shared_linear), the cross-attention keys and values of the
text context and the ResBlocks' projections of the time embedding, which every block reads the same.

A joined weight is built once per edit, like the channels-last conv weights (edit.EditState.channels_last_weight),
and again when a weight was replaced, moved or written since. Layers whose weights ComfyUI casts per call (offloaded
or converted to another dtype, LoRA applied on the fly), or some with a bias and some without, run one by one.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from . import comfy_adapter as host
from . import warm
from .graphs import outside_capture


class JoinedLinears:
    def __init__(self):
        self._kept: dict[tuple, tuple] = {}  # module ids -> (their tensors, the tensors' states, joined weight, bias)

    def weight(self, modules, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The weights (and biases) of `modules` for inputs like `like`, concatenated along the outputs; None where
        they cannot be joined (see the module docstring)."""
        with ExitStack() as stack:
            cast = [stack.enter_context(host.cast_weights(m, like)) for m in modules]
        if any(w is not m.weight or b is not m.bias for (w, b), m in zip(cast, modules)):
            return None
        biases = [b for _, b in cast if b is not None]
        if biases and len(biases) != len(modules):
            return None
        tensors = tuple(t for pair in cast for t in pair if t is not None)
        key = tuple(id(m) for m in modules)
        states = tuple(warm.tensor_state(t) for t in tensors)
        kept = self._kept.get(key)
        if kept is None or any(a is not b for a, b in zip(kept[0], tensors)) or kept[1] != states:
            outside_capture(like.device, f"the joined weight of {len(modules)} linear layers")
            with torch.no_grad():
                kept = self._kept[key] = (tensors, states, torch.cat([w for w, _ in cast]),
                                          torch.cat(biases) if biases else None)
        return kept[2], kept[3]

    def __call__(self, modules, x: torch.Tensor) -> list[torch.Tensor]:
        """Each module's output for x: views of one GEMM's output where the weights join, else one by one."""
        joined = self.weight(modules, x)
        if joined is not None:
            return list(F.linear(x, *joined).split([m.out_features for m in modules], dim=-1))
        outs = []
        for m in modules:
            with host.cast_weights(m, x) as (w, b):
                outs.append(F.linear(x, w, b))
        return outs

    def clear(self) -> None:
        self._kept.clear()
