"""The per-edit plan: which tiles of each sparse UNet level are active, and the index maps the sparse ops gather by.

Level 0's active set is every tile that touches the (dilated) edit mask of any batch sample. Level l+1's is every
tile touching the any-pooled (2x2) active set of level l, so a coarser level always covers the parents of the finer
one. All blocks of one level share its active set: then every block's input outside the set is exactly the cached
value (the previous block's cached output), which is what makes each sparse op exact (invariant I5).

A sparse op reads an input patch per active tile: `rows`/`cols` [tiles, P] give, per tile, the input coordinates of
the patch (the tile plus its halo for that op's geometry), -1 where the patch leaves the input (zero padding). They
are built once per edit and per op geometry, on the device that runs the edit: before a CUDA graph captures a
sparse step (EditPlan.prepare), since a capture cannot copy them from host memory.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .graphs import outside_capture

DEFAULT_TILE = 4


@dataclass
class LevelPlan:
    level: int
    height: int
    width: int
    tile: int
    tiles: torch.Tensor            # [n, 2] (tile row, tile col), long
    active: torch.Tensor           # [H, W] bool: the union of the active tiles, clipped to the map
    read: torch.Tensor | None = None  # [H, W] bool: every position a sparse op reads at this level (see EditPlan)
    _maps: dict = field(default_factory=dict, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    @property
    def full(self) -> bool:
        return bool(self.active.all())

    @property
    def n_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def fraction(self) -> float:
        return float(self.active.float().mean())

    def tiles_on(self, device) -> torch.Tensor:
        """`tiles` on `device` (indexing a device tensor by host indices would copy them on every call)."""
        return self._cached(("tiles",), device, lambda: self.tiles)

    def tokens(self, device) -> torch.Tensor:
        """Flat indices (row-major, as SpatialTransformer orders tokens) of the active positions."""
        return self._cached(("tokens",), device, lambda: torch.nonzero(self.active.flatten()).flatten())

    def tile_scatter(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, sources) for kernels.reference.scatter_tiles_: where each tile element inside the map goes."""
        def make():
            t = self.tile
            r = self.tiles[:, 0, None, None] * t + torch.arange(t)[None, :, None]
            c = self.tiles[:, 1, None, None] * t + torch.arange(t)[None, None, :]
            r, c = r.expand(-1, t, t).flatten(), c.expand(-1, t, t).flatten()
            inside = (r < self.height) & (c < self.width)
            return (r * self.width + c)[inside], torch.nonzero(inside).flatten()
        return self._cached(("tile_scatter",), device, make)

    def read_positions(self, device) -> torch.Tensor:
        """Flat indices of the positions the level's sparse ops read (the active tiles and their halo rings)."""
        return self._cached(("read",), device, lambda: torch.nonzero(self.read.flatten()).flatten())

    def active_in_read(self, device) -> torch.Tensor:
        """Where each active position (tokens()) sits in read_positions()."""
        return self._cached(("active_in_read",), device,
                            lambda: torch.searchsorted(self.read_positions("cpu"), self.tokens("cpu")))

    def patch_index(self, kind: str, device, in_size: tuple[int, int] | None = None):
        """(rows, cols), each [tiles, P], for one op geometry:
        - "conv3": a 3x3 stride-1 conv at this level (halo 1);
        - "interior": the tile itself (1x1 convs, skip connections);
        - "down": a 3x3 stride-2 padding-1 conv reading the finer level of size `in_size`;
        - "up": nearest upsampling from the coarser level of size `in_size`, then a 3x3 conv (halo 1).
        """
        return self._cached((kind, in_size), device, lambda: self._patch_index(kind, in_size))

    def _patch_index(self, kind, in_size):
        t = self.tile
        starts_r, starts_c = self.tiles[:, 0] * t, self.tiles[:, 1] * t
        if kind == "conv3":
            off, lim, src = torch.arange(-1, t + 1), (self.height, self.width), None
        elif kind == "interior":
            off, lim, src = torch.arange(t), (self.height, self.width), None
        elif kind == "down":
            off, lim, src = None, in_size, None
        elif kind == "up":
            off, lim, src = torch.arange(-1, t + 1), (self.height, self.width), in_size
        else:
            raise ValueError(kind)
        out = []
        for starts, axis in ((starts_r, 0), (starts_c, 1)):
            if kind == "down":
                idx = 2 * starts[:, None] + torch.arange(-1, 2 * t)[None, :]
                valid = (idx >= 0) & (idx < in_size[axis])
            else:
                idx = starts[:, None] + off[None, :]
                valid = (idx >= 0) & (idx < lim[axis])
                if src is not None:  # nearest: output p reads input floor(p * in / out)
                    idx = torch.div(idx * src[axis], lim[axis], rounding_mode="floor")
            out.append(torch.where(valid, idx, torch.full_like(idx, -1)))
        return tuple(out)

    def im2col_index(self, kind: str, device, in_size: tuple[int, int] | None = None):
        """(rows, cols), each [tiles, 3 * O] for a 3x3 conv of `kind` ("conv3", "down", "up") with O x O outputs per
        tile: entry 3 * o + k is the patch_index entry that output o's tap k reads (patch position o * stride + k).
        Gathered by these, a tile's [3 O, 3 O] "patch" holds, at (3 * oi + ki, 3 * oj + kj), what the conv's
        output (oi, oj) multiplies with its weight's tap (ki, kj): the im2col rows
        (kernels.fused.gather_norm_im2col)."""
        def make():
            rows, cols = self._patch_index(kind, in_size)
            stride = 2 if kind == "down" else 1
            taps = (torch.arange(self.tile)[:, None] * stride + torch.arange(3)[None, :]).flatten()
            return rows[:, taps], cols[:, taps]
        return self._cached(("im2col", kind, in_size), device, make)

    def release(self) -> None:
        """Drops the index maps built on devices (ComfyUI may keep the patched model, and so this plan, alive)."""
        self._maps.clear()

    def _cached(self, key, device, make):
        key = (key, str(device))
        if key not in self._maps:
            outside_capture(device, f"level {self.level}'s index map {key[0]}")
            value = make()
            self._maps[key] = tuple(v.to(device) for v in value) if isinstance(value, tuple) else value.to(device)
        return self._maps[key]


def tiles_covering(active: torch.Tensor, tile: int) -> torch.Tensor:
    """[n, 2] tiles of size `tile` that contain any active position, row-major."""
    h, w = active.shape
    gh, gw = math.ceil(h / tile), math.ceil(w / tile)
    padded = F.pad(active.float(), (0, gw * tile - w, 0, gh * tile - h))
    hit = F.max_pool2d(padded[None, None], tile)[0, 0] > 0
    return torch.nonzero(hit)


def tile_region(tiles: torch.Tensor, tile: int, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    region = torch.zeros(math.ceil(h / tile) * tile, math.ceil(w / tile) * tile, dtype=torch.bool)
    view = region.view(region.shape[0] // tile, tile, region.shape[1] // tile, tile)
    view[tiles[:, 0], :, tiles[:, 1], :] = True
    return region[:h, :w]


def active_tiles(mask: torch.Tensor, level_sizes: list[tuple[int, int]], sparse_levels,
                 tile_sizes: dict[int, int] | int = DEFAULT_TILE) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """Per sparse level: (tile size, its active tiles [n, 2], their region [H, W] clipped to the map)."""
    if mask.shape[-2:] != tuple(level_sizes[0]):
        raise ValueError(f"mask {tuple(mask.shape[-2:])} does not match the latent {tuple(level_sizes[0])}")
    levels = {}
    active = mask.any(dim=0) if mask.dim() == 3 else mask
    for lvl in range(max(sparse_levels, default=-1) + 1):
        if lvl > 0:
            active = pooled(levels[lvl - 1][2] if lvl - 1 in levels else active, level_sizes[lvl])
        if lvl in sparse_levels:
            t = tile_sizes if isinstance(tile_sizes, int) else tile_sizes.get(lvl, DEFAULT_TILE)
            levels[lvl] = tiled(active, t)
    return levels


def pooled(finer: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The any-pool (2x2) of a finer level's active set onto the grid of the next level down, of `size`."""
    h, w = finer.shape
    padded = F.pad(finer.float(), (0, 2 * size[1] - w, 0, 2 * size[0] - h))
    return F.max_pool2d(padded[None, None], 2)[0, 0] > 0


def tiled(active: torch.Tensor, tile: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(tile, the tiles covering `active`, their region clipped to the map)."""
    tiles = tiles_covering(active, tile)
    return tile, tiles, tile_region(tiles, tile, tuple(active.shape))


def _read_region(levels: dict[int, LevelPlan], lvl: int, level_sizes) -> torch.Tensor:
    """Every position of level `lvl` that a sparse op reads: 3x3 convs at the level, the stride-2 conv of the next
    level down, the upsampling conv of the level above. Always contains the active region."""
    h, w = level_sizes[lvl]
    read = levels[lvl].active.clone()
    reads = [(levels[lvl], "conv3", None)]
    if lvl + 1 in levels:
        reads.append((levels[lvl + 1], "down", (h, w)))
    if lvl - 1 in levels:
        reads.append((levels[lvl - 1], "up", (h, w)))
    for lp, kind, in_size in reads:
        rows, cols = lp.patch_index(kind, "cpu", in_size)
        r = rows[:, :, None].expand(-1, -1, cols.shape[1])
        c = cols[:, None, :].expand(-1, rows.shape[1], -1)
        inside = (r >= 0) & (c >= 0)
        read[r[inside], c[inside]] = True
    return read


@dataclass
class EditPlan:
    mask: torch.Tensor                 # [B or 1, H, W] bool: the dilated edit mask at latent resolution
    levels: dict[int, LevelPlan]       # the sparse levels
    level_sizes: list[tuple[int, int]]

    @classmethod
    def build(cls, mask: torch.Tensor, level_sizes: list[tuple[int, int]], sparse_levels,
              tile_sizes: dict[int, int] | int = DEFAULT_TILE) -> "EditPlan":
        levels = {lvl: LevelPlan(lvl, *level_sizes[lvl], t, tiles, region)
                  for lvl, (t, tiles, region) in active_tiles(mask, level_sizes, sparse_levels, tile_sizes).items()}
        for lvl, lp in levels.items():
            lp.read = _read_region(levels, lvl, level_sizes)
        return cls(mask, levels, list(level_sizes))

    def prepare(self, device) -> None:
        """Builds on `device` every index map that a sparse op of this plan may read."""
        for lvl, lp in self.levels.items():
            lp.tiles_on(device), lp.tokens(device), lp.tile_scatter(device), lp.active_in_read(device)
            lp.patch_index("conv3", device)
            if lvl > 0:
                lp.patch_index("down", device, tuple(self.level_sizes[lvl - 1]))
            if lvl + 1 < len(self.level_sizes):
                lp.patch_index("up", device, tuple(self.level_sizes[lvl + 1]))

    @functools.cached_property
    def sparse_anywhere(self) -> bool:
        """Whether some sparse level has inactive tiles (otherwise a sparse step runs every module whole)."""
        return not all(lp.full for lp in self.levels.values())

    def describe(self) -> str:
        parts = [f"level {l} ({p.width}x{p.height}, tile {p.tile}): {p.n_tiles} tiles, {p.fraction:.0%}"
                 for l, p in sorted(self.levels.items())]
        return "; ".join(parts) or "no sparse level (every level is under the smallest sparse size): each step runs dense"
