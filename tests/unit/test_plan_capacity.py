"""Index maps padded to a capacity, and refilled in place with another mask's (plan.py): how a CUDA graph captured
for one mask can replay another's."""
import pytest
import torch

from fisedit_engine.kernels import reference as R
from fisedit_engine.plan import Capacity, EditPlan

SIZES = [(16, 20), (8, 10)]


def box(top, left, height, width):
    mask = torch.zeros(1, *SIZES[0], dtype=torch.bool)
    mask[0, top:top + height, left:left + width] = True
    return mask


def every_map(plan):
    """Builds every index map the sparse ops read, on the CPU: {(level, name): tensors}."""
    plan.prepare("cpu")
    return {(lvl, key): value if isinstance(value, tuple) else (value,)
            for lvl, lp in plan.levels.items() for (key, _), value in lp._maps.items()}


def roomy(*plans, extra=4):
    """A capacity holding every plan's maps, with room to spare."""
    return {lvl: Capacity(max(p.levels[lvl].needs.tiles for p in plans) + extra,
                          max(p.levels[lvl].needs.tokens for p in plans) + extra,
                          max(p.levels[lvl].needs.read for p in plans) + extra) for lvl in plans[0].levels}


def test_padded_maps_have_the_capacitys_lengths_and_the_same_entries():
    mask = box(3, 15, 5, 4)  # partial tiles at the right border
    plain = EditPlan.build(mask, SIZES, [0, 1], 4)
    padded = EditPlan.build(mask, SIZES, [0, 1], 4, roomy(plain))
    for lvl, lp in padded.levels.items():
        cap, needs = lp.lengths, plain.levels[lvl].needs
        assert cap != needs and lp.needs == needs
        assert len(lp.tiles_on("cpu")) == cap.tiles and len(lp.tokens("cpu")) == cap.tokens
        assert len(lp.read_positions("cpu")) == cap.read
        assert all(len(part) == cap.tokens for part in (*lp.tile_scatter("cpu"), *lp.stat_positions("cpu")))
        assert all(len(part) == cap.tiles for part in lp.patch_index("conv3", "cpu"))
        for name in ("tokens", "read_positions"):
            assert torch.equal(torch.unique(getattr(lp, name)("cpu")), getattr(plain.levels[lvl], name)("cpu"))


def test_a_padded_scatter_writes_what_the_unpadded_one_writes():
    mask = box(2, 3, 6, 9)
    plain = EditPlan.build(mask, SIZES, [0], 4).levels[0]
    padded = EditPlan.build(mask, SIZES, [0], 4, roomy(EditPlan.build(mask, SIZES, [0], 4))).levels[0]
    base = torch.randn(2, 3, *SIZES[0])
    tiles_of = lambda lp: R.tiles_of(torch.randn(2, 3, *SIZES[0], generator=torch.Generator().manual_seed(0)),
                                     lp.tiles_on("cpu"), 4) * 3 + 1  # what each tile computes: its own values
    expected = R.scatter_tiles_(base.clone(), tiles_of(plain), *plain.tile_scatter("cpu"))
    actual = R.scatter_tiles_(base.clone(), tiles_of(padded), *padded.tile_scatter("cpu"))
    assert torch.equal(actual, expected) and not torch.equal(actual, base)


def test_the_statistics_are_padded_where_fresh_and_cached_values_agree():
    mask = box(5, 5, 3, 3)
    plain = EditPlan.build(mask, SIZES, [0, 1], 2)
    for lvl, lp in EditPlan.build(mask, SIZES, [0, 1], 2, roomy(plain)).levels.items():
        tokens, in_read = lp.stat_positions("cpu")
        n = plain.levels[lvl].needs.tokens
        assert torch.equal(tokens[:n], plain.levels[lvl].tokens("cpu"))
        pads = tokens[n:]
        assert len(pads) and not lp.active.flatten()[pads].any() and lp.read.flatten()[pads].all()
        assert torch.equal(lp.read_positions("cpu")[in_read], tokens)
        # the statistics of a map whose fresh values agree with the cached ones off the active region
        cached = torch.randn(2, 8, *lp.active.shape) * 3 + 5
        fresh = cached.clone()
        fresh.flatten(2)[:, :, lp.active.flatten()] = torch.randn(2, 8, n)
        stats = [R.exact_group_stats(R.group_stats(cached, 4), cached.flatten(2)[:, :, t], fresh.flatten(2)[:, :, t],
                                     cached[0, 0].numel()) for t in (tokens, tokens[:n])]
        torch.testing.assert_close(stats[0], stats[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[0], R.group_stats(fresh, 4), rtol=1e-5, atol=1e-5)


def test_a_refill_writes_the_other_masks_maps_into_the_same_tensors():
    first, second = box(2, 2, 4, 5), box(9, 11, 5, 6)
    plans = [EditPlan.build(m, SIZES, [0, 1], 4) for m in (first, second)]
    capacity = roomy(*plans)
    kept = EditPlan.build(first, SIZES, [0, 1], 4, capacity)
    before = every_map(kept)
    addresses = {k: [t.data_ptr() for t in v] for k, v in before.items()}
    other = EditPlan.build(second, SIZES, [0, 1], 4)
    assert kept.holds(other)
    kept.refill(other)
    wanted = every_map(EditPlan.build(second, SIZES, [0, 1], 4, capacity))
    after = every_map(kept)
    assert after.keys() == wanted.keys() == before.keys()
    for k in wanted:
        assert [t.data_ptr() for t in after[k]] == addresses[k]
        assert all(torch.equal(a, w) for a, w in zip(after[k], wanted[k], strict=True)), k
    assert any(not torch.equal(a, b) for k in before for a, b in zip(after[k], every_map(
        EditPlan.build(first, SIZES, [0, 1], 4, capacity))[k]))  # the test can fail
    assert torch.equal(kept.mask, second) and kept.levels[0].fraction == other.levels[0].fraction


def test_a_plan_that_does_not_fit_is_refused():
    small, moved, large = box(2, 2, 3, 3), box(10, 10, 3, 3), box(1, 1, 9, 12)
    kept = EditPlan.build(small, SIZES, [0, 1], 4, roomy(*(EditPlan.build(m, SIZES, [0, 1], 4) for m in (small, moved)),
                                                         extra=0))
    assert not kept.holds(EditPlan.build(large, SIZES, [0, 1], 4))          # longer maps
    assert not kept.holds(EditPlan.build(small, SIZES, [0, 1], 2))          # another tile size
    assert not kept.holds(EditPlan.build(torch.ones(1, *SIZES[0], dtype=torch.bool), SIZES, [0, 1], 4))  # whole
    assert kept.holds(EditPlan.build(moved, SIZES, [0, 1], 4))              # another place, within the lengths
    with pytest.raises(ValueError, match="does not fit"):
        kept.refill(EditPlan.build(large, SIZES, [0, 1], 4))
    with pytest.raises(ValueError, match="short of what its tiles need"):
        EditPlan.build(large, SIZES, [0, 1], 4, kept.lengths())


def test_a_whole_level_is_not_padded():
    whole = torch.ones(1, *SIZES[0], dtype=torch.bool)
    lp = EditPlan.build(whole, SIZES, [0], 4, {0: Capacity(100, 1000, 1000)}).levels[0]
    assert lp.full and len(lp.tokens("cpu")) == len(lp.stat_positions("cpu")[0]) == 16 * 20


def test_a_plan_built_unpadded_keeps_its_lengths_when_a_smaller_mask_refills_it():
    kept = EditPlan.build(box(2, 2, 8, 9), SIZES, [0, 1], 4)
    lengths = kept.lengths()
    every_map(kept)
    smaller = EditPlan.build(box(3, 3, 4, 4), SIZES, [0, 1], 4)
    needs = smaller.lengths()
    kept.refill(smaller)
    assert kept.lengths() == lengths != needs
    assert all(len(lp.tokens("cpu")) == lengths[lvl].tokens for lvl, lp in kept.levels.items())
