"""The Triton kernels compiled for CUDA against their references, at SD2.1@768 sizes (level 0: 320 channels, 96x96,
tiles of 4, 5% of the tiles active; the level-1 geometries at 48x48), in fp16 and bf16, with the bound of
tests/kernel_checks.py (K = 2: compiled kernels round to nearest); the exact GroupNorm statistics too. Also: partial
channel blocks, every input memory format, NaN canvases, a CUDA-graph replay equal to the eager launch, and an edit on
a tiny model whose result with the kernels stays within the half-precision I3 bounds of the reference ops' result.
Skipped without CUDA."""
import pytest
import torch

import kernel_checks as KC
from fisedit_engine.kernels import fused
from fisedit_engine.kernels import reference as R

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
N, C, GROUPS, HW, TILE = 2, 320, 32, (96, 96), 4


@pytest.fixture(scope="module")
def T():
    reasons = fused.not_supported_reasons(torch.device(DEV))
    assert not reasons, reasons  # on a GPU the kernels must run: a fallback here would hide them
    return fused.triton_module()


@pytest.fixture(scope="module")
def plan():
    p = KC.tiles_fraction_plan(HW, TILE, 0.05)
    assert 0 < p.levels[0].fraction < 0.1
    return p


@pytest.fixture(scope="module")
def border_plan():
    return KC.make_plan(HW, TILE, fraction=0.05, seed=1)  # random rectangles, and tiles at two corners


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KC.KINDS)
@pytest.mark.parametrize("which", ["centre", "border"])
def test_gather_norm_silu(T, plan, border_plan, kind, dtype, which):
    p = plan if which == "centre" else border_plan
    lp, rows, cols, in_hw = KC.geometry(p, kind, DEV)
    x = KC.make_map(N, C, in_hw, dtype, DEV, seed=1, nan_outside=KC.patch_read_region(rows, cols, in_hw))
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, DEV, seed=2)
    out = T.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    ref = R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
    KC.check_bound(out, ref, KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-5, True), 2.0)
    invalid = ~R.valid_patch_mask(rows, cols)
    # border tiles read past the map through a halo; an "interior" patch is the tile itself and never does
    assert bool(invalid.any()) == (which == "border" and kind != "interior")
    assert torch.equal(out[:, :, invalid], torch.zeros_like(out[:, :, invalid]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("out_channels_last", [False, True])
@pytest.mark.parametrize("channels, blocks", [(320, None), (224, (64, 128)), (96, (128, 32))])
def test_gather_norm_formats_and_blocks(T, border_plan, layout, out_channels_last, channels, blocks):
    dtype = torch.float16
    lp, rows, cols, in_hw = KC.geometry(border_plan, "conv3", DEV)
    x = KC.make_map(N, channels, in_hw, dtype, DEV, seed=3, layout=layout)
    stats, w, b = KC.norm_params(N, channels, GROUPS, dtype, DEV, seed=4)
    out = T.gather_norm_patches(x, rows, cols, stats, w, b, 1e-6, True, channels_last=out_channels_last,
                                blocks=blocks)
    ref = R.gather_norm_patches(x, rows, cols, stats, w, b, 1e-6, True)
    KC.check_bound(out, ref, KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-6, True), 2.0)
    assert torch.equal(T.gather_norm_patches(x, rows, cols, blocks=blocks), R.gather_patches(x, rows, cols))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_tokens(T, plan, dtype):
    lp = plan.levels[0]
    tokens = lp.tokens(DEV)
    x = KC.make_map(N, C, HW, dtype, DEV, seed=5, nan_outside=lp.active)
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, DEV, seed=6)
    out = T.group_norm_tokens(x, tokens, stats, w, b, 1e-6)
    ref = R.group_norm_tokens(x, tokens, stats, w, b, 1e-6)
    KC.check_bound(out, ref, KC.oracle_tokens(x, tokens, stats, w, b, 1e-6), 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [320, 960, 2560])  # 10, 30 and 80 channels per group (concatenated inputs)
def test_exact_group_stats(T, plan, dtype, channels):
    """From token-major rows, as the feed stages them; the concatenated inputs from two maps (split inside a
    group where the group size allows)."""
    tokens = plan.levels[0].tokens(DEV)
    split = None if channels == 320 else channels // 3 + 1
    cached, cached_active, fresh, exact = KC.stats_case(N, channels, GROUPS, HW, tokens, dtype, DEV, seed=12,
                                                        token_major=True, split=split)
    out = T.exact_group_stats(cached, cached_active, fresh, HW[0] * HW[1])
    ref = R.exact_group_stats(cached, R.gathered(cached_active), fresh.gather(), HW[0] * HW[1])
    KC.check_bound(out, ref, exact, 2.0)
    unchanged = R.AtPositions(R.gathered(cached_active), fresh.index)
    assert torch.equal(T.exact_group_stats(cached, cached_active, unchanged, HW[0] * HW[1]), cached)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adds", ["none", "bias", "residual_tiles", "residual_map", "bias+residual_map",
                                  "bias+residual_tiles"])
def test_scatter_add(T, border_plan, adds, dtype):
    lp = border_plan.levels[0]
    positions, sources = lp.tile_scatter(DEV)
    tiles_out = KC.conv_output_tiles(N, C, lp.n_tiles, TILE, dtype, DEV, seed=7, channels_last=True)
    base = KC.make_map(N, C, HW, dtype, DEV, seed=8, nan_outside=lp.read)
    kw = {}
    if "bias" in adds:
        kw["bias"] = KC.rand(N, C, seed=9, device=DEV, dtype=dtype)
    if "residual_tiles" in adds:
        kw["residual_tiles"] = KC.conv_output_tiles(N, C, lp.n_tiles, TILE, dtype, DEV, seed=10)
    if "residual_map" in adds:
        kw["residual_map"] = KC.make_map(N, C, HW, dtype, DEV, seed=11, layout="slice", nan_outside=lp.active)
    out = T.scatter_tiles_(base.clone(), tiles_out, positions, sources, **kw)
    ref = R.scatter_add_tiles_(base.clone(), tiles_out, positions, sources, **kw)
    if adds == "none":
        assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
    KC.check_bound(out, ref, KC.oracle_scatter(base, tiles_out, positions, sources, **kw), 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["conv3", "down", "up"])
def test_gather_norm_im2col(T, border_plan, kind, dtype):
    """The im2col rows (FISEDIT_PATCH_LAYOUT=im2col) against the reference (their GEMM against the conv: the unit
    tests, in fp64)."""
    lp, _, _, in_hw = KC.geometry(border_plan, kind, DEV)
    rows, cols = lp.im2col_index(kind, DEV, in_hw if kind in ("down", "up") else None)
    x = KC.make_map(N, C, in_hw, dtype, DEV, seed=1, nan_outside=KC.patch_read_region(rows, cols, in_hw),
                    layout="channels_last")
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, DEV, seed=2)
    out = T.gather_norm_im2col(x, rows, cols, stats, w, b, 1e-5, True)
    ref = R.gather_norm_im2col(x, rows, cols, stats, w, b, 1e-5, True)
    patches = KC.oracle_gather_norm(x, rows, cols, stats, w, b, 1e-5, True)  # [N, C, tiles, 3 O, 3 O]
    n, c, t, p, _ = patches.shape
    exact = patches.reshape(n, c, t, p // 3, 3, p // 3, 3).permute(0, 2, 3, 5, 4, 6, 1).reshape(out.shape)
    KC.check_bound(out, ref, exact, 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu(T, dtype):
    """SD2.1@768 level 0's feed-forward: 5% of 96x96 tokens, 2 rows, 2 x 1280 channels; and a strided view."""
    torch.manual_seed(0)
    h = (torch.randn(2, 461, 2 * 1280, device=DEV, dtype=torch.float64) * 3).to(dtype)
    KC.check_bound(T.geglu(h), R.geglu(h), R.geglu(h.double()), 2.0)
    strided = h.reshape(-1, 2560)[:, :2 * 600]
    KC.check_bound(T.geglu(strided), R.geglu(strided), R.geglu(strided.double()), 2.0)


def test_graph_replay_equals_eager(T, plan):
    """The kernels inside a captured CUDA graph (as the sparse step runs) give the eager launch's result."""
    dtype = torch.float16
    lp, rows, cols, in_hw = KC.geometry(plan, "conv3", DEV)
    positions, sources = lp.tile_scatter(DEV)
    x = KC.make_map(N, C, in_hw, dtype, DEV, seed=12)
    stats, w, b = KC.norm_params(N, C, GROUPS, dtype, DEV, seed=13)
    bias = KC.rand(N, C, seed=14, device=DEV, dtype=dtype)
    base = KC.make_map(N, C, HW, dtype, DEV, seed=15)

    def step(target):
        p = T.gather_norm_patches(x, rows, cols, stats, w, b, 1e-5, True)
        tiles = p[:, :, :, 1:-1, 1:-1]  # stands in for the conv: the interior of each patch
        return T.scatter_tiles_(target, tiles, positions, sources, bias=bias, residual_map=x)

    eager = step(base.clone())
    target = base.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(target.clone())  # warm-up outside the capture (compiles nothing new, allocates the pool)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(target)
    target.copy_(base)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(target, eager) and not torch.equal(target, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_reads_pinned_host_memory_in_place(T, plan, dtype):
    """The feed's per-step gather: rows of a stored step (channels-last, in pinned host memory) at the level's read
    positions, read by the GPU in place; bit for bit what the host gather gives, also from a strided view and from
    device memory. Memory that is not pinned is refused (the GPU cannot address it)."""
    positions = plan.levels[0].read_positions(DEV)
    gen = torch.Generator().manual_seed(31)
    stored = torch.randn(3, N, HW[0] * HW[1], C, generator=gen).to(dtype).pin_memory()  # [steps, batch, H*W, C]
    want = stored[1][:, positions.cpu()]
    for src in (stored[1], stored[1][:, :, :C - 64], stored[1].to(DEV)):
        out = torch.full((N, len(positions), src.shape[2]), float("nan"), dtype=dtype, device=DEV)
        T.gather_rows(src, positions, out)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), want[..., :src.shape[2]])
    with pytest.raises(ValueError, match="pinned"):
        T.gather_rows(stored[1].clone(), positions, torch.empty(N, len(positions), C, dtype=dtype, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_copies_read_pinned_host_memory_and_replay_in_a_graph(T, plan, dtype):
    """The feed's planned moves at SD2.1@768's level 0 (kernels/row_copies.py): per step, the read region's rows of
    a stored step in pinned host memory into a landing buffer (one launch), then the landing into a NaN canvas
    [B, C, H, W] and a staged copy, and whole fp32 statistics beside them (another launch); bit for bit the
    reference, at several steps, and the same when the launches replay as a CUDA graph."""
    from fisedit_engine.kernels.row_copies import RowCopies
    steps, positions = 3, plan.levels[0].read_positions(DEV)
    gen = torch.Generator().manual_seed(37)
    stored = torch.randn(steps, N, HW[0] * HW[1], C, generator=gen).to(dtype).pin_memory()
    stats = torch.randn(steps, N, GROUPS, 2, generator=gen).pin_memory()
    landing = torch.empty(N, len(positions), C, dtype=dtype, device=DEV)
    canvas = torch.full((N, C, *HW), float("nan"), dtype=dtype, device=DEV)
    staged, stats_out = torch.empty_like(landing), torch.empty(N, GROUPS, 2, device=DEV)
    upload, activate = RowCopies(DEV, steps), RowCopies(DEV, 1)
    upload.add(stored, landing, src_index=positions)  # a step per index
    upload.add_whole(list(stats), stats_out)
    activate.add([landing], canvas.flatten(2).transpose(1, 2), out_index=positions)
    activate.add_whole([landing], staged)
    assert upload.nbytes(1) == N * len(positions) * C * dtype.itemsize + stats[0].numel() * 4

    def check(step):
        want = stored[step][:, positions.cpu()].to(DEV)
        assert torch.equal(landing, want) and torch.equal(staged, want)
        assert torch.equal(canvas.flatten(2)[:, :, positions], want.transpose(1, 2))
        assert torch.equal(stats_out.cpu(), stats[step])

    for step in (2, 0, 1):
        fused.copy_rows(upload, step)
        fused.copy_rows(activate, 0)
        torch.cuda.synchronize()
        check(step)
    assert len(upload.launches.launches) == 2 and len(activate.launches.launches) == 2
    assert int(canvas.isnan().sum()) == N * C * (HW[0] * HW[1] - len(positions))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.copy_rows(upload, 2)
        fused.copy_rows(activate, 0)
    graph.replay()
    torch.cuda.synchronize()
    check(2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_copies_after_a_replay_gather_what_the_graph_computed(T, plan, dtype):
    """What a captured sparse step does with its record (capture.Recording.packing): row copies built once the
    capture has ended, over a channels-first map [B, C, H, W] that the graph computes (in its own memory pool, after
    scratch work whose blocks the pool hands out again), gather after each replay that replay's values at the level's
    active positions. Building them while a graph captures is refused (their tables would be the pool's)."""
    from fisedit_engine.kernels.row_copies import RowCopies
    positions = plan.levels[0].tokens(DEV)
    source = torch.empty(N, C, *HW, dtype=dtype, device=DEV)
    out = torch.full((N, len(positions), C), float("nan"), dtype=dtype, device=DEV)
    warm = RowCopies(DEV, 1)  # the kernel's first launch is eager (kernels/fused.py)
    warm.add([source.flatten(2).transpose(1, 2)], out, src_index=positions)
    fused.copy_rows(warm, 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):  # scratch in the graph's pool, freed before the map is made
            (torch.randn(1 << 16, device=DEV) * 2).sum()
        fmap = source * 2
        with pytest.raises(ValueError, match="while a CUDA graph captures"):
            refused = RowCopies(DEV, 1)
            refused.add([fmap.flatten(2).transpose(1, 2)], out, src_index=positions)
            fused.copy_rows(refused, 0)
    copies = RowCopies(DEV, 1)
    copies.add([fmap.flatten(2).transpose(1, 2)], out, src_index=positions)
    for seed in (2, 3):
        source.copy_(torch.randn(source.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
        graph.replay()
        fused.copy_rows(copies, 0)
        torch.cuda.synchronize()
        assert torch.equal(out, (source * 2).flatten(2)[:, :, positions].transpose(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nhwc", "im2col", "mixed"])
def test_edit_with_kernels_matches_the_reference_ops(host, monkeypatch, dtype, layout):
    """A whole edit of a tiny SD1.5-structured model: the kernels (auto mode picks them on CUDA) against the
    reference ops, the convs on stacked patches or as im2col GEMMs or by level (FISEDIT_PATCH_LAYOUT). Outside the
    mask both are the original exactly (I4); inside they differ by rounding, which random weights amplify over the
    steps, within the I3 bounds of tests/gpu/test_edit_gpu.py."""
    monkeypatch.setenv(fused.LAYOUT_ENV, layout)
    import tiny_models
    from tiny_models import sample

    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec, run_edit
    arch, size = "sd15", 64
    model = tiny_models.build(arch, seed=2, dtype=dtype)
    captured, handle = api.capture(model, f"gpu-kernels-{dtype}-{layout}")
    original = sample(captured, arch, batch=2, cfg=6.0, sampler="dpmpp_2m", size=size)
    api.store(handle, {"samples": original})
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    mask[0, 10:30, 20:44] = True
    mask[1, 0:12, 50:64] = True  # tiles at the border
    outside = ~mask[:, None].expand_as(original)
    results = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv(fused.ENV, mode)
        fused.reset()
        with torch.inference_mode():
            results[mode] = run_edit(model, EditSpec(handle, tiny_models.conditioning(arch, 99), mask))[0]
        if mode == "auto":
            assert ("gather_norm", "cuda:0") in fused._launched and ("scatter", "cuda:0") in fused._launched
    ref, kern = results["reference"], results["auto"]
    assert torch.equal(kern[outside], original[outside]) and torch.equal(ref[outside], original[outside])
    bound = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype] * max(1.0, original.abs().max().item())
    assert (kern - ref).abs().max().item() <= bound
    assert not torch.equal(kern, original)
