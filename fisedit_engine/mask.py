"""The difference mask: where the edited prompt changes the latent, from a few probe steps.

Per probe step, the channel-summed absolute difference between the edited and the cached latent, normalised to
[0, 1] per step and sample (so late steps with small absolute changes count as much as early ones), summed over the
steps, then thresholded: by Otsu's method (the cut that best separates two classes of values) or by the quantile
that selects `edit_size` of the area. Cleaned with a 3x3 opening (odd, so centred: the authors' 2x2 opening shifted
their mask by a latent pixel) and dilated. A step where nothing differs contributes nothing (the authors' min-max
normalisation divided 0 by 0 there), so an unchanged prompt gives an empty mask. Differences below 1% of the
latent's mean magnitude are rounding, not edits: the probe computes the positive branch alone, in another batch
than the original run did, so on GPUs the last bits differ, and per-step normalisation would blow that up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OTSU_BINS = 256
NOISE_FLOOR = 1e-2  # of the latent's mean channel-summed magnitude


def difference_map(edited: list[torch.Tensor], cached: list[torch.Tensor],
                   noise_floor: float = NOISE_FLOOR) -> torch.Tensor:
    """[B, H, W] in [0, steps]: per-step normalised channel-summed |edited - cached|, summed over the steps."""
    if len(edited) != len(cached) or not edited:
        raise ValueError("difference_map needs the same, non-zero number of edited and cached latents")
    total = None
    for e, c in zip(edited, cached, strict=True):
        d = (e.float() - c.float()).abs().sum(dim=1)                       # [B, H, W]
        floor = noise_floor * c.float().abs().sum(dim=1).mean(dim=(1, 2), keepdim=True)
        d = torch.where(d > floor, d, torch.zeros_like(d))
        lo = d.flatten(1).min(dim=1).values[:, None, None]
        span = d.flatten(1).max(dim=1).values[:, None, None] - lo
        normalised = torch.where(span > 0, (d - lo) / span.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))
        total = normalised if total is None else total + normalised
    return total


def otsu_threshold(values: torch.Tensor, bins: int = OTSU_BINS) -> float:
    """The threshold maximising the between-class variance of a histogram of `values`."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist = torch.histc(values.float(), bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    weight0 = hist.cumsum(0)
    weight1 = hist.sum() - weight0
    mass0 = (hist * centers).cumsum(0)
    mean0 = mass0 / weight0.clamp_min(1e-12)
    mean1 = (mass0[-1] - mass0) / weight1.clamp_min(1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    k = int(torch.argmax(between[:-1]))  # a cut above the last bin would select nothing
    return float(centers[k] + (centers[1] - centers[0]) / 2)


def quantile_threshold(values: torch.Tensor, edit_size: float) -> float:
    """The threshold above which `edit_size` of the values lie."""
    if not 0.0 < edit_size <= 1.0:
        raise ValueError(f"edit_size is a fraction of the image area in (0, 1], got {edit_size}")
    return float(torch.quantile(values.float().flatten(), 1.0 - edit_size))


def opening(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Erosion then dilation with a centred size x size square (size odd): removes specks, never shifts."""
    if size % 2 == 0:
        raise ValueError("the opening needs an odd size: an even kernel cannot be centred")
    if size <= 1:
        return mask
    pad = size // 2
    m = mask[:, None].float()
    # outside the map counts as set, so a region touching the border is not eroded from that side
    eroded = -F.max_pool2d(F.pad(-m, (pad, pad, pad, pad), value=-1.0), size, stride=1)
    return (F.max_pool2d(eroded, size, stride=1, padding=pad) > 0)[:, 0]


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask
    pixels = min(pixels, max(mask.shape[-2:]))  # beyond the map's size the result is the same: all or nothing
    return (F.max_pool2d(mask[:, None].float(), 2 * pixels + 1, stride=1, padding=pixels) > 0)[:, 0]


def threshold_mask(diff: torch.Tensor, method: str = "otsu", edit_size: float = 0.15, clean: int = 3,
                   dilate_px: int = 1) -> torch.Tensor:
    """[B, H, W] bool from a difference map: per sample, threshold, opening, dilation. All-zero maps stay empty."""
    out = []
    for d in diff:
        if not (d > 0).any():
            out.append(torch.zeros_like(d, dtype=torch.bool))
            continue
        t = otsu_threshold(d) if method == "otsu" else quantile_threshold(d, edit_size)
        out.append(d > t if method == "otsu" else d >= t)
    return dilate(opening(torch.stack(out), clean), dilate_px)
