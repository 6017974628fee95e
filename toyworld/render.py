"""Scenes -> images and per-object pixel masks. Pure torch, vectorised over the batch, on the scenes' device.

Edges are hard (no anti-aliasing): a pixel belongs to an object or not, so "the pixels an edit changes" is an
exact set, and an image is its background with each object's colour painted over its mask.
"""
from __future__ import annotations

import math

import torch

from . import world
from .world import Scenes

# Each shape's test in local coordinates (u, v) = (offset from the centre) / half extent; all four fill about
# the same [-1, 1] box, so size words mean the same for every shape.
SQUARE_HALF = 0.85          # a square of the full box would look larger than the other shapes
TRIANGLE_HALF_HEIGHT = 0.9  # apex up, base at the bottom


def shape_masks(u: torch.Tensor, v: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Inside-tests of the shapes `shape` (broadcast against u, v)."""
    circle = u * u + v * v <= 1.0
    square = (u.abs() <= SQUARE_HALF) & (v.abs() <= SQUARE_HALF)
    h = TRIANGLE_HALF_HEIGHT
    triangle = (v >= -h) & (v <= h) & (u.abs() <= (v + h) / (2 * h))
    diamond = u.abs() + v.abs() <= 1.0
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, triangle, diamond)))


def _pixel_grid(image_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(image_size, device=device, dtype=torch.float32) + 0.5  # pixel centres
    return c[None, :], c[:, None]  # x [1, W], y [H, 1]


def object_masks(scenes: Scenes, image_size: int = world.REFERENCE_SIZE) -> torch.Tensor:
    """[B, K, H, W] bool: each slot's pixels (all False for an absent slot)."""
    x, y = _pixel_grid(image_size, scenes.device)
    cx, cy = world.cell_centre(scenes.cell, image_size)
    r = world.half_extent(scenes.size, image_size)
    u = (x - cx[..., None, None]) / r[..., None, None]
    v = (y - cy[..., None, None]) / r[..., None, None]
    return shape_masks(u, v, scenes.shape[..., None, None]) & scenes.present[..., None, None]


def background(scenes: Scenes, image_size: int = world.REFERENCE_SIZE) -> torch.Tensor:
    """[B, 3, H, W] float in 0..1: the tinted pattern of each scene."""
    device = scenes.device
    scale = image_size / world.REFERENCE_SIZE
    x, y = _pixel_grid(image_size, device)
    x, y = x[None], y[None]
    px = scenes.phase[:, 0, None, None]
    py = scenes.phase[:, 1, None, None]

    period = world.STRIPE_PERIOD * scale
    o = scenes.orientation[:, None, None]
    diagonal = torch.where(o == 2, x + y, x - y) / math.sqrt(2)
    q = torch.where(o == 0, y, torch.where(o == 1, x, diagonal))
    striped = torch.floor(q / (period / 2) + 2 * px).remainder(2) == 1

    cs = world.CHECKER_SIZE * scale
    checkered = (torch.floor(x / cs + px) + torch.floor(y / cs + py)).remainder(2) == 1

    sp = world.DOT_SPACING * scale
    dx = (x / sp + px).remainder(1.0) - 0.5
    dy = (y / sp + py).remainder(1.0) - 0.5
    dotted = (dx * dx + dy * dy) * sp * sp <= (world.DOT_RADIUS * scale) ** 2

    kind = scenes.background[:, None, None]
    shaded = torch.where(kind == 1, striped, torch.where(kind == 2, checkered, torch.where(kind == 3, dotted,
                                                                                           False)))
    tint = world.TINT_RGB.to(device)[scenes.tint][:, :, None, None]
    return torch.where(shaded[:, None], tint * world.PATTERN_SHADE, tint)


def render(scenes: Scenes, image_size: int = world.REFERENCE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, 3, H, W] float in 0..1, object masks [B, K, H, W] bool)."""
    masks = object_masks(scenes, image_size)
    image = background(scenes, image_size)
    colours = world.COLOUR_RGB.to(scenes.device)[scenes.colour]  # [B, K, 3]
    for k in range(masks.shape[1]):  # objects never overlap, so the painting order does not matter
        image = torch.where(masks[:, k, None], colours[:, k, :, None, None], image)
    return image, masks
