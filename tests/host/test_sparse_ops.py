"""Invariant I5: every sparse op, on random inputs whose values outside the active region are the cached ones, equals
the dense op restricted to the active region (and the cached output outside it).

Blocks with an inner activation (ResBlock `h`, self-attention K/V) take it from the cache outside the active region,
so their dense reference does the same: the dense op, with that inner activation replaced by the cached one at
inactive positions. Random weights (tiny models of each structure), random activations (not zeros), random masks,
non-square maps, several tile sizes, batch 2 with CFG chunks (rows = 2 chunks x 2 samples).
"""
import pytest
import torch

import tiny_models

ROWS_CHUNKS, BATCH = [1, 0], 2


class FakeSource:
    """Stands in for a sealed cache: returns the test's random 'cached' tensors per (key, chunk)."""

    def __init__(self):
        self.values = {}

    def set(self, key, rows):
        for i, chunk in enumerate(ROWS_CHUNKS):
            self.values[(key, chunk)] = rows[i * BATCH:(i + 1) * BATCH]

    def read(self, key, step, chunk=0, sample=None):
        return self.values[(key, chunk)]

    def cached_steps(self, key, chunk=0):
        return 1 if (key, chunk) in self.values else 0


class Sink:
    def __init__(self):
        self.recorded = {}

    def record(self, key, ctx, rows):
        self.recorded[key] = rows


def make_ctx(mask, sizes, sparse_levels, tile):
    from fisedit_engine.capture import StepContext
    from fisedit_engine.edit import EditState
    from fisedit_engine.plan import EditPlan
    plan = EditPlan.build(mask, sizes, sparse_levels, tile)
    source = FakeSource()
    return StepContext(Sink(), 0, ROWS_CHUNKS, BATCH, EditState(plan, source, dense_from=10**9)), plan, source


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_cached_outside(fresh, cached, active):
    return torch.where(active, fresh, cached)


def assert_matches(actual, expected, active):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    inactive = ~active.expand_as(expected)
    assert torch.equal(actual[inactive], expected[inactive])  # outside: the cached output, bit for bit


CASES = [("sd15", (16, 24), 4, 0), ("sd21v", (16, 16), 3, 1), ("sdxl", (20, 16), 5, 2), ("sd15", (16, 16), 1, 3)]


@pytest.fixture(scope="module")
def models(host):
    return {arch: tiny_models.build(arch, seed=4) for arch in tiny_models.ARCHS}


def setup_case(models, arch, hw, tile, seed):
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
    ctx, plan, source = make_ctx(mask, sizes, [0, 1], tile)
    assert 0 < plan.levels[0].fraction < 1 and 0 < plan.levels[1].fraction < 1  # partial: the test can fail
    return unet, layout, ctx, plan, source


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_resblock(models, arch, hw, tile, seed):
    from fisedit_engine.sparse import SparseResBlock
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed)
    for block in [b for b in layout.blocks if b.kind == "resblock" and b.level in plan.levels][:3]:
        m = dict(unet.named_modules())[block.path]
        lp = plan.levels[block.level]
        active = lp.active[None, None]
        n, c_in, h, w = 4, m.channels, lp.height, lp.width
        x = with_cached_outside(rand(n, c_in, h, w, seed=1), rand(n, c_in, h, w, seed=2), active)
        emb = rand(n, m.emb_channels, seed=3)
        h_cached, out_cached = rand(n, m.out_channels, h, w, seed=4), rand(n, m.out_channels, h, w, seed=5)
        source.set(f"{block.path}:h", h_cached)
        source.set(block.path, out_cached)
        with torch.no_grad():
            h_dense = m.in_layers(x) + m.emb_layers(emb)[:, :, None, None]
            h_assembled = with_cached_outside(h_dense, h_cached, active)
            expected = with_cached_outside(m.skip_connection(x) + m.out_layers(h_assembled), out_cached, active)
            actual = SparseResBlock(m, block, block.path).sparse(ctx, x, emb)
        assert_matches(actual, expected, active)
        torch.testing.assert_close(ctx.recording.recorded[f"{block.path}:h"], h_assembled, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_spatial_transformer(models, arch, hw, tile, seed):
    from fisedit_engine.sparse import SparseSpatialTransformer
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed)
    ctx_dim = tiny_models.CONFIGS[arch]["context_dim"]
    for block in [b for b in layout.blocks if b.kind == "transformer" and b.level in plan.levels]:
        m = dict(unet.named_modules())[block.path]
        lp = plan.levels[block.level]
        active = lp.active[None, None]
        n, c, h, w = 4, block.channels, lp.height, lp.width
        x = with_cached_outside(rand(n, c, h, w, seed=11), rand(n, c, h, w, seed=12), active)
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
        with torch.no_grad():
            actual = SparseSpatialTransformer(m, block, block.path).sparse(ctx, x, context, {})
        assert_matches(actual, expected, active)


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_conv_in_downsample_upsample(models, arch, hw, tile, seed):
    from fisedit_engine.sparse import SparseConv, SparseDownsample, SparseUpsample
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed)
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
        shape = (n, block.channels, lp.height, lp.width)
        with torch.no_grad():
            if block.kind == "upsample":
                dense, actual = m(x, output_shape=shape), op(m, block, block.path).sparse(ctx, x, shape)
            else:
                dense, actual = m(x), op(m, block, block.path).sparse(ctx, x)
        assert_matches(actual, with_cached_outside(dense, out_cached, active), active)


@pytest.mark.parametrize("arch, hw, tile, seed", CASES)
def test_output_head(models, arch, hw, tile, seed):
    from fisedit_engine.sparse import SparseOutput
    unet, layout, ctx, plan, source = setup_case(models, arch, hw, tile, seed)
    lp = plan.levels[0]
    active = lp.active[None, None]
    c = unet.out[0].num_channels
    h = with_cached_outside(rand(4, c, *hw, seed=41), rand(4, c, *hw, seed=42), active)
    out_cached = rand(4, 4, *hw, seed=43)
    source.set("out", out_cached)
    with torch.no_grad():
        expected = with_cached_outside(unet.out(h), out_cached, active)
        actual = SparseOutput(unet.out, layout.blocks[0], "out").sparse(ctx, h)
    assert_matches(actual, expected, active)


def test_cached_statistics_mode_uses_the_original_runs_statistics(models):
    """The paper's approximation: GroupNorm normalizes with the cached statistics, not the current map's."""
    from fisedit_engine.kernels import reference as R
    unet, layout, ctx, plan, source = setup_case(models, "sd15", (16, 16), 2, 5)
    gn_path = "input_blocks.1.0.in_layers.0"
    x = rand(4, 32, 16, 16, seed=51)
    cached_stats = R.group_stats(rand(4, 32, 16, 16, seed=52) * 3 + 1, 32)
    source.set(f"{gn_path}:stats", cached_stats)
    ctx.edit.stats_mode = "cached"
    assert torch.equal(ctx.edit.group_stats(ctx, gn_path, x, 32), cached_stats)
    ctx.edit.stats_mode = "exact"
    exact = ctx.edit.group_stats(ctx, gn_path, x, 32)  # 32 groups of 32 channels: one channel per group
    normalized = (x - exact[..., 0, None, None]) * torch.rsqrt(exact[..., 1, None, None] + 1e-5)
    torch.testing.assert_close(normalized, torch.nn.functional.group_norm(x, 32), rtol=1e-5, atol=1e-5)
    assert ctx.recording.recorded[f"{gn_path}:stats"] is exact  # recorded into the edited result's cache
