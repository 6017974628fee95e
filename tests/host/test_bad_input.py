"""Bad input to the edit nodes: every case gives a clear error or a documented result, and leaves no trace (the
registry holds what it held, nothing of FISEdit stays on the model, a stock run is still the stock result).

Documented results tested here: an empty mask returns the original and its cache; a mask is cut at 0.5 per image
pixel (soft masks, values above 1 or below 0 are fine); a dilation beyond the latent's size covers everything (the
edit is a regenerate, I2); probe_steps 0 means 20% of the cached steps. Errors: masks of another size, batch or rank,
NaN/inf in a mask, a conditioning, a generation or a latent to decode; a negative dilation; probe steps outside
1..steps-1; a cache of another model family; a ControlNet in the captured generation or in the edited prompt. Property-based parts (hypothesis) vary mask shapes, values, dilation
and the probe settings, and compare accepted masks with an independent reference.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import reliability
import tiny_models
from tiny_models import sample

BATCH, H, W, STEPS = 2, 16, 24, 4  # non-square, so width and height cannot be swapped unnoticed
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(host):
    return tiny_models.build("sd15", seed=1)


@pytest.fixture(scope="module")
def source(model):
    from fisedit_engine import api
    captured, handle = api.capture(model, "bad-input")
    original = generate(captured)
    cache, _ = api.store(handle, {"samples": original})
    return api.sealed_handle(cache), original


def generate(model, prompt_seed=11, negative=None, latent=None, positive=None):
    import comfy.sample
    latent = torch.zeros(BATCH, 4, H, W) if latent is None else latent
    with torch.inference_mode():
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), STEPS, 7.0, "euler", "normal",
                                   positive or tiny_models.conditioning("sd15", prompt_seed),
                                   negative or tiny_models.conditioning("sd15", 12), latent, seed=3, disable_pbar=True)


def edited_prompt(seed=99):
    return tiny_models.conditioning("sd15", seed)


def difference_mask(model, handle, **kw):
    from fisedit_engine import api
    args = dict(mask_mode="user", user_mask=None, dilate=1)
    args.update(kw)
    with torch.inference_mode():
        return api.difference_mask(model, handle, args.pop("positive", edited_prompt()), args.pop("mask_mode"), **args)


def reference_latent_mask(image_mask: torch.Tensor, dilate: int) -> np.ndarray:
    """Independent of the engine's pooling: a latent pixel is set when any of its 8x8 image pixels is above 0.5;
    then every pixel within Chebyshev distance `dilate` of a set one is set (rows, then columns, by prefix sums)."""
    m = image_mask.float().numpy()
    m = m[None] if m.ndim == 2 else m
    b, hh, ww = m.shape
    cells = (m > 0.5).reshape(b, hh // 8, 8, ww // 8, 8).any(axis=(2, 4))

    def grow(a, axis):
        n = a.shape[axis]
        c = np.concatenate([np.zeros_like(np.take(a, [0], axis=axis), dtype=int),
                            np.cumsum(a.astype(int), axis=axis)], axis=axis)
        lo = np.clip(np.arange(n) - dilate, 0, n)
        hi = np.clip(np.arange(n) + dilate + 1, 0, n)
        return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) > 0
    return grow(grow(cells, 1), 2)


@pytest.fixture
def untouched(model):
    """Asserts after the test that the registry was not changed and nothing of FISEdit stayed on the model."""
    before = reliability.registry_snapshot()
    yield
    reliability.assert_registry_unchanged(before)
    assert reliability.fisedit_leftovers(model) == []


# --- masks -------------------------------------------------------------------------------------------------------

def test_an_empty_mask_returns_the_original_and_its_cache(model, source):
    from fisedit_engine import api
    handle, original = source
    spec, mask, _ = difference_mask(model, handle, user_mask=torch.zeros(BATCH, H * 8, W * 8))
    assert not spec.mask.any() and not mask.any()
    with torch.inference_mode():
        latent, result = api.sparse_sample(model, spec, 0.0, "exact", 4)
    assert torch.equal(latent["samples"], original) and result is handle


@pytest.mark.parametrize("dilate", [0, 64, 10**6])
def test_a_full_mask_or_a_huge_dilation_covers_the_whole_latent(model, source, untouched, dilate):
    """dilate 64 is the node's maximum; 10**6 comes only through the API and costs no more (clamped to the size)."""
    point = torch.zeros(1, H * 8, W * 8)
    point[0, 0, 0] = 1.0
    spec, mask, _ = difference_mask(model, source[0], user_mask=torch.ones(1, H * 8, W * 8) if dilate == 0 else point,
                                    dilate=dilate)
    assert spec.mask.all() and mask.shape == (1, H * 8, W * 8) and mask.all()


@pytest.mark.parametrize("bad, message", [
    (torch.ones(BATCH, H * 8, W * 8 - 8), r"the mask is 184x128 but the cached image is 192x128"),
    (torch.ones(BATCH, W * 8, H * 8), r"the mask is 128x192 but the cached image is 192x128"),
    (torch.ones(3, H * 8, W * 8), r"the mask has 3 images but the cached generation has batch 2"),
    (torch.ones(0, H * 8, W * 8), r"the mask has 0 images"),
    (torch.ones(BATCH, 1, H * 8, W * 8), r"a MASK is \[batch, height, width\]"),
    (torch.ones(W * 8), r"a MASK is \[batch, height, width\]"),
    (torch.full((BATCH, H * 8, W * 8), float("nan")), r"NaN or infinite"),
    (torch.zeros(BATCH, H * 8, W * 8).index_fill(2, torch.tensor([5]), float("inf")), r"NaN or infinite"),
])
def test_masks_that_cannot_be_used_are_refused(model, source, untouched, bad, message):
    from fisedit_engine.cache import CacheError
    with pytest.raises(CacheError, match=message):
        difference_mask(model, source[0], user_mask=bad)


def test_a_negative_dilation_is_refused(model, source, untouched):
    from fisedit_engine.cache import CacheError
    with pytest.raises(CacheError, match="dilate is a number of latent pixels, 0 or more"):
        difference_mask(model, source[0], user_mask=torch.ones(1, H * 8, W * 8), dilate=-1)


MASK_FAULTS = {  # one fault per example, and the words the refusal must contain
    "rank": r"a MASK is [batch, height, width]", "batch": "images but the cached generation has batch",
    "empty batch": "the mask has 0 images", "height": "but the cached image is 192x128",
    "width": "but the cached image is 192x128", "nan": "NaN or infinite", "inf": "NaN or infinite",
    "dilate": "dilate is a number of latent pixels",
}


@st.composite
def masks(draw):
    """(MASK, dilate, fault): about half well-formed (any rank-2/3 shape of the image's size, batch 1 or the cache's,
    binary, soft, out-of-range, empty or full values, any dilation), the rest with exactly one fault."""
    fault = draw(st.sampled_from([None] * 8 + sorted(MASK_FAULTS)))
    rank = draw(st.sampled_from([2, 3, 3])) if fault != "rank" else draw(st.sampled_from([1, 4]))
    batch = {"batch": 3, "empty batch": 0}[fault] if fault in ("batch", "empty batch") else draw(
        st.sampled_from([1, BATCH]))
    hh = H * 8 + (draw(st.sampled_from([-8, 8, -1, 3])) if fault == "height" else 0)
    ww = W * 8 + (draw(st.sampled_from([-8, 8, -5, 1])) if fault == "width" else 0)
    if fault in ("batch", "empty batch"):
        rank = 3
    shape = {1: (ww,), 2: (hh, ww), 3: (batch, hh, ww), 4: (batch, 1, hh, ww)}[rank]
    kind = draw(st.sampled_from(["binary", "soft", "wide", "zeros", "ones"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if kind == "binary":  # sparse blobs: a random 1/64-density field, so masks stay partial
        values = (torch.rand(shape, generator=gen) < 1 / 64).float()
    elif kind == "soft":
        values = torch.rand(shape, generator=gen)
    elif kind == "wide":
        values = torch.rand(shape, generator=gen) * 3 - 1  # below 0 and above 1, as arithmetic on masks can give
    else:
        values = torch.full(shape, 0.0 if kind == "zeros" else 1.0)
    if fault in ("nan", "inf"):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = float(fault)
    dilate = -1 if fault == "dilate" else draw(st.sampled_from([0, 1, 2, 5, 30, 200]))
    return values, kind, dilate, fault


@settings(max_examples=60, **HYPOTHESIS)
@given(case=masks())
def test_any_mask_is_either_refused_naming_its_fault_or_pooled_exactly(model, source, case):
    from fisedit_engine.cache import CacheError
    before = reliability.registry_snapshot()
    user_mask, kind, dilate, fault = case
    try:
        spec, mask, preview = difference_mask(model, source[0], user_mask=user_mask, dilate=dilate)
    except CacheError as e:
        event(f"refused: {fault}")
        assert fault is not None, f"a usable mask {tuple(user_mask.shape)} ({kind}, dilate {dilate}) was refused: {e}"
        assert MASK_FAULTS[fault] in str(e), str(e)
    else:
        event(f"accepted: {kind}")
        assert fault is None, f"a mask with a fault ({fault}) was accepted"
        expected = reference_latent_mask(user_mask, dilate)
        assert spec.mask.dtype == torch.bool and np.array_equal(spec.mask.numpy(), expected)
        assert torch.equal(mask, spec.mask.float().repeat_interleave(8, 1).repeat_interleave(8, 2))
        assert preview.shape == (BATCH, H * 8, W * 8, 3)
    reliability.assert_registry_unchanged(before)


@settings(max_examples=8, **HYPOTHESIS)
@given(top=st.integers(0, H - 1), left=st.integers(0, W - 1), height=st.integers(1, H), width=st.integers(1, W),
       dilate=st.integers(0, 3), tile=st.sampled_from([1, 3, 4, 8]), per_sample=st.booleans())
def test_any_box_edit_keeps_the_outside_exactly(model, source, top, left, height, width, dilate, tile, per_sample):
    """Invariant I4 over random regions, dilations, tile sizes and per-sample masks, through the nodes' engine calls."""
    from fisedit_engine import api
    handle, original = source
    image_mask = torch.zeros(BATCH if per_sample else 1, H * 8, W * 8)
    image_mask[0, top * 8:(top + height) * 8, left * 8:(left + width) * 8] = 1.0
    spec, _, _ = difference_mask(model, handle, user_mask=image_mask, dilate=dilate)
    with torch.inference_mode():
        latent, result = api.sparse_sample(model, spec, 0.0, "exact", tile)
    edited = latent["samples"]
    outside = ~spec.mask.expand(BATCH, H, W)[:, None].expand_as(edited)
    assert torch.equal(edited[outside], original[outside])
    assert not torch.equal(edited[~outside], original[~outside])
    assert result.get().final_latent.equal(edited)
    reliability.assert_registry_consistent()


# --- the probe's settings ----------------------------------------------------------------------------------------

PROBE_FAULTS = {
    "probe_steps below 1": f"probe_steps must be between 1 and {STEPS - 1}",
    "probe_steps beyond the steps": f"probe_steps must be between 1 and {STEPS - 1}",
    "threshold": "threshold must be one of", "edit_size": "edit_size is a share of the image area",
    "attention control beyond its recorded steps": "attention control needs the cross-attention queries",
}


@st.composite
def probe_settings(draw):
    """(probe_steps, threshold, edit_size, attention_control, control_steps, fault): about half valid, the rest one
    fault each."""
    from fisedit_engine.layout import probe_record_steps
    recorded = probe_record_steps(STEPS)  # the capture keeps attention control's queries for 30% of the steps
    fault = draw(st.sampled_from([None] * 5 + sorted(PROBE_FAULTS)))
    beyond = fault == "attention control beyond its recorded steps"
    attention = draw(st.booleans()) if not beyond else True
    control_steps = None if beyond else draw(st.sampled_from([None, 1, recorded]))  # None: every probe step
    # 0: the default, 20%; controlled in its first steps only, a probe reads the queries of those steps only
    valid_steps = [0, 1, 2, 3] if not attention or control_steps else [0, *range(1, recorded + 1)]
    probe_steps = {"probe_steps below 1": -1,
                   "probe_steps beyond the steps": draw(st.sampled_from([STEPS, STEPS + 3, 1000])),
                   "attention control beyond its recorded steps": STEPS - 1}.get(fault)
    if probe_steps is None:
        probe_steps = draw(st.sampled_from(valid_steps))
    threshold = "median" if fault == "threshold" else draw(st.sampled_from(["otsu", "edit_size"]))
    edit_size = draw(st.sampled_from([0.0, 1.5])) if fault == "edit_size" else draw(st.sampled_from([0.01, 0.5, 1.0]))
    if fault == "edit_size":
        threshold = "edit_size"
    return probe_steps, threshold, edit_size, attention, control_steps, fault


@settings(max_examples=16, **HYPOTHESIS)
@given(case=probe_settings(), mode=st.sampled_from(["auto", "auto+user"]))
@example(case=(1, "edit_size", 0.0, True, 1, "edit_size"), mode="auto")  # every fault at least once, whatever is drawn
@example(case=(2, "edit_size", 1.5, False, None, "edit_size"), mode="auto+user")
@example(case=(STEPS, "otsu", 0.5, False, None, "probe_steps beyond the steps"), mode="auto")
@example(case=(STEPS - 1, "otsu", 0.5, True, None, "attention control beyond its recorded steps"), mode="auto")
@example(case=(STEPS - 1, "otsu", 0.5, True, 1, None), mode="auto")
def test_any_probe_setting_is_either_refused_naming_its_fault_or_runs_that_many_steps(model, source, case, mode):
    from fisedit_engine.cache import CacheError
    before = reliability.registry_snapshot()
    probe_steps, threshold, edit_size, attention, control_steps, fault = case
    user = torch.zeros(1, H * 8, W * 8)
    user[:, 8:40, 16:64] = 1.0
    try:
        spec, mask, _ = difference_mask(model, source[0], mask_mode=mode, user_mask=user, probe_steps=probe_steps,
                                        threshold=threshold, edit_size=edit_size, attention_control=attention,
                                        control_steps=control_steps)
    except CacheError as e:
        event(f"refused: {fault}")
        assert fault is not None, f"valid probe settings {case} were refused: {e}"
        assert PROBE_FAULTS[fault] in str(e), str(e)
    else:
        event(f"accepted: {probe_steps} probe steps")
        assert fault is None, f"probe settings with a fault ({fault}) were accepted"
        steps = probe_steps or round(0.2 * STEPS)  # 0: the documented default, 20% of the cached steps
        assert spec.probe.steps == steps and spec.probe.cond_outputs.shape[0] == steps
        assert spec.mask.shape[-2:] == (H, W) and mask.shape[-2:] == (H * 8, W * 8)
        if mode == "auto+user":
            assert (mask[:, 8:40, 16:64] == 1).all()
    reliability.assert_registry_unchanged(before)
    assert reliability.fisedit_leftovers(model) == []


def test_a_one_step_generation_cannot_be_probed_but_can_be_edited_with_a_user_mask(model, untouched):
    import comfy.sample
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    captured, handle = api.capture(model, "bad-input-one-step")
    latent = torch.zeros(1, 4, H, W)
    with torch.inference_mode():
        out = comfy.sample.sample(captured, comfy.sample.prepare_noise(latent, 3), 1, 7.0, "euler", "normal",
                                  tiny_models.conditioning("sd15", 11), tiny_models.conditioning("sd15", 12), latent,
                                  seed=3, disable_pbar=True)
    cache, _ = api.store(handle, {"samples": out})
    one_step = api.sealed_handle(cache)
    try:
        with pytest.raises(CacheError, match="needs a generation of at least 2 steps; this cache has 1"):
            difference_mask(model, one_step, mask_mode="auto")
        spec, _, _ = difference_mask(model, one_step, user_mask=torch.ones(1, H * 8, W * 8))
        with torch.inference_mode():
            latent, _ = api.sparse_sample(model, spec, 0.0, "exact", 4)
        assert latent["samples"].shape == out.shape and not torch.equal(latent["samples"], out)
    finally:
        from fisedit_engine.registry import registry
        registry().remove("bad-input-one-step")  # this test's own caches; the fixture checks nothing else changed
        registry().remove(next((n for n in registry().names() if n.startswith("bad-input-one-step>")), ""))


# --- NaN / inf in conditionings and generations ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["embedding", "pooled_output"])
@pytest.mark.parametrize("mode", ["user", "auto"])
def test_a_conditioning_with_nan_or_inf_is_refused_before_any_work(model, source, untouched, where, mode):
    from fisedit_engine.cache import CacheError
    positive = edited_prompt()
    if where == "embedding":
        positive[0][0][0, 3, 5] = float("nan")
    else:
        positive[0][1]["pooled_output"] = torch.tensor([[1.0, float("inf")]])
    calls = []
    hook = model.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(CacheError, match="positive conditioning .* NaN or infinite"):
            difference_mask(model, source[0], positive=positive, mask_mode=mode,
                            user_mask=torch.ones(1, H * 8, W * 8))
    finally:
        hook.remove()
    assert calls == []  # refused before the probe ran the model


@pytest.mark.parametrize("where", ["negative", "latent_image"])
def test_a_generation_gone_nan_is_refused_by_the_store_and_its_memory_returned(model, where):
    """NaN in a generation's inputs (an inf in the negative conditioning, a NaN in an img2img latent) makes the
    sampler's output NaN; ComfyUI does not stop it, so FISEditCacheStore must, and free what the run recorded."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    before = reliability.registry_snapshot()
    captured, handle = api.capture(model, f"bad-input-nan-{where}")
    negative, latent = None, None
    if where == "negative":
        negative = tiny_models.conditioning("sd15", 12)
        negative[0][0][0, 0, 0] = float("inf")
    else:
        latent = torch.zeros(BATCH, 4, H, W)
        latent[1, 2, 3, 4] = float("nan")
    out = generate(captured, negative=negative, latent=latent)
    assert not torch.isfinite(out).all()
    with pytest.raises(CacheError, match="produced NaN or infinite values"):
        api.store(handle, {"samples": out})
    assert handle.recording.reserved == 0 and not handle.recording.store.tensors
    reliability.assert_registry_unchanged(before)


# --- ControlNet -------------------------------------------------------------------------------------------------

def test_a_controlnet_is_refused_by_the_store_and_by_the_edit(model, source, untouched):
    """A ControlNet adds its residuals to the block outputs after the capture records them: a generation with one is
    sampled untouched (I1) but not cached, and an edited prompt with one is refused before any model call."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    before = reliability.registry_snapshot()
    positive = tiny_models.with_control_net(tiny_models.conditioning("sd15", 11), "sd15", (H, W))
    captured, handle = api.capture(model, "bad-input-controlnet")
    out = generate(captured, positive=positive)
    assert torch.equal(out, generate(model, positive=positive))
    assert not torch.equal(out, generate(model))  # the ControlNet took part
    with pytest.raises(CacheError, match="ControlNet"):
        api.store(handle, {"samples": out})
    reliability.assert_registry_unchanged(before)
    calls = []
    hook = model.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(CacheError, match="positive conditioning .* ControlNet"):
            difference_mask(model, source[0], positive=tiny_models.with_control_net(edited_prompt(), "sd15", (H, W)),
                            mask_mode="user", user_mask=torch.ones(1, H * 8, W * 8))
    finally:
        hook.remove()
    assert calls == []


# --- another model family ----------------------------------------------------------------------------------------

def test_a_cache_from_another_model_family_is_refused(source, untouched):
    from fisedit_engine.cache import CacheError
    for arch in ("sd21v", "sdxl"):
        other = tiny_models.build(arch, seed=1)
        with pytest.raises(CacheError, match="not the one cache 'bad-input' was captured with"):
            difference_mask(other, source[0], positive=tiny_models.conditioning(arch, 99),
                            user_mask=torch.ones(1, H * 8, W * 8))
        assert reliability.fisedit_leftovers(other) == []


def test_after_all_the_bad_input_a_stock_run_is_the_stock_result(model):
    """Invariant I6 at the end of the module: nothing above changed what the plain MODEL computes."""
    stock = sample(tiny_models.build("sd15", seed=1), "sd15", batch=BATCH)
    reliability.assert_unpatched(model, lambda: sample(model, "sd15", batch=BATCH), stock)
