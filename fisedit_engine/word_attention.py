"""Where the changed words look: the auto mask's second signal, beside the probe's latent difference.

Prompt-to-prompt locates a word by its cross-attention map. The node gets two CONDITIONINGs, not words, so the words
an edit changed are the prompt positions whose embedding it moved, each weighted by how far (a causal text encoder
moves the changed word's phrase with it, which is what describes the object). In every probe step each
cross-attention layer sums, per query, the attention the edited prompt's changed positions receive, and the same
for the original run at the original prompt's positions (from its captured queries; a removed object is named only
there), attention_control.ControlledCrossAttention. Here the layers' sums become one map on the latent grid: each
layer's carried up to the latent's size (bilinear), summed over layers, each run's scaled to peak 1, the two added.

The mask is cut from the difference map times this map squared (`weighted`, both scaled to peak 1): where the edited
caption repeats words of another object, the model redraws that object too and the difference shows it, but the
changed words do not look there. On 200 toy-world pairs (benchmarks/mask_attention.py, two sets of 100, CPU),
undilated grid IoU against the generator's truth went from 0.74 and 0.73 to 0.77 and 0.78: shape changes 0.71 ->
0.75 and 0.65 -> 0.76, added objects 0.72 -> 0.77 and 0.68 -> 0.73, removals 0.75 -> 0.74 and 0.76 -> 0.77;
the first power, or the edited run's map alone, gained less and lost removals. On the GPU quality benchmark's 200
pairs with the node's defaults (benchmarks/results/edit_quality.md), shape changes scored 0.76 and added objects
0.78, against 0.695 and 0.712 before this weighting on the same pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POWER = 2.0  # the attention map's exponent in the weighting


def changed_weights(original: list, edited: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt position of the edited and of the original prompt ([tokens] float32 each), how far the edit moved
    its embedding: the distance between the two at a position both have, the embedding's length at a position only
    one has (a longer prompt). Zero where the prompts agree."""
    a, b = original[0][0][0].float(), edited[0][0][0].float()
    n = min(a.shape[0], b.shape[0])
    moved = (b[:n] - a[:n]).norm(dim=-1)
    return torch.cat([moved, b[n:].norm(dim=-1)]), torch.cat([moved, a[n:].norm(dim=-1)])


def latent_map(layers: list, size: tuple[int, int]) -> torch.Tensor | None:
    """[B, H, W]: the layers' attention sums (ControlledCrossAttention.sums, [2, B, queries] at the layer's grid)
    on the latent grid `size`, each run scaled to peak 1 per sample, the two added; None where no layer summed."""
    total = None
    for layer in layers:
        if layer.sums is None:
            continue
        runs, batch, _ = layer.sums.shape
        up = F.interpolate(layer.sums.float().reshape(runs * batch, 1, *layer.grid), size=size, mode="bilinear",
                           align_corners=False).reshape(runs, batch, *size)
        total = up if total is None else total + up
    if total is None:
        return None
    peaks = total.amax((-2, -1), keepdim=True)
    return torch.where(peaks > 0, total / peaks.clamp_min(torch.finfo(total.dtype).tiny), 0.0).sum(0)


def weighted(difference: torch.Tensor, attention: torch.Tensor | None, power: float = POWER) -> torch.Tensor:
    """[B, H, W]: the difference map times the attention map to `power`, both scaled to peak 1 per sample; a sample
    whose attention map is all zero (no position changed) keeps its difference map."""
    if attention is None:
        return difference
    attention = attention.to(difference.device, difference.dtype)
    tiny = torch.finfo(difference.dtype).tiny
    d_peak = difference.amax((-2, -1), keepdim=True).clamp_min(tiny)
    a_peak = attention.amax((-2, -1), keepdim=True)
    product = (difference / d_peak) * (attention / a_peak.clamp_min(tiny)) ** power
    return torch.where(a_peak > 0, product, difference)
