"""Tile sizes by a cost model: the paper's adaptive sparse-tile choice (APSC), which its code never implemented.

Small tiles follow the mask closely but every 3x3 conv reads a tile plus its 1-px halo, (t+2)^2 positions for t^2
outputs; large tiles read little halo but compute positions outside the mask. Per sparse level with tile size t, n
active tiles and P active positions (the tiles clipped to the map), one sparse step costs, per row of the batch
- layer MACs: the level's convs and linear layers at P positions (cost.LevelCost);
- attention MACs: the level's attention at P queries, against every key (cost.LevelCost);
- gathered: every 3x3 conv of the level gathers n (t+2)^2 positions of its input channels (fused with GroupNorm
  and SiLU in one kernel);
- tile ops: n per 3x3 conv, what a tile costs beyond its positions (index work, part-filled GEMM blocks);
and a level whose tiles cover its whole map runs its modules whole: its MACs, nothing gathered. The predicted time of
a step is a linear function of these four sums over the sparse levels; the rest of the step (dense levels, the time
embedding, the host) does not depend on the tiles. The coefficients are fitted per GPU by non-negative least
squares to replayed sparse steps of random-weight SD models at many masks and tile sizes
(benchmarks/tile_costs.py) and stored beside this module (tile_costs.json). Attention and the other layers get
their own coefficient because a MAC of attention costs several times one of a GEMM (on an H200, about 9x: the
benchmark's first fit with one coefficient for both missed by up to 3.5 ms).

An edit takes the combination of tile sizes, one per level, of least predicted time. Level l+1's active set pools
level l's tiles, so the levels are chosen together: every combination of CANDIDATES (4^3 for three sparse levels),
depth first so that each level's tiles are computed once per choice of the finer levels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .cost import LevelCost
from .layout import UNetLayout
from .plan import DEFAULT_TILE, active_tiles, pooled, tiled

CANDIDATES = (2, 4, 8, 16)
CALIBRATIONS = Path(__file__).with_name("tile_costs.json")
FEATURES = ("layer MACs", "attention MACs", "gathered channel-positions", "tile ops")


@dataclass(frozen=True)
class LevelWork:
    """What one row of the batch costs at a sparse level, for the cost model."""
    cost: LevelCost
    conv_inputs: int    # input channels summed over the level's 3x3 convs
    convs: int          # the level's 3x3 convs

    def features(self, tile: int, tiles: int, positions: int) -> tuple[float, ...]:
        c = self.cost
        full = positions >= c.positions  # a fully active level runs its modules whole
        q = c.positions if full else positions
        layer, attention = c.fixed + q * c.per_position, q * (c.attention + c.self_attention * c.positions)
        if full:
            return layer, attention, 0.0, 0.0
        return layer, attention, float(tiles * (tile + 2) ** 2 * self.conv_inputs), float(tiles * self.convs)


def level_work(unet, layout: UNetLayout, costs: dict[int, LevelCost], sparse_levels) -> dict[int, LevelWork]:
    """Per sparse level: its MACs (`costs`: cost.level_costs) and its 3x3 convs."""
    modules = dict(unet.named_modules())
    roots = [(modules[b.path], b.level) for b in layout.blocks if b.level in sparse_levels]
    if isinstance(getattr(unet, "out", None), torch.nn.Module) and 0 in sparse_levels:
        roots.append((unet.out, 0))
    inputs = {lvl: 0 for lvl in sparse_levels}
    convs = dict(inputs)
    for root, lvl in roots:
        for m in root.modules():
            if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3):
                inputs[lvl] += m.in_channels
                convs[lvl] += 1
    return {lvl: LevelWork(costs[lvl], inputs[lvl], convs[lvl]) for lvl in sparse_levels if lvl in costs}


def plan_features(work: dict[int, LevelWork], levels: dict[int, tuple[int, torch.Tensor, torch.Tensor]],
                  rows: int) -> tuple[float, ...]:
    """The cost model's sums (FEATURES) for the active tiles of every sparse level (plan.active_tiles), `rows`
    rows of the batch."""
    total = [0.0] * len(FEATURES)
    for lvl, (tile, tiles, region) in levels.items():
        for i, value in enumerate(work[lvl].features(tile, int(tiles.shape[0]), int(region.sum()))):
            total[i] += rows * value
    return tuple(total)


@dataclass(frozen=True)
class Calibration:
    device: str                  # torch.cuda.get_device_name(), or a device type ("cpu")
    kind: str                    # the device type: "cuda", "cpu", ...
    seconds: tuple[float, ...]   # per unit of each of FEATURES
    fitted: str                  # how and on what it was measured

    def predict(self, features) -> float:
        return sum(c * f for c, f in zip(self.seconds, features))


@dataclass(frozen=True)
class TileChoice:
    tiles: dict[int, int]
    predicted_s: float      # the sparse levels' predicted time per step (NaN without a calibration)
    default_s: float        # the same with DEFAULT_TILE at every level
    note: str               # for the edit's summary: how the sizes were chosen


def calibrations(path: Path | None = None) -> dict[str, Calibration]:
    """The stored calibrations by device name (tile_costs.json, unless `path`)."""
    path = CALIBRATIONS if path is None else path
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())
    return {name: Calibration(name, e["kind"], tuple(e["seconds"]), e["fitted"]) for name, e in entries.items()}


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def calibration_for(device, table: dict[str, Calibration] | None = None) -> tuple[Calibration | None, str]:
    """The calibration of this device, else one of another device of the same type (said so), else None."""
    table = calibrations() if table is None else table
    name = device_name(device)
    if name in table:
        return table[name], f"calibrated on this {name}"
    kind = torch.device(device).type
    same_kind = [c for _, c in sorted(table.items()) if c.kind == kind]
    if same_kind:
        return same_kind[0], (f"calibrated on {same_kind[0].device}, not this {name}: run benchmarks/tile_costs.py "
                              f"--write to calibrate it")
    return None, f"no calibration for {name}"


def choose_tiles(mask: torch.Tensor, level_sizes: list[tuple[int, int]], sparse_levels, work: dict[int, LevelWork],
                 rows: int, calibration: Calibration | None, note: str = "",
                 candidates=CANDIDATES, kept: dict[int, int] | None = None, kept_within: float = 1.0) -> TileChoice:
    """The tile size per sparse level of least predicted step time (DEFAULT_TILE everywhere without calibration),
    or `kept` (the tile sizes of steps kept for another mask) where they are predicted at most `kept_within` times
    that: near-equal choices flip with the mask's alignment, and a mask planned with the kept sizes can be written
    into the kept steps' index maps (edit.KeptEdit.refit)."""
    levels = sorted(sparse_levels)
    default = {lvl: DEFAULT_TILE for lvl in levels}
    if calibration is None:
        return TileChoice(default, math.nan, math.nan, f"tile {DEFAULT_TILE} at every level ({note})")
    if levels != list(range(len(levels))):
        raise ValueError(f"sparse levels {levels}: the cost model expects the finest levels, 0 up")
    best: list = [math.inf, None]

    def search(lvl: int, active: torch.Tensor, chosen: dict[int, int], seconds: float) -> None:
        """Depth first over the levels: a level's tiles depend only on the finer levels' choices."""
        if lvl == len(levels):
            if seconds < best[0]:
                best[:] = [seconds, dict(chosen)]
            return
        for t in candidates:
            tile, tiles, region = tiled(active, t)
            cost = calibration.predict([rows * f for f in work[lvl].features(tile, int(tiles.shape[0]),
                                                                              int(region.sum()))])
            nxt = pooled(region, level_sizes[lvl + 1]) if lvl + 1 < len(levels) else None
            search(lvl + 1, nxt, {**chosen, lvl: t}, seconds + cost)

    search(0, mask.any(dim=0) if mask.dim() == 3 else mask, {}, 0.0)

    def predicted(tiles: dict[int, int]) -> float:
        return calibration.predict(plan_features(work, active_tiles(mask, level_sizes, levels, tiles), rows))
    default_s = predicted(default)
    if kept is not None and sorted(kept) == levels:
        kept_s = predicted(kept)
        if kept_s <= kept_within * best[0]:
            return TileChoice(dict(kept), kept_s, default_s,
                              f"the tile sizes of the sparse steps kept from the last edit ({note}): predicted "
                              f"{1e3 * kept_s:.2f} ms per step for the sparse levels, the cost model's best "
                              f"{1e3 * best[0]:.2f} ms")
    return TileChoice(best[1], best[0], default_s,
                      f"tiles by the cost model ({note}): predicted {1e3 * best[0]:.2f} ms per step for the sparse "
                      f"levels, {1e3 * default_s:.2f} ms at tile {DEFAULT_TILE}")


def fit(features: list[tuple[float, ...]], seconds: list[float], groups: list[str]
        ) -> tuple[tuple[float, ...], dict[str, float]]:
    """Non-negative least squares of `seconds` on the features, with one free intercept per group (a model: its
    dense levels and host work do not depend on the tiles): (coefficients, intercepts). Lawson-Hanson's active set,
    in float64; the features are scaled to unit norm first so the solve is well conditioned."""
    names = sorted(set(groups))
    x = torch.tensor(features, dtype=torch.float64)
    scale = x.norm(dim=0).clamp_min(1e-300)
    onehot = torch.tensor([[float(g == n) for n in names] for g in groups], dtype=torch.float64)
    a = torch.cat([x / scale, onehot], dim=1)
    y = torch.tensor(seconds, dtype=torch.float64)
    k = x.shape[1]
    free = torch.zeros(a.shape[1], dtype=torch.bool)
    free[k:] = True  # the intercepts are unconstrained
    coef = _solve(a, y, free)
    for _ in range(4 * a.shape[1]):
        grad = a.T @ (y - a @ coef)
        grad[free] = -math.inf
        j = int(grad.argmax())
        if grad[j] <= 1e-12 * float(y.norm()):
            break
        free[j] = True
        while True:
            trial = _solve(a, y, free)
            bad = free.clone()
            bad[k:] = False
            bad &= trial <= 0
            if not bad.any():
                coef = trial
                break
            # step from coef toward trial until the first constrained coefficient reaches zero, and drop it
            ratio = torch.where(bad, coef / (coef - trial), torch.full_like(coef, math.inf)).nan_to_num(0.0)
            coef = coef + float(ratio.min()) * (trial - coef)
            drop = free & (coef <= 1e-15)
            drop[k:] = False
            free &= ~drop
            coef[~free] = 0.0
    return tuple((coef[:k] / scale).tolist()), {n: float(coef[k + i]) for i, n in enumerate(names)}


def _solve(a: torch.Tensor, y: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    coef = torch.zeros(a.shape[1], dtype=a.dtype)
    coef[free] = torch.linalg.lstsq(a[:, free], y[:, None]).solution[:, 0]
    return coef
