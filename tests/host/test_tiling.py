"""The tile-size cost model (fisedit_engine/tiling.py): what it counts, its fit, its search, and an edit that takes
its choice on the real host."""
import itertools
import json
import random

import pytest
import torch

import tiny_models


@pytest.fixture(scope="module")
def sd15(host):
    return tiny_models.build("sd15", seed=1)


def work_of(model, latent_hw, levels):
    from fisedit_engine import tiling
    from fisedit_engine.cost import level_costs
    from fisedit_engine.layout import UNetLayout
    unet = model.model.diffusion_model
    layout = UNetLayout.from_unet(unet)
    sizes = layout.level_sizes(*latent_hw)
    return tiling.level_work(unet, layout, level_costs(unet, layout, sizes, 77), levels), sizes


def random_mask(hw, seed):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, hw[0] // 4, hw[1] // 4, generator=gen) > 0.75
    return torch.nn.functional.interpolate(coarse.float(), size=hw)[0] > 0


def test_every_3x3_conv_of_the_unet_is_counted_at_exactly_one_level(sd15):
    unet = sd15.model.diffusion_model
    work, _ = work_of(sd15, (32, 40), [0, 1])
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3)]
    assert sum(w.convs for w in work.values()) == len(convs)
    assert sum(w.conv_inputs for w in work.values()) == sum(m.in_channels for m in convs)


def test_a_fully_active_level_costs_its_dense_macs_and_gathers_nothing(sd15):
    work, sizes = work_of(sd15, (32, 40), [0, 1])
    w = work[1]
    layer, attention, gathered, tile_ops = w.features(4, 20, w.cost.positions)
    assert (gathered, tile_ops) == (0.0, 0.0)
    assert layer + attention == pytest.approx(w.cost.macs(w.cost.positions))
    part = w.features(4, 3, 48)
    assert part[2] == 3 * 36 * w.conv_inputs and part[3] == 3 * w.convs
    assert part[0] + part[1] == pytest.approx(w.cost.macs(48))


@pytest.mark.parametrize("seed", range(6))
def test_the_search_finds_the_combination_of_least_predicted_time(sd15, seed):
    """Against every combination of tile sizes, planned as an edit plans them (plan.active_tiles)."""
    from fisedit_engine import plan, tiling
    levels = [0, 1]
    work, sizes = work_of(sd15, (32, 40), levels)
    rng = random.Random(seed)
    calibration = tiling.Calibration("test", "cpu", tuple(rng.uniform(0, 1) * 10 ** rng.uniform(-14, -9)
                                                   for _ in tiling.FEATURES), "random")
    mask = random_mask((32, 40), seed)
    choice = tiling.choose_tiles(mask, sizes, levels, work, 2, calibration, "test")

    def predicted(tiles):
        return calibration.predict(tiling.plan_features(work, plan.active_tiles(mask, sizes, levels, tiles), 2))
    every = {combo: predicted(dict(zip(levels, combo))) for combo in itertools.product(tiling.CANDIDATES, repeat=2)}
    best = min(every.values())
    assert choice.predicted_s == pytest.approx(best, rel=1e-9)
    assert every[tuple(choice.tiles[l] for l in levels)] == pytest.approx(best, rel=1e-9)
    assert choice.default_s == pytest.approx(every[(4, 4)], rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_kept_tile_sizes_are_taken_within_their_margin_of_the_best(sd15, seed):
    """choose_tiles(kept=...): the sizes of steps kept for another mask where predicted at most `kept_within` times
    the best, else the best."""
    from fisedit_engine import plan, tiling
    levels = [0, 1]
    work, sizes = work_of(sd15, (32, 40), levels)
    calibration = tiling.Calibration("test", "cpu", (1e-12, 1e-12, 1e-12, 1e-9), "")
    mask = random_mask((32, 40), seed)
    best = tiling.choose_tiles(mask, sizes, levels, work, 2, calibration)
    kept = dict(zip(levels, max(itertools.product(tiling.CANDIDATES, repeat=2), key=lambda combo: calibration.predict(
        tiling.plan_features(work, plan.active_tiles(mask, sizes, levels, dict(zip(levels, combo))), 2)))))
    taken = tiling.choose_tiles(mask, sizes, levels, work, 2, calibration, kept=kept, kept_within=100.0)
    ratio = taken.predicted_s / best.predicted_s
    assert taken.tiles == kept and 1.0 < ratio <= 100.0
    assert taken.note.startswith("the tile sizes of the sparse steps kept from the last edit")
    assert tiling.choose_tiles(mask, sizes, levels, work, 2, calibration, kept=kept,
                               kept_within=ratio * 1.001).tiles == kept
    assert tiling.choose_tiles(mask, sizes, levels, work, 2, calibration, kept=kept,
                               kept_within=ratio * 0.999) == best


def test_halos_favour_large_tiles_and_masks_favour_small_ones(sd15):
    from fisedit_engine import tiling
    levels = [0, 1]
    work, sizes = work_of(sd15, (32, 40), levels)
    mask = random_mask((32, 40), 0)
    only = lambda i: tiling.Calibration("test", "cpu", tuple(1e-12 * (j == i) for j in range(4)), "")  # noqa: E731
    by_macs = tiling.choose_tiles(mask, sizes, levels, work, 2, only(0)).tiles
    by_gathers = tiling.choose_tiles(mask, sizes, levels, work, 2, only(2)).tiles
    assert by_macs[0] == min(tiling.CANDIDATES)
    assert by_gathers[0] > by_macs[0]


def test_without_a_calibration_every_level_takes_the_default_tile_and_says_why(sd15):
    from fisedit_engine import tiling
    from fisedit_engine.plan import DEFAULT_TILE
    work, sizes = work_of(sd15, (32, 40), [0, 1])
    calibration, note = tiling.calibration_for("cpu", {})
    assert calibration is None and note == "no calibration for cpu"
    choice = tiling.choose_tiles(random_mask((32, 40), 1), sizes, [0, 1], work, 2, calibration, note)
    assert choice.tiles == {0: DEFAULT_TILE, 1: DEFAULT_TILE}
    assert choice.note == f"tile {DEFAULT_TILE} at every level (no calibration for cpu)"


def test_a_calibration_is_taken_by_device_name_else_by_device_type():
    from fisedit_engine import tiling
    gpu = tiling.Calibration("Some GPU", "cuda", (1.0, 1.0, 1.0, 1.0), "")
    cpu = tiling.Calibration("cpu", "cpu", (2.0, 2.0, 2.0, 2.0), "")
    assert tiling.calibration_for("cpu", {"Some GPU": gpu, "cpu": cpu}) == (cpu, "calibrated on this cpu")
    assert tiling.calibration_for("cpu", {"Some GPU": gpu})[0] is None  # a GPU's costs say nothing of a CPU's
    other = tiling.Calibration("Other CPU", "cpu", (3.0, 3.0, 3.0, 3.0), "")
    assert tiling.calibration_for("cpu", {"Some GPU": gpu, "Other CPU": other}) == (
        other, "calibrated on Other CPU, not this cpu: run benchmarks/tile_costs.py --write to calibrate it")


def test_the_stored_calibrations_load():
    from fisedit_engine import tiling
    table = tiling.calibrations()
    assert table, f"{tiling.CALIBRATIONS} holds no calibration"
    for name, c in table.items():
        assert c.device == name and c.kind == "cuda" and len(c.seconds) == len(tiling.FEATURES)
        assert all(v >= 0 for v in c.seconds) and any(v > 0 for v in c.seconds) and c.fitted


def test_the_fit_recovers_known_costs_and_keeps_them_non_negative():
    from fisedit_engine import tiling
    rng = random.Random(0)
    truth, intercepts = (2e-15, 3e-14, 4e-11, 1e-7), {"a": 5e-3, "b": 9e-3}
    features = [tuple(rng.uniform(0.2, 1.0) * s for s in (1e12, 1e11, 1e8, 1e4)) for _ in range(80)]
    groups = [rng.choice("ab") for _ in features]
    seconds = [sum(c * f for c, f in zip(truth, x)) + intercepts[g] for x, g in zip(features, groups)]
    coef, fitted = tiling.fit(features, seconds, groups)
    assert coef == pytest.approx(truth, rel=1e-6)
    assert fitted == pytest.approx(intercepts, rel=1e-6)
    negative = (2e-15, -3e-14, 4e-11, 1e-7)  # a cost that would pay back: the fit must not believe it
    seconds = [sum(c * f for c, f in zip(negative, x)) + intercepts[g] for x, g in zip(features, groups)]
    coef, _ = tiling.fit(features, seconds, groups)
    assert coef[1] == 0.0 and all(c >= 0 for c in coef)


def test_an_edit_without_a_tile_size_takes_the_cost_models_tiles(sd15, monkeypatch, tmp_path):
    """On the real host: the edit plans with the chosen sizes, says so in its summary, and keeps I4."""
    from fisedit_engine import api, tiling
    from fisedit_engine.capture import CacheHandle, attach_capture
    from fisedit_engine.edit import EditSpec, run_edit
    from fisedit_engine.registry import registry
    handle = CacheHandle("tiling-src", registry(), min_sparse_positions=64)
    captured = attach_capture(sd15, handle)
    original = tiny_models.sample(captured, "sd15", size=24)
    api.store(handle, {"samples": original})
    mask = torch.zeros(1, 24, 24, dtype=torch.bool)
    mask[0, 5:9, 10:17] = True
    spec = EditSpec(handle, tiny_models.conditioning("sd15", 99), mask)
    with torch.inference_mode():
        _, default = run_edit(sd15, spec)
    assert "tile 4 at every level (no calibration for cpu)" in default.edit_summary
    path = tmp_path / "tile_costs.json"
    path.write_text(json.dumps({"cpu": {"kind": "cpu", "seconds": [1e-12, 1e-12, 0.0, 0.0],
                                        "fitted": "test: MACs only"}}))
    monkeypatch.setattr(tiling, "CALIBRATIONS", path)
    with torch.inference_mode():
        edited, result = run_edit(sd15, spec)
    assert "tiles by the cost model (calibrated on this cpu)" in result.edit_summary
    assert "level 0 (24x24, tile 2)" in result.edit_summary and "level 1 (12x12, tile 2)" in result.edit_summary
    outside = ~mask[:, None].expand_as(edited)
    assert torch.equal(edited[outside], original[outside])
    assert not torch.equal(edited[~outside], original[~outside])
    for h in (default, result, handle):
        registry().remove(h.name)


def test_a_mask_that_does_not_fit_the_kept_steps_keeps_their_tile_sizes_so_that_the_next_refits(sd15, monkeypatch,
                                                                                                 tmp_path, caplog):
    """edit.KEEP_TILES: the cost model's best sizes flip between near-equal choices as a mask moves. A larger mask
    that does not fit the kept steps is planned with their sizes where they are predicted near the best (here
    within 0.1%: (2, 2) against its best (4, 2)), its maps grown to hold both masks, so the first mask, edited
    again, is written into them instead of built."""
    from fisedit_engine import api, tiling
    from fisedit_engine.capture import CacheHandle, attach_capture
    from fisedit_engine.edit import EditSpec, run_edit
    from fisedit_engine.registry import registry
    path = tmp_path / "tile_costs.json"
    path.write_text(json.dumps({"cpu": {"kind": "cpu", "seconds": [1e-12, 1e-12, 1e-12, 0.0],
                                        "fitted": "test: MACs and gathers"}}))
    monkeypatch.setattr(tiling, "CALIBRATIONS", path)
    handle = CacheHandle("kept-tiles-src", registry(), min_sparse_positions=64)
    captured = attach_capture(sd15, handle)
    api.store(handle, {"samples": tiny_models.sample(captured, "sd15", size=24)})
    first, larger = (torch.zeros(1, 24, 24, dtype=torch.bool) for _ in range(2))
    first[0, 4:13, 5:16] = True
    larger[0, 4:15, 4:15] = True
    work, sizes = work_of(sd15, (24, 24), [0, 1])
    calibration = tiling.calibrations()["cpu"]
    assert tiling.choose_tiles(first, sizes, [0, 1], work, 2, calibration).tiles == {0: 2, 1: 2}
    assert tiling.choose_tiles(larger, sizes, [0, 1], work, 2, calibration).tiles == {0: 4, 1: 2}  # the flip

    def edit(mask, seed):
        caplog.clear()
        with torch.inference_mode(), caplog.at_level("INFO", logger="FISEdit"):
            return run_edit(sd15, EditSpec(handle, tiny_models.conditioning("sd15", seed), mask))[1]
    results = [edit(first, 99)]
    assert "tiles by the cost model (calibrated on this cpu)" in results[-1].edit_summary
    results.append(edit(larger, 98))
    assert "not reusing the sparse steps kept from the last edit" in caplog.text
    assert "the tile sizes of the sparse steps kept from the last edit (calibrated on this cpu)" in \
        results[-1].edit_summary
    assert "level 1 (12x12, tile 2)" in results[-1].edit_summary
    results.append(edit(first, 97))
    assert "not reusing" not in caplog.text and "refilled with this mask" in results[-1].edit_summary
    for h in (*results, handle):
        registry().remove(h.name)


def test_kept_tile_sizes_are_kept_only_where_the_grown_maps_would_still_take_the_kept_mask(sd15):
    """edit._holds_both: keeping the tile sizes is for masks that come back. A 16x16 corner planned with tiles of 8
    covers 4 level-0 tiles of a 32x32 latent, an 18x18 one 9: maps grown to hold the larger would compute far more
    than the smaller needs. With tiles of 2 (64 against 81) they hold both within REFIT_WASTE."""
    from fisedit_engine.cost import level_costs
    from fisedit_engine.edit import REFIT_WASTE, _grown_capacity, _holds_both, _padding_waste
    from fisedit_engine.layout import UNetLayout
    from fisedit_engine.plan import EditPlan
    unet = sd15.model.diffusion_model
    layout = UNetLayout.from_unet(unet)
    sizes = layout.level_sizes(32, 32)
    costs = level_costs(unet, layout, sizes, 77)
    kept_mask, larger = (torch.zeros(1, 32, 32, dtype=torch.bool) for _ in range(2))
    kept_mask[0, :16, :16] = True
    larger[0, :18, :18] = True
    for tile, holds in ((2, True), (8, False)):
        kept, plan = (EditPlan.build(m, sizes, [0, 1], {0: tile, 1: tile}) for m in (kept_mask, larger))
        capacity = _grown_capacity(kept, plan, costs)
        assert capacity is not None  # the larger mask itself fits its grown maps: the kept one is what fails
        assert (_padding_waste(capacity, kept, costs) <= REFIT_WASTE) is holds
        assert _holds_both(kept, plan, costs) is holds
