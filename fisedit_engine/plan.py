"""The per-edit plan: which tiles of each sparse UNet level are active, and the index maps the sparse ops gather by.

Level 0's active set is every tile that touches the (dilated) edit mask of any batch sample. Level l+1's is every
tile touching the any-pooled (2x2) active set of level l, so a coarser level always covers the parents of the finer
one. All blocks of one level share its active set: then every block's input outside the set is exactly the cached
value (the previous block's cached output), which is what makes each sparse op exact (invariant I5).

A sparse op reads an input patch per active tile: `rows`/`cols` [tiles, P] give, per tile, the input coordinates of
the patch (the tile plus its halo for that op's geometry), -1 where the patch leaves the input (zero padding). They
are built once per edit and per op geometry, on the device that runs the edit: before a CUDA graph captures a
sparse step (EditPlan.prepare), since a capture cannot copy them from host memory.

A level's index maps may be padded to a `Capacity`, longer than its tiles need: a CUDA graph bakes their lengths into
its launches, so a graph captured for one mask can replay another whose maps fit, once they are copied into the same
tensors (`EditPlan.refill`). A padded map repeats its last entry: the ops that gather, compute and scatter by it then
compute that entry again and write the same value to the same place. The sums of the exact GroupNorm statistics
would count it twice, so their maps (`stat_positions`) are padded instead with a position that the sparse ops read
but do not compute, where the fresh map and the cached one hold the same value: it adds nothing to the change.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .graphs import outside_capture

DEFAULT_TILE = 4


@dataclass(frozen=True)
class Capacity:
    """The lengths of a level's index maps: its tiles (and the patch maps, one row per tile), its active positions
    (the tokens, the tiles' scatter, the statistics' positions) and the positions its ops read."""
    tiles: int
    tokens: int
    read: int

    def holds(self, other: "Capacity") -> bool:
        return self.tiles >= other.tiles and self.tokens >= other.tokens and self.read >= other.read


@dataclass
class LevelPlan:
    level: int
    height: int
    width: int
    tile: int
    tiles: torch.Tensor            # [n, 2] (tile row, tile col), long
    active: torch.Tensor           # [H, W] bool: the union of the active tiles, clipped to the map
    read: torch.Tensor | None = None  # [H, W] bool: every position a sparse op reads at this level (see EditPlan)
    capacity: Capacity | None = None  # the index maps' lengths; None: what the tiles need (`needs`)
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

    @property
    def needs(self) -> Capacity:
        """The index maps' lengths unpadded (no read positions before the plan has set `read`)."""
        return Capacity(self.n_tiles, int(self.active.sum()), 0 if self.read is None else int(self.read.sum()))

    @property
    def lengths(self) -> Capacity:
        """The index maps' lengths as built: the capacity, or what the tiles need."""
        return self.capacity or self.needs

    def tiles_on(self, device) -> torch.Tensor:
        """`tiles` on `device` (indexing a device tensor by host indices would copy them on every call), padded."""
        return self._cached(("tiles",), device)

    def tokens(self, device) -> torch.Tensor:
        """Flat indices (row-major, as SpatialTransformer orders tokens) of the active positions, padded."""
        return self._cached(("tokens",), device)

    def tile_scatter(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, sources) for kernels.reference.scatter_tiles_: where each tile element inside the map goes
        (padded)."""
        return self._cached(("tile_scatter",), device)

    def read_positions(self, device) -> torch.Tensor:
        """Flat indices of the positions the level's sparse ops read (the active tiles and their halo rings),
        padded."""
        return self._cached(("read",), device)

    def stat_positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, their places in read_positions()): the active positions, for the exact GroupNorm statistics,
        padded with a read position that is not active (module docstring)."""
        return self._cached(("stats",), device)

    def patch_index(self, kind: str, device, in_size: tuple[int, int] | None = None):
        """(rows, cols), each [tiles, P] (padded), for one op geometry:
        - "conv3": a 3x3 stride-1 conv at this level (halo 1);
        - "interior": the tile itself (1x1 convs, skip connections);
        - "down": a 3x3 stride-2 padding-1 conv reading the finer level of size `in_size`;
        - "up": nearest upsampling from the coarser level of size `in_size`, then a 3x3 conv (halo 1).
        """
        return self._cached(("patches", kind, in_size), device)

    def _patch_index(self, kind, in_size):
        t, tiles = self.tile, _padded(self.tiles, self.lengths.tiles)
        starts_r, starts_c = tiles[:, 0] * t, tiles[:, 1] * t
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
        return self._cached(("im2col", kind, in_size), device)

    def _im2col_index(self, kind, in_size):
        rows, cols = self._patch_index(kind, in_size)
        stride = 2 if kind == "down" else 1
        taps = (torch.arange(self.tile)[:, None] * stride + torch.arange(3)[None, :]).flatten()
        return rows[:, taps], cols[:, taps]

    def _tile_scatter(self):
        t = self.tile
        r = self.tiles[:, 0, None, None] * t + torch.arange(t)[None, :, None]
        c = self.tiles[:, 1, None, None] * t + torch.arange(t)[None, None, :]
        r, c = r.expand(-1, t, t).flatten(), c.expand(-1, t, t).flatten()
        inside = (r < self.height) & (c < self.width)  # as many as the active positions: the tiles do not overlap
        tokens = self.lengths.tokens
        return _padded((r * self.width + c)[inside], tokens), _padded(torch.nonzero(inside).flatten(), tokens)

    def _stat_positions(self):
        tokens, read = torch.nonzero(self.active.flatten()).flatten(), torch.nonzero(self.read.flatten()).flatten()
        in_read = torch.searchsorted(read, tokens)
        missing = self.lengths.tokens - len(tokens)
        if missing:
            neutral = torch.nonzero((self.read & ~self.active).flatten()).flatten()[:1]  # there is one: not full
            tokens = torch.cat([tokens, neutral.expand(missing)])
            in_read = torch.cat([in_read, torch.searchsorted(read, neutral).expand(missing)])
        return tokens, in_read

    def _make(self, key):
        """The index map named `key` (as `_cached` keys them), on the host."""
        lengths = self.lengths
        if key[0] == "tiles":
            return _padded(self.tiles, lengths.tiles)
        if key[0] == "tokens":
            return _padded(torch.nonzero(self.active.flatten()).flatten(), lengths.tokens)
        if key[0] == "read":
            return _padded(torch.nonzero(self.read.flatten()).flatten(), lengths.read)
        if key[0] == "tile_scatter":
            return self._tile_scatter()
        if key[0] == "stats":
            return self._stat_positions()
        if key[0] == "patches":
            return self._patch_index(*key[1:])
        if key[0] == "im2col":
            return self._im2col_index(*key[1:])
        raise KeyError(key)

    def release(self) -> None:
        """Drops the index maps built on devices (ComfyUI may keep the patched model, and so this plan, alive)."""
        self._maps.clear()

    def refill(self, other: "LevelPlan") -> None:
        """Takes `other`'s tiles (another mask's, of the same tile size, within this plan's capacity), writing its
        index maps into the tensors this plan built: whatever holds them, a CUDA graph included, reads the other
        mask's from then on."""
        if other.tile != self.tile or (other.height, other.width) != (self.height, self.width):
            raise ValueError(f"level {self.level}: tiles of {other.tile} on {other.height}x{other.width} cannot refill "
                             f"a plan of tile {self.tile} on {self.height}x{self.width}")
        if not self.lengths.holds(other.needs):
            raise ValueError(f"level {self.level}: {other.needs} does not fit the capacity {self.lengths}")
        self.capacity = other.capacity = self.lengths  # before the tiles change: the maps keep their lengths
        for (key, _), value in self._maps.items():
            outside_capture(_device_of(value), f"level {self.level}'s index map {key}")
            new = other._make(key)
            for target, v in zip(value if isinstance(value, tuple) else (value,),
                                 new if isinstance(new, tuple) else (new,), strict=True):
                target.copy_(v)
        self.tiles, self.active, self.read = other.tiles, other.active, other.read

    def _cached(self, key, device):
        key = (key, str(device))
        if key not in self._maps:
            outside_capture(device, f"level {self.level}'s index map {key[0]}")
            value = self._make(key[0])
            self._maps[key] = tuple(v.to(device) for v in value) if isinstance(value, tuple) else value.to(device)
        return self._maps[key]


def _padded(index: torch.Tensor, length: int) -> torch.Tensor:
    """`index` (along its first dim) with its last entry repeated up to `length` entries."""
    missing = length - index.shape[0]
    if missing < 0 or (missing and index.shape[0] == 0):
        raise ValueError(f"{index.shape[0]} entries cannot be padded to {length}")
    return torch.cat([index, index[-1:].expand(missing, *index.shape[1:])]) if missing else index


def _device_of(value) -> torch.device:
    return (value[0] if isinstance(value, tuple) else value).device


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
              tile_sizes: dict[int, int] | int = DEFAULT_TILE,
              capacity: dict[int, Capacity] | None = None) -> "EditPlan":
        """`capacity`: per level, the lengths to pad its index maps to (at least what its tiles need; a level left
        out is not padded)."""
        levels = {lvl: LevelPlan(lvl, *level_sizes[lvl], t, tiles, region)
                  for lvl, (t, tiles, region) in active_tiles(mask, level_sizes, sparse_levels, tile_sizes).items()}
        for lvl, lp in levels.items():
            lp.read = _read_region(levels, lvl, level_sizes)
        for lvl, lp in levels.items():
            lp.release()  # the read regions' patch maps, built unpadded
            wanted = (capacity or {}).get(lvl)
            if wanted is not None:
                if not wanted.holds(lp.needs):
                    raise ValueError(f"level {lvl}: the capacity {wanted} is short of what its tiles need, {lp.needs}")
                # a whole map needs no padding (and has no inactive position to pad the statistics with)
                positions = lp.height * lp.width
                lp.capacity = Capacity(wanted.tiles, min(wanted.tokens, positions), min(wanted.read, positions))
        return cls(mask, levels, list(level_sizes))

    def lengths(self) -> dict[int, Capacity]:
        """Per level, its index maps' lengths."""
        return {lvl: lp.lengths for lvl, lp in self.levels.items()}

    def holds(self, other: "EditPlan") -> bool:
        """Whether `other` (another mask's plan) fits this one's index maps (`refill`): the same levels, tile sizes
        and whole levels, and no map longer."""
        return (other.level_sizes == self.level_sizes and other.levels.keys() == self.levels.keys()
                and all(o.tile == lp.tile and o.full == lp.full and lp.lengths.holds(o.needs)
                        for lp, o in ((lp, other.levels[lvl]) for lvl, lp in self.levels.items())))

    def refill(self, other: "EditPlan") -> None:
        """Takes `other`'s mask and tiles into the index maps this plan built (LevelPlan.refill); `holds(other)`."""
        if not self.holds(other):
            raise ValueError(f"the plan {other.describe()} does not fit this one's index maps "
                             f"({self.describe()}, lengths {self.lengths()})")
        for lvl, lp in self.levels.items():
            lp.refill(other.levels[lvl])
        self.mask = other.mask
        self.__dict__.pop("sparse_anywhere", None)  # functools.cached_property

    def prepare(self, device) -> None:
        """Builds on `device` every index map that a sparse op of this plan may read."""
        for lvl, lp in self.levels.items():
            lp.tiles_on(device), lp.tokens(device), lp.tile_scatter(device), lp.stat_positions(device)
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
        """Per sparse level its tiles and active share; where the maps are padded (a refit into another mask's, or
        grown to hold both), how many tiles they compute."""
        parts = [f"level {l} ({p.width}x{p.height}, tile {p.tile}): {p.n_tiles} tiles"
                 f"{f' in maps of {p.lengths.tiles}' if p.lengths.tiles != p.n_tiles else ''}, {p.fraction:.0%}"
                 for l, p in sorted(self.levels.items())]
        return "; ".join(parts) or "no sparse level (every level is under the smallest sparse size): each step runs dense"
