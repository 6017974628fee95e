"""Reads an image back into the toy world's words: which object (colour, shape, size), if any, a grid cell holds.

This is the benchmark's edit-success test, built from the generator's own knowledge instead of a learned
classifier. Within the cell, a pixel belongs to an object when it is close to one of the six palette colours
(the background tints are far from all of them); the most frequent palette colour is the object's colour if it
covers enough pixels. The object's pixels are then compared with the eight (shape, size) templates that the
renderer draws, each shifted so that its centroid sits on the object's centroid (a generator may place an object
a few pixels off); the best intersection-over-union names the shape and size, and below MIN_IOU the object is
present but unrecognisable. On clean renders every cell is read correctly (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import render, world
from .edits import REMOVE, Edits
from .world import Scenes

COLOUR_TOLERANCE = 0.3       # RGB distance to a palette colour; background tints are >= 0.4 away from all six
MIN_AREA_FRACTION = 0.3      # of the smallest object's area (a small triangle): less is "no object here"
MIN_IOU = 0.5


@dataclass(frozen=True)
class Reading:
    present: torch.Tensor   # [N] bool: an object is there
    colour: torch.Tensor    # [N] palette index, -1 if none
    shape: torch.Tensor     # [N] shape index, -1 if none or unrecognisable
    size: torch.Tensor      # [N] size index, -1 if none or unrecognisable
    iou: torch.Tensor       # [N] best template IoU (0 if none)


def _templates(image_size: int, cell: int, dx: torch.Tensor, dy: torch.Tensor, device) -> torch.Tensor:
    """[T, 8, h, w] bool: the 8 (shape, size) templates in `cell`'s window, shifted by (dx, dy) [T, 8] pixels."""
    y0, y1, x0, x1 = world.cell_box(cell, image_size)
    cx, cy = world.cell_centre(torch.tensor(cell), image_size)
    shapes = torch.arange(len(world.SHAPES), device=device).repeat_interleave(len(world.SIZES))
    sizes = torch.arange(len(world.SIZES), device=device).repeat(len(world.SHAPES))
    r = world.half_extent(sizes, image_size)[None, :, None, None]
    x = torch.arange(x0, x1, device=device, dtype=torch.float32)[None, None, None, :] + 0.5
    y = torch.arange(y0, y1, device=device, dtype=torch.float32)[None, None, :, None] + 0.5
    u = (x - float(cx) - dx[..., None, None]) / r
    v = (y - float(cy) - dy[..., None, None]) / r
    return render.shape_masks(u, v, shapes[None, :, None, None])


def read_cells(images: torch.Tensor, cells: torch.Tensor) -> Reading:
    """What each image holds in its cell. images: [N, 3, H, W] in 0..1 (square); cells: [N] cell indices."""
    n, _, h, w = images.shape
    if h != w:
        raise ValueError("the toy world's images are square")
    device = images.device
    palette = world.COLOUR_RGB.to(device)
    smallest = 2 * render.TRIANGLE_HALF_HEIGHT * (world.HALF_EXTENT[0] * h / world.REFERENCE_SIZE) ** 2
    min_area = MIN_AREA_FRACTION * smallest
    present = torch.zeros(n, dtype=torch.bool, device=device)
    colour, shape, size = (torch.full((n,), -1, dtype=torch.long, device=device) for _ in range(3))
    iou = torch.zeros(n, device=device)
    for cell in cells.unique().tolist():
        rows = (cells == cell).nonzero().flatten()
        y0, y1, x0, x1 = world.cell_box(cell, h)
        crop = images[rows, :, y0:y1, x0:x1].float()                                         # [T, 3, ch, cw]
        # squared distances to the palette as |p|^2 - 2 p.c + |c|^2 (a broadcast norm is ~50x slower on CPU)
        dist2 = ((crop * crop).sum(1, keepdim=True) - 2 * torch.einsum("tchw,kc->tkhw", crop, palette)
                 + (palette * palette).sum(1)[None, :, None, None])                           # [T, 6, ch, cw]
        best, nearest = dist2.min(dim=1)
        member = best < COLOUR_TOLERANCE ** 2
        counts = torch.stack([(member & (nearest == i)).sum(dim=(1, 2)) for i in range(len(palette))], 1)
        area, top = counts.max(dim=1)
        here = area >= min_area
        seg = member & (nearest == top[:, None, None])                                        # [T, ch, cw]
        ys = torch.arange(y0, y1, device=device, dtype=torch.float32)[None, :, None] + 0.5
        xs = torch.arange(x0, x1, device=device, dtype=torch.float32)[None, None, :] + 0.5
        mass = seg.sum(dim=(1, 2)).clamp(min=1)
        sx, sy = (seg * xs).sum(dim=(1, 2)) / mass, (seg * ys).sum(dim=(1, 2)) / mass
        # template centroids at zero shift, then shift each template onto the object's centroid
        zero = torch.zeros(1, len(world.SHAPES) * len(world.SIZES), device=device)
        base = _templates(h, cell, zero, zero, device)[0]                                     # [8, ch, cw]
        bmass = base.sum(dim=(1, 2)).float()
        bx, by = (base * xs).sum(dim=(1, 2)) / bmass, (base * ys).sum(dim=(1, 2)) / bmass
        tmpl = _templates(h, cell, sx[:, None] - bx[None], sy[:, None] - by[None], device)    # [T, 8, ch, cw]
        inter = (tmpl & seg[:, None]).sum(dim=(2, 3)).float()
        union = (tmpl | seg[:, None]).sum(dim=(2, 3)).float().clamp(min=1)
        score, which = (inter / union).max(dim=1)
        recognised = here & (score >= MIN_IOU)
        present[rows] = here
        colour[rows] = torch.where(here, top, -1)
        shape[rows] = torch.where(recognised, which // len(world.SIZES), -1)
        size[rows] = torch.where(recognised, which % len(world.SIZES), -1)
        iou[rows] = torch.where(here, score, 0.0)
    return Reading(present, colour, shape, size, iou)


def objects_correct(images: torch.Tensor, scenes: Scenes) -> torch.Tensor:
    """[B, K] bool: each present object of the scene is in its cell with its colour, shape and size (absent
    slots: True)."""
    b, k = scenes.present.shape
    reading = read_cells(images.repeat_interleave(k, 0), scenes.cell.reshape(-1))
    ok = (reading.present & (reading.colour == scenes.colour.reshape(-1)) & (reading.shape == scenes.shape.reshape(-1))
          & (reading.size == scenes.size.reshape(-1)))
    return ok.reshape(b, k) | ~scenes.present


def edit_success(images: torch.Tensor, edits: Edits) -> torch.Tensor:
    """[B] bool: the edited image has what the edit asked for at the edited object's cell: the new object with its
    colour, shape and size, or (remove) nothing there."""
    removed = edits.kind == REMOVE
    b = torch.arange(len(edits), device=edits.kind.device)
    slot_after = edits.slot_after.clamp(min=0)
    cell = torch.where(removed, edits.before.cell[b, edits.slot_before.clamp(min=0)], edits.after.cell[b, slot_after])
    reading = read_cells(images, cell.to(images.device))
    want = lambda field: getattr(edits.after, field)[b, slot_after].to(images.device)
    there = (reading.present & (reading.colour == want("colour")) & (reading.shape == want("shape"))
             & (reading.size == want("size")))
    return torch.where(removed.to(images.device), ~reading.present, there)
