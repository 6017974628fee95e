"""Triton kernels of the sparse path. Each launcher computes what its reference in `reference.py` computes:

- `gather_norm_patches`: gather with halo (`reference.gather_patches`) + GroupNorm with given statistics + optional
  SiLU + zero outside the input (`reference.group_norm_silu_patches`), in one pass over the input.
- `gather_norm_im2col`: the same, stored as a 3x3 conv's im2col rows (each output's nine taps side by side), which
  one GEMM turns into the conv's output.
- `group_norm_tokens`: the same at a list of positions (SpatialTransformer's active tokens), channels innermost.
- `scatter_tiles_`: `reference.scatter_add_tiles_`, the in-place scatter of tiles into a map with an added per-(row,
  channel) bias and/or residual (from tiles, or read from a map at the scattered positions).
- `gather_rows`: `reference.gather_rows`, rows of a [B, L, C] map at a list of positions; the map may lie in pinned
  host memory, which the GPU then reads in place (zero-copy), so only the gathered rows cross the bus.
- `RowCopyLaunches`: `reference.copy_rows` for many copies at once (an edit's per-step upload and activation), rows
  gathered from and/or scattered to positions, bitwise, one launch per element size.
- `geglu`: `reference.geglu`, the feed-forward's GELU of one half times the other, in one pass.
- `exact_group_stats`: `reference.exact_group_stats`, a GroupNorm's statistics over a map of cached values with fresh
  ones at the active positions, from the cached statistics (one program per batch row and group), each read at its
  positions where it lies (no gathered copies).

Arithmetic is fp32 inside; each output element is rounded once to the output dtype. Every index and stride is a
kernel argument, so inputs of any memory format are read where they lie (no `.contiguous()` copies).

This module imports Triton, which decides at decoration time whether `@triton.jit` kernels are compiled or
interpreted (`TRITON_INTERPRET=1`); `INTERPRETED` records which. Import it through `kernels.fused`, which falls back
to the reference ops where Triton cannot run.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_norm_kernel(
    x_ptr,                      # input map [N, C, H, W], strides sx_*
    rows_ptr,                   # [T, P] int, contiguous: input row of each patch row, -1 outside (FLAT: [T] positions)
    cols_ptr,                   # [T, Q] int, contiguous: input column of each patch column, -1 outside
    stats_ptr,                  # [N, G, 2] fp32, contiguous: mean and biased variance per row and group
    w_ptr, b_ptr,               # [C] GroupNorm weight and bias (read only when HAS_W / HAS_B)
    out_ptr,                    # output [N, T, C, P*Q] addressed by strides so_*
    C, W, P, Q, S,              # channels, input width, patch rows and columns, S = T * P * Q
    CPG, G,                     # channels per group, groups
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_t, so_c, so_pq,
    eps,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, FLAT: tl.constexpr,
    IM2COL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program: one batch row, BLOCK_C channels, BLOCK_S of the T * P * Q patch positions (tiles flattened, so
    # short patches of many tiles fill a block as well as long ones).
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    s_ok = s < S
    pq_count = P * Q
    t = s // pq_count
    pq = s % pq_count
    if FLAT:
        pos = tl.load(rows_ptr + t, mask=s_ok, other=-1).to(tl.int64)
        r = pos // W
        col = pos % W
        valid = pos >= 0
    else:
        r = tl.load(rows_ptr + t * P + pq // Q, mask=s_ok, other=-1).to(tl.int64)
        col = tl.load(cols_ptr + t * Q + pq % Q, mask=s_ok, other=-1).to(tl.int64)
        valid = (r >= 0) & (col >= 0)
    src = n.to(tl.int64) * sx_n + c[:, None].to(tl.int64) * sx_c + (r * sx_h + col * sx_w)[None, :]
    load_ok = c_ok[:, None] & (s_ok & valid)[None, :]
    v = tl.load(x_ptr + src, mask=load_ok, other=0.0).to(tl.float32)
    if NORM:
        g = c // CPG
        mean = tl.load(stats_ptr + (n * G + g) * 2, mask=c_ok, other=0.0)
        var = tl.load(stats_ptr + (n * G + g) * 2 + 1, mask=c_ok, other=1.0)
        scale = tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + eps))  # IEEE-rounded, like torch
        if HAS_W:
            scale = scale * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        v = v * scale[:, None] + shift[:, None]
        if SILU:
            # Not tl.sigmoid: a @triton.jit helper of Triton's own, which the interpreter can only run when
            # TRITON_INTERPRET was set before Triton itself was imported; builtins run either way.
            v = v / (1.0 + tl.exp(-v))
        # The conv pads its post-activation input with zeros. A product, not a select, as the reference does: NaN
        # statistics stay visible outside the input too.
        v = v * valid.to(tl.float32)[None, :]
    if IM2COL:  # patch (3 oi + ki, 3 oj + kj) is im2col row (oi, oj), column block 3 ki + kj (so_pq: one block)
        pr = pq // Q
        pc = pq % Q
        pq = ((pr // 3) * (Q // 3) + pc // 3) * 9 + (pr % 3) * 3 + pc % 3
    dst = n.to(tl.int64) * so_n + (t * so_t + pq * so_pq)[None, :].to(tl.int64) + c[:, None].to(tl.int64) * so_c
    tl.store(out_ptr + dst, v.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & s_ok[None, :])


@triton.jit
def _scatter_kernel(
    base_ptr,                   # map [N, C, H, W] written in place, strides sb_*
    tiles_ptr,                  # tiles [N, C, T, TT, TT], strides st_*
    pos_ptr,                    # [S] int: flat map position (h * W + w) of each scattered element
    src_ptr,                    # [S] int: flat index into [T, TT, TT] of each element (unused when IDENTITY)
    bias_ptr,                   # [N, C], strides sbias_* (read when HAS_BIAS)
    res_ptr,                    # residual: tiles like `tiles` (RES == 1) or a map like `base` (RES == 2)
    C, S, W, TT,
    sb_n, sb_c, sb_h, sb_w,
    st_n, st_c, st_t, st_a, st_b,
    sbias_n, sbias_c,
    sr_n, sr_c, sr_t, sr_a, sr_b,   # RES == 2 uses (sr_a, sr_b) as the map's row and column strides
    HAS_BIAS: tl.constexpr, RES: tl.constexpr, IDENTITY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    i_ok = i < S
    ok = c_ok[:, None] & i_ok[None, :]
    pos = tl.load(pos_ptr + i, mask=i_ok, other=0).to(tl.int64)
    if IDENTITY:
        src = i.to(tl.int64)
    else:
        src = tl.load(src_ptr + i, mask=i_ok, other=0).to(tl.int64)
    tt2 = TT * TT
    t = src // tt2
    a = (src // TT) % TT
    b = src % TT
    n64 = n.to(tl.int64)
    c64 = c[:, None].to(tl.int64)
    v = tl.load(tiles_ptr + n64 * st_n + c64 * st_c + (t * st_t + a * st_a + b * st_b)[None, :],
                mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + n64 * sbias_n + c.to(tl.int64) * sbias_c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    h = pos // W
    w = pos % W
    if RES == 1:
        v += tl.load(res_ptr + n64 * sr_n + c64 * sr_c + (t * sr_t + a * sr_a + b * sr_b)[None, :],
                     mask=ok, other=0.0).to(tl.float32)
    if RES == 2:
        v += tl.load(res_ptr + n64 * sr_n + c64 * sr_c + (h * sr_a + w * sr_b)[None, :],
                     mask=ok, other=0.0).to(tl.float32)
    tl.store(base_ptr + n64 * sb_n + c64 * sb_c + (h * sb_h + w * sb_w)[None, :],
             v.to(base_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add(a, b):
    return a + b


def _interpreted() -> bool:
    return type(_add).__name__ == "InterpretedFunction"


INTERPRETED = _interpreted()
"""True when the kernels were decorated under TRITON_INTERPRET=1: they then run on CPU tensors, in Python."""


# The sum that the reductions below combine with. tl.sum cannot be called by kernels that the interpreter runs when
# TRITON_INTERPRET was set after Triton was imported (see SILU above), but the interpreter sums with numpy when a
# reduction names Triton's own `_sum_combine`, and element by element in Python for any other combine function (some
# seconds per launch). Compiled, `_add` is the same sum; it is what the H100 runs were measured with.
_SUM = tl.standard._sum_combine if INTERPRETED else _add


@triton.jit
def _exact_stats_kernel(
    stats_ptr,                  # [N, G, 2] fp32, contiguous: the cached map's mean and biased variance
    old0_ptr, old0_idx,         # the cached values: channels < C0 from map 0 [N, C0, L0] at its positions [P] ...
    old1_ptr, old1_idx,         # ... the rest from map 1 [N, C - C0, L1] at its own positions (strides s0_*, s1_*)
    new_ptr, new_idx,           # the fresh values: map [N, C, L] at its positions, strides sn_*
    out_ptr,                    # [N, G, 2] fp32, contiguous
    P, CPG, G, C0, count,       # active positions, channels per group, groups, map 0's channels, positions x CPG
    s0_n, s0_c, s0_p, s1_n, s1_c, s1_p, sn_n, sn_c, sn_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: one batch row and group. Sums about the cached mean, so nothing cancels (as the reference).
    n = tl.program_id(0)
    g = tl.program_id(1)
    mean = tl.load(stats_ptr + (n * G + g) * 2)
    var = tl.load(stats_ptr + (n * G + g) * 2 + 1)
    k = tl.arange(0, BLOCK_C)
    c = (g * CPG + k).to(tl.int64)
    c_ok = k < CPG
    first = (c < C0)[:, None]  # a group may straddle the two maps
    n64 = n.to(tl.int64)
    s1 = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)  # not tl.zeros: a jit helper, as tl.sum
    s2 = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        ok = c_ok[:, None] & p_ok[None, :]
        i0 = tl.load(old0_idx + p, mask=p_ok, other=0).to(tl.int64)[None, :]
        i1 = tl.load(old1_idx + p, mask=p_ok, other=0).to(tl.int64)[None, :]
        i_new = tl.load(new_idx + p, mask=p_ok, other=0).to(tl.int64)[None, :]
        a = tl.load(old0_ptr + n64 * s0_n + c[:, None] * s0_c + i0 * s0_p, mask=ok & first, other=0.0)
        b = tl.load(old1_ptr + n64 * s1_n + (c[:, None] - C0) * s1_c + i1 * s1_p, mask=ok & ~first, other=0.0)
        new = tl.load(new_ptr + n64 * sn_n + c[:, None] * sn_c + i_new * sn_p, mask=ok, other=0.0)
        old = tl.where(ok, tl.where(first, a.to(tl.float32), b.to(tl.float32)) - mean, 0.0)
        new = tl.where(ok, new.to(tl.float32) - mean, 0.0)
        s1 += new - old
        s2 += new * new - old * old
    d1 = tl.reduce(tl.reduce(s1, 1, _SUM), 0, _SUM)  # the cached map's centred sum is zero
    d2 = tl.reduce(tl.reduce(s2, 1, _SUM), 0, _SUM)
    shift = d1 / count
    tl.store(out_ptr + (n * G + g) * 2, mean + shift)
    tl.store(out_ptr + (n * G + g) * 2 + 1, tl.maximum(var + d2 / count - shift * shift, 0.0))


@triton.jit
def _gather_rows_kernel(
    src_ptr,                    # [B, L, C], strides ss_*; device memory or pinned host memory (read in place)
    idx_ptr,                    # [P] int, contiguous: the positions (indices along L) to gather
    out_ptr,                    # [B, P, C] on the device, strides so_*
    P, C,
    ss_b, ss_l, ss_c, so_b, so_p, so_c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    ok = p_ok[:, None] & (c < C)[None, :]
    rows = tl.load(idx_ptr + p, mask=p_ok, other=0).to(tl.int64)
    c64 = c.to(tl.int64)
    values = tl.load(src_ptr + b * ss_b + rows[:, None] * ss_l + c64[None, :] * ss_c, mask=ok)
    tl.store(out_ptr + b * so_b + p.to(tl.int64)[:, None] * so_p + c64[None, :] * so_c, values, mask=ok)


@triton.jit
def _geglu_kernel(
    h_ptr,                      # [R, 2 * D], row stride sh_r, channels contiguous: the projection's output
    out_ptr,                    # [R, D], row stride so_r, channels contiguous
    R, D, sh_r, so_r,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (r < R)[:, None] & (d < D)[None, :]
    x = tl.load(h_ptr + r[:, None] * sh_r + d[None, :], mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + r[:, None] * sh_r + (d + D)[None, :], mask=ok, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(out_ptr + r[:, None] * so_r + d[None, :], (x * gelu).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["step", "n_jobs", "n_work"])  # one compiled variant for every step
def _copy_rows_kernel(
    jobs_ptr,                   # [jobs, JOB_FIELDS] int64: each copy's geometry (RowCopyLaunch.FIELDS)
    sources_ptr,                # [steps, jobs] int64: each copy's source address per step
    job_of_ptr,                 # [n_work] int32: the copy each work item belongs to
    step, n_jobs, n_work,       # n_work: the work items (job, batch, row block, channel block) of every copy
    UNIT: tl.constexpr,         # the integer type of the elements' size: the copy is bitwise
    SRC_C1: tl.constexpr,       # every source's channel stride is 1 (vectorised loads)
    OUT_C1: tl.constexpr,       # every output's channel stride is 1 (vectorised stores)
    JOB_FIELDS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # a launch of fewer programs than work items (an upload that must leave the GPU's SMs to the step running beside
    # it) takes its items in turn
    for item in range(tl.program_id(0), n_work, tl.num_programs(0)):
        job = tl.load(job_of_ptr + item).to(tl.int64)
        f = jobs_ptr + job * JOB_FIELDS
        local = item - tl.load(f)
        rows, channels, blocks_p, blocks_c = tl.load(f + 1), tl.load(f + 2), tl.load(f + 3), tl.load(f + 4)
        b = local // (blocks_p * blocks_c)
        local -= b * blocks_p * blocks_c
        p = (local // blocks_c) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = ((local % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        p_ok = p < rows
        ok = p_ok[:, None] & (c < channels)[None, :]
        src_rows = tl.load(tl.load(f + 5).to(tl.pointer_type(tl.int64)) + p, mask=p_ok, other=0)
        out_rows = tl.load(tl.load(f + 6).to(tl.pointer_type(tl.int64)) + p, mask=p_ok, other=0)
        src = tl.load(sources_ptr + step * n_jobs + job).to(tl.pointer_type(UNIT))
        src += b * tl.load(f + 7) + src_rows[:, None] * tl.load(f + 8)
        src += c[None, :] if SRC_C1 else c[None, :] * tl.load(f + 13)
        out = tl.load(f + 9).to(tl.pointer_type(UNIT)) + b * tl.load(f + 10) + out_rows[:, None] * tl.load(f + 11)
        out += c[None, :] if OUT_C1 else c[None, :] * tl.load(f + 12)
        tl.store(out, tl.load(src, mask=ok), mask=ok)


# Blocks: on a GPU, 2048-element tiles for 4 warps (the maps are small and the ops bandwidth-bound). The interpreter
# runs each program as numpy calls, so there fewer, larger programs are much faster; the results are the same.
# "stats": elements per loop iteration of a program (one group's channels by as many positions as fit).
# "rows": (channels, positions) per program of gather_rows: 128 channels are 256 contiguous bytes of one row in half
# precision, whole transactions on the host link.
GPU_BLOCKS = {"gather": (32, 64), "scatter": (32, 64), "stats": 4096, "rows": (128, 32), "geglu": (256, 8)}
INTERPRETER_BLOCKS = {"gather": (64, 256), "scatter": (64, 256), "stats": 1 << 14, "rows": (256, 256),
                      "geglu": (256, 256)}


def _blocks(op: str, channels: int, blocks):
    block_c, block_s = blocks or (INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS)[op]
    return min(block_c, triton.next_power_of_2(channels)), block_s


def _on(device: torch.device):
    """Triton launches on the current CUDA device; the tensors may live on another one."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _check(cond: bool, message):
    """`message`: a callable, formatted only on failure (the checks run at every launch)."""
    if not cond:
        raise ValueError(message())


def _check_index(name: str, index: torch.Tensor, device):
    _check(index.dtype in (torch.int32, torch.int64), lambda: f"{name}: integer indices expected, got {index.dtype}")
    _check(index.is_contiguous(), lambda: f"{name}: contiguous indices expected")
    _check(index.device == device, lambda: f"{name} is on {index.device}, the map on {device}")


def gather_norm_patches(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor | None = None,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                        silu: bool = True, channels_last: bool = False, blocks=None) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, tiles, P, Q] patches (`reference.gather_norm_patches`).

    Args:
        x: the input map, any strides.
        rows, cols: [tiles, P] and [tiles, Q] patch coordinates, -1 outside the input (reads zero).
        stats: [N, G, 2] fp32 mean and biased variance per row and group; None gathers only.
        weight, bias: [C] GroupNorm affine parameters, or None.
        silu: apply SiLU after the norm.
        channels_last: store the patches as [N, tiles, P, Q, C] (channels innermost, what cuDNN's NHWC convs read)
            instead of [N, tiles, C, P, Q]. Either way the result is a view [N, C, tiles, P, Q] whose reshape to
            the conv's [N * tiles, C, P, Q] is free.
    Returns:
        [N, C, tiles, P, Q] in x's dtype.
    """
    n, c, h, w = x.shape
    t, p = rows.shape
    q = cols.shape[1]
    _check(cols.shape[0] == t,
           lambda: f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} disagree on the tile count")
    _check_index("rows", rows, x.device)
    _check_index("cols", cols, x.device)
    if channels_last:
        storage = torch.empty((n, t, p, q, c), device=x.device, dtype=x.dtype)
        out = storage.permute(0, 4, 1, 2, 3)
        so = (storage.stride(0), storage.stride(1), 1, c)
    else:
        storage = torch.empty((n, t, c, p, q), device=x.device, dtype=x.dtype)
        out = storage.permute(0, 2, 1, 3, 4)
        so = (storage.stride(0), storage.stride(1), p * q, 1)
    _launch_gather(x, rows, cols, False, stats, weight, bias, eps, silu, storage, so, p, q, t * p * q, blocks)
    return out


def gather_norm_im2col(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor | None = None,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                       silu: bool = True, blocks=None) -> torch.Tensor:
    """`reference.gather_norm_im2col`: [N, tiles, O, O, 9 * C] im2col rows of a 3x3 conv from the plan's
    `im2col_index` (rows, cols) [tiles, 3 * O], contiguous (one GEMM reads them as [N * tiles * O * O, 9 * C])."""
    n, c, h, w = x.shape
    t, p = rows.shape
    _check(cols.shape == rows.shape and p % 3 == 0,
           lambda: f"im2col rows {tuple(rows.shape)} and cols {tuple(cols.shape)}: [tiles, 3 * O] each expected")
    _check_index("rows", rows, x.device)
    _check_index("cols", cols, x.device)
    o = p // 3
    storage = torch.empty((n, t, o, o, 9 * c), device=x.device, dtype=x.dtype)
    _launch_gather(x, rows, cols, False, stats, weight, bias, eps, silu, storage,
                   (storage.stride(0), storage.stride(1), 1, c), p, p, t * p * p, blocks, im2col=True)
    return storage


def group_norm_tokens(x: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float, blocks=None) -> torch.Tensor:
    """GroupNorm (no SiLU) of x [N, C, H, W] at the flat positions `tokens` [P] -> [N, C, P] in x's dtype
    (`reference.group_norm_tokens`), stored [N, P, C]: the token-major layout proj_in reads."""
    n, c, h, w = x.shape
    _check(tokens.dim() == 1, lambda: f"tokens: [P] expected, got {tuple(tokens.shape)}")
    _check_index("tokens", tokens, x.device)
    p = tokens.shape[0]
    storage = torch.empty((n, p, c), device=x.device, dtype=x.dtype)
    _launch_gather(x, tokens, tokens, True, stats, weight, bias, eps, False, storage,
                   (storage.stride(0), c, 1, 0), 1, 1, p, blocks)
    return storage.transpose(1, 2)


def _launch_gather(x, rows, cols, flat, stats, weight, bias, eps, silu, storage, so, p, q, s, blocks, im2col=False):
    n, c, h, w = x.shape
    norm = stats is not None
    groups = 1
    if norm:
        _check(stats.dtype == torch.float32 and stats.dim() == 3 and stats.shape[0] == n and stats.shape[2] == 2,
               lambda: f"stats: fp32 [N={n}, G, 2] expected, got {stats.dtype} {tuple(stats.shape)}")
        groups = stats.shape[1]
        _check(c % groups == 0, lambda: f"{c} channels do not split into {groups} groups")
        for name, v in (("weight", weight), ("bias", bias)):
            _check(v is None or v.shape == (c,),
                   lambda: f"{name}: [{c}] expected, got {None if v is None else tuple(v.shape)}")
        # copies only if the caller's are strided (normally no-ops): the kernel reads them by flat index
        stats = stats.contiguous()
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
    if s == 0 or n == 0 or c == 0:
        return
    block_c, block_s = _blocks("gather", c, blocks)
    grid = (n, triton.cdiv(c, block_c), triton.cdiv(s, block_s))
    dummy = stats if norm else storage  # never read: the constexpr flags drop the loads
    with _on(x.device):
        _gather_norm_kernel[grid](
            x, rows, cols, stats if norm else dummy,
            weight if weight is not None else dummy, bias if bias is not None else dummy, storage,
            c, w, p, q, s, c // groups, groups,
            *x.stride(), *so, float(eps),
            NORM=norm, HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu and norm), FLAT=flat,
            IM2COL=im2col, BLOCK_C=block_c, BLOCK_S=block_s,
        )


def scatter_tiles_(base: torch.Tensor, tiles_out: torch.Tensor, positions: torch.Tensor,
                   sources: torch.Tensor | None, bias: torch.Tensor | None = None,
                   residual_tiles: torch.Tensor | None = None, residual_map: torch.Tensor | None = None,
                   blocks=None) -> torch.Tensor:
    """In place: base[n, c, positions[i]] = tiles_out[n, c, sources[i]] (+ bias[n, c]) (+ residual_tiles[n, c,
    sources[i]] or residual_map[n, c, positions[i]]), summed in fp32 and rounded once (`reference.scatter_add_tiles_`).

    Args:
        base: [N, C, H, W] map, any strides; returned.
        tiles_out: [N, C, tiles, T, T], any strides; `sources` index its flattened [tiles, T, T].
        positions, sources: [S] flat map positions and tile elements (the plan's `tile_scatter`); sources None
            means element i of the tiles goes to positions[i] (tokens: tiles_out [N, C, P, 1, 1]).
        bias: [N, C] (a time embedding), residual_tiles: like tiles_out, residual_map: like base (read at
            `positions`); at most one residual.
    """
    n, c, h, w = base.shape
    _check(tiles_out.dim() == 5 and tiles_out.shape[:2] == (n, c) and tiles_out.shape[3] == tiles_out.shape[4],
           lambda: f"tiles_out: [{n}, {c}, tiles, T, T] expected, got {tuple(tiles_out.shape)}")
    _check(residual_tiles is None or residual_map is None, lambda: "at most one residual")
    _check_index("positions", positions, base.device)
    s = positions.shape[0]
    if sources is not None:
        _check_index("sources", sources, base.device)
        _check(sources.shape == positions.shape, lambda: "positions and sources differ in length")
    else:
        _check(tiles_out.shape[2] * tiles_out.shape[3] ** 2 == s,
               lambda: "without sources, one tile element per position")
    if bias is not None:
        _check(bias.shape == (n, c), lambda: f"bias: [{n}, {c}] expected, got {tuple(bias.shape)}")
    res, res_t, sr = 0, base, (0, 0, 0, 0, 0)
    if residual_tiles is not None:
        _check(residual_tiles.shape == tiles_out.shape, lambda: "residual_tiles must be shaped like tiles_out")
        res, res_t, sr = 1, residual_tiles, residual_tiles.stride()
    elif residual_map is not None:
        _check(residual_map.shape == base.shape, lambda: "residual_map must be shaped like base")
        rs = residual_map.stride()
        res, res_t, sr = 2, residual_map, (rs[0], rs[1], 0, rs[2], rs[3])
    if s == 0 or n == 0 or c == 0:
        return base
    block_c, block_s = _blocks("scatter", c, blocks)
    grid = (n, triton.cdiv(c, block_c), triton.cdiv(s, block_s))
    with _on(base.device):
        _scatter_kernel[grid](
            base, tiles_out, positions, sources if sources is not None else positions,
            bias if bias is not None else base, res_t,
            c, s, w, tiles_out.shape[3],
            *base.stride(), *tiles_out.stride(),
            *(bias.stride() if bias is not None else (0, 0)), *sr,
            HAS_BIAS=bias is not None, RES=res, IDENTITY=sources is None,
            BLOCK_C=block_c, BLOCK_S=block_s,
        )
    return base


def gather_rows(src: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, blocks=None) -> torch.Tensor:
    """out[b, i, :] = src[b, positions[i], :] (`reference.gather_rows`); returns out.

    Args:
        src: [B, L, C], any strides, on out's device or in pinned host memory (the GPU reads it in place: under
            unified addressing a pinned allocation is mapped into the device's address space).
        positions: [P] integer indices along L, contiguous, on out's device.
        out: [B, P, C], any strides.
    """
    _check(src.dim() == 3 and out.dim() == 3 and out.shape == (src.shape[0], positions.shape[0], src.shape[2]),
           lambda: f"src [B, L, C] and out [B, P, C] expected, got {tuple(src.shape)} and {tuple(out.shape)}")
    _check(src.dtype == out.dtype, lambda: f"src is {src.dtype}, out {out.dtype}")
    _check(src.device == out.device or (src.device.type == "cpu" and out.device.type == "cuda" and src.is_pinned()),
           lambda: f"src on {src.device} cannot be read from {out.device}: it must be there or in pinned host memory")
    _check_index("positions", positions, out.device)
    b, p, c = out.shape
    if b == 0 or p == 0 or c == 0:
        return out
    block_c, block_p = _blocks("rows", c, blocks)
    grid = (b, triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    with _on(out.device):
        _gather_rows_kernel[grid](src, positions, out, p, c, *src.stride(), *out.stride(),
                                  BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def geglu(h: torch.Tensor, blocks=None) -> torch.Tensor:
    """`reference.geglu`: h [..., 2 * D] -> [..., D] in h's dtype, the GELU and the product in one pass."""
    _check(h.shape[-1] % 2 == 0, lambda: f"GEGLU halves the last dimension, which is {h.shape[-1]}")
    _check(h.stride(-1) == 1, lambda: "GEGLU reads contiguous channels")
    d = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * d)  # a view for a projection's output
    out = torch.empty((rows.shape[0], d), device=h.device, dtype=h.dtype)
    if out.numel() == 0:
        return out.view(*h.shape[:-1], d)
    block_d, block_r = _blocks("geglu", d, blocks)
    grid = (triton.cdiv(rows.shape[0], block_r), triton.cdiv(d, block_d))
    with _on(h.device):
        _geglu_kernel[grid](rows, out, rows.shape[0], d, rows.stride(0), out.stride(0), BLOCK_R=block_r,
                            BLOCK_D=block_d)
    return out.view(*h.shape[:-1], d)


_UNITS = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}


class RowCopyLaunches:
    """`kernels.row_copies.RowCopies` as launches of _copy_rows_kernel: its copies grouped by element size and by
    whether the sources' and the outputs' channels are contiguous, one launch per group; each group's tables (per copy
    its geometry and output address, per step and copy the source address, per work item its copy) are built here once
    and kept on the device with the tensors they address. They are never built while a CUDA graph captures: the
    graph's own memory pool hands out blocks that the graph's earlier kernels use as scratch on every replay, which
    would overwrite tables filled once, and a capture cannot contain a copy from pageable memory.

    Args:
        copies: objects with `sources` (per step, or one for all steps: [B, L, C] tensors on the device or in pinned
            host memory; or one [steps, B, L, C] tensor, a step per index), `out` ([B, L', C] on
            the device), `src_index` and `out_index` ([P] int64 on the device, or None: 0..P-1) and `rows` (P);
            checked by RowCopies.add.
        steps: how many steps a source list must cover.
        max_programs: at most this many programs per launch (None: one per work item), each taking work items in
            turn: an upload from host memory that runs beside a step, whose programs would otherwise hold every SM
            while they wait on the host link and keep the step's kernels from starting.
    """
    FIELDS = 16  # first work item, rows, channels, blocks along rows and channels, source and output index addresses,
    # source strides (batch, row), output address and strides (batch, row, channel), source channel stride; padded

    def __init__(self, copies, device: torch.device, steps: int, blocks=None, max_programs: int | None = None):
        block_c, self.block_p = blocks or (INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS)["rows"]
        self.device = device
        self.max_programs = max_programs
        _check(device.type != "cuda" or not torch.cuda.is_current_stream_capturing(),
               lambda: "row copies cannot be built while a CUDA graph captures: build them before or after")
        longest = max([c.rows for c in copies if c.src_index is None or c.out_index is None], default=0)
        self.identity = torch.arange(longest, dtype=torch.int64, device=device)
        self.launches = []
        groups: dict = {}
        for c in copies:
            if c.rows and c.out.shape[0] and c.out.shape[2]:
                src_c1 = c.out.shape[2] == 1 or c.sources[0].stride(2) == 1
                groups.setdefault((c.out.element_size(), src_c1, c.out.stride(2) == 1), []).append(c)
        for (size, src_c1, out_c1), group in groups.items():
            bc = min(block_c, triton.next_power_of_2(max(c.out.shape[2] for c in group)))
            jobs, sources, items = [], [], []
            first = 0
            for c in group:
                batch, channels, src = c.out.shape[0], c.out.shape[2], c.sources[0]
                blocks_p, blocks_c = triton.cdiv(c.rows, self.block_p), triton.cdiv(channels, bc)
                index = [self.identity.data_ptr() if i is None else i.data_ptr() for i in (c.src_index, c.out_index)]
                jobs.append([first, c.rows, channels, blocks_p, blocks_c, *index, src.stride(0), src.stride(1),
                             c.out.data_ptr(), *c.out.stride(), src.stride(2)] + [0] * 2)
                # plain lists, one tensor per table: a small tensor per copy cost more than the kernels' work
                if isinstance(c.sources, torch.Tensor):  # [steps, ...]: step s at a fixed stride
                    base, stride = c.sources.data_ptr(), c.sources.stride(0) * c.sources.element_size()
                    sources.append([base + stride * s for s in range(steps)])
                else:
                    per_step = c.sources if len(c.sources) == steps else c.sources * steps
                    sources.append([t.data_ptr() for t in per_step])
                items.append(batch * blocks_p * blocks_c)
                first += items[-1]
            job_of = torch.repeat_interleave(torch.arange(len(jobs), dtype=torch.int32), torch.tensor(items))
            host = (torch.tensor(jobs, dtype=torch.int64), torch.tensor(sources, dtype=torch.int64).t().contiguous(),
                    job_of)
            self.launches.append(dict(
                tables=tuple(h.to(device) for h in host),
                n_jobs=len(jobs), work=first, UNIT=_UNITS[size], SRC_C1=src_c1, OUT_C1=out_c1, BLOCK_C=bc))
        self.copies = copies  # the tables address their tensors: kept alive with them

    def __call__(self, step: int) -> None:
        with _on(self.device):
            for la in self.launches:
                grid = la["work"] if self.max_programs is None else min(la["work"], self.max_programs)
                _copy_rows_kernel[(grid,)](*la["tables"], step, la["n_jobs"], la["work"], UNIT=la["UNIT"],
                                           SRC_C1=la["SRC_C1"], OUT_C1=la["OUT_C1"], JOB_FIELDS=self.FIELDS,
                                           BLOCK_P=self.block_p, BLOCK_C=la["BLOCK_C"])


def exact_group_stats(cached: torch.Tensor, cached_active, fresh_active, positions: int,
                      blocks: int | None = None) -> torch.Tensor:
    """`reference.exact_group_stats` in one launch: [N, G, 2] fp32 statistics of the cached map with its active
    positions replaced by fresh values, from the cached statistics `cached` [N, G, 2] (fp32), the cached values at
    the active positions (`cached_active`: a list of one or two reference.AtPositions, concatenated along channels)
    and the fresh ones (`fresh_active`: an AtPositions), of a map of `positions` positions. The values are read where
    they lie (any strides, any float dtype), at their positions."""
    _check(1 <= len(cached_active) <= 2, lambda: f"one or two cached maps expected, got {len(cached_active)}")
    first, second = cached_active[0], cached_active[-1]
    n, c, p = fresh_active.values.shape[0], fresh_active.values.shape[1], len(fresh_active.index)
    channels = sum(part.values.shape[1] for part in cached_active)
    _check(channels == c and all(len(part.index) == p and part.values.shape[0] == n for part in cached_active),
           lambda: f"the cached values ({channels} channels at {[len(x.index) for x in cached_active]} positions) and "
           f"the fresh ones ({c} channels at {p} positions) differ")
    for at in (*cached_active, fresh_active):
        _check_index("an index of active positions", at.index, at.values.device)
    _check(cached.dtype == torch.float32 and cached.dim() == 3 and cached.shape[0] == n and cached.shape[2] == 2,
           lambda: f"cached: fp32 [N={n}, G, 2] expected, got {cached.dtype} {tuple(cached.shape)}")
    groups = cached.shape[1]
    _check(groups > 0 and c % groups == 0, lambda: f"{c} channels do not split into {groups} groups")
    cached = cached.contiguous()
    if n == 0 or p == 0:
        return cached.clone()
    per = c // groups
    block_c = triton.next_power_of_2(per)  # a program holds a whole group's channels
    block_p = max(1, (blocks or (INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS)["stats"]) // block_c)
    out = torch.empty_like(cached)
    with _on(cached.device):
        _exact_stats_kernel[(n, groups)](
            cached, first.values, first.index, second.values, second.index, fresh_active.values, fresh_active.index,
            out, p, per, groups, first.values.shape[1], float(positions * per),
            *first.values.stride(), *second.values.stride(), *fresh_active.values.stride(),
            BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return out
