"""The reference ops and the delta store that the feed's ring-only uploads rest on, on random data."""
import torch

from fisedit_engine.cache import Region, StepTensors, take_positions
from fisedit_engine.kernels import reference as R
from fisedit_engine.plan import EditPlan


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_exact_group_stats_equal_the_assembled_maps_statistics():
    n, c, h, w, groups = 3, 12, 9, 7, 4
    cached = rand(n, c, h, w, seed=0) * 5 + 20  # a large mean: the centred sums must not cancel
    active = torch.zeros(h * w, dtype=torch.bool)
    active[torch.randperm(h * w, generator=torch.Generator().manual_seed(1))[:17]] = True
    positions = torch.nonzero(active).flatten()
    fresh = rand(n, c, len(positions), seed=2) * 2 - 3
    assembled = cached.clone().flatten(2)
    assembled[:, :, positions] = fresh
    expected = R.group_stats(assembled.view(n, c, h, w), groups)
    actual = R.exact_group_stats(R.group_stats(cached, groups), cached.flatten(2)[:, :, positions], fresh, h * w)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, R.group_stats(cached, groups), rtol=1e-3)  # the test can fail


def test_in_place_scatter_equals_scatter_tiles_at_borders():
    h, w, tile = 10, 13, 4  # partial tiles at the bottom and right borders
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, 8:, 11:] = True
    mask[0, 2, 3] = True
    lp = EditPlan.build(mask, [(h, w)], [0], tile).levels[0]
    base = rand(2, 3, h, w, seed=3)
    tiles_out = rand(2, 3, lp.n_tiles, tile, tile, seed=4)
    expected = R.scatter_tiles(base, tiles_out, lp.tiles, tile)
    positions, sources = lp.tile_scatter("cpu")
    actual = R.scatter_tiles_(base.clone(), tiles_out, positions, sources)
    assert torch.equal(actual, expected) and not torch.equal(actual, base)


def test_read_region_holds_the_active_region_and_every_conv_halo():
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 5:7, 9:12] = True
    plan = EditPlan.build(mask, [(16, 16), (8, 8)], [0, 1], 2)
    for lp in plan.levels.values():
        assert (lp.read | ~lp.active).all()
        rows, cols = lp.patch_index("conv3", "cpu")
        for r, c in zip(rows, cols):
            for i in r[r >= 0]:
                assert lp.read[i, c[c >= 0]].all()
        assert 0 < lp.read.float().mean() < 1


def test_delta_store_reads_as_its_base_with_the_region_replaced():
    steps, batch = 3, 2
    base = StepTensors(steps, batch)
    maps, tokens = rand(steps, batch, 4, 6, 5, seed=5), rand(steps, batch, 30, 8, seed=6)
    base.slot("m", 0, (6, 5, 4), maps.dtype).copy_(maps.permute(0, 1, 3, 4, 2))  # maps are stored channels-last
    base.slot("t", 0, tokens.shape[2:], tokens.dtype).copy_(tokens)
    positions = torch.tensor([0, 7, 8, 21, 29])
    delta = StepTensors(steps, batch, base=base)
    fresh_maps, fresh_tokens = rand(steps, batch, 5, 4, seed=7), rand(steps, batch, 5, 8, seed=8)  # [P, C]
    delta.regions = {"m": Region(positions), "t": Region(positions)}
    delta.slot("m", 0, fresh_maps.shape[2:], fresh_maps.dtype).copy_(fresh_maps)
    delta.slot("t", 0, fresh_tokens.shape[2:], fresh_tokens.dtype).copy_(fresh_tokens)
    whole = rand(batch, 4, 6, 5, seed=9)
    delta.whole[("m", 0, 2)] = whole  # a dense step keeps its whole map
    wanted = torch.tensor([1, 7, 21, 22])
    for s in range(steps):
        m = maps[s].clone().flatten(2)
        m[:, :, positions] = fresh_maps[s].transpose(1, 2)
        m = whole if s == 2 else m.view_as(maps[s])
        t = tokens[s].clone()
        t[:, positions] = fresh_tokens[s]
        assert torch.equal(delta.step("m", 0, s), m) and torch.equal(delta.step("t", 0, s), t)
        assert torch.equal(delta.step_positions("m", 0, s, wanted), take_positions(m, wanted))
        assert torch.equal(delta.step_positions("t", 0, s, wanted), take_positions(t, wanted))
    assert torch.equal(delta.whole_tensor("t", 0)[1], delta.step("t", 0, 1))
    assert torch.equal(delta.whole_tensor("m", 0)[1].permute(0, 3, 1, 2), delta.step("m", 0, 1))  # stored layout
    assert delta.nbytes < base.nbytes
