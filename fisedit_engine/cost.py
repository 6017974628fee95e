"""What an edit saves, estimated from multiply-accumulates (MACs): the speed-up the edit's summary line reports.

Per UNet block, every conv and linear layer costs its weights' MACs at each output position of the block's level,
and every attention layer costs, per query token, its keys times its width twice (scores and weighted sum):
self-attention's keys are the level's positions, cross-attention's the conditioning's tokens. A sparse step
computes a sparse level's blocks at the active positions only (its queries still see every key), and the dense
levels, the time embedding, the prompt's key/value projections and the output head in full. Halos and gathers are
not counted, so this is the compute a sparse step needs, not a measured time: on the GPU the measured
speed-up is lower while the sparse path is launch-bound (README, "Speed"), and on the CPU the reference ops' gathers
cost more than they save.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import UNetLayout


@dataclass(frozen=True)
class LevelCost:
    positions: int          # output positions of the level
    per_position: float     # conv + linear MACs per position
    attention: float        # attention MACs per query token, without the self-attention keys' count
    self_attention: float   # self-attention MACs per query token and key
    fixed: float = 0.0      # MACs that do not scale with positions (time-embedding and context projections)

    def macs(self, queries: float) -> float:
        return self.fixed + queries * (self.per_position + self.attention + self.self_attention * self.positions)


def level_costs(unet, layout: UNetLayout, level_sizes: list[tuple[int, int]],
                context_tokens: int) -> dict[int, LevelCost]:
    """Per resolution level: the MACs of one row of the batch through the UNet's blocks there. The time embedding
    and the output head are counted at level 0 (a sparse step computes them in full)."""
    modules = dict(unet.named_modules())
    per_position: dict[int, float] = {}
    attention: dict[int, float] = {}
    self_attention: dict[int, float] = {}
    fixed: dict[int, float] = {}

    def add(table, lvl, value):
        table[lvl] = table.get(lvl, 0.0) + value

    def visit(root, lvl, head=False):
        for name, m in root.named_modules():
            parts = name.split(".")
            if isinstance(m, torch.nn.Conv2d):
                kh, kw = m.kernel_size
                add(per_position, lvl, m.out_channels * m.in_channels // m.groups * kh * kw)
            elif isinstance(m, torch.nn.Linear):
                if head or "emb_layers" in parts:  # once per row: the timestep embedding
                    add(fixed, lvl, m.in_features * m.out_features)
                elif len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in ("to_k", "to_v"):
                    add(fixed, lvl, context_tokens * m.in_features * m.out_features)  # over the prompt's tokens
                else:
                    add(per_position, lvl, m.in_features * m.out_features)
            if parts[-1] in ("attn1", "attn2") and hasattr(m, "to_q"):
                width = m.to_q.out_features
                if parts[-1] == "attn1":
                    add(self_attention, lvl, 2 * width)
                else:
                    add(attention, lvl, 2 * width * context_tokens)

    for block in layout.blocks:
        visit(modules[block.path], block.level)
    for name in ("time_embed", "label_emb"):
        if isinstance(getattr(unet, name, None), torch.nn.Module):
            visit(getattr(unet, name), 0, head=True)
    if isinstance(getattr(unet, "out", None), torch.nn.Module):
        visit(unet.out, 0)
    levels = sorted({b.level for b in layout.blocks})
    return {lvl: LevelCost(level_sizes[lvl][0] * level_sizes[lvl][1], per_position.get(lvl, 0.0),
                           attention.get(lvl, 0.0), self_attention.get(lvl, 0.0), fixed.get(lvl, 0.0))
            for lvl in levels}


def sparse_fraction(costs: dict[int, LevelCost], active: dict[int, float]) -> float:
    """MACs of a sparse step over those of a dense one; `active` maps each sparse level to its active share of
    positions (levels not in it run dense)."""
    dense = sum(c.macs(c.positions) for c in costs.values())
    sparse = sum(c.macs(c.positions * active.get(lvl, 1.0)) for lvl, c in costs.items())
    return sparse / dense if dense > 0 else 1.0


def edit_speedup(steps: int, probe_steps: int, sparse_steps: int, dense_steps: int, fraction: float,
                 chunks: int) -> float:
    """Estimated speed-up of an edit (probe + sampling) over regenerating, `steps` dense steps: the probe computes
    `probe_steps` steps of the positive branch only (1 of `chunks` rows), the sampling replays those, computes
    `sparse_steps` steps costing `fraction` of a dense one each and `dense_steps` dense ones."""
    cost = probe_steps / max(chunks, 1) + sparse_steps * fraction + dense_steps
    return steps / cost if cost > 0 else float("inf")
