"""Caption edits with their exact ground truth.

An edit changes one object of a scene: its colour, its shape or its size, or adds an object in a free cell, or
removes one. Everything else (the other objects, the background with its unnamed tint and phase) stays, so
between the two rendered images only the edited object's pixels can differ:
- `affected`: the union of the object's pixels before and after, the region an editor has to recompute;
- `changed`: the pixels whose colour really changes. That is `affected` except where the old and the new object
  overlap with the same colour (a shape or size change keeps the colour), which look the same in both images.
Both are computed from the scene description, not from the images; the tests check `changed` against a pixel
diff of the two renders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import captions, render, world
from .world import Scenes

EDIT_KINDS = ("colour", "shape", "size", "add", "remove")
COLOUR, SHAPE, SIZE, ADD, REMOVE = range(5)


@dataclass(frozen=True)
class Edits:
    before: Scenes
    after: Scenes
    kind: torch.Tensor          # [B] index into EDIT_KINDS
    slot_before: torch.Tensor   # [B] the edited object's slot in `before` (-1: added)
    slot_after: torch.Tensor    # [B] its slot in `after` (-1: removed)

    def __len__(self) -> int:
        return len(self.before)

    def regions(self, image_size: int = world.REFERENCE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        """(affected, changed): [B, H, W] bool each; see the module docstring."""
        old = _slot_mask(render.object_masks(self.before, image_size), self.slot_before)
        new = _slot_mask(render.object_masks(self.after, image_size), self.slot_after)
        old_colour = _slot_value(self.before.colour, self.slot_before)
        new_colour = _slot_value(self.after.colour, self.slot_after)
        same = (self.slot_before >= 0) & (self.slot_after >= 0) & (old_colour == new_colour)
        affected = old | new
        return affected, affected & ~(old & new & same[:, None, None])

    def captions(self) -> tuple[list[str], list[str]]:
        return captions.captions(self.before), captions.captions(self.after)

    def describe(self) -> list[str]:
        """One line per edit, e.g. "colour: red -> blue (the circle at the top left)"."""
        b, a = self.before.to("cpu"), self.after.to("cpu")
        out = []
        for i in range(len(self)):
            kind, sb, sa = int(self.kind[i]), int(self.slot_before[i]), int(self.slot_after[i])
            if kind == ADD:
                out.append("add: " + captions.clause(*_attrs(a, i, sa)))
            elif kind == REMOVE:
                out.append("remove: " + captions.clause(*_attrs(b, i, sb)))
            else:
                names = (world.COLOURS, world.SHAPES, world.SIZES)[kind]
                field = ("colour", "shape", "size")[kind]
                old, new = int(getattr(b, field)[i, sb]), int(getattr(a, field)[i, sa])
                out.append(f"{EDIT_KINDS[kind]}: {names[old]} -> {names[new]} ({captions.clause(*_attrs(b, i, sb))})")
        return out


def _attrs(s: Scenes, i: int, k: int) -> tuple[int, int, int, int]:
    return int(s.size[i, k]), int(s.colour[i, k]), int(s.shape[i, k]), int(s.cell[i, k])


def _slot_value(values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return values.gather(1, slot.clamp(min=0)[:, None])[:, 0]


def _slot_mask(masks: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[B, H, W]: masks[b, slot[b]], all False where slot is -1."""
    picked = masks[torch.arange(masks.shape[0], device=masks.device), slot.clamp(min=0)]
    return picked & (slot >= 0)[:, None, None]


def allowed_kinds(scenes: Scenes) -> torch.Tensor:
    """[B, 5] bool: add needs a free slot, remove leaves at least one object."""
    count = scenes.count
    yes = torch.ones_like(count, dtype=torch.bool)
    return torch.stack([yes, yes, yes, count < world.MAX_OBJECTS, count >= 2], dim=1)


def apply_edits(scenes: Scenes, kind: torch.Tensor, seed: int) -> Edits:
    """Applies edit `kind[b]` to scene b, choosing the object and the new value at random (a different colour,
    shape or size; for add: a free cell and random attributes). Raises ValueError where a kind is not allowed."""
    kind = kind.to("cpu", torch.long)
    s = scenes.to("cpu")
    if not allowed_kinds(s)[torch.arange(len(s)), kind].all():
        raise ValueError("an edit kind is not allowed for its scene (add to a full scene, or remove the last object)")
    g = torch.Generator().manual_seed(seed)
    n, k = s.present.shape
    rows = torch.arange(n)
    # the edited object: a random present slot (add: the first free slot, so the new clause comes last)
    pick = torch.where(s.present, torch.rand(n, k, generator=g), -1.0).argmax(dim=1)
    slot = torch.where(kind == ADD, s.count, pick)
    colour, shape, size, cell, present = s.colour.clone(), s.shape.clone(), s.size.clone(), s.cell.clone(), \
        s.present.clone()

    step = lambda m: torch.randint(1, m, (n,), generator=g)
    new_colour = (colour[rows, slot.clamp(max=k - 1)] + step(len(world.COLOURS))) % len(world.COLOURS)
    new_shape = (shape[rows, slot.clamp(max=k - 1)] + step(len(world.SHAPES))) % len(world.SHAPES)
    new_size = 1 - size[rows, slot.clamp(max=k - 1)]
    add_attrs = [torch.randint(m, (n,), generator=g) for m in (len(world.COLOURS), len(world.SHAPES), len(world.SIZES))]
    # summed, not scattered: an absent slot's cell is 0, and scattering its False would free the top left cell
    occupied = torch.zeros(n, len(world.CELLS), dtype=torch.long).scatter_add_(1, s.cell, s.present.long()) > 0
    free_cell = torch.where(occupied, -1.0, torch.rand(n, len(world.CELLS), generator=g)).argmax(dim=1)

    for b in range(n):
        kb, sb = int(kind[b]), int(slot[b])
        if kb == COLOUR:
            colour[b, sb] = new_colour[b]
        elif kb == SHAPE:
            shape[b, sb] = new_shape[b]
        elif kb == SIZE:
            size[b, sb] = new_size[b]
        elif kb == ADD:
            present[b, sb] = True
            colour[b, sb], shape[b, sb], size[b, sb] = (int(a[b]) for a in add_attrs)
            cell[b, sb] = free_cell[b]
        else:
            present[b, sb] = False
    after = world.compact(s.replace(present=present, colour=colour, shape=shape, size=size, cell=cell))
    slot_before = torch.where(kind == ADD, -1, slot)
    # removing slot j moves the later objects one slot forward; every other kind keeps the slot
    slot_after = torch.where(kind == REMOVE, -1, slot)
    device = scenes.device
    return Edits(scenes, after.to(device), kind.to(device), slot_before.to(device), slot_after.to(device))


def sample_edits(n: int, seed: int, kinds: tuple[str, ...] = EDIT_KINDS, device="cpu") -> Edits:
    """`n` scene/edit pairs with the kinds taken in turn (balanced); each scene's object count is drawn from what
    its kind allows (add: 1-2 objects, remove: 2-3, the others 1-3)."""
    kind_ids = torch.tensor([EDIT_KINDS.index(x) for x in kinds])[torch.arange(n) % len(kinds)]
    g = torch.Generator().manual_seed(seed)
    lo = torch.where(kind_ids == REMOVE, 2, 1)
    hi = torch.where(kind_ids == ADD, world.MAX_OBJECTS - 1, world.MAX_OBJECTS)
    count = lo + (torch.rand(n, generator=g) * (hi - lo + 1)).long().clamp(max=hi - lo)
    scenes = world.sample_scenes(n, seed=seed + 1, count=count)
    edits = apply_edits(scenes, kind_ids, seed=seed + 2)
    return Edits(edits.before.to(device), edits.after.to(device), edits.kind.to(device),
                 edits.slot_before.to(device), edits.slot_after.to(device))
