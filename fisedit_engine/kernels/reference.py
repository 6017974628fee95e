"""Pure-torch reference ops of the sparse path, on any device. The GPU kernels are checked against these.

Tile patches are [N, C, tiles, P, Q]: per batch row and channel, the input patch of each active tile. Patch
coordinates come from the plan's index maps, -1 meaning "outside the input" (the conv's zero padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STATS_DTYPE = torch.float32


@dataclass(frozen=True)
class AtPositions:
    """A map's values [N, C, L] (any strides) at positions `index` [P] (int64 on its device): `values[:, :, index]`,
    left for the kernel that reads them to gather."""
    values: torch.Tensor
    index: torch.Tensor

    def gather(self) -> torch.Tensor:
        return self.values.index_select(2, self.index)


def gathered(parts: list[AtPositions]) -> torch.Tensor:
    """[N, sum of C, P]: the parts gathered and concatenated along channels."""
    return torch.cat([part.gather() for part in parts], dim=1)


def gather_patches(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, tiles, P, Q]; positions with index -1 read zero."""
    padded = F.pad(x, (1, 0, 1, 0))  # a leading zero row and column: index -1 + 1 = 0 reads zero
    return padded[:, :, (rows + 1)[:, :, None], (cols + 1)[:, None, :]]


def valid_patch_mask(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[tiles, P, Q] bool: which patch positions lie inside the input."""
    return (rows >= 0)[:, :, None] & (cols >= 0)[:, None, :]


def group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, groups, 2]: mean and biased variance per row and group, in fp32, as GroupNorm computes them."""
    var, mean = torch.var_mean(x.reshape(x.shape[0], groups, -1).to(STATS_DTYPE), dim=-1, unbiased=False)
    return torch.stack([mean, var], dim=-1)


def exact_group_stats(cached: torch.Tensor, cached_active: torch.Tensor, fresh_active: torch.Tensor,
                      positions: int) -> torch.Tensor:
    """group_stats of a map that is the cached map with its active positions replaced by fresh values, from the
    cached map's statistics `cached` [N, G, 2] and the cached and fresh values at the active positions [N, C, P]
    of a map with `positions` positions. Sums are taken about the cached group mean, so nothing cancels."""
    n, c, p = fresh_active.shape
    groups = cached.shape[1]
    mean, var = cached[..., 0], cached[..., 1]
    count = positions * (c // groups)

    def centred_sums(values):
        v = values.to(STATS_DTYPE).reshape(n, groups, -1) - mean[..., None]
        return v.sum(-1), v.square().sum(-1)

    s1_old, s2_old = centred_sums(cached_active)
    s1_new, s2_new = centred_sums(fresh_active)
    s1 = s1_new - s1_old                       # the cached map's centred sum is zero
    s2 = var * count + s2_new - s2_old
    shift = s1 / count
    return torch.stack([mean + shift, (s2 / count - shift.square()).clamp_min(0)], dim=-1)


def group_norm_silu_patches(patches: torch.Tensor, stats: torch.Tensor, weight, bias, eps: float,
                            valid: torch.Tensor | None, silu: bool = True) -> torch.Tensor:
    """GroupNorm with the given statistics (+ SiLU) on patches; positions outside the input become zero again,
    because the conv that follows pads its (post-activation) input with zeros."""
    n, c = patches.shape[:2]
    groups = stats.shape[1]
    mean = stats[..., 0].repeat_interleave(c // groups, dim=1)
    rstd = torch.rsqrt(stats[..., 1] + eps).repeat_interleave(c // groups, dim=1)
    scale = rstd * (weight.float() if weight is not None else 1.0)
    shift = (bias.float() if bias is not None else 0.0) - mean * scale
    y = patches.float() * scale.view(n, c, 1, 1, 1) + shift.view(n, c, 1, 1, 1)
    if silu:
        y = F.silu(y)
    if valid is not None:
        y = y * valid.to(y.dtype)
    return y.to(patches.dtype)


def conv_patches(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1) -> torch.Tensor:
    """A conv with padding 0 over every patch: [N, C, tiles, P, Q] -> [N, C', tiles, P', Q']."""
    n, c, t, p, q = patches.shape
    flat = patches.permute(0, 2, 1, 3, 4).reshape(n * t, c, p, q)
    out = F.conv2d(flat, weight, bias, stride=stride)
    return out.view(n, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)


def scatter_tiles(base: torch.Tensor, tiles_out: torch.Tensor, tiles: torch.Tensor, tile: int) -> torch.Tensor:
    """A copy of `base` [N, C, H, W] with each active tile's block replaced by `tiles_out` [N, C, tiles, T, T]."""
    n, c, h, w = base.shape
    gh, gw = -(-h // tile), -(-w // tile)
    out = F.pad(base, (0, gw * tile - w, 0, gh * tile - h))
    view = out.view(n, c, gh, tile, gw, tile).permute(0, 1, 2, 4, 3, 5)
    view[:, :, tiles[:, 0], tiles[:, 1]] = tiles_out.to(out.dtype)
    return out[:, :, :h, :w]


def scatter_tiles_(base: torch.Tensor, tiles_out: torch.Tensor, positions: torch.Tensor, sources: torch.Tensor):
    """scatter_tiles into `base` itself, by the plan's flat maps: tile element `sources[i]` (of the flattened
    [tiles, T, T]) goes to map position `positions[i]` (tile elements past the border have no entry)."""
    n, c = base.shape[:2]
    values = tiles_out.reshape(n, c, -1).index_select(2, sources)
    base.view(n, c, -1).index_copy_(2, positions, values.to(base.dtype))
    return base


def tiles_of(x: torch.Tensor, tiles: torch.Tensor, tile: int) -> torch.Tensor:
    """The inverse of scatter_tiles' placement: [N, C, H, W] -> [N, C, tiles, T, T] (zeros past the border)."""
    n, c, h, w = x.shape
    gh, gw = -(-h // tile), -(-w // tile)
    padded = F.pad(x, (0, gw * tile - w, 0, gh * tile - h))
    view = padded.view(n, c, gh, tile, gw, tile).permute(0, 1, 2, 4, 3, 5)
    return view[:, :, tiles[:, 0], tiles[:, 1]]


def gather_norm_patches(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor | None = None,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                        silu: bool = True) -> torch.Tensor:
    """gather_patches, then (with `stats`) group_norm_silu_patches: what the fused gather kernel computes."""
    patches = gather_patches(x, rows, cols)
    if stats is None:
        return patches
    return group_norm_silu_patches(patches, stats, weight, bias, eps, valid_patch_mask(rows, cols), silu)


def gather_norm_im2col(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor | None = None,
                       weight=None, bias=None, eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """The im2col rows of a 3x3 conv over x's tiles, GroupNorm'ed and SiLU'd like `gather_norm_patches`:
    [N, tiles, O, O, 9 * C] from the plan's `im2col_index` (rows, cols) [tiles, 3 * O], the 9 * C ordered (ki, kj, c),
    as a channels-last weight [C', 3, 3, C] flattens."""
    patches = gather_norm_patches(x, rows, cols, stats, weight, bias, eps, silu)  # [N, C, tiles, 3 O, 3 O]
    n, c, t, p, _ = patches.shape
    o = p // 3
    return patches.view(n, c, t, o, 3, o, 3).permute(0, 2, 3, 5, 4, 6, 1).reshape(n, t, o, o, 9 * c)


def group_norm_tokens(x: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor, weight, bias,
                      eps: float) -> torch.Tensor:
    """GroupNorm (no SiLU) of x [N, C, H, W] at the flat positions `tokens` [P]: [N, C, P]."""
    active = x.flatten(2)[:, :, tokens]
    return group_norm_silu_patches(active[..., None, None], stats, weight, bias, eps, None, silu=False)[..., 0, 0]


def scatter_add_tiles_(base: torch.Tensor, tiles_out: torch.Tensor, positions: torch.Tensor,
                       sources: torch.Tensor | None, bias: torch.Tensor | None = None,
                       residual_tiles: torch.Tensor | None = None,
                       residual_map: torch.Tensor | None = None) -> torch.Tensor:
    """scatter_tiles_ of `tiles_out` [N, C, tiles, T, T] (+ bias [N, C]) (+ residual_tiles, like tiles_out, or
    residual_map, like base, read at `positions`), each sum in the tiles' dtype as the unfused ops take it. `sources`
    None: element i of the flattened tiles goes to positions[i]."""
    n, c = base.shape[:2]
    values = tiles_out
    if bias is not None:
        values = values + bias[:, :, None, None, None]
    if residual_tiles is not None:
        values = residual_tiles + values
    values = values.reshape(n, c, -1)
    if sources is not None:
        values = values.index_select(2, sources)
    if residual_map is not None:
        values = residual_map.reshape(n, c, -1).index_select(2, positions) + values
    base.view(n, c, -1).index_copy_(2, positions, values.to(base.dtype))
    return base


def gather_rows(src: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, i, :] = src[b, positions[i], :]; src [B, L, C] may be on another device than out (host memory for a
    device out: gathered on the host, then copied)."""
    return out.copy_(src.index_select(1, positions.to(src.device)))


def copy_rows(copies, step: int) -> None:
    """For each copy (kernels.row_copies.RowCopy): out[b, out_index[i], :] = source[b, src_index[i], :] for i < rows,
    with the step's source and 0..rows-1 for an index that is None."""
    for c in copies:
        src = c.sources[step if len(c.sources) > 1 else 0]
        rows = src[:, :c.rows] if c.src_index is None else src.index_select(1, c.src_index.to(src.device))
        rows = rows.to(c.out.device)
        if c.out_index is None:
            c.out[:, :c.rows].copy_(rows)
        else:
            c.out.index_copy_(1, c.out_index, rows)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU's activation of its projection h [..., 2 * D]: the first half times the GELU (erf) of the second, as
    ComfyUI's GEGLU computes it."""
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)
