"""Edits on the real host: invariants I2, I3, I4 and I6 over samplers, batch sizes, cfg, a non-square latent and the
SD1.5 / SD2.1-v / SDXL structures (tiny random UNets, fp32 on CPU), chained edits, and the edge cases.

Tolerance for I3. The invariant bounds the difference at 1e-5 for latents of unit scale. Random-weight epsilon
models do not predict the noise, so their latents end at ~sigma_max / 0.18 (hundreds); float rounding in the sparse
ops (another summation order than the dense conv and attention) is relative, ~1e-6 of that scale after the
sampling steps (6e-6 at worst in a sweep of every case here). So I3 is checked as |diff| <= 1e-5 * max(1, |latent|).
I2 and I4 are checked exactly: a fully active level runs the module's own forward, and outside the mask the model
output, and so every step's latent, is the cached one bit for bit.
"""
import functools

import pytest
import torch

import tiny_models

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc", "lcm"]
STEPS = 4
NEGATIVE_SEED, ORIGINAL_SEED, EDITED_SEED = 12, 11, 99


@pytest.fixture(scope="module")
def models(host):
    return {arch: tiny_models.build(arch, seed=1) for arch in tiny_models.ARCHS}


def generate(model, arch, sampler, batch, cfg, hw, prompt_seed, seed=3):
    import comfy.sample
    latent = torch.zeros(batch, 4, *hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, cfg, sampler, "normal",
                                   tiny_models.conditioning(arch, prompt_seed, batch),
                                   tiny_models.conditioning(arch, NEGATIVE_SEED, batch), latent, seed=seed,
                                   disable_pbar=True)


@pytest.fixture(scope="module")
def source(models):
    """(handle, original LATENT) of a captured generation, made once per setting."""
    from fisedit_engine import api

    @functools.lru_cache(maxsize=None)
    def make(arch, sampler, batch, cfg, hw):
        captured, handle = api.capture(models[arch], f"src-{arch}-{sampler}-{batch}-{cfg}-{hw}")
        out = generate(captured, arch, sampler, batch, cfg, hw, ORIGINAL_SEED)
        api.store(handle, {"samples": out})
        return handle, out
    return make


def blob_mask(batch, hw):
    mask = torch.zeros(batch, *hw, dtype=torch.bool)
    mask[:, 3:8, 5:12] = True
    if batch > 1:  # a different region for the second sample
        mask[1] = False
        mask[1, 9:14, 1:5] = True
    return mask


def run_edit(model, handle, arch, batch, mask, prompt_seed, **kw):
    from fisedit_engine.edit import EditSpec, run_edit
    spec = EditSpec(handle, tiny_models.conditioning(arch, prompt_seed, batch), mask)
    with torch.inference_mode():
        return run_edit(model, spec, **kw)


def assert_i3(edited, original):
    bound = 1e-5 * max(1.0, original.abs().max().item())
    assert (edited - original).abs().max().item() <= bound


def assert_i4(edited, original, mask):
    outside = ~mask[:, None].expand_as(edited)
    assert torch.equal(edited[outside], original[outside])
    assert not torch.equal(edited[~outside], original[~outside])  # and the edit did change the inside


GRID = [(a, s, b, c, hw) for a in ["sd15"] for s in SAMPLERS for b in (1, 2) for c in (1.0, 7.0) for hw in [(16, 24)]]
GRID += [(a, "dpmpp_2m", 2, 7.0, (16, 16)) for a in ("sd21v", "sdxl")]
GRID += [(a, "euler_ancestral", 1, 1.0, (24, 16)) for a in ("sd21v", "sdxl")]


@pytest.mark.parametrize("arch, sampler, batch, cfg, hw", GRID)
def test_i2_full_mask_equals_stock_sampling_with_the_edited_prompt(models, source, arch, sampler, batch, cfg, hw):
    handle, _ = source(arch, sampler, batch, cfg, hw)
    edited, _ = run_edit(models[arch], handle, arch, batch, torch.ones(batch, *hw, dtype=torch.bool), EDITED_SEED)
    stock = generate(models[arch], arch, sampler, batch, cfg, hw, EDITED_SEED)
    assert (edited - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch, sampler, batch, cfg, hw", GRID)
def test_i3_unchanged_prompt_returns_the_original(models, source, arch, sampler, batch, cfg, hw):
    handle, original = source(arch, sampler, batch, cfg, hw)
    edited, _ = run_edit(models[arch], handle, arch, batch, blob_mask(batch, hw), ORIGINAL_SEED)
    assert_i3(edited, original)


@pytest.mark.parametrize("arch, sampler, batch, cfg, hw", GRID)
def test_i4_outside_the_mask_the_latent_is_the_original(models, source, arch, sampler, batch, cfg, hw):
    handle, original = source(arch, sampler, batch, cfg, hw)
    mask = blob_mask(batch, hw)
    edited, _ = run_edit(models[arch], handle, arch, batch, mask, EDITED_SEED)
    assert_i4(edited, original, mask)


@pytest.mark.parametrize("options", [dict(dense_tail=0.5), dict(stats_mode="cached"), dict(tile_size=1),
                                     dict(tile_size=7)])
def test_i4_holds_for_every_option(models, source, options):
    handle, original = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    mask = blob_mask(2, (16, 24))
    edited, _ = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED, **options)
    assert_i4(edited, original, mask)


def test_i3_with_cached_statistics_is_approximate_but_close(models, source):
    """The paper's cached-statistics mode is an approximation: with the prompt unchanged it is still the original,
    since the statistics are the original's too."""
    handle, original = source("sd15", "euler", 1, 7.0, (16, 24))
    edited, _ = run_edit(models["sd15"], handle, "sd15", 1, blob_mask(1, (16, 24)), ORIGINAL_SEED,
                         stats_mode="cached")
    assert_i3(edited, original)


def test_chained_edit(models, source):
    """A second edit of the first edit's result. The first result's cache holds edited-prompt activations inside the
    first edit's region and the original prompt's outside it, so "unchanged prompt" (I3) means: re-editing part of
    the already edited region with the first edit's prompt returns the first result. Any second edit leaves
    everything outside its own mask exactly as the first result (I4), and outside both masks as the original."""
    handle, original = source("sd15", "dpmpp_2m", 1, 7.0, (16, 24))
    first_mask = blob_mask(1, (16, 24))
    first, first_handle = run_edit(models["sd15"], handle, "sd15", 1, first_mask, EDITED_SEED)
    assert first_handle.get().settings.positive_fingerprint != handle.get().settings.positive_fingerprint
    inner = torch.zeros_like(first_mask)
    inner[:, 4:7, 8:12] = True
    assert not (inner & ~first_mask).any()
    again, _ = run_edit(models["sd15"], first_handle, "sd15", 1, inner, EDITED_SEED, tile_size=1)
    assert_i3(again, first)
    second_mask = torch.zeros_like(first_mask)
    second_mask[:, 8:14, 14:20] = True  # overlaps nothing of the first edit
    second, second_handle = run_edit(models["sd15"], first_handle, "sd15", 1, second_mask, 123)
    assert_i4(second, first, second_mask)
    outside_both = ~(first_mask | second_mask)[:, None].expand_as(second)
    assert torch.equal(second[outside_both], original[outside_both])
    assert second_handle.get().store.written  # the chained result is a complete cache again


def test_a_chained_edit_refits_the_kept_steps_like_a_first_edit(models, source, monkeypatch, caplog):
    """KeptEdit.refit with an edit's result as the source, whose values the feed assembles on the host and moves key
    by key: a second mask whose tiles fit the kept maps refits them, keeps I4 against the first result, and gives a
    fresh edit's latent within I3's bound."""
    handle, _ = source("sd15", "dpmpp_2m", 1, 7.0, (16, 24))
    first, first_handle = run_edit(models["sd15"], handle, "sd15", 1, blob_mask(1, (16, 24)), EDITED_SEED + 3)
    wide = torch.zeros(1, 16, 24, dtype=torch.bool)
    wide[:, 2:10, 4:14] = True
    narrow = wide.clone()
    narrow[:, 8:10, 12:14] = False  # one tile fewer
    run_edit(models["sd15"], first_handle, "sd15", 1, wide, EDITED_SEED + 4)
    with caplog.at_level("INFO", logger="FISEdit"):
        refit, refit_result = run_edit(models["sd15"], first_handle, "sd15", 1, narrow, EDITED_SEED + 5)
    assert "not reusing" not in caplog.text and "refilled with this mask" in refit_result.edit_summary
    assert_i4(refit, first, narrow)
    with monkeypatch.context() as m:
        m.setenv("FISEDIT_KEEP_GRAPHS", "0")
        fresh, _ = run_edit(models["sd15"], first_handle, "sd15", 1, narrow, EDITED_SEED + 5)
    assert (refit - fresh).abs().max().item() <= 1e-5 * max(1.0, fresh.abs().max().item())


def test_an_edits_result_records_the_fingerprint_and_layout_of_the_clone_it_sampled(models, source, monkeypatch):
    """An edit's result takes its source's model fingerprint instead of fingerprinting the clone it samples: the
    clone is the checked model plus FISEdit's own patches and wrappers, which fingerprints leave out. That premise,
    on the real host: the sampled clone fingerprints as the model does, and as the result records. The same for the
    UNet's layout, which the edit built before sampling: the clone's UNet is that UNet, and lays out the same."""
    from fisedit_engine import capture
    from fisedit_engine import comfy_adapter as host
    from fisedit_engine.fingerprint import model_fingerprint
    from fisedit_engine.layout import UNetLayout
    sampled = []
    original_call = capture.CaptureOuterSample.__call__

    def spy(self, executor, *args, **kwargs):
        unet = host.diffusion_model_of_guider(executor.class_obj)
        sampled.append((model_fingerprint(executor.class_obj.model_patcher), self.known_fingerprint,
                        unet, UNetLayout.from_unet(unet), self.known_layout))
        return original_call(self, executor, *args, **kwargs)
    monkeypatch.setattr(capture.CaptureOuterSample, "__call__", spy)
    handle, _ = source("sd15", "euler", 1, 7.0, (16, 24))
    _, result = run_edit(models["sd15"], handle, "sd15", 1, blob_mask(1, (16, 24)), EDITED_SEED)
    clone, given, unet, layout, (known_unet, known_layout) = sampled[-1]
    assert clone == given == model_fingerprint(models["sd15"]) == result.get().settings.model_fingerprint
    assert known_unet is unet and known_layout == layout


def test_zero_area_mask_returns_the_original(models, source):
    handle, original = source("sd15", "euler", 2, 7.0, (16, 24))
    edited, same = run_edit(models["sd15"], handle, "sd15", 2, torch.zeros(2, 16, 24, dtype=torch.bool), EDITED_SEED)
    assert torch.equal(edited, original) and same is handle


def test_a_latent_under_the_smallest_sparse_level_is_edited_dense_and_composited(models, source):
    """8x8 latent positions are under the 16x16 a level needs to run sparse: no level is sparse, every step runs the
    whole UNet, and the output head still composites with the mask (I4); the summary says so."""
    handle, original = source("sd15", "euler", 1, 7.0, (8, 8))
    assert not handle.get().settings.sparse_levels
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 3:6] = True
    edited, result = run_edit(models["sd15"], handle, "sd15", 1, mask, EDITED_SEED)
    assert_i4(edited, original, mask)
    assert "no sparse level" in result.edit_summary


def test_masks_that_do_not_fit_the_image_are_refused(models, source):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    handle, _ = source("sd15", "euler", 2, 7.0, (16, 24))
    positive = tiny_models.conditioning("sd15", EDITED_SEED)
    with pytest.raises(CacheError, match=r"the mask is 128x128 but the cached image is 192x128"):
        api.difference_mask(models["sd15"], handle, positive, "user", torch.ones(1, 128, 128), dilate=1)
    with pytest.raises(CacheError, match="batch 2"):
        api.difference_mask(models["sd15"], handle, positive, "user", torch.ones(3, 128, 192), dilate=1)
    with pytest.raises(CacheError, match="needs a user_mask"):
        api.difference_mask(models["sd15"], handle, positive, "user", None, dilate=1)


def test_user_mask_is_pooled_to_latent_pixels_and_dilated(models, source):
    from fisedit_engine import api
    handle, _ = source("sd15", "euler", 2, 7.0, (16, 24))
    image_mask = torch.zeros(1, 128, 192)
    image_mask[0, 40, 60] = 1.0  # one image pixel -> latent pixel (5, 7)
    spec, mask, preview = api.difference_mask(models["sd15"], handle, tiny_models.conditioning("sd15", 1), "user",
                                              image_mask, dilate=1)
    expected = torch.zeros(1, 16, 24, dtype=torch.bool)
    expected[0, 4:7, 6:9] = True
    assert torch.equal(spec.mask, expected)
    assert mask.shape == (1, 128, 192) and mask.sum() == 9 * 64
    assert preview.shape == (2, 128, 192, 3)  # one preview per cached image, the mask over each


def test_an_edit_with_another_model_is_refused(models, source):
    from fisedit_engine.cache import CacheError
    handle, _ = source("sd15", "euler", 1, 7.0, (16, 24))
    other = tiny_models.build("sd15", seed=2)
    with pytest.raises(CacheError, match="not the one cache .* was captured with"):
        run_edit(other, handle, "sd15", 1, blob_mask(1, (16, 24)), EDITED_SEED)


def test_i6_no_leak_after_an_edit(models, source):
    model = models["sd15"]
    unet = model.model.diffusion_model
    stock = generate(model, "sd15", "dpmpp_2m", 2, 7.0, (16, 24), EDITED_SEED)
    handle, _ = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    run_edit(model, handle, "sd15", 2, blob_mask(2, (16, 24)), EDITED_SEED)
    assert torch.equal(generate(model, "sd15", "dpmpp_2m", 2, 7.0, (16, 24), EDITED_SEED), stock)
    assert not model.object_patches and not any(model.wrappers.get(k) for k in ("outer_sample", "apply_model"))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_uploads_and_the_result_cache_scale_with_the_mask(models, source):
    """Ring-only transfer: a sparse step uploads each map of a sparse level at the read region only (plus the whole
    attention context, statistics and model output), and the edit's result cache is a delta over its source."""
    handle, original = source("sd15", "dpmpp_2m", 1, 7.0, (16, 24))
    fractions = {}
    for rows in (2, 8):
        mask = torch.zeros(1, 16, 24, dtype=torch.bool)
        mask[:, 4:4 + rows, 6:6 + rows] = True
        _, result = run_edit(models["sd15"], handle, "sd15", 1, mask, EDITED_SEED, tile_size=2)
        fractions[rows] = result.feed_stats.bytes_per_step / handle.get().bytes_per_step()
        assert result.get().store.nbytes < handle.get().store.nbytes * fractions[rows]
    assert fractions[2] < fractions[8] < 1.0


def test_planned_moves_feed_what_key_by_key_moves_feed(models, source, monkeypatch, caplog):
    """feed.py moves a step's cached values with copies planned once per edit (one launch per element size on a
    GPU); moved key by key instead, the edit and its result cache are the same bit for bit. A chained edit's source
    holds its region apart from its base, so that edit moves key by key, says so, and still keeps I4."""
    from fisedit_engine.feed import EditFeed
    handle, original = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    mask = blob_mask(2, (16, 24))
    planned, planned_result = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED)
    stats = planned_result.feed_stats
    assert stats.planned_steps == stats.steps > 0 and stats.bytes_uploaded > 0
    with monkeypatch.context() as m:
        m.setattr(EditFeed, "_unplannable", lambda self, chunks, device: "forced by the test")
        m.setenv("FISEDIT_KEEP_GRAPHS", "0")  # the first edit's feed, kept, moves as planned
        by_key, by_key_result = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED)
    assert by_key_result.feed_stats.planned_steps == 0
    assert by_key_result.feed_stats.bytes_uploaded == stats.bytes_uploaded
    assert torch.equal(planned, by_key)
    a, b = planned_result.get(), by_key_result.get()
    for key in a.keys():
        for chunk in a.settings.chunks:
            for step in range(a.cached_steps(key, chunk)):
                assert torch.equal(a.read(key, step, chunk), b.read(key, step, chunk)), (key, chunk, step)
    second_mask = torch.zeros_like(mask)
    second_mask[:, 10:15, 14:20] = True
    with caplog.at_level("INFO", logger="FISEdit"):
        chained, chained_result = run_edit(models["sd15"], planned_result, "sd15", 2, second_mask, 123)
    assert chained_result.feed_stats.planned_steps == 0
    assert "moves its cached values key by key (the source is an edit's result" in caplog.text
    assert_i4(chained, planned, second_mask)


def test_a_resident_attention_context_replaces_its_upload_and_changes_nothing(models, source):
    """resident.py on any device: the first edit of a cache keeps the self-attention K/V it uploads, the next edit
    reads them from there (uploading only the rest), and both give exactly the edit without a resident context."""
    from fisedit_engine import resident
    handle, _ = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    cache = handle.get()
    assert cache.resident is None  # a CPU capture keeps nothing on a device
    mask = blob_mask(2, (16, 24))
    plain, plain_result = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED)
    budget = resident.DeviceBudget(budget_bytes=2**40)
    cache.resident = resident.ResidentContext(budget, torch.device("cpu"))  # what a GPU capture attaches
    try:
        runs = [run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED) for _ in range(2)]
        context_keys = {k for k in cache.keys() if resident.is_attention_context(k)}
        assert context_keys and {k for k, _, _ in cache.resident.tensors} == context_keys
        assert len(cache.resident.tensors) == len(context_keys) * 2 * STEPS and budget.used == cache.resident.nbytes
        (first, first_result), (second, second_result) = runs
        assert first_result.feed_stats.bytes_resident == 0
        assert second_result.feed_stats.bytes_resident == cache.resident.nbytes
        assert (second_result.feed_stats.bytes_uploaded + second_result.feed_stats.bytes_resident
                == first_result.feed_stats.bytes_uploaded == plain_result.feed_stats.bytes_uploaded)
        for edited, result in runs:
            assert torch.equal(edited, plain)
            for key in context_keys:
                for step in range(STEPS):
                    for chunk in (0, 1):
                        assert torch.equal(result.get().read(key, step, chunk), plain_result.get().read(key, step, chunk))
        from fisedit_engine import api
        api.registry().remove(handle.name)  # a cache leaving the registry lets go of its device copy
        assert cache.resident.nbytes == 0 and not cache.resident.tensors and budget.used == 0
    finally:
        cache.resident = None
        source.cache_clear()


def test_an_edit_with_the_last_edits_mask_reuses_its_steps_and_equals_a_fresh_edit(models, source, monkeypatch,
                                                                                     caplog):
    """warm.py: an edit keeps its plan, feed (and on a GPU its CUDA graph) for the next edit of the same source; the
    next edit with the same mask and another prompt takes them and gives what an edit built afresh gives, bit for
    bit, result cache included. Another mask builds anew and says why; the source leaving the registry closes them."""
    from fisedit_engine.edit import KEPT
    from fisedit_engine.registry import registry
    handle, _ = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    cache = handle.get()
    mask = blob_mask(2, (16, 24))
    run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED)
    kept = cache.kept[KEPT][1]
    reused, reused_result = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED + 1)
    assert cache.kept[KEPT][1] is kept
    with monkeypatch.context() as m:
        m.setenv("FISEDIT_KEEP_GRAPHS", "0")
        fresh, fresh_result = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED + 1)
    assert KEPT not in cache.kept and kept.state.plan.levels[0]._maps == {}  # closed when keeping was turned off
    assert torch.equal(reused, fresh)
    assert reused_result.feed_stats == fresh_result.feed_stats
    a, b = reused_result.get(), fresh_result.get()
    assert a.keys() == b.keys()
    for key in a.keys():
        for chunk in a.settings.chunks:
            for step in range(a.cached_steps(key, chunk)):
                assert torch.equal(a.read(key, step, chunk), b.read(key, step, chunk)), (key, chunk, step)
    run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED)
    kept = cache.kept[KEPT][1]
    other = mask.clone()
    other[0, 10:12, 10:12] = True
    with caplog.at_level("INFO", logger="FISEdit"):
        run_edit(models["sd15"], handle, "sd15", 2, other, EDITED_SEED)
    assert "not reusing the sparse steps kept from the last edit: built for another mask" in caplog.text
    assert cache.kept[KEPT][1] is not kept and kept.state.plan.levels[0]._maps == {}
    kept = cache.kept[KEPT][1]
    registry().remove(cache.name)
    try:
        assert cache.kept == {} and kept.state.plan.levels[0]._maps == {}
    finally:
        registry().put(cache)  # the module's other tests read this source


def result_values(handle) -> dict:
    cache = handle.get()
    return {(k, c, s): cache.read(k, s, c).clone() for k in cache.keys() for c in cache.settings.chunks
            for s in range(cache.cached_steps(k, c))}


def test_an_edit_with_another_mask_refits_the_kept_steps_and_equals_a_fresh_edit(models, source, monkeypatch,
                                                                                  caplog):
    """plan.py, KeptEdit.refit: an edit whose mask's tiles fit the index maps kept from the last edit (with the
    kept tile sizes) writes its maps into them and takes the kept steps (on a GPU, the kept CUDA graph). It gives
    what an edit built afresh gives: I4 exactly, the inside and the result cache within I3's bound (the padded
    statistics sum in another order). The last edit's result keeps its own region. A mask that does not fit builds
    anew, its maps grown to hold both (so the first mask fits again); one that would compute more than REFIT_WASTE
    times what it needs builds anew, unpadded."""
    from fisedit_engine.edit import KEPT, REFIT_WASTE
    handle, original = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    cache = handle.get()
    first = blob_mask(2, (16, 24))
    inner = first.clone()
    inner[1, :, 4:] = False  # a part of it, on fewer tiles: they fit the first mask's maps
    with monkeypatch.context() as m:
        m.setenv("FISEDIT_KEEP_GRAPHS", "0")
        fresh, fresh_result = run_edit(models["sd15"], handle, "sd15", 2, inner, EDITED_SEED + 2)
    _, first_result = run_edit(models["sd15"], handle, "sd15", 2, first, EDITED_SEED)
    first_values = result_values(first_result)
    kept = cache.kept[KEPT][1]
    lengths = kept.state.plan.lengths()
    with caplog.at_level("INFO", logger="FISEdit"):
        refit, refit_result = run_edit(models["sd15"], handle, "sd15", 2, inner, EDITED_SEED + 2)
    assert "not reusing" not in caplog.text and cache.kept[KEPT][1] is kept
    assert kept.state.plan.lengths() == lengths and torch.equal(kept.state.plan.mask, inner)
    assert any(lp.needs != lengths[lvl] for lvl, lp in kept.state.plan.levels.items())  # padded: the test can fail
    assert "refilled with this mask" in refit_result.edit_summary
    assert f"{kept.state.plan.levels[0].n_tiles} tiles in maps of {lengths[0].tiles}," in refit_result.edit_summary
    assert_i4(refit, original, inner)
    bound = 1e-5 * max(1.0, fresh.abs().max().item())
    assert (refit - fresh).abs().max().item() <= bound
    refit_values, fresh_values = result_values(refit_result), result_values(fresh_result)
    assert refit_values.keys() == fresh_values.keys()
    for k, v in fresh_values.items():
        assert (refit_values[k] - v).abs().max().item() <= 1e-5 * max(1.0, v.abs().max().item()), k
    after = result_values(first_result)
    assert all(torch.equal(after[k], v) for k, v in first_values.items())  # the first result kept its region

    larger = first.clone()
    larger[:, 12:15, 14:22] = True
    caplog.clear()
    with caplog.at_level("INFO", logger="FISEdit"):
        run_edit(models["sd15"], handle, "sd15", 2, larger, EDITED_SEED)
    assert "not reusing the sparse steps kept from the last edit: built for another mask, whose index maps" in caplog.text
    grown = cache.kept[KEPT][1]
    assert grown is not kept and all(grown.state.plan.lengths()[lvl].holds(lengths[lvl]) for lvl in lengths)
    caplog.clear()
    with caplog.at_level("INFO", logger="FISEdit"):
        run_edit(models["sd15"], handle, "sd15", 2, first, EDITED_SEED)  # fits the grown maps
    assert "not reusing" not in caplog.text and cache.kept[KEPT][1] is grown

    speck = torch.zeros_like(first)
    speck[:, 4, 6] = True
    caplog.clear()
    with caplog.at_level("INFO", logger="FISEdit"):
        speck_latent, _ = run_edit(models["sd15"], handle, "sd15", 2, speck, EDITED_SEED)
    assert "would compute" in caplog.text and f"(at most {REFIT_WASTE}x)" in caplog.text
    assert cache.kept[KEPT][1].state.plan.levels[0].capacity is None  # built unpadded
    assert_i4(speck_latent, original, speck)

    run_edit(models["sd15"], handle, "sd15", 2, first, EDITED_SEED)
    kept = cache.kept[KEPT][1]
    with monkeypatch.context() as m, caplog.at_level("INFO", logger="FISEdit"):
        m.setenv("FISEDIT_REFIT", "0")
        caplog.clear()
        run_edit(models["sd15"], handle, "sd15", 2, first, EDITED_SEED + 1)  # the same mask: taken as it is
        assert "not reusing" not in caplog.text and cache.kept[KEPT][1] is kept
        run_edit(models["sd15"], handle, "sd15", 2, inner, EDITED_SEED + 1)
        assert "built for another mask (FISEDIT_REFIT=0)" in caplog.text
        assert cache.kept[KEPT][1] is not kept and cache.kept[KEPT][1].state.plan.levels[0].capacity is None


def test_a_replaced_results_store_is_reused_by_the_next_and_changes_nothing(models, source, monkeypatch):
    """registry.py's spare block: the same edit three times. The second result replaces the first at its seal, whose
    planned block the third result's store takes over (the second recorded while the first was still registered).
    Every edit gives the same latent and the same result cache, bit for bit."""
    import gc

    from fisedit_engine.registry import registry
    handed = []  # per edit, the address of the spare it took, or None (the allocator may give a freed one back too)
    take = registry().take_block

    def spy(nbytes):
        block = take(nbytes)
        handed.append(None if block is None else block.data_ptr())
        return block
    monkeypatch.setattr(registry(), "take_block", spy)
    handle, _ = source("sd15", "dpmpp_2m", 2, 7.0, (16, 24))
    mask = blob_mask(2, (16, 24))

    def edit():
        latent, result = run_edit(models["sd15"], handle, "sd15", 2, mask, EDITED_SEED + 7)
        cache = result.get()
        values = {(k, c, s): cache.read(k, s, c).clone() for k in cache.keys() for c in cache.settings.chunks
                  for s in range(cache.cached_steps(k, c))}
        return latent, values, cache.store.rows.block.data_ptr()

    first, first_values, first_block = edit()
    second, second_values, second_block = edit()
    gc.collect()
    third, third_values, third_block = edit()
    assert len(handed) == 3 and handed[1:] == [None, first_block] and third_block == first_block != second_block
    assert torch.equal(first, second) and torch.equal(first, third)
    assert first_values.keys() == third_values.keys()
    assert all(torch.equal(first_values[k], second_values[k]) and torch.equal(first_values[k], third_values[k])
               for k in first_values)


def test_a_diffusion_model_wrapper_sees_the_unet_whose_weights_a_kept_graph_checks(models):
    """graphs.StepGraph.check_weights takes `executor.class_obj` in the DIFFUSION_MODEL wrappers of the sparse steps
    and the probe (edit.SparseStepWrapper, probe.ProbeStepWrapper, GPU only): on the real host that is the UNet,
    with its weights where sampling has loaded them."""
    from fisedit_engine import comfy_adapter as host
    from fisedit_engine import warm
    from fisedit_engine.graphs import StepGraph
    graph, seen = StepGraph("cpu"), []

    def wrapper(executor, *args, **kwargs):
        graph.check_weights(executor.class_obj)
        seen.append(executor.class_obj)
        return executor(*args, **kwargs)

    model = models["sd15"].clone()
    host.add_diffusion_model_wrapper(model, wrapper)
    generate(model, "sd15", "euler", 1, 7.0, (16, 24), EDITED_SEED)
    unet = models["sd15"].model.diffusion_model
    assert len(seen) == STEPS * 2 or len(seen) == STEPS  # CFG chunks in one call or two
    assert all(s is unet for s in seen) and graph.weights == warm.weights_key(unet)
