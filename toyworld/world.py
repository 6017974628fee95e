"""The toy world's vocabulary and batches of scenes.

A scene is 1 to 3 objects on a textured background. Each object has a shape, a colour, a size and a cell of a
3x3 grid; objects sit exactly at their cell's centre and never share a cell, so they never overlap and the
pixels an edit changes are known exactly (no occlusion, no jitter to guess). What the caption does not say is
random per scene: the background's tint, the stripes' orientation and the pattern's phase, so a generator still
has to choose something that the text leaves open.

Scenes are drawn with a CPU generator (a few integers per scene) and then moved to the device, so a seed gives
the same scenes on CPU and GPU; rendering them is deterministic (see render.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
# Cells in reading order; each one's phrase in the caption.
CELLS = ("at the top left", "at the top", "at the top right",
         "on the left", "in the middle", "on the right",
         "at the bottom left", "at the bottom", "at the bottom right")
MAX_OBJECTS = 3
GRID = 3

# Saturated object colours, far from each other and from the muted background tints, so that a pixel's nearest
# palette colour says which object it belongs to (judge.py relies on this).
COLOUR_RGB = torch.tensor([
    [0.86, 0.14, 0.14],   # red
    [0.97, 0.55, 0.10],   # orange
    [0.96, 0.88, 0.16],   # yellow
    [0.16, 0.68, 0.24],   # green
    [0.14, 0.32, 0.90],   # blue
    [0.58, 0.20, 0.76],   # purple
])
# Background tints (not named in captions) and the darker second tone of patterns.
TINT_RGB = torch.tensor([
    [0.56, 0.56, 0.56],   # grey
    [0.80, 0.74, 0.62],   # beige
    [0.50, 0.60, 0.68],   # slate
])
PATTERN_SHADE = 0.8

# Geometry at the reference size of 256 px; everything scales with the image size.
REFERENCE_SIZE = 256
HALF_EXTENT = (22.0, 34.0)          # small, large: half the bounding box; a large object leaves ~9 px to its cell
STRIPE_PERIOD = 24.0
CHECKER_SIZE = 32.0
DOT_SPACING = 24.0
DOT_RADIUS = 5.0


@dataclass(frozen=True)
class Scenes:
    """A batch of B scenes with up to MAX_OBJECTS object slots each. Per slot ([B, K]): present (bool), shape,
    colour, size, cell. Per scene ([B]): background, tint, orientation (stripes: 0 horizontal, 1 vertical, 2 and
    3 diagonal); phase ([B, 2], a fraction of the pattern's period). Present slots come first, in caption order."""
    present: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    cell: torch.Tensor
    background: torch.Tensor
    tint: torch.Tensor
    orientation: torch.Tensor
    phase: torch.Tensor

    def __len__(self) -> int:
        return self.present.shape[0]

    @property
    def device(self) -> torch.device:
        return self.present.device

    def to(self, device) -> Scenes:
        return Scenes(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index) -> Scenes:
        """Scenes `index` (an int, slice, index tensor or boolean mask over the batch), as a batch."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def replace(self, **changes) -> Scenes:
        return replace(self, **changes)

    @property
    def count(self) -> torch.Tensor:
        return self.present.sum(dim=1)

    def validate(self) -> None:
        """Raises ValueError unless the batch is a well-formed set of scenes (used on hand-built scenes)."""
        p = self.present
        if p.dtype != torch.bool or p.ndim != 2 or p.shape[1] != MAX_OBJECTS:
            raise ValueError(f"present must be a bool [B, {MAX_OBJECTS}] tensor")
        if (p[:, 1:] & ~p[:, :-1]).any():
            raise ValueError("present slots must come first")
        for name, n in (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)),
                        ("cell", len(CELLS))):
            v = getattr(self, name)
            if v.shape != p.shape or ((v < 0) | (v >= n))[p].any():
                raise ValueError(f"{name} out of range")
        cells = torch.where(p, self.cell, -1 - torch.arange(MAX_OBJECTS, device=p.device))
        if (cells[:, :, None] == cells[:, None, :]).sum(dim=(1, 2)).gt(MAX_OBJECTS).any():
            raise ValueError("two objects share a cell")


def sample_scenes(n: int, seed: int, min_objects: int = 1, max_objects: int = MAX_OBJECTS,
                  device: torch.device | str = "cpu", count: torch.Tensor | None = None) -> Scenes:
    """`n` random scenes; the same seed gives the same scenes on every device. `count` ([n]) fixes the number of
    objects per scene instead of drawing it from min_objects..max_objects."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    g = torch.Generator().manual_seed(seed)
    k = MAX_OBJECTS
    drawn = torch.randint(min_objects, max_objects + 1, (n,), generator=g)
    count = drawn if count is None else count.to("cpu", torch.long)
    if count.shape != (n,) or ((count < 0) | (count > k)).any():
        raise ValueError(f"count must be [n] in 0..{k}")
    present = torch.arange(k)[None, :] < count[:, None]
    # distinct cells: the first k of a random permutation of the 9 cells
    cell = torch.rand(n, len(CELLS), generator=g).argsort(dim=1)[:, :k]
    scenes = Scenes(
        present=present,
        shape=torch.randint(len(SHAPES), (n, k), generator=g),
        colour=torch.randint(len(COLOURS), (n, k), generator=g),
        size=torch.randint(len(SIZES), (n, k), generator=g),
        cell=cell,
        background=torch.randint(len(BACKGROUNDS), (n,), generator=g),
        tint=torch.randint(len(TINT_RGB), (n,), generator=g),
        orientation=torch.randint(4, (n,), generator=g),
        phase=torch.rand(n, 2, generator=g),
    )
    return _zero_absent(scenes).to(device)


def _zero_absent(s: Scenes) -> Scenes:
    """Absent slots hold zeros, so equal scenes compare equal whatever their history."""
    p = s.present
    return s.replace(shape=s.shape * p, colour=s.colour * p, size=s.size * p, cell=s.cell * p)


def compact(s: Scenes) -> Scenes:
    """Moves present slots to the front (keeping their order) and zeroes the absent ones."""
    order = (~s.present).to(torch.int8).argsort(dim=1, stable=True)
    take = lambda t: t.gather(1, order)
    return _zero_absent(s.replace(present=take(s.present), shape=take(s.shape), colour=take(s.colour),
                                  size=take(s.size), cell=take(s.cell)))


def cell_centre(cell: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) in pixels of each cell's centre."""
    step = image_size / GRID
    return (cell % GRID).float().add(0.5).mul(step), (cell // GRID).float().add(0.5).mul(step)


def cell_box(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the pixels of a cell (the last row/column takes the rounding remainder)."""
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    r, c = divmod(int(cell), GRID)
    return edges[r], edges[r + 1], edges[c], edges[c + 1]


def half_extent(size: torch.Tensor, image_size: int) -> torch.Tensor:
    return torch.tensor(HALF_EXTENT, device=size.device)[size] * (image_size / REFERENCE_SIZE)
