"""Invariant I5: every sparse op, on random inputs whose values outside the active region are the cached ones, equals
the dense op restricted to the active region (and the cached output outside it).

Blocks with an inner activation (ResBlock `h`, self-attention K/V) take it from the cache outside the active region,
so their dense reference does the same: the dense op, with that inner activation replaced by the cached one at
inactive positions. Random weights (tiny models of each structure), random activations (not zeros), random masks,
non-square maps, several tile sizes, batch 2 with CFG chunks (rows = 2 chunks x 2 samples).

The ops read the cache through the edit's feed (feed.py), whose maps hold NaN outside the level's read region: an op
that read outside it would turn its active values into NaN. Outputs are compared on the read region (where the next
ops read them); GroupNorm statistics come from the cached statistics of the input blocks' cached maps.
"""
import pytest
import torch

import tiny_models

ROWS_CHUNKS, BATCH = [1, 0], 2


class FakeSource:
    """Stands in for a sealed cache: returns the test's random 'cached' tensors per (key, chunk)."""

    resident = None  # nothing kept on a device (fisedit_engine/resident.py)

    def __init__(self):
        self.values = {}

    def set(self, key, rows):
        for i, chunk in enumerate(ROWS_CHUNKS):
            self.values[(key, chunk)] = rows[i * BATCH:(i + 1) * BATCH]

    def read(self, key, step, chunk=0, sample=None):
        return self.values[(key, chunk)]

    def read_stored(self, key, step, chunk):
        from fisedit_engine.cache import to_storage
        return to_storage(self.values[(key, chunk)]).contiguous()

    def read_positions(self, key, step, chunk, positions, out=None):
        from fisedit_engine.cache import take_positions
        values = take_positions(self.values[(key, chunk)], positions)
        return values if out is None else out.copy_(values)

    def stored_channels(self, key, chunk):
        value = self.values[(key, chunk)]  # maps [B, C, H, W], tokens [B, T, C]
        return value.shape[0], value.shape[1] if value.dim() == 4 else value.shape[-1], value.dtype

    def set_input(self, layout, block, cached_x, gn_path, groups):
        """The cached input of `block` (the channel concatenation of its input blocks' cached outputs, e.g. an
        output block's cat(h, skip)) and the cached statistics of the GroupNorm at `gn_path` that normalises it."""
        from fisedit_engine.kernels import reference as R
        channels = {b.path: b.channels for b in layout.blocks}
        for key, part in zip(block.inputs, cached_x.split([channels[k] for k in block.inputs], dim=1)):
            self.set(key, part)
        self.set(f"{gn_path}:stats", R.group_stats(cached_x, groups))

    def cached_steps(self, key, chunk=0):
        return 1 if (key, chunk) in self.values else 0

    @property
    def store(self):
        """A one-step store of the values, laid out as a sealed cache stores them: what the feed plans its moves
        from."""
        from fisedit_engine.cache import StepTensors, to_storage
        store = StepTensors(steps=1, batch=BATCH)
        store.tensors = {k: to_storage(v)[None].contiguous() for k, v in self.values.items()}
        return store

    @property
    def settings(self):
        from types import SimpleNamespace
        return SimpleNamespace(steps=1)


class Sink:
    def __init__(self):
        self.recorded = {}

    def record(self, key, ctx, rows):
        self.recorded[key] = rows


def make_ctx(mask, sizes, sparse_levels, tile, layout, padded=False):
    """`padded`: the plan's index maps longer than its tiles need, as a graph captured for another mask has them."""
    from fisedit_engine.capture import StepContext
    from fisedit_engine.edit import EditState
    from fisedit_engine.feed import EditFeed
    from fisedit_engine.plan import Capacity, EditPlan
    plan = EditPlan.build(mask, sizes, sparse_levels, tile)
    if padded:
        needs = {lvl: lp.needs for lvl, lp in plan.levels.items()}
        plan = EditPlan.build(mask, sizes, sparse_levels, tile,
                              {lvl: Capacity(n.tiles + 3, n.tokens + 5, n.read + 7) for lvl, n in needs.items()})
        for lvl, lp in plan.levels.items():  # padded indeed: the test can fail
            assert len(lp.tokens("cpu")) > needs[lvl].tokens and len(lp.tiles_on("cpu")) > needs[lvl].tiles
    source = FakeSource()
    state = EditState(plan, source, dense_from=10**9, feed=EditFeed.build(plan, source, layout))
    return StepContext(Sink(), 0, ROWS_CHUNKS, BATCH, state), plan, source


def refeed(ctx, source, layout):
    """A feed of the maps the test has cached so far (all in one step, so each op gets a fresh feed)."""
    from fisedit_engine.feed import EditFeed
    entries = EditFeed.build(ctx.edit.plan, source, layout).entries
    ctx.edit.feed = EditFeed(ctx.edit.plan, source, {k: e for k, e in entries.items() if (k, 0) in source.values})


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_cached_outside(fresh, cached, active):
    return torch.where(active, fresh, cached)


def assert_matches(actual, expected, active, read):
    """Close on the active region, the cached output bit for bit on the rest of the read region."""
    scale = expected.abs().max().item()
    on_active, ring = active.expand_as(expected), (read & ~active).expand_as(expected)
    assert not actual[on_active].isnan().any()  # NaN: an op read a position the feed did not upload
    torch.testing.assert_close(actual[on_active], expected[on_active], rtol=1e-5, atol=1e-5 * max(1.0, scale))
    assert torch.equal(actual[ring], expected[ring])


CASES = [("sd15", (16, 24), 4, 0), ("sd21v", (16, 16), 3, 1), ("sdxl", (20, 16), 5, 2), ("sd15", (16, 16), 1, 3)]


@pytest.fixture(params=["nhwc", "im2col", "mixed"])
def patch_layout(request, monkeypatch):
    """The convs' two paths: cuDNN on stacked patches, and one GEMM over im2col rows (kernels/fused.py); and the two
    by level."""
    monkeypatch.setenv("FISEDIT_PATCH_LAYOUT", request.param)
    return request.param


@pytest.fixture(params=["unpadded", "padded"])
def index_maps(request):
    """The plan's index maps as its tiles need them, and padded (plan.py: how a CUDA graph captured for one mask
    replays another's)."""
    return request.param


@pytest.fixture(scope="module")
def models(host):
    return {arch: tiny_models.build(arch, seed=4) for arch in tiny_models.ARCHS}


def setup_case(models, arch, hw, tile, seed, index_maps="unpadded"):
    from fisedit_engine.layout import UNetLayout
    unet = models[arch].model.diffusion_model
    layout = UNetLayout.from_unet(unet)
    sizes = layout.level_sizes(*hw)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(BATCH, *hw, dtype=torch.bool)
    for b in range(BATCH):  # a small blob per sample, at a random place: partial tiles, several regions
        r, c = (int(torch.randint(2, n - 4, (1,), generator=gen)) for n in hw)
        mask[b, r:r + 2, c:c + 3] = True
    mask[0, 0, 0] = True  # and a tile at the border, where patches leave the map
    ctx, plan, source = make_ctx(mask, sizes, [0, 1], tile, layout, padded=index_maps == "padded")
    assert 0 < plan.levels[0].fraction < 1 and 0 < plan.levels[1].fraction < 1  # partial: the test can fail
    return unet, layout, ctx, plan, source


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_resblock(models, arch, hw, tile, seed, patch_layout, index_maps):
    from fisedit_engine.kernels import reference as R
    from fisedit_engine.sparse import SparseResBlock
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed, index_maps)
    for block in [b for b in layout.blocks if b.kind == "resblock" and b.level in plan.levels][:3]:
        m = dict(unet.named_modules())[block.path]
        lp = plan.levels[block.level]
        active = lp.active[None, None]
        n, c_in, h, w = 4, m.channels, lp.height, lp.width
        x_cached = rand(n, c_in, h, w, seed=2)
        x = with_cached_outside(rand(n, c_in, h, w, seed=1), x_cached, active)
        source.set_input(layout, block, x_cached, f"{block.path}.in_layers.0", m.in_layers[0].num_groups)
        emb = rand(n, m.emb_channels, seed=3)
        h_cached, out_cached = rand(n, m.out_channels, h, w, seed=4), rand(n, m.out_channels, h, w, seed=5)
        source.set(f"{block.path}:h", h_cached)
        source.set(f"{block.path}.out_layers.0:stats", R.group_stats(h_cached, m.out_layers[0].num_groups))
        source.set(block.path, out_cached)
        refeed(ctx, source, layout)
        with torch.no_grad():
            h_dense = m.in_layers(x) + m.emb_layers(emb)[:, :, None, None]
            h_assembled = with_cached_outside(h_dense, h_cached, active)
            expected = with_cached_outside(m.skip_connection(x) + m.out_layers(h_assembled), out_cached, active)
            actual = SparseResBlock(m, block, block.path).sparse(ctx, x, emb)
        assert_matches(actual, expected, active, lp.read)
        assert_matches(ctx.recording.recorded[f"{block.path}:h"], h_assembled, active, lp.read)


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_spatial_transformer(models, arch, hw, tile, seed, index_maps):
    from fisedit_engine.sparse import SparseSpatialTransformer
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed, index_maps)
    ctx_dim = tiny_models.CONFIGS[arch]["context_dim"]
    for block in [b for b in layout.blocks if b.kind == "transformer" and b.level in plan.levels]:
        m = dict(unet.named_modules())[block.path]
        lp = plan.levels[block.level]
        active = lp.active[None, None]
        n, c, h, w = 4, block.channels, lp.height, lp.width
        x_cached = rand(n, c, h, w, seed=12)
        x = with_cached_outside(rand(n, c, h, w, seed=11), x_cached, active)
        source.set_input(layout, block, x_cached, f"{block.path}.norm", m.norm.num_groups)
        context = rand(n, 77, ctx_dim, seed=13)
        out_cached = rand(n, c, h, w, seed=14)
        source.set(block.path, out_cached)
        hooks = []
        inactive_tokens = ~lp.active.flatten()
        for j, tb in enumerate(m.transformer_blocks):
            inner = tb.attn1.to_k.out_features
            for what, proj in (("k", tb.attn1.to_k), ("v", tb.attn1.to_v)):
                cached = rand(n, h * w, inner, seed=20 + 2 * j + (what == "v"))
                source.set(f"{block.path}.transformer_blocks.{j}.attn1:{what}", cached)

                def replace_inactive(mod, inp, out, cached=cached, inactive=inactive_tokens):  # exact context
                    out = out.clone()
                    out[:, inactive] = cached[:, inactive]
                    return out
                hooks.append(proj.register_forward_hook(replace_inactive))
        try:
            with torch.no_grad():
                dense = m(x, context=context, transformer_options={})
        finally:
            for hk in hooks:
                hk.remove()
        expected = with_cached_outside(dense, out_cached, active)
        refeed(ctx, source, layout)
        with torch.no_grad():
            actual = SparseSpatialTransformer(m, block, block.path).sparse(ctx, x, context, {})
        assert_matches(actual, expected, active, lp.read)


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_conv_in_downsample_upsample(models, arch, hw, tile, seed, patch_layout, index_maps):
    from fisedit_engine.sparse import SparseConv, SparseDownsample, SparseUpsample
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed, index_maps)
    modules = dict(unet.named_modules())
    for block in [b for b in layout.blocks if b.kind in ("conv_in", "downsample", "upsample") and b.level in plan.levels]:
        m = modules[block.path]
        lp = plan.levels[block.level]
        active = lp.active[None, None]
        n = 4
        if block.kind == "conv_in":
            in_size, c_in, op = (lp.height, lp.width), m.in_channels, SparseConv
        elif block.kind == "downsample":
            in_size, c_in, op = plan.level_sizes[block.level - 1], m.channels, SparseDownsample
        else:
            in_size, c_in, op = plan.level_sizes[block.level + 1], m.channels, SparseUpsample
        x = rand(n, c_in, *in_size, seed=31)  # the coarser/finer input: cached values are whatever it holds
        out_cached = rand(n, block.channels, lp.height, lp.width, seed=32)
        source.set(block.path, out_cached)
        refeed(ctx, source, layout)
        shape = (n, block.channels, lp.height, lp.width)
        with torch.no_grad():
            if block.kind == "upsample":
                dense, actual = m(x, output_shape=shape), op(m, block, block.path).sparse(ctx, x, shape)
            else:
                dense, actual = m(x), op(m, block, block.path).sparse(ctx, x)
        assert_matches(actual, with_cached_outside(dense, out_cached, active), active, lp.read)


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_output_head(models, arch, hw, tile, seed, patch_layout, index_maps):
    from fisedit_engine.sparse import SparseOutput
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed, index_maps)
    lp = plan.levels[0]
    active = lp.active[None, None]
    c = unet.out[0].num_channels
    h_cached = rand(4, c, *hw, seed=42)
    h = with_cached_outside(rand(4, c, *hw, seed=41), h_cached, active)
    head = SparseOutput.for_unet(unet, layout)
    source.set_input(layout, head.block, h_cached, "out.0", unet.out[0].num_groups)
    out_cached = rand(4, 4, *hw, seed=43)
    source.set("out", out_cached)
    refeed(ctx, source, layout)
    with torch.no_grad():
        expected = with_cached_outside(unet.out(h), out_cached, active)
        actual = head.sparse(ctx, h)
    assert_matches(actual, expected, active, torch.ones_like(lp.read))  # the head's output is whole


def test_cached_statistics_mode_uses_the_original_runs_statistics(models):
    """The paper's approximation: GroupNorm normalizes with the cached statistics, not the current map's; the exact
    mode's statistics are those of the assembled map (cached outside the active region, fresh inside)."""
    from fisedit_engine.kernels import reference as R
    unet, layout, ctx, plan, source = setup_case(models, "sd15", (16, 16), 2, 5)
    block = next(b for b in layout.blocks if b.path == "input_blocks.1.0")
    gn_path = f"{block.path}.in_layers.0"
    active = plan.levels[0].active[None, None]
    x_cached = rand(4, 32, 16, 16, seed=52) * 3 + 1
    x = with_cached_outside(rand(4, 32, 16, 16, seed=51), x_cached, active)
    source.set_input(layout, block, x_cached, gn_path, 32)
    refeed(ctx, source, layout)
    ctx.edit.stats_mode = "cached"
    cached_stats = ctx.edit.group_stats(ctx, gn_path, x, 32, block.inputs)
    assert torch.equal(cached_stats, R.group_stats(x_cached, 32))
    ctx.edit.stats_mode = "exact"
    exact = ctx.edit.group_stats(ctx, gn_path, x, 32, block.inputs)  # 32 groups of 32 channels: one per group
    assert not torch.allclose(exact, cached_stats, rtol=1e-3)  # the fresh values moved the statistics
    normalized = (x - exact[..., 0, None, None]) * torch.rsqrt(exact[..., 1, None, None] + 1e-5)
    torch.testing.assert_close(normalized, torch.nn.functional.group_norm(x, 32), rtol=1e-5, atol=1e-5)
    assert ctx.recording.recorded[f"{gn_path}:stats"] is exact  # recorded into the edited result's cache


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_every_block_of_a_sparse_level_takes_its_sparse_forward(models, arch):
    """What an edit substitutes on a GPU, where every conv module also gets WholeConv: conv_in is a conv module and
    a sparse block, and must run sparse (it once ran whole on GPUs, for want of this check: 85 us of a 7 ms step)."""
    from fisedit_engine.edit import module_forwards
    from fisedit_engine.layout import UNetLayout
    from fisedit_engine.sparse import SPARSE_FORWARDS, SparseOutput, WholeConv
    unet = models[arch].model.diffusion_model
    layout = UNetLayout.from_unet(unet)
    modules = dict(unet.named_modules())
    convs = {path: m for path, m in modules.items() if isinstance(m, torch.nn.Conv2d)}
    forwards = module_forwards(modules, layout, {0}, convs)
    sparse = [b for b in layout.blocks if b.level == 0]
    assert any(b.kind == "conv_in" for b in sparse)
    for block in sparse:
        assert type(forwards[block.path]) is SPARSE_FORWARDS[block.kind], block.path
        assert forwards[block.path].module is modules[block.path]
    assert isinstance(forwards["out"], SparseOutput)
    whole = {p for p, f in forwards.items() if isinstance(f, WholeConv)}
    assert whole == convs.keys() - {b.path for b in sparse}
    assert any(b.level != 0 for b in layout.blocks)  # the dense levels' blocks keep their own forwards
    assert not {b.path for b in layout.blocks if b.level != 0} & forwards.keys()


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_feed_forward_with_one_geglu_kernel_equals_the_module(models, arch):
    """SD1.x, SD2.x and SDXL feed-forwards are GEGLU ones: the sparse block runs them with the fused GEGLU op."""
    from fisedit_engine import comfy_adapter as host
    from fisedit_engine.sparse import _feed_forward
    blocks = [m for m in models[arch].model.diffusion_model.modules() if hasattr(m, "ff") and hasattr(m, "attn2")]
    assert blocks and all(host.geglu_feed_forward(b.ff) for b in blocks)
    x = rand(2, 5, blocks[0].ff.net[0].proj.in_features, seed=41)
    with torch.no_grad():
        torch.testing.assert_close(_feed_forward(blocks[0].ff, x), blocks[0].ff(x), rtol=1e-6, atol=1e-6)
    assert not host.geglu_feed_forward(torch.nn.Sequential(blocks[0].ff.net[0]))
