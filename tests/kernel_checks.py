"""Shared by the kernel tests (tests/unit/test_triton_kernels.py under Triton's interpreter,
tests/gpu/test_kernels_gpu.py on CUDA) and benchmarks/kernels.py: test geometries from the real plan, random maps,
fp64 oracles written independently of kernels/reference.py, and the error bound.

The bound: a kernel's largest error against the fp64 oracle is at most K times the reference op's own largest error
(the reference run in the same dtype) plus a tiny absolute term, so a kernel may round differently but not worse.
"""
from __future__ import annotations

import math
import platform

import pytest
import torch
import torch.nn.functional as F

from fisedit_engine.plan import EditPlan


def require_triton() -> None:
    """For a test module's top: Triton must be there on Linux (scripts/setup_host.sh installs it); elsewhere there
    may be no wheel, and the module is skipped."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if platform.system() == "Linux":
            raise
        pytest.skip("Triton is not installed (no wheel for this platform)", allow_module_level=True)

KINDS = ("conv3", "interior", "down", "up")


def rand(*shape, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def make_plan(hw, tile, fraction=0.1, seed=0, border=True) -> EditPlan:
    """A two-level plan (level 1 at half size) of random rectangles covering about `fraction` of level 0, with a tile
    at the top-left corner (patches that leave the map) when `border`."""
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, h, w, dtype=torch.bool)  # two batch samples, two masks: their union is planned
    target = max(1, int(fraction * h * w))
    while int(mask.any(0).sum()) < target:
        b = int(torch.randint(0, 2, (1,), generator=g))
        rh, rw = (int(torch.randint(1, max(2, n // 6), (1,), generator=g)) for n in hw)
        r = int(torch.randint(0, h - rh + 1, (1,), generator=g))
        c = int(torch.randint(0, w - rw + 1, (1,), generator=g))
        mask[b, r:r + rh, c:c + rw] = True
    if border:
        mask[0, 0, 0] = True
        mask[1, h - 1, w - 1] = True
    sizes = [(h, w), ((h + 1) // 2, (w + 1) // 2)]
    return EditPlan.build(mask, sizes, [0, 1], tile)


def geometry(plan: EditPlan, kind: str, device):
    """(level plan of the output, rows, cols, input size) for one op geometry."""
    (h0, w0), (h1, w1) = plan.level_sizes[:2]
    if kind == "down":
        lp, in_size = plan.levels[1], (h0, w0)
    elif kind == "up":
        lp, in_size = plan.levels[0], (h1, w1)
    else:
        lp, in_size = plan.levels[0], (h0, w0)
    rows, cols = lp.patch_index(kind, device, in_size if kind in ("down", "up") else None)
    return lp, rows, cols, in_size


def make_map(n, c, hw, dtype, device, seed, layout="contiguous", nan_outside=None):
    """A random map [n, c, H, W] in `layout` (contiguous, channels_last, or a channel slice of a wider map, as an
    output block's concatenated input is read), with NaN outside the bool [H, W] `nan_outside` region if given:
    the feed's canvases hold NaN where nothing may be read."""
    x = rand(n, c + 5, *hw, seed=seed) * 3 + 0.5
    if nan_outside is not None:
        x[:, :, ~nan_outside] = float("nan")
    x = x.to(device=device, dtype=dtype)
    if layout == "slice":
        return x[:, 2:2 + c]
    x = x[:, :c].contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def patch_read_region(rows, cols, hw) -> torch.Tensor:
    """[H, W] bool: every input position a patch reads."""
    read = torch.zeros(hw, dtype=torch.bool)
    rows, cols = rows.cpu(), cols.cpu()
    for r, c in zip(rows, cols):
        rr, cc = r[r >= 0], c[c >= 0]
        read[rr[:, None], cc[None, :]] = True
    return read


def norm_params(n, c, groups, dtype, device, seed, affine=True):
    """Statistics [n, groups, 2] (fp32, a plausible mean and variance), weight and bias [c] in `dtype`."""
    mean = rand(n, groups, seed=seed) * 0.5 + 0.5
    var = rand(n, groups, seed=seed + 1).abs() * 4 + 0.25
    stats = torch.stack([mean, var], -1).to(device)
    if not affine:
        return stats, None, None
    return stats, (rand(c, seed=seed + 2) * 0.5 + 1).to(device, dtype), rand(c, seed=seed + 3).to(device, dtype)


# --- fp64 oracles -----------------------------------------------------------------------------------------------

def oracle_gather_norm(x, rows, cols, stats, weight, bias, eps, silu):
    """fp64 [N, C, tiles, P, Q] of the (low-precision) inputs."""
    n, c = x.shape[:2]
    xd = F.pad(x.double(), (1, 0, 1, 0))
    patches = xd[:, :, (rows.long() + 1)[:, :, None], (cols.long() + 1)[:, None, :]]
    if stats is None:
        return patches
    groups = stats.shape[1]
    per = c // groups
    mean = stats[..., 0].double().repeat_interleave(per, 1)
    std = (stats[..., 1].double() + eps).sqrt().repeat_interleave(per, 1)
    y = (patches - mean[:, :, None, None, None]) / std[:, :, None, None, None]
    if weight is not None:
        y = y * weight.double()[None, :, None, None, None]
    if bias is not None:
        y = y + bias.double()[None, :, None, None, None]
    if silu:
        y = y / (1 + torch.exp(-y))
    valid = (rows >= 0)[:, :, None] & (cols >= 0)[:, None, :]
    return torch.where(valid, y, torch.zeros_like(y))


def oracle_tokens(x, tokens, stats, weight, bias, eps):
    """fp64 [N, C, P]."""
    n, c, h, w = x.shape
    rows, cols = (tokens // w)[:, None], (tokens % w)[:, None]
    return oracle_gather_norm(x, rows, cols, stats, weight, bias, eps, False)[..., 0, 0]


def oracle_scatter(base, tiles_out, positions, sources, bias=None, residual_tiles=None, residual_map=None):
    """fp64 map."""
    n, c = base.shape[:2]
    out = base.double().clone()
    v = tiles_out.double()
    if bias is not None:
        v = v + bias.double()[:, :, None, None, None]
    if residual_tiles is not None:
        v = v + residual_tiles.double()
    v = v.reshape(n, c, -1)
    if sources is not None:
        v = v[:, :, sources]
    if residual_map is not None:
        v = v + residual_map.double().reshape(n, c, -1)[:, :, positions]
    out.view(n, c, -1)[:, :, positions] = v
    return out


def stats_case(n, c, groups, hw, tokens, dtype, device, seed, token_major=False, split=None):
    """A GroupNorm input before and after an edit at the flat positions `tokens`: (the cached statistics [n, G, 2]
    fp32 of the map before; its values at the tokens, as the edit hands them over (reference.AtPositions, a list):
    the map [n, c, H*W] itself at the tokens, or with `token_major` token-major rows [n, c, R] (as the feed's staged
    values are, R > P) at positions of them, and with `split` two maps of `split` and c - split channels; the fresh
    values [n, c, P] at 0..P-1 (token-major with `token_major`); the fp64 statistics of the map after)."""
    from fisedit_engine.kernels.reference import AtPositions
    before = (rand(n, c, *hw, seed=seed) * 2 + 0.7).to(device, dtype)
    fresh = (rand(n, c, len(tokens), seed=seed + 1) * 3 - 0.4).to(device, dtype)
    after = before.clone()
    after.view(n, c, -1)[:, :, tokens] = fresh
    tokens = tokens.to(device)
    flat = before.view(n, c, -1)
    if token_major:  # rows of every other position (twice the tokens), the tokens at the odd ones
        rows = torch.zeros(n, c, 2 * len(tokens), dtype=dtype, device=device)
        rows[:, :, 1::2] = flat[:, :, tokens]
        flat = rows.transpose(1, 2).contiguous().transpose(1, 2)
        tokens = torch.arange(1, 2 * len(tokens), 2, device=device)
        fresh = fresh.transpose(1, 2).contiguous().transpose(1, 2)
    cut = c if split is None else split
    parts = [AtPositions(flat[:, :cut], tokens)] + ([AtPositions(flat[:, cut:], tokens)] if cut < c else [])
    index = torch.arange(fresh.shape[2], device=device)
    return (oracle_group_stats(before, groups).float(), parts, AtPositions(fresh, index),
            oracle_group_stats(after, groups))


def oracle_group_stats(x, groups):
    """fp64 [N, G, 2]: mean and biased variance per row and group."""
    var, mean = torch.var_mean(x.double().reshape(x.shape[0], groups, -1), dim=-1, unbiased=False)
    return torch.stack([mean, var], dim=-1)


# --- the bound --------------------------------------------------------------------------------------------------

def max_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    d = (a.double() - exact).abs()
    both_nan = a.isnan() & exact.isnan()
    return float(torch.where(both_nan, torch.zeros_like(d), d).max()) if d.numel() else 0.0


def check_bound(kernel_out, reference_out, exact, k: float = 2.0, rel_atol: float = 1e-6) -> dict:
    """Asserts max|kernel - exact| <= k * max|reference - exact| + rel_atol * max|exact|; returns the errors."""
    assert kernel_out.shape == reference_out.shape == exact.shape, (kernel_out.shape, reference_out.shape, exact.shape)
    assert kernel_out.dtype == reference_out.dtype, (kernel_out.dtype, reference_out.dtype)
    assert torch.equal(kernel_out.isnan(), exact.isnan()), "NaN where the oracle has none (or the reverse)"
    scale = float(exact.nan_to_num().abs().max()) if exact.numel() else 0.0
    e_k, e_r = max_err(kernel_out, exact), max_err(reference_out, exact)
    bound = k * e_r + rel_atol * max(scale, 1.0)
    assert e_k <= bound, f"kernel error {e_k:.3g} > {k} x reference error {e_r:.3g} + {rel_atol * max(scale, 1.0):.3g}"
    return {"kernel_err": e_k, "reference_err": e_r, "scale": scale}


def tolerance_factor(dtype, interpreted: bool) -> float:
    """K of the bound. Triton's interpreter (3.x) converts fp32 to bf16 by truncation, not round-to-nearest, so its
    bf16 outputs may be a whole ulp off where the reference is half an ulp off; compiled kernels round to nearest."""
    return 3.0 if (interpreted and dtype == torch.bfloat16) else 2.0


def conv_output_tiles(n, c, tiles, tile, dtype, device, seed, channels_last=False):
    """Tiles as the conv on stacked patches returns them: a [N, C, tiles, T, T] view of [N * tiles, C, T, T]."""
    flat = rand(n * tiles, c, tile, tile, seed=seed).to(device, dtype)
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    return flat.view(n, tiles, c, tile, tile).permute(0, 2, 1, 3, 4)


def level_shape(model: str, level: int = 0):
    """(channels, height, width) of a UNet level at the benchmark sizes (latent = image / 8)."""
    return {("sd21@768", 0): (320, 96, 96), ("sd21@768", 1): (640, 48, 48), ("sd21@768", 2): (1280, 24, 24),
            ("sdxl@1024", 0): (320, 128, 128), ("sdxl@1024", 1): (640, 64, 64),
            ("sdxl@1024", 2): (1280, 32, 32)}[(model, level)]


def tiles_fraction_plan(hw, tile, fraction) -> EditPlan:
    """A plan whose level 0 is a centred rectangle of about `fraction` of its tiles (as the speed benchmark's
    rectangle masks)."""
    h, w = hw
    gh, gw = math.ceil(h / tile), math.ceil(w / tile)
    side_h = max(1, round(gh * math.sqrt(fraction)))
    side_w = max(1, round(fraction * gh * gw / side_h))
    r0, c0 = (gh - side_h) // 2, (gw - side_w) // 2
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, r0 * tile:(r0 + side_h) * tile, c0 * tile:(c0 + side_w) * tile] = True
    sizes = [(h, w), ((h + 1) // 2, (w + 1) // 2)]
    return EditPlan.build(mask, sizes, [0, 1], tile)
