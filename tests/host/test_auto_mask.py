"""The automatic difference mask on the real host: probe steps, thresholds, and the sparse run continuing from the
probe (replaying its steps instead of recomputing them).

A random-weight UNet changes the latent everywhere a little when the prompt changes, with no spatial structure, so
thresholds select scattered pixels, most of which the mask's cleaning drops (regions under half the strongest
difference); the tests use Otsu and large edit_size values, which leave blobs here. Whether the mask finds the right region is the quality benchmark's job,
on a trained model."""
import pytest
import torch

import tiny_models

STEPS, HW = 6, (16, 24)


@pytest.fixture(scope="module")
def model(host):
    return tiny_models.build("sd15", seed=1)


def generate(model, sampler, batch, cfg, prompt_seed=11):
    import comfy.sample
    latent = torch.zeros(batch, 4, *HW)
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), STEPS, cfg, sampler, "normal",
                                   tiny_models.conditioning("sd15", prompt_seed), tiny_models.conditioning("sd15", 12),
                                   latent, seed=3, disable_pbar=True)


@pytest.fixture(scope="module")
def source(model):
    from fisedit_engine import api
    made = {}

    def make(sampler="dpmpp_2m", batch=2, cfg=7.0):
        key = (sampler, batch, cfg)
        if key not in made:
            captured, handle = api.capture(model, f"auto-{sampler}-{batch}-{cfg}")
            out = generate(captured, sampler, batch, cfg)
            api.store(handle, {"samples": out})
            made[key] = handle, out
        return made[key]
    return make


def auto(model, handle, prompt_seed, **kw):
    from fisedit_engine import api
    with torch.inference_mode():
        return api.difference_mask(model, handle, tiny_models.conditioning("sd15", prompt_seed), kw.pop("mode", "auto"),
                                   **kw)


def sparse(model, spec):
    from fisedit_engine import api
    with torch.inference_mode():
        latent, handle = api.sparse_sample(model, spec, 0.0, "exact", 4)
    return latent["samples"], handle


def test_an_identical_prompt_gives_an_empty_mask_and_the_original(model, source):
    handle, original = source()
    spec, mask, _ = auto(model, handle, 11, probe_steps=2)
    assert not spec.mask.any() and not mask.any()
    assert torch.equal(spec.probe.difference, torch.zeros_like(spec.probe.difference))
    edited, same = sparse(model, spec)
    assert torch.equal(edited, original) and same is handle


def test_the_probe_computes_only_the_positive_branch(model, source):
    from fisedit_engine.probe import run_probe
    handle, _ = source()
    with torch.inference_mode():
        state, calls = run_probe(model, handle.get(), tiny_models.conditioning("sd15", 99), 3)
    assert calls == [[0]] * 4  # steps 0-2, then the call of step 3 that stops the probe: never the negative (1)
    assert state.cond_outputs.shape == (3, 2, 4, *HW) and state.latents.shape == (4, 2, 4, *HW)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "uni_pc"])
def test_the_sparse_run_continues_from_the_probe(model, source, sampler):
    """The probe steps are replayed, not recomputed (UNet calls = steps - probe steps); the replayed trajectory is
    the probe's inside the mask and the original's outside it, bit for bit; I4 holds for the result."""
    handle, original = source(sampler=sampler)
    spec, _, _ = auto(model, handle, 99, probe_steps=2)
    assert spec.mask.any() and not spec.mask.all()
    unet = model.model.diffusion_model
    calls = []
    hook = unet.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        edited, result = sparse(model, spec)
    finally:
        hook.remove()
    assert len(calls) == STEPS - 2
    m = spec.mask[:, None].expand_as(edited)
    assert torch.equal(edited[~m], original[~m]) and not torch.equal(edited[m], original[m])  # I4
    for step in (1, 2):  # the latents entering the steps after the replayed ones
        recorded, source_x = result.get().read("x", step), handle.get().read("x", step)
        assert torch.equal(recorded[m], spec.probe.latents[step][m])
        assert torch.equal(recorded[~m], source_x[~m])


def test_the_result_reads_the_replayed_steps_through_to_the_source(model, source):
    """A replayed probe step's activations in the result cache are the source's: the delta reads them through to
    its base (nothing copied), also once it is made whole (as when the source leaves memory)."""
    from fisedit_engine.edit import EditSpec
    handle, _ = source()
    probed, _, _ = auto(model, handle, 99, probe_steps=2)
    mask = torch.zeros(2, *HW, dtype=torch.bool)
    mask[:, 2:5, 3:7] = True  # small, so that level 0 runs sparse and the result is a delta there
    spec = EditSpec(handle, probed.positive, mask, mode="auto", probe=probed.probe)
    _, result = sparse(model, spec)
    store = result.get().store
    key = "input_blocks.1.0"  # level 0's first ResBlock
    assert key in store.regions
    whole = store.materialized()
    for step in (0, 1):
        assert all((key, chunk, step) in store.from_base for chunk in (0, 1))
        assert torch.equal(result.get().read(key, step), handle.get().read(key, step))
        assert torch.equal(whole.tensors[(key, 0)][step], handle.get().store.tensors[(key, 0)][step])
    assert (key, 0, 2) not in store.from_base
    assert not torch.equal(result.get().read(key, 2), handle.get().read(key, 2))  # a computed step differs


def test_auto_plus_user_contains_the_user_mask(model, source):
    handle, _ = source()
    user = torch.zeros(2, 128, 192)
    user[:, 8:24, 160:184] = 1.0  # a corner the automatic mask is unlikely to pick
    spec, mask, _ = auto(model, handle, 99, mode="auto+user", user_mask=user, probe_steps=2, dilate=0)
    assert (mask[user > 0] == 1).all()
    auto_only, _, _ = auto(model, handle, 99, probe_steps=2, dilate=0)
    assert torch.equal(spec.mask, auto_only.mask | (user[:, ::8, ::8] > 0))


def test_edit_size_bounds_the_area_and_dilate_grows_it(model, source):
    handle, _ = source()
    small, _, _ = auto(model, handle, 99, probe_steps=2, threshold="edit_size", edit_size=0.5, dilate=0)
    grown, _, _ = auto(model, handle, 99, probe_steps=2, threshold="edit_size", edit_size=0.5, dilate=1)
    assert 0 < small.mask.float().mean() <= 0.5 + 1e-6  # cleaning only removes from an edit_size cut
    assert (grown.mask >= small.mask).all() and grown.mask.sum() > small.mask.sum()


def test_probe_steps_default_and_bounds(model, source):
    from fisedit_engine.cache import CacheError
    handle, _ = source()
    spec, _, _ = auto(model, handle, 99)
    assert spec.probe.steps == round(0.2 * STEPS)
    with pytest.raises(CacheError, match="probe_steps must be between 1 and 5"):
        auto(model, handle, 99, probe_steps=STEPS)
    with pytest.raises(CacheError, match="needs a user_mask"):
        auto(model, handle, 99, mode="auto+user")


def test_the_probe_keeps_the_clean_latent_its_last_step_predicts(model, source):
    """At step 0 the probe's latent and the cached negative prediction are what a stock run of the edited prompt
    computes, so a one-step probe's prediction is the stock sampler's denoised of step 0 (its preview callback's)."""
    import comfy.sample
    handle, _ = source()
    spec, _, _ = auto(model, handle, 99, probe_steps=1)
    seen = {}
    latent = torch.zeros(2, 4, *HW)
    with torch.inference_mode():
        comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), STEPS, 7.0, "dpmpp_2m", "normal",
                            tiny_models.conditioning("sd15", 99), tiny_models.conditioning("sd15", 12), latent, seed=3,
                            disable_pbar=True, callback=lambda step, x0, x, total: seen.setdefault(step, x0.clone()))
    assert spec.probe.predicted.shape == seen[0].shape
    torch.testing.assert_close(spec.probe.predicted, seen[0].float(), rtol=1e-4, atol=1e-4)
    two, _, _ = auto(model, handle, 99, probe_steps=2)
    assert not torch.allclose(two.probe.predicted, seen[0].float(), rtol=1e-2, atol=1e-2)  # the last step's


def test_cfg_1_probe(model, source):
    """With cfg 1 ComfyUI evaluates only the positive branch anyway; the probe mirrors it exactly."""
    handle, original = source(cfg=1.0)
    spec, _, _ = auto(model, handle, 11, probe_steps=2)
    assert not spec.mask.any()
    spec, _, _ = auto(model, handle, 99, probe_steps=2)
    edited, _ = sparse(model, spec)
    m = spec.mask[:, None].expand_as(edited)
    assert torch.equal(edited[~m], original[~m])
