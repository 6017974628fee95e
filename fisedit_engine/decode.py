"""Decoding an edit: only the edited region goes through the VAE; every other pixel is the original image's.

The original image of a cache is its final latent decoded once per VAE and kept with the cache. An edit decodes,
per batch sample, the bounding box of its dilated mask grown by a halo (the decoder's mid-block attention sees the
whole input, so a crop is an approximation inside the box, and the halo gives it context), and pastes the mask's
pixels over the original image. Pixels outside the dilated mask are therefore the original's, bit for bit
(invariant I4 for pixels). The pasted image becomes the original image of the edit's result cache, so a chained
edit keeps the first edit's pixels exactly too.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .cache import CacheError, FisEditCache
from .fingerprint import vae_fingerprint

log = logging.getLogger("FISEdit")

DEFAULT_HALO = 8  # latent pixels (64 image pixels) of context around the decoded region
LATENT_SCALE = 8


def original_image(vae, cache: FisEditCache, key: str | None = None) -> torch.Tensor:
    """[B, H, W, 3]: the cache's image for this VAE, decoded once and kept with the cache. An edit's result that no
    FISEditDecode has decoded yet (a graph may run the next edit's decode first) is rebuilt as that decode would
    have made it, from its source's image; decoding its whole latent instead would change pixels outside its mask.
    `key`: the VAE's fingerprint, where the caller has it already."""
    key = key or vae_fingerprint(vae)
    if key not in cache.images:
        source_ref, mask = cache.edited_from or (None, None)
        source = source_ref() if source_ref is not None else None
        if source is not None:
            decode_edit(vae, cache.final_latent, mask, source, cache, key=key)
        else:
            if cache.edited_from is not None:
                log.warning("FISEdit: '%s' is decoded whole: its source left memory before any FISEditDecode of it "
                            "ran, so pixels outside its edit's mask may differ from the source image's; raise "
                            "FISEDIT_CACHE_BUDGET to keep sources of chained edits", cache.name)
            cache.images[key] = vae.decode(cache.final_latent).cpu()
    return cache.images[key]


def decode_edit(vae, samples: torch.Tensor, mask: torch.Tensor, source: FisEditCache, result: FisEditCache | None,
                halo: int = DEFAULT_HALO, key: str | None = None) -> torch.Tensor:
    """The edited image: the original with each sample's masked pixels decoded from `samples`."""
    if samples.shape != source.final_latent.shape:
        raise CacheError(f"FISEditDecode got a latent of shape {tuple(samples.shape)}, but the edit's cache holds "
                         f"{tuple(source.final_latent.shape)}: connect the FISEditSparseKSampler output of this edit")
    if not torch.isfinite(samples).all():
        raise CacheError("FISEditDecode got a latent with NaN or infinite values: connect the FISEditSparseKSampler "
                         "output of this edit, not a latent changed on the way")
    key = key or vae_fingerprint(vae)
    base = original_image(vae, source, key)
    image = base.clone()
    masks = mask.expand(samples.shape[0], *mask.shape[1:]) if mask.shape[0] == 1 else mask
    for b, m in enumerate(masks):
        if not m.any():
            continue
        rows, cols = torch.nonzero(m.any(dim=1)).flatten(), torch.nonzero(m.any(dim=0)).flatten()
        r0, r1 = max(int(rows[0]) - halo, 0), min(int(rows[-1]) + 1 + halo, m.shape[0])
        c0, c1 = max(int(cols[0]) - halo, 0), min(int(cols[-1]) + 1 + halo, m.shape[1])
        crop = vae.decode(samples[b:b + 1, :, r0:r1, c0:c1]).cpu()[0]
        pixels = F.interpolate(m[None, None, r0:r1, c0:c1].float(), scale_factor=LATENT_SCALE, mode="nearest")[0, 0] > 0
        s = LATENT_SCALE
        region = image[b, r0 * s:r1 * s, c0 * s:c1 * s]
        region[pixels] = crop[pixels].to(region.dtype)
    if result is not None:
        result.images[key] = image
    return image


def latent_preview(model, cache: FisEditCache, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3]: the cached image as ComfyUI's latent preview shows it (a linear latent -> RGB map, no VAE),
    upscaled to image size, with the mask tinted red."""
    latent_format = model.model.latent_format
    factors = getattr(latent_format, "latent_rgb_factors", None)
    latent = latent_format.process_in(cache.final_latent.float())
    if factors is None:
        rgb = latent[:, :3].clamp(-1, 1) * 0.5 + 0.5
    else:
        weight = torch.tensor(factors, dtype=latent.dtype).t()[:, :, None, None]
        bias = getattr(latent_format, "latent_rgb_factors_bias", None)
        bias = torch.tensor(bias, dtype=latent.dtype) if bias is not None else None
        rgb = ((F.conv2d(latent, weight, bias) + 1) / 2).clamp(0, 1)
    return image_preview(F.interpolate(rgb, scale_factor=LATENT_SCALE, mode="nearest").permute(0, 2, 3, 1), mask)


def image_preview(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3]: `image` with the latent-grid `mask` tinted red."""
    scale = image.shape[1] // mask.shape[1]
    pixels = F.interpolate(mask[:, None].float(), scale_factor=scale, mode="nearest")[:, 0, :, :, None]
    red = torch.tensor([1.0, 0.0, 0.0])
    return image.float() * (1 - 0.5 * pixels) + red * 0.5 * pixels
