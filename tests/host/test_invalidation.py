"""Cache invalidation: an edit only ever uses the generation its cache recorded.

The edit nodes take every sampling setting from the cache (DESIGN.md section 2), so an edit can meet another
generation than its own in two ways only: through its MODEL input (other weights, a LoRA), checked by the model
fingerprint; and through the registry, which is keyed by cache name: a second capture under the same cache_name
(two capture nodes with one name, or another workflow run in the same server while ComfyUI keeps this workflow's
outputs cached) replaces the sealed cache that this workflow's FISEDIT_CACHE handle names. The mutation test
captures once, then changes each setting in turn, and every edit attempt through the first capture's handle must be
refused with a message naming exactly what changed. An identical re-capture must still be accepted.
"""
import pytest
import torch

import comfy_host
import reliability
import tiny_models
from tiny_models import sample

NAME = "invalidation"
BASE = dict(batch=1, cfg=7.0, sampler="euler", seed=3, size=16, steps=4, scheduler="normal", denoise=1.0,
            negative_seed=12)
EDITED_PROMPT = 99

# setting -> (what changes, the difference the refusal must name; a trailing "*" means "starts with")
MUTATIONS = {
    "seed": (dict(seed=4), "seed 4 (was 3)"),
    "steps": (dict(steps=5), "steps 5 (was 4)"),
    "sampler": (dict(sampler="dpmpp_2m"), "sampler dpmpp_2m (was euler)"),
    "scheduler": (dict(scheduler="karras"), "scheduler (same steps and first sigma*"),
    "cfg": (dict(cfg=5.0), "cfg 5 (was 7)"),
    "denoise": (dict(denoise=0.75), "denoise or scheduler (the schedule starts at sigma*"),
    "size": (dict(size=24), "size 192x192 (was 128x128)"),
    "batch": (dict(batch=2), "batch 2 (was 1)"),
    "negative prompt": (dict(negative_seed=13), "negative prompt"),
}
MODEL_MUTATIONS = ("model weights", "LoRA")


@pytest.fixture(scope="module")
def model(host):
    return tiny_models.build("sd15", seed=1)


@pytest.fixture(scope="module")
def mutated_models(model):
    return {"model weights": tiny_models.build("sd15", seed=2), "LoRA": tiny_models.with_lora(model, seed=5)}


@pytest.fixture(scope="module")
def base(model):
    """The one capture every mutation is checked against: (handle, sealed cache, original latent)."""
    from fisedit_engine import api
    captured, handle = api.capture(model, NAME)
    original = sample(captured, "sd15", **BASE)
    cache, _ = api.store(handle, {"samples": original})
    return handle, cache, original


def capture_under_the_same_name(model, **settings):
    """What a second FISEditCacheCapture with the same cache_name does: a new handle, sealed under that name."""
    from fisedit_engine import api
    captured, handle = api.capture(model, NAME)
    api.store(handle, {"samples": sample(captured, "sd15", **{**BASE, **settings})})
    return handle


def user_mask(size=16, batch=1):
    m = torch.zeros(batch, size * 8, size * 8)
    m[:, 24:72, 40:96] = 1.0
    return m


def edit_attempts(model, handle, spec):
    """The two nodes that read a cache during an edit: FISEditDifferenceMask and FISEditSparseKSampler (with an edit
    made before the cache changed under it). Returns the error of each attempt, None where it went through."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    attempts = (lambda: api.difference_mask(model, handle, tiny_models.conditioning("sd15", EDITED_PROMPT), "user",
                                            user_mask(), dilate=1),
                lambda: api.sparse_sample(model, spec, 0.0, "exact", 4))
    errors = []
    for attempt in attempts:
        try:
            with torch.inference_mode():
                attempt()
        except CacheError as e:
            errors.append(str(e))
        else:
            errors.append(None)
    return errors


def named_differences(message: str) -> list[str]:
    assert "it differs in: " in message, message
    return message.split("it differs in: ", 1)[1].split(". Another capture", 1)[0].split("; ")


def matches(found: str, expected: str) -> bool:
    return found.startswith(expected[:-1]) if expected.endswith("*") else found == expected


@pytest.fixture(scope="module")
def spec(model, base):
    from fisedit_engine import api
    handle = base[0]
    with torch.inference_mode():
        made, _, _ = api.difference_mask(model, handle, tiny_models.conditioning("sd15", EDITED_PROMPT), "user",
                                         user_mask(), dilate=1)
    return made


@pytest.mark.parametrize("setting", list(MUTATIONS) + list(MODEL_MUTATIONS))
def test_a_cache_replaced_by_another_generation_is_refused_naming_the_difference(model, mutated_models, base, spec,
                                                                                 setting):
    from fisedit_engine.registry import registry
    handle, cache, _ = base
    if setting in MODEL_MUTATIONS:
        other = capture_under_the_same_name(mutated_models[setting])
        expected = "model (its weights, LoRAs or patches)"
    else:
        changes, expected = MUTATIONS[setting]
        other = capture_under_the_same_name(model, **changes)
    try:
        assert registry().get(NAME) is not cache  # the other generation really took the name
        errors = edit_attempts(model, handle, spec)
        assert None not in errors, f"an edit used the other generation's cache ({setting} changed): a wrong hit"
        for message in errors:
            found = named_differences(message)
            assert len(found) == 1 and matches(found[0], expected), found
            assert f"cache '{NAME}'" in message and "cache_name" in message
        # the other capture's own handle is its generation's and stays usable
        assert other.get() is registry().get(NAME)
    finally:
        registry().put(cache)  # the sealed base back under its name, for the next mutation
    assert handle.get() is cache


@pytest.mark.parametrize("setting", MODEL_MUTATIONS)
def test_an_edit_with_another_model_is_refused(mutated_models, base, spec, setting):
    """The cache unchanged, the edit's MODEL input changed: refused by the model fingerprint."""
    errors = edit_attempts(mutated_models[setting], base[0], spec)
    assert None not in errors, f"an edit ran with a model whose {setting} differ from the capture's: a wrong hit"
    assert all("weights, LoRAs or patches differ" in e for e in errors), errors


def test_an_identical_re_capture_is_accepted(model, base, spec):
    """No false refusals: the same generation re-captured under the name (ComfyUI re-running the workflow) is the
    same cache bit for bit, so both nodes accept it through the first handle (and a clone of the model)."""
    from fisedit_engine.registry import registry
    handle, cache, _ = base
    capture_under_the_same_name(model)
    try:
        assert registry().get(NAME) is not cache
        assert reliability.cache_digest(handle.get()) == reliability.cache_digest(cache)
        assert edit_attempts(model.clone(), handle, spec) == [None, None]
    finally:
        registry().put(cache)


def test_the_differences_are_named_for_every_setting_at_once(model, base):
    """All mutations together: each one is named, none is lost when several change."""
    from fisedit_engine.cache import settings_differences
    handle, cache, _ = base
    changes = {k: v for c, _ in MUTATIONS.values() for k, v in c.items() if k != "denoise"}  # steps and denoise
    other = capture_under_the_same_name(model, **changes)                                    # share the sigmas
    try:
        found = settings_differences(cache.settings, other.get().settings)
    finally:
        from fisedit_engine.registry import registry
        registry().put(cache)
    expected = [e for s, (_, e) in MUTATIONS.items() if s not in ("denoise", "scheduler")]
    assert sorted(found) == sorted(expected), found


def test_in_a_server_a_cached_workflow_meets_another_workflows_capture_of_the_same_name(checkpoints):
    """The wrong hit as a server meets it. With an output cache that keeps earlier prompts' nodes (--cache-lru), a
    re-queued workflow does not re-run its capture, KSampler and store: its edit reads the cache by name. Another
    workflow, run in between with the same cache_name and another seed, sealed its own generation under that name;
    the re-queued edit must be refused, naming the seed, instead of editing the other workflow's image."""
    executor = comfy_host.new_executor(lru=64)
    mine = reliability.edit_workflow("shared-name", 42, "a red cube", "a blue cube")
    first = comfy_host.run_prompt(mine, "mine-1", executor=executor)
    assert first.outputs["15"][0][0]["samples"].shape == (1, 4, 16, 16)
    comfy_host.run_prompt(reliability.edit_workflow("shared-name", 43, "a red cube", "", with_edit=False), "theirs",
                          executor=executor)
    mine["10"]["inputs"]["text"] = "a green cube"  # only the edit changes: ComfyUI keeps nodes 1-7 from the cache
    with pytest.raises(comfy_host.WorkflowError, match=r"node 14 .*seed 43 \(was 42\)"):
        comfy_host.run_prompt(mine, "mine-2", executor=executor)


def test_the_model_fingerprint_follows_comfyuis_weight_patching_in_place(host):
    """Fingerprints remember weight samples (`fingerprint._SampleMemo`); ComfyUI's in-place patching writes through
    `.data`, which no version counter sees. Its LoRA patching backs the original up first, so every fingerprint
    still hashes the unpatched weights; a hook patch has no such backup, and is seen as it is applied."""
    import comfy.utils
    from fisedit_engine.fingerprint import model_fingerprint
    plain = tiny_models.build("sd15", seed=11)  # its own weights: no other test's load state
    lora = tiny_models.with_lora(plain, seed=7)
    lora.weight_inplace_update = True
    before = model_fingerprint(plain), model_fingerprint(lora)
    assert before[0] != before[1]
    lora.patch_model()
    try:
        assert lora.backup, "the LoRA was not patched into the weights"
        assert (model_fingerprint(plain), model_fingerprint(lora)) == before
    finally:
        lora.unpatch_model()
    assert (model_fingerprint(plain), model_fingerprint(lora)) == before

    key = "diffusion_model.out.2.bias"
    weight = comfy.utils.get_attr(plain.model, key)
    original = weight.detach().clone()
    plain.hook_backup[key] = (original, weight.device)  # what patch_hook_weight_to_device keeps
    try:
        comfy.utils.copy_to_param(plain.model, key, original + 1.0)
        hooked = model_fingerprint(plain)
        assert hooked != before[0]
    finally:
        comfy.utils.copy_to_param(plain.model, key, original)
        plain.hook_backup.clear()
    assert model_fingerprint(plain) == before[0]
