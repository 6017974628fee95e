"""The Triton kernels (kernels/triton_ops.py) against their references, on the CPU under Triton's interpreter, and the
dispatch that chooses between them (kernels/fused.py).

Triton decides at decoration time whether a kernel is compiled or interpreted, from TRITON_INTERPRET. The kernels
under test are a private copy of triton_ops loaded with TRITON_INTERPRET=1 set for that import only, so nothing of it
reaches other tests: the dispatch's own triton_ops (sys.modules) is untouched, and the variable is restored.

Each kernel output is compared with an fp64 oracle (tests/kernel_checks.py) and must be within K times the reference
op's own error (same inputs, same dtype) plus a tiny absolute term; pure data movement must be bit-exact. Shapes are
small (the interpreter runs each program in Python) but have what the real ones have: two batch rows (CFG), 32
groups, channel counts that are not a multiple of the block, partial tiles at the map's border, patches leaving the
map (-1 indices), inputs channels-last or sliced from a wider map, and NaN where the feed's canvases hold it.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel_checks as KC

KC.require_triton()
import triton  # noqa: E402  (the ahead-of-time compile check below)

from fisedit_engine.kernels import fused
from fisedit_engine.kernels import reference as R

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, C, GROUPS, HW, TILE = 2, 96, 32, (18, 27), 4   # C = 3 x 32: two channel blocks of 64, the second partial


def load_triton_ops(interpret: bool):
    """A private copy of triton_ops, its kernels decorated with TRITON_INTERPRET set to `interpret` for the import
    only."""
    path = ROOT / "fisedit_engine" / "kernels" / "triton_ops.py"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1" if interpret else "0")
        name = f"fisedit_triton_ops_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert module.INTERPRETED == interpret
    return module


@pytest.fixture(scope="module")
def T():
    return load_triton_ops(interpret=True)


@pytest.fixture(scope="module")
def plan():
    p = KC.make_plan(HW, TILE, fraction=0.04, seed=3)
    assert 0 < p.levels[0].fraction < 1 and 0 < p.levels[1].fraction < 1
    return p


def k_of(dtype):
    return KC.tolerance_factor(dtype, interpreted=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KC.KINDS)
def test_gather_norm_silu(T, plan, kind, dtype):
    lp, rows, cols, in_hw = KC.geometry(plan, kind, "cpu")
    assert (rows < 0).any() or (cols < 0).any()  # some patch leaves the map
    x = KC.make_map(N, C, in_hw, dtype, "cpu", seed=1, nan_outside=KC.patch_read_region(rows, cols, in_hw))
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, "cpu", seed=2)
    exact = KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-5, True)
    out = T.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    ref = R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    KC.check_bound(out, ref, exact, k_of(dtype))
    invalid = ~R.valid_patch_mask(rows, cols)
    assert torch.equal(out[:, :, invalid], torch.zeros_like(out[:, :, invalid]))  # the conv's zero padding
    assert out.abs().sum() > 0


def im2col_geometry(plan, kind):
    lp, _, _, in_hw = KC.geometry(plan, kind, "cpu")
    rows, cols = lp.im2col_index(kind, "cpu", in_hw if kind in ("down", "up") else None)
    return lp, rows, cols, in_hw


def as_im2col(patches):
    """[N, C, tiles, 3 O, 3 O] gathered by the im2col index -> [N, tiles, O, O, 9 C], (ki, kj, c) innermost."""
    n, c, t, p, _ = patches.shape
    return patches.reshape(n, c, t, p // 3, 3, p // 3, 3).permute(0, 2, 3, 5, 4, 6, 1).reshape(n, t, p // 3,
                                                                                                 p // 3, 9 * c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["conv3", "down", "up"])
def test_gather_norm_im2col(T, plan, kind, dtype):
    lp, rows, cols, in_hw = im2col_geometry(plan, kind)
    assert (rows < 0).any() or (cols < 0).any()  # some tap leaves the map
    x = KC.make_map(N, C, in_hw, dtype, "cpu", seed=1, nan_outside=KC.patch_read_region(rows, cols, in_hw),
                    layout="channels_last")
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, "cpu", seed=2)
    out = T.gather_norm_im2col(x, rows, cols, stats, w, b, 1e-5, True)
    assert out.shape == (N, lp.n_tiles, lp.tile, lp.tile, 9 * C) and out.is_contiguous()
    ref = R.gather_norm_im2col(x, rows, cols, stats, w, b, 1e-5, True)
    KC.check_bound(out, ref, as_im2col(KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-5, True)), k_of(dtype))
    assert torch.equal(T.gather_norm_im2col(x, rows, cols), R.gather_norm_im2col(x, rows, cols))  # gather only


@pytest.mark.parametrize("kind", ["conv3", "down", "up"])
def test_im2col_rows_times_the_weight_are_the_conv(plan, kind):
    """The im2col path's GEMM (sparse._sparse_conv under FISEDIT_PATCH_LAYOUT=im2col, with EditState.im2col_weight's
    matrix) equals the conv on the patches, in fp64."""
    lp, rows, cols, in_hw = KC.geometry(plan, kind, "cpu")
    _, r2, c2, _ = im2col_geometry(plan, kind)
    x = KC.make_map(N, C, in_hw, torch.float64, "cpu", seed=3)
    weight, bias = KC.rand(7, C, 3, 3, seed=4).double(), KC.rand(7, seed=5).double()
    conv = R.conv_patches(R.gather_patches(x, rows, cols), weight, bias, stride=2 if kind == "down" else 1)
    gemm = torch.nn.functional.linear(R.gather_norm_im2col(x, r2, c2), weight.permute(0, 2, 3, 1).reshape(7, -1),
                                      bias).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(gemm, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "slice"])
@pytest.mark.parametrize("out_channels_last", [False, True])
def test_gather_norm_memory_formats(T, plan, layout, out_channels_last):
    dtype = torch.float16
    lp, rows, cols, in_hw = KC.geometry(plan, "conv3", "cpu")
    x = KC.make_map(N, C, in_hw, dtype, "cpu", seed=4, layout=layout)
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, "cpu", seed=5)
    out = T.gather_norm_patches(x, rows, cols, stats, w, b, 1e-6, True, channels_last=out_channels_last)
    ref = R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-6, True)
    KC.check_bound(out, ref, KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-6, True), k_of(dtype))
    stacked = out.permute(0, 2, 1, 3, 4).reshape(N * lp.n_tiles, C, *out.shape[-2:])  # what conv_patches makes
    assert stacked.data_ptr() == out.data_ptr()  # a view: the conv reads the kernel's output where it lies
    assert stacked.is_contiguous(memory_format=torch.channels_last if out_channels_last else torch.contiguous_format)


@pytest.mark.parametrize("affine, silu", [(False, True), (True, False)])
def test_gather_norm_variants(T, plan, affine, silu):
    dtype = torch.bfloat16
    lp, rows, cols, in_hw = KC.geometry(plan, "up", "cpu")
    x = KC.make_map(1, 64, in_hw, dtype, "cpu", seed=6)
    stats, w, b = KC.norm_params(1, 64, 32, dtype, "cpu", seed=7, affine=affine)
    stats = torch.stack([stats[..., 0], stats[..., 1]], 0).permute(1, 2, 0)  # strided: the launcher copies it
    assert not stats.is_contiguous()
    if affine:
        w = torch.stack([w, w], 1)[:, 0]
    out = T.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, silu)
    ref = R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, silu)
    KC.check_bound(out, ref, KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-5, silu), k_of(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_only_is_exact(T, plan, dtype):
    for kind in KC.KINDS:
        lp, rows, cols, in_hw = KC.geometry(plan, kind, "cpu")
        x = KC.make_map(N, 24, in_hw, dtype, "cpu", seed=8, layout="slice")
        out = T.gather_norm_patches(x, rows, cols)
        assert torch.equal(out, R.gather_patches(x, rows, cols)), kind


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_tokens(T, plan, dtype):
    lp = plan.levels[0]
    tokens = lp.tokens("cpu")
    x = KC.make_map(N, C, HW, dtype, "cpu", seed=9, nan_outside=lp.active)
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, "cpu", seed=10)
    out = T.group_norm_tokens(x, tokens, stats, w, b, 1e-6)
    ref = R.group_norm_tokens(x, tokens, stats, w, b, 1e-6)
    KC.check_bound(out, ref, KC.oracle_tokens(x, tokens, stats, w, b, 1e-6), k_of(dtype))
    assert out.transpose(1, 2).is_contiguous()  # token-major, as proj_in reads it


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu(T, dtype):
    torch.manual_seed(0)
    h = (torch.randn(3, 37, 2 * 80, dtype=torch.float64) * 3).to(dtype)  # rows and channels past a block's end
    out = T.geglu(h)
    assert out.shape == (3, 37, 80) and out.dtype == dtype
    KC.check_bound(out, R.geglu(h), R.geglu(h.double()), k_of(dtype))
    strided = h.reshape(-1, 160)[:, :120]  # rows strided, as a view of a wider GEMM's output
    KC.check_bound(T.geglu(strided), R.geglu(strided), R.geglu(strided.double()), k_of(dtype))


SCATTER_ADDS = ["none", "bias", "residual_tiles", "residual_map", "bias+residual_map", "bias+residual_tiles"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adds", SCATTER_ADDS)
def test_scatter_add(T, plan, adds, dtype):
    lp = plan.levels[0]
    positions, sources = lp.tile_scatter("cpu")
    assert len(positions) < lp.n_tiles * TILE * TILE  # partial tiles at the border: elements without a place
    tiles_out = KC.conv_output_tiles(N, C, lp.n_tiles, TILE, dtype, "cpu", seed=11,
                                     channels_last=dtype == torch.bfloat16)  # both layouts the conv may return
    base = KC.make_map(N, C, HW, dtype, "cpu", seed=12, nan_outside=lp.read)
    kw = {}
    if "bias" in adds:
        kw["bias"] = KC.rand(N, C, seed=13, dtype=dtype)
    if "residual_tiles" in adds:
        kw["residual_tiles"] = KC.conv_output_tiles(N, C, lp.n_tiles, TILE, dtype, "cpu", seed=14)
    if "residual_map" in adds:
        kw["residual_map"] = KC.make_map(N, C, HW, dtype, "cpu", seed=15, layout="slice", nan_outside=lp.active)
    exact = KC.oracle_scatter(base, tiles_out, positions, sources, **kw)
    out = T.scatter_tiles_(base.clone(), tiles_out, positions, sources, **kw)
    ref = R.scatter_add_tiles_(base.clone(), tiles_out, positions, sources, **kw)
    if adds == "none":
        assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
    KC.check_bound(out, ref, exact, k_of(dtype))
    outside = ~lp.active
    assert torch.equal(out[:, :, outside].nan_to_num(7.0), base[:, :, outside].nan_to_num(7.0))  # untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scatter_tokens_with_residual(T, plan, dtype):
    """The transformer's output: token-major values [N, P, C] (as proj_out returns them) + x at the tokens."""
    lp = plan.levels[1]
    tokens = lp.tokens("cpu")
    hw = (lp.height, lp.width)
    values = KC.rand(N, len(tokens), 40, seed=16, dtype=dtype).transpose(1, 2)[..., None, None]
    x = KC.make_map(N, 40, hw, dtype, "cpu", seed=17, nan_outside=lp.active)
    base = KC.make_map(N, 40, hw, dtype, "cpu", seed=18)
    exact = KC.oracle_scatter(base, values, tokens, None, residual_map=x)
    out = T.scatter_tiles_(base.clone(), values, tokens, None, residual_map=x)
    ref = R.scatter_add_tiles_(base.clone(), values, tokens, None, residual_map=x)
    KC.check_bound(out, ref, exact, k_of(dtype))


@pytest.mark.parametrize("dtype, token_major, split", [(torch.float32, False, None), (torch.float16, True, 40),
                                                       (torch.bfloat16, False, 40), (torch.float16, True, None)])
def test_exact_group_stats(T, plan, dtype, token_major, split):
    """The statistics of the assembled map from the cached ones, for a map edited at the level's active tokens; the
    cached values read at their positions from the map, or from token-major rows, or from two maps concatenated
    along channels (split inside a group: channel 39 in the first map, 40 and 41 in the second)."""
    lp = plan.levels[0]
    tokens = lp.tokens("cpu")
    positions = HW[0] * HW[1]
    cached, cached_active, fresh, exact = KC.stats_case(N, C, GROUPS, HW, tokens, dtype, "cpu", seed=23,
                                                        token_major=token_major, split=split)
    out = T.exact_group_stats(cached, cached_active, fresh, positions)
    ref = R.exact_group_stats(cached, R.gathered(cached_active), fresh.gather(), positions)
    KC.check_bound(out, ref, exact, 2.0)
    if token_major:  # a program looping over the positions in several blocks: fp32 summation order only
        torch.testing.assert_close(T.exact_group_stats(cached, cached_active, fresh, positions, blocks=64), out)
    # no edit gives the cached statistics exactly, and so does an empty active region
    unchanged = R.AtPositions(R.gathered(cached_active), fresh.index)
    assert torch.equal(T.exact_group_stats(cached, cached_active, unchanged, positions), cached)
    empty = [R.AtPositions(part.values, part.index[:0]) for part in cached_active]
    assert torch.equal(T.exact_group_stats(cached, empty, R.AtPositions(fresh.values, fresh.index[:0]), positions),
                       cached)
    with pytest.raises(ValueError, match="differ"):
        T.exact_group_stats(cached, cached_active[:1], fresh, positions) if split else T.exact_group_stats(
            cached, cached_active, R.AtPositions(fresh.values, fresh.index[:-1]), positions)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_is_exact(T, plan, dtype):
    """Rows of a channels-last map at the level's read positions (what the feed uploads per step), bit for bit, from
    a contiguous map and from one sliced out of a wider one (strides of a stored step); P and C not multiples of the
    blocks."""
    positions = plan.levels[0].read_positions("cpu")
    gen = torch.Generator().manual_seed(29)
    src = torch.randn(N, HW[0] * HW[1], C + 5, generator=gen).to(dtype)
    for view in (src[..., :C].contiguous(), src[..., 2:C + 2]):
        out = torch.full((N, len(positions), C), float("nan"), dtype=dtype)
        assert T.gather_rows(view, positions, out, blocks=(64, 16)) is out
        assert torch.equal(out, R.gather_rows(view, positions, torch.empty_like(out)))
        assert torch.equal(out, view[:, positions])
    assert T.gather_rows(src, positions[:0], torch.empty(N, 0, C + 5, dtype=dtype)).shape == (N, 0, C + 5)
    with pytest.raises(ValueError, match="out"):
        T.gather_rows(src, positions, torch.empty(N, len(positions), C, dtype=dtype))
    with pytest.raises(ValueError, match="integer"):
        T.gather_rows(src, positions.float(), torch.empty(N, len(positions), C + 5, dtype=dtype))


def _step_copies(plan, dtype, steps=3):
    """What an edit's feed moves per step, small: a gathered read region from a per-step source (a channels-last
    [steps, batch, H*W, C] store), a scatter of it into a NaN canvas [B, C, H, W], a plain copy, and whole fp32
    statistics (another element size: another launch); and what a replayed step records: a channels-first map
    gathered at the positions (channels strided: another launch)."""
    from fisedit_engine.kernels.row_copies import RowCopies
    positions = plan.levels[0].read_positions("cpu")
    gen = torch.Generator().manual_seed(41)
    stored = torch.randn(steps, N, HW[0] * HW[1], C, generator=gen).to(dtype)
    stats = torch.randn(steps, N, GROUPS, 2, generator=gen)
    landing = torch.full((N, len(positions), C), float("nan"), dtype=dtype)
    canvas = torch.full((N, C, *HW), float("nan"), dtype=dtype)
    staged = torch.empty_like(landing)
    stats_out = torch.empty(N, GROUPS, 2)
    fresh = torch.randn(N, C, *HW, generator=gen).to(dtype)
    recorded = torch.full((N, len(positions), C), float("nan"), dtype=dtype)
    copies = RowCopies("cpu", steps)
    copies.add(stored, landing, src_index=positions)  # a step per index
    copies.add([landing], canvas.view(N, C, -1).transpose(1, 2), out_index=positions)
    copies.add([landing], staged)
    copies.add_whole(list(stats), stats_out)
    copies.add([fresh.flatten(2).transpose(1, 2)], recorded, src_index=positions)
    return copies, (landing, canvas, staged, stats_out, recorded)


@pytest.mark.parametrize("max_programs", [1, 3])
def test_row_copies_with_fewer_programs_than_work_items_copy_every_row(T, max_programs):
    """An upload's launch limited to a few programs (so that it leaves the GPU's SMs to the step beside it): each
    program takes work items in turn, and every row still lands where the reference puts it."""
    from fisedit_engine.kernels.row_copies import RowCopies
    gen = torch.Generator().manual_seed(43)
    stored = torch.randn(2, N, 40, C, generator=gen).half()
    index = torch.randperm(40, generator=gen)[:23]
    stats = torch.randn(2, N, GROUPS, 2, generator=gen)
    got = [torch.full((N, 23, C), float("nan")).half(), torch.empty(N, GROUPS, 2)]
    want = [t.clone() for t in got]
    copies, reference = (RowCopies("cpu", 2, max_programs=max_programs), RowCopies("cpu", 2))
    for c, (rows, whole) in ((copies, got), (reference, want)):
        c.add(stored, rows, src_index=index)
        c.add_whole(list(stats), whole)
    launches = T.RowCopyLaunches(copies.copies, copies.device, copies.steps, blocks=(64, 4),
                                 max_programs=copies.max_programs)
    assert max(la["work"] for la in launches.launches) > max_programs  # more work items than programs
    launches(1)
    R.copy_rows(reference.copies, 1)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(got[0], stored[1][:, index])


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_copies_are_exact(T, plan, dtype):
    """Many copies in one launch per element size (the feed's per-step upload and activation), bit for bit what
    the reference copies give, at two steps: the per-step source moves, everything else stays."""
    copies, outs = _step_copies(plan, dtype)
    want, want_outs = _step_copies(plan, dtype)
    launches = T.RowCopyLaunches(copies.copies, copies.device, copies.steps, blocks=(64, 16))
    # by element size and by whether the source's and the output's channels are contiguous (the canvas's and the
    # channels-first map's are not)
    unit = T._UNITS[dtype.itemsize]
    groups = {(unit, True, True), (unit, True, False), (T._UNITS[4], True, True), (unit, False, True)}
    assert {(la["UNIT"], la["SRC_C1"], la["OUT_C1"]) for la in launches.launches} == groups
    assert len(launches.launches) == len(groups)
    for step in (2, 0):
        launches(step)
        R.copy_rows(want.copies, step)
        for got, ref in zip(outs, want_outs):
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    positions = plan.levels[0].read_positions("cpu")
    landing, canvas, staged, stats_out, recorded = outs
    assert torch.equal(landing, copies.copies[0].sources[0][:, positions])
    assert torch.equal(recorded, copies.copies[-1].sources[0][:, positions])
    assert torch.equal(canvas.flatten(2)[:, :, positions], landing.transpose(1, 2))
    assert canvas.flatten(2).isnan().sum() == N * C * (HW[0] * HW[1] - len(positions))


def test_row_copies_refuse_what_they_cannot_copy(plan):
    from fisedit_engine.kernels.row_copies import RowCopies
    copies = RowCopies("cpu", steps=2)
    src = torch.zeros(2, 10, 8)
    with pytest.raises(ValueError, match="sources for 2 steps"):
        copies.add([src] * 3, torch.zeros(2, 10, 8))
    with pytest.raises(ValueError, match="1 sources for 2 steps"):
        copies.add(src[None], torch.zeros(2, 10, 8))  # a stepped source covers every step
    with pytest.raises(ValueError, match="strides"):
        copies.add([src, src[:, :, :4].repeat(1, 1, 2)[:, :, :8].contiguous().half()], torch.zeros(2, 10, 8))
    with pytest.raises(ValueError, match="int64"):
        copies.add([src], torch.zeros(2, 10, 8), src_index=torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows"):
        copies.add([src], torch.zeros(2, 4, 8), out_index=None, src_index=torch.arange(6))


def test_empty_and_bad_arguments(T, plan):
    lp, rows, cols, in_hw = KC.geometry(plan, "conv3", "cpu")
    x = KC.make_map(N, C, in_hw, torch.float16, "cpu", seed=19)
    stats, w, b = KC.norm_params(N, C, GROUPS, torch.float16, "cpu", seed=20)
    empty = T.gather_norm_patches(x, rows[:0], cols[:0], stats, w, b, 1e-5, True)
    assert empty.shape == (N, C, 0, rows.shape[1], cols.shape[1])
    with pytest.raises(ValueError, match="groups"):
        T.gather_norm_patches(x, rows, cols, stats[:, :5].contiguous(), w, b, 1e-5, True)
    with pytest.raises(ValueError, match="fp32"):
        T.gather_norm_patches(x, rows, cols, stats.half(), w, b, 1e-5, True)
    with pytest.raises(ValueError, match="disagree"):
        T.gather_norm_patches(x, rows, cols[:1], stats, w, b, 1e-5, True)


PINNED_TRITON = "3.9.0"  # scripts/requirements-triton.txt


@pytest.mark.skipif(triton.__version__ != PINNED_TRITON,
                    reason=f"ahead-of-time compilation's signature API is Triton {PINNED_TRITON}'s (CI's pin); with "
                           "another Triton, as on a GPU machine, tests/gpu compiles the kernels for real")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_the_h100():
    """Every kernel variant the launchers use, compiled for sm_90 down to a cubin (Triton's bundled ptxas): what the
    interpreter cannot catch (types the compiler rejects, unsupported ops) is caught without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    T = load_triton_ops(interpret=False)
    target = GPUTarget("cuda", 90, 32)

    def compile_(kernel, pointers, consts):
        sig = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in ("eps", "count") else "i32")
               for n in kernel.arg_names}
        return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target)

    for dt in ("fp16", "bf16", "fp32"):
        ptrs = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
        ptrs.update(rows_ptr="*i64", cols_ptr="*i64", stats_ptr="*fp32")
        for norm, flat, im2col in ((True, False, False), (True, True, False), (False, False, False),
                                   (True, False, True), (False, False, True)):
            consts = dict(NORM=norm, HAS_W=norm, HAS_B=norm, SILU=norm and not flat, FLAT=flat, IM2COL=im2col,
                          BLOCK_C=T.GPU_BLOCKS["gather"][0], BLOCK_S=T.GPU_BLOCKS["gather"][1])
            assert "cubin" in compile_(T._gather_norm_kernel, ptrs, consts).asm
        ptrs = {n: f"*{dt}" for n in ("base_ptr", "tiles_ptr", "bias_ptr", "res_ptr")}
        ptrs.update(pos_ptr="*i64", src_ptr="*i64")
        for res in (0, 1, 2):
            consts = dict(HAS_BIAS=res != 1, RES=res, IDENTITY=res == 2,
                          BLOCK_C=T.GPU_BLOCKS["scatter"][0], BLOCK_S=T.GPU_BLOCKS["scatter"][1])
            assert "cubin" in compile_(T._scatter_kernel, ptrs, consts).asm
        ptrs = {"src_ptr": f"*{dt}", "idx_ptr": "*i64", "out_ptr": f"*{dt}"}
        consts = dict(BLOCK_C=T.GPU_BLOCKS["rows"][0], BLOCK_P=T.GPU_BLOCKS["rows"][1])
        assert "cubin" in compile_(T._gather_rows_kernel, ptrs, consts).asm
        ptrs = {"stats_ptr": "*fp32", "old0_ptr": f"*{dt}", "old1_ptr": f"*{dt}", "new_ptr": f"*{dt}",
                "out_ptr": "*fp32", "old0_idx": "*i64", "old1_idx": "*i64", "new_idx": "*i64"}
        sig_consts = dict(BLOCK_C=16, BLOCK_P=T.GPU_BLOCKS["stats"] // 16)
        assert "cubin" in compile_(T._exact_stats_kernel, ptrs, sig_consts).asm
        consts = dict(BLOCK_D=T.GPU_BLOCKS["geglu"][0], BLOCK_R=T.GPU_BLOCKS["geglu"][1])
        assert "cubin" in compile_(T._geglu_kernel, {"h_ptr": f"*{dt}", "out_ptr": f"*{dt}"}, consts).asm
    ptrs = {"jobs_ptr": "*i64", "sources_ptr": "*i64", "job_of_ptr": "*i32"}  # bitwise: no float type
    for unit, src_c1, out_c1 in ((triton.language.int16, True, True), (triton.language.int32, True, False),
                                 (triton.language.int16, False, True)):
        consts = dict(UNIT=unit, SRC_C1=src_c1, OUT_C1=out_c1, JOB_FIELDS=T.RowCopyLaunches.FIELDS, BLOCK_P=T.GPU_BLOCKS["rows"][1],
                      BLOCK_C=T.GPU_BLOCKS["rows"][0])
        assert "cubin" in compile_(T._copy_rows_kernel, ptrs, consts).asm


# --- the dispatch -----------------------------------------------------------------------------------------------

@pytest.fixture
def dispatch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(fused.ENV, raising=False)
    fused.reset()
    yield monkeypatch
    fused.reset()


def _args(plan):
    lp, rows, cols, in_hw = KC.geometry(plan, "conv3", "cpu")
    x = KC.make_map(N, C, in_hw, torch.float32, "cpu", seed=21)
    stats, w, b = KC.norm_params(N, C, GROUPS, torch.float32, "cpu", seed=22)
    return x, rows, cols, stats, w, b


def test_dispatch_falls_back_on_cpu_and_logs_once(plan, dispatch, caplog):
    x, rows, cols, stats, w, b = _args(plan)
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        first = fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
        second = fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    assert fused.backend("gather_norm", "cpu") == "reference"
    assert torch.equal(first, R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True))
    assert torch.equal(first, second)
    lines = [r.getMessage() for r in caplog.records if "reference ops" in r.getMessage()]
    assert len(lines) == 1 and "TRITON_INTERPRET" in lines[0], lines


def test_dispatch_modes(plan, dispatch, caplog):
    x, rows, cols, stats, w, b = _args(plan)
    dispatch.setenv(fused.ENV, "triton")
    with pytest.raises(RuntimeError, match="cannot run here"):
        fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    dispatch.setenv(fused.ENV, "fast")
    with pytest.raises(ValueError, match="expected one of"):
        fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    dispatch.setenv(fused.ENV, "reference")
    with caplog.at_level(logging.INFO, logger="FISEdit"):
        out = fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    assert torch.equal(out, R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True))
    assert any("FISEDIT_KERNELS=reference" in r.getMessage() for r in caplog.records)


_SUBPROCESS = r"""
import json, logging, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import kernel_checks as KC
from fisedit_engine.kernels import fused, reference as R
records = []
class H(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("FISEdit").addHandler(H()); logging.getLogger("FISEdit").setLevel(logging.INFO)
plan = KC.make_plan((18, 27), 4, fraction=0.04, seed=3)
lp, rows, cols, hw = KC.geometry(plan, "conv3", "cpu")
x = KC.make_map(2, 32, hw, torch.float16, "cpu", seed=1)
stats, w, b = KC.norm_params(2, 32, 32, torch.float16, "cpu", seed=2)
out = fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
res = {"backend": fused.backend("gather_norm", "cpu"), "interpreted": fused.triton_module().INTERPRETED,
       "err": KC.check_bound(out, R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True),
                             KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-5, True))}
import os
os.environ[fused.LAYOUT_ENV] = "nhwc"
nhwc = fused.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
res["nhwc_equal"] = torch.equal(nhwc, out)
stacked = nhwc.permute(0, 2, 1, 3, 4).reshape(-1, nhwc.shape[1], *nhwc.shape[3:])
res["nhwc_stacked_channels_last"] = stacked.is_contiguous(memory_format=torch.channels_last)
def broken():
    raise RuntimeError("no compiler")
res["fallback"] = fused._run("probe_op", "cpu", broken, lambda: "reference result")
res["second"] = fused._run("probe_op", "cpu", broken, lambda: "reference result")
res["logs"] = records
print(json.dumps(res))
"""


def test_dispatch_runs_triton_under_the_interpreter_in_auto_mode():
    """A fresh process with TRITON_INTERPRET=1 (as CI's interpreted runs set it): auto mode takes the Triton kernels
    on CPU tensors; a kernel whose first launch fails is logged once and the reference answers from then on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", fused.ENV: "auto", fused.LAYOUT_ENV: "nchw"}  # then nhwc
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["backend"] == "triton" and res["interpreted"]
    assert res["nhwc_equal"] and res["nhwc_stacked_channels_last"]  # FISEDIT_PATCH_LAYOUT=nhwc: same values
    assert res["fallback"] == res["second"] == "reference result"
    failures = [line for line in res["logs"] if "probe_op failed on its first launch" in line]
    assert len(failures) == 1, res["logs"]
