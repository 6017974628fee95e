"""Capture and Store on the real ComfyUI host, with tiny random UNets of the SD1.5 / SD2.1-v / SDXL structures."""
import pytest
import torch

import tiny_models
from tiny_models import sample

STEPS = tiny_models.STEPS


@pytest.fixture(scope="module")
def engine(host):
    from fisedit_engine import api, cache, layout, registry
    return api, cache, layout, registry


@pytest.fixture(scope="module")
def models(host):
    return {arch: tiny_models.build(arch, seed=1) for arch in tiny_models.ARCHS}


def capture_run(engine, model, arch, name, **kw):
    api = engine[0]
    captured, handle = api.capture(model, name)
    out = sample(captured, arch, **kw)
    return captured, handle, out


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg", [1.0, 7.0])
def test_i1_capture_is_bit_identical(engine, models, sampler, batch, cfg):
    ref = sample(models["sd15"], "sd15", batch=batch, cfg=cfg, sampler=sampler)
    _, handle, out = capture_run(engine, models["sd15"], "sd15", f"i1-{sampler}-{batch}-{cfg}",
                                 batch=batch, cfg=cfg, sampler=sampler)
    assert torch.equal(ref, out)
    assert handle.recording.state == "complete", handle.recording.failure


@pytest.mark.parametrize("arch", ["sd21v", "sdxl"])
def test_i1_other_structures(engine, models, arch):
    ref = sample(models[arch], arch, batch=2)
    _, handle, out = capture_run(engine, models[arch], arch, f"i1-{arch}", batch=2)
    assert torch.equal(ref, out)
    assert handle.recording.state == "complete", handle.recording.failure


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
@pytest.mark.parametrize("cfg", [1.0, 7.0])
def test_cache_holds_every_layer_step_chunk(engine, models, arch, cfg):
    api, cache_mod, layout_mod, _ = engine
    batch, size = 2, 16
    _, handle, out = capture_run(engine, models[arch], arch, f"full-{arch}-{cfg}", batch=batch, cfg=cfg, size=size)
    cache, _ = api.store(handle, {"samples": out})
    unet = models[arch].model.diffusion_model
    lay = layout_mod.UNetLayout.from_unet(unet)
    sizes = lay.level_sizes(size, size)
    sparse = lay.sparse_levels(size, size)
    assert list(cache.settings.sparse_levels) == sparse and sparse == [0]  # 16x16 = 256 positions; 8x8 runs dense
    chunks = (0,) if cfg == 1.0 else (0, 1)
    assert cache.settings.chunks == chunks
    assert cache.settings.dtype == "float32"  # the model's dtype on CPU
    modules = dict(unet.named_modules())
    expected_keys = {t.key for t in lay.targets(sparse)} | {layout_mod.LATENT_KEY}
    assert set(cache.keys()) == expected_keys
    probe_steps = layout_mod.probe_record_steps(STEPS)
    for target in lay.targets(sparse):
        probe_only = target.what == "probe_q"  # attention control's queries: positive chunk, early steps only
        assert (target.key, 1) not in cache.store.tensors or not probe_only
        for chunk in (0,) if probe_only else chunks:
            t = cache.store.tensors[(target.key, chunk)]
            assert t.shape[:2] == ((probe_steps if probe_only else STEPS), batch)
            assert cache.store.written[(target.key, chunk)].all()
            assert torch.isfinite(t).all()
            if target.what == "stats":
                assert t.shape[2:] == (modules[target.module_path].num_groups, 2)
                continue
            h, w = sizes[target.level]
            if target.what in ("attn_k", "attn_v", "probe_q"):
                assert t.shape[2] == h * w  # tokens
            else:
                assert t.shape[2:4] == (h, w)  # maps are stored channels-last: [steps, batch, H, W, C]
    # the recorded latent of step 0 is the initial noise at full denoise scaling, and every step differs
    x = [cache.read(layout_mod.LATENT_KEY, i) for i in range(STEPS)]
    sigma0 = cache.settings.sigmas[0]
    assert torch.allclose(x[0], cache.noise * (1 + sigma0 ** 2) ** 0.5, rtol=1e-5, atol=1e-5)
    assert all(not torch.equal(x[i], x[i + 1]) for i in range(STEPS - 1))
    assert cache.read("out", STEPS - 1, chunk=chunks[-1], sample=1).shape == (4, size, size)
    assert cache.final_latent.shape == (batch, 4, size, size)


def test_recorded_values_match_the_model(engine, models):
    """The cached block outputs are the values the UNet computed: replay step 2's model call and compare."""
    api = engine[0]
    _, handle, out = capture_run(engine, models["sd15"], "sd15", "values", batch=1, cfg=7.0)
    cache, _ = api.store(handle, {"samples": out})
    unet = models["sd15"].model.diffusion_model
    seen = {}
    hooks = [unet.input_blocks[1][0].register_forward_hook(lambda m, i, o: seen.__setitem__("res", o.cpu())),
             unet.input_blocks[1][1].transformer_blocks[0].attn1.to_k.register_forward_hook(
                 lambda m, i, o: seen.__setitem__("k", o.cpu()))]
    try:
        model = models["sd15"].model
        step = 2
        device = next(unet.parameters()).device  # where the last sampling run left the model
        sigma = torch.tensor([cache.settings.sigmas[step]], device=device)
        x = cache.read("x", step).to(device)
        ctx = cache.conds["positive"][0][0].to(device)
        with torch.inference_mode():
            model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={})
    finally:
        for h in hooks:
            h.remove()
    # the replay runs one row where sampling ran two (uncond, cond), so float blocking differs in the last bits
    close = dict(rtol=1e-4, atol=1e-4)
    assert torch.allclose(seen["res"], cache.read("input_blocks.1.0", step, chunk=0), **close)
    assert torch.allclose(seen["k"], cache.read("input_blocks.1.1.transformer_blocks.0.attn1:k", step, chunk=0),
                          **close)
    assert not torch.allclose(seen["res"], cache.read("input_blocks.1.0", step + 1, chunk=0), **close)


def test_store_refuses_interrupted_run(engine, models):
    import comfy.model_management
    api, cache_mod, _, _ = engine

    def interrupt_at_2(step, *args):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    captured, handle = api.capture(models["sd15"], "interrupted")
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(captured, "sd15", callback=interrupt_at_2)
    with pytest.raises(cache_mod.CacheError, match=r"interrupted after step 2 of 4; re-run the sampler"):
        api.store(handle, {"samples": torch.zeros(1, 4, 16, 16)})
    assert "interrupted" not in engine[3].registry()
    assert handle.recording.reserved == 0 and not handle.recording.store.tensors  # memory given back


def test_store_refuses_foreign_latent(engine, models):
    api, cache_mod, _, _ = engine
    _, handle, out = capture_run(engine, models["sd15"], "sd15", "foreign")
    with pytest.raises(cache_mod.CacheError, match="not the output of the sampler"):
        api.store(handle, {"samples": out + 1})
    with pytest.raises(cache_mod.CacheError, match="nothing was recorded"):
        api.store(api.capture(models["sd15"], "never-run")[1], {"samples": out})


def test_multi_evaluation_sampler_is_refused_before_sampling(engine, models):
    api, cache_mod, _, _ = engine
    captured, handle = api.capture(models["sd15"], "heun")
    with pytest.raises(cache_mod.CacheError, match="'heun'.*several times per step"):
        sample(captured, "sd15", sampler="heun")
    assert handle.recording is None


@pytest.mark.parametrize("fault", sorted(tiny_models.SAMPLER_FAULTS))
def test_a_sampler_off_the_schedule_fails_the_recording_not_the_generation(engine, models, fault):
    """A sampler not known to evaluate the model several times per step, which does (tests/gpu runs the same with
    the sigmas on the GPU, where they are checked after the fact)."""
    api, cache_mod, _, _ = engine
    captured, handle = api.capture(models["sd15"], f"fault-{fault}")
    out = tiny_models.faulty_sample(captured, "sd15", fault)
    assert torch.equal(out, tiny_models.faulty_sample(models["sd15"], "sd15", fault))
    with pytest.raises(cache_mod.CacheError, match=tiny_models.SAMPLER_FAULTS[fault]):
        api.store(handle, {"samples": out})


def test_combined_conditionings_fail_the_recording_not_the_generation(engine, models):
    import comfy.sample
    api, cache_mod, _, _ = engine
    captured, handle = api.capture(models["sd15"], "combined")
    latent = torch.zeros(1, 4, 16, 16)
    pos = tiny_models.conditioning("sd15", 1) + tiny_models.conditioning("sd15", 2)  # ConditioningCombine
    neg = tiny_models.conditioning("sd15", 3)
    with torch.inference_mode():
        out = comfy.sample.sample(captured, comfy.sample.prepare_noise(latent, 0), 2, 7.0, "euler", "normal",
                                  pos, neg, latent, seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    with pytest.raises(cache_mod.CacheError, match="several positive or negative conditionings"):
        api.store(handle, {"samples": out})


def test_i6_no_leak_after_capture(engine, models):
    model = models["sd15"]
    unet = model.model.diffusion_model
    ref = sample(model, "sd15", batch=2, sampler="dpmpp_2m")
    capture_run(engine, model, "sd15", "leak", batch=2, sampler="dpmpp_2m")
    assert torch.equal(sample(model, "sd15", batch=2, sampler="dpmpp_2m"), ref)
    assert not model.wrappers.get("outer_sample") and not model.wrappers.get("apply_model")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_handle_survives_clone_and_deepcopy(engine, models):
    import copy
    api = engine[0]
    captured, handle = api.capture(models["sd15"], "copies")
    clone = captured.clone()
    wrappers = [w for ws in clone.wrappers.values() for w in ws.get("fisedit", [])]
    assert wrappers and all(w.handle is handle for w in wrappers)
    assert copy.deepcopy(handle) is handle
    assert copy.deepcopy(clone.model_options) is not None
