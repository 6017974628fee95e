"""Other node packs on the real host, with the in-tree nodes that exercise them (other_packs.py has the reasoning):
- LoraLoader with a generated LoRA (sd15-small through the executor): captures and edits exactly; another strength
  misses the cache, naming both strengths.
- FreeU_V2 (output_block_patch over whole maps): captured transparently; a sparse edit is refused before any model
  call, naming FreeU_V2 and dense_tail; with every step dense the edit keeps the outside exactly (I3, I4).
- PerturbedAttentionGuidance and SelfAttentionGuidance (a post-CFG function with a second model evaluation per step):
  refused by the capture before any model call.
- TomePatchModel (attn1 patches merging tokens across the map): a sparse edit is refused before any model call.
- An attention replacement at a block that runs dense (a PAG-style perturbed self-attention in the middle block,
  without PAG's second evaluation): the sparse edit honours it exactly (I2, I3, I4).
The tiny SD1.5-structured UNet: 16x16 latent, level 0 sparse, level 1 (8x8, with the middle block) dense.
"""
import logging

import pytest
import torch

import comfy_host
import tiny_models
from tiny_models import sample

ARCH, SIZE, STEPS = "sd15", 16, 4
ORIGINAL, EDITED = 11, 99


def apply_node(nodes, class_type, **inputs):
    """Runs an in-tree node's function as the executor would, V1 or V3 alike; returns its first output."""
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "define_schema"):  # V3 (comfy_api io.ComfyNode)
        return cls.execute(**inputs).result[0]
    return getattr(cls(), cls.FUNCTION)(**inputs)[0]


@pytest.fixture(scope="module")
def base(host):
    return tiny_models.build(ARCH, seed=1)


class UNetCalls:
    """Counts the UNet's forward calls (a refusal before sampling makes none)."""

    def __init__(self, model):
        self.count = 0
        self.unet = model.model.diffusion_model

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._count)
        return self

    def _count(self, *_):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def capture(model, name):
    from fisedit_engine import api
    captured, handle = api.capture(model, name)
    original = sample(captured, ARCH, size=SIZE, steps=STEPS, prompt_seed=ORIGINAL)
    api.store(handle, {"samples": original})
    return handle, original


def box_mask():
    m = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    m[:, 3:8, 5:12] = True
    return m


def edit(model, handle, mask, prompt_seed=EDITED, dense_tail=0.0):
    from fisedit_engine.edit import EditSpec, run_edit
    spec = EditSpec(handle, tiny_models.conditioning(ARCH, prompt_seed), mask)
    with torch.inference_mode():
        latent, _ = run_edit(model, spec, dense_tail=dense_tail)
    return latent


def assert_i3(edited, original):
    assert (edited - original).abs().max().item() <= 1e-5 * max(1.0, original.abs().max().item())


def assert_i4(edited, original, mask):
    outside = ~mask[:, None].expand_as(edited)
    assert torch.equal(edited[outside], original[outside])
    assert not torch.equal(edited[~outside], original[~outside])


# --- FreeU_V2 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def freeu(host, base):
    model = apply_node(host, "FreeU_V2", model=base, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    # it acts on a sparse level: the first decoder block of level 0 reads level 1's upsampled map, of twice the
    # model's 32 channels, which FreeU_V2 scales
    seen = []
    model_options = model.model_options["transformer_options"]["patches"]
    original_patch = model_options["output_block_patch"][0]
    hooked = model.clone()
    hooked.model_options["transformer_options"]["patches"]["output_block_patch"] = [
        lambda h, hsp, to: (seen.append(tuple(h.shape[1:])), original_patch(h, hsp, to))[1]]
    sample(hooked, ARCH, size=SIZE, steps=1, prompt_seed=ORIGINAL)
    assert (64, SIZE, SIZE) in seen
    return model


def test_freeu_is_captured_transparently_and_warns_that_edits_must_run_dense(freeu, caplog):
    stock = sample(freeu, ARCH, size=SIZE, steps=STEPS, prompt_seed=ORIGINAL)
    with caplog.at_level(logging.WARNING, logger="FISEdit"):
        _, original = capture(freeu, "freeu-transparent")
    assert torch.equal(original, stock)  # I1 with FreeU in the model
    assert any("FreeU_V2" in r.getMessage() and "dense_tail 1.0" in r.getMessage() for r in caplog.records)


def test_a_sparse_edit_of_a_freeu_model_is_refused_before_any_model_call(freeu):
    from fisedit_engine.cache import CacheError
    handle, _ = capture(freeu, "freeu-refused")
    with UNetCalls(freeu) as calls, pytest.raises(CacheError) as refused:
        edit(freeu, handle, box_mask())
    assert calls.count == 0
    message = str(refused.value)
    assert "output_block_patch from FreeU_V2 (comfy_extras/nodes_freelunch)" in message
    assert "Fourier filter" in message and "dense_tail to 1.0" in message and "remove FreeU_V2" in message


def test_a_freeu_edit_with_every_step_dense_keeps_the_outside_exactly(freeu):
    handle, original = capture(freeu, "freeu-dense")
    mask = box_mask()
    assert_i4(edit(freeu, handle, mask, dense_tail=1.0), original, mask)
    assert_i3(edit(freeu, handle, mask, prompt_seed=ORIGINAL, dense_tail=1.0), original)


def test_freeu_settings_are_in_the_fingerprint_and_it_is_stable(host, base, freeu):
    """Patch functions are fingerprinted by name and settings, not by address: FreeU_V2 run again with the same
    settings matches (a saved cache stays usable in a new process), other settings do not."""
    from fisedit_engine.fingerprint import model_fingerprint
    again = apply_node(host, "FreeU_V2", model=base, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    other = apply_node(host, "FreeU_V2", model=base, b1=1.1, b2=1.4, s1=0.9, s2=0.2)
    assert model_fingerprint(again) == model_fingerprint(freeu)
    assert len({model_fingerprint(other), model_fingerprint(freeu), model_fingerprint(base)}) == 3


# --- guidance that evaluates the model again ----------------------------------------------------------------------

@pytest.mark.parametrize("class_type, inputs", [("PerturbedAttentionGuidance", dict(scale=3.0)),
                                                ("SelfAttentionGuidance", dict(scale=0.5, blur_sigma=2.0))])
def test_guidance_with_a_second_model_evaluation_is_refused_by_the_capture_before_sampling(host, base, class_type,
                                                                                           inputs):
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    model = apply_node(host, class_type, model=base, **inputs)
    captured, _ = api.capture(model, f"refused-{class_type}")
    with UNetCalls(model) as calls, pytest.raises(CacheError) as refused:
        sample(captured, ARCH, size=SIZE, steps=STEPS, prompt_seed=ORIGINAL)
    assert calls.count == 0
    message = str(refused.value)
    assert f"sampler_post_cfg_function from {class_type} (comfy_extras/" in message
    assert "another model evaluation" in message and f"remove {class_type} from the model" in message
    # the model itself still samples as before (the refusal left nothing on it)
    assert torch.isfinite(sample(model, ARCH, size=SIZE, steps=1, prompt_seed=ORIGINAL)).all()


# --- attention patches -----------------------------------------------------------------------------------------------

def test_a_sparse_edit_of_a_tome_model_is_refused_before_any_model_call(host, base):
    from fisedit_engine.cache import CacheError
    tome = apply_node(host, "TomePatchModel", model=base, ratio=0.5)
    handle, _ = capture(tome, "tome")
    with UNetCalls(tome) as calls, pytest.raises(CacheError) as refused:
        edit(tome, handle, box_mask())
    assert calls.count == 0
    message = str(refused.value)
    assert "attn1_patch from TomePatchModel (comfy_extras/nodes_tomesd)" in message
    assert "attn1_output_patch from TomePatchModel" in message and "merges tokens" in message


def test_an_attention_replacement_at_a_dense_block_is_honoured_exactly(host, base):
    """A self-attention replacement like PAG's (the output is the values: no attention) in the middle block, without
    PAG's second evaluation: the middle block runs dense at this size, so the sparse edit runs it as is."""
    from fisedit_engine import other_packs
    from fisedit_engine.layout import UNetLayout
    calls = []

    def perturbed_attention(q, k, v, extra_options, mask=None):
        calls.append(extra_options["block"])
        return v

    model = base.clone()
    model.set_model_attn1_replace(perturbed_attention, "middle", 0, 0)
    layout = UNetLayout.from_unet(model.model.diffusion_model)
    verdict, = other_packs.assess(model, layout, layout.sparse_levels(SIZE, SIZE))
    assert verdict.support == other_packs.SUPPORTED
    handle, original = capture(model, "dense-replace")
    assert calls and set(calls) == {("middle", 0)}
    mask = box_mask()
    calls.clear()
    assert_i4(edit(model, handle, mask), original, mask)
    assert calls  # the edit ran the replacement
    assert_i3(edit(model, handle, mask, prompt_seed=ORIGINAL), original)
    regenerated = sample(model, ARCH, size=SIZE, steps=STEPS, prompt_seed=EDITED)
    assert torch.equal(edit(model, handle, torch.ones(1, SIZE, SIZE, dtype=torch.bool)), regenerated)  # I2


# --- LoraLoader with a generated LoRA --------------------------------------------------------------------------------

LORA_NAME = "fisedit-test-lora.safetensors"


def write_lora(path, rank=4, seed=0):
    """A random LoRA on every attention projection of sd15-small's UNet and CLIP-L's q/v projections, under the key
    names ComfyUI maps (comfy.lora.model_lora_keys_unet / _clip). Sorted keys and one generator: deterministic."""
    import make_test_checkpoint
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    shapes = make_test_checkpoint.meta_state_dict("sd15-small")
    for key in sorted(shapes):
        unet = key.startswith("model.diffusion_model.") and key.endswith(("to_q.weight", "to_k.weight", "to_v.weight"))
        clip = key.startswith("cond_stage_model.transformer.text_model.") and key.endswith(
            ("q_proj.weight", "v_proj.weight"))
        if not (unet or clip):
            continue
        name = key.removeprefix("model.diffusion_model." if unet else "cond_stage_model.transformer.")
        lora_key = ("lora_unet_" if unet else "lora_te_") + name.removesuffix(".weight").replace(".", "_")
        out_f, in_f = shapes[key].shape
        lora[f"{lora_key}.lora_up.weight"] = 0.05 * torch.randn(out_f, rank, generator=gen)
        lora[f"{lora_key}.lora_down.weight"] = 0.05 * torch.randn(rank, in_f, generator=gen)
        lora[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    save_file(lora, str(path))
    return sum(1 for k in lora if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))


def lora_workflow(strength_for_edit):
    """Capture with the LoRA at strength 1, then two edits (user mask) through a LoraLoader at `strength_for_edit`:
    the edited prompt (node 14) and the unchanged one (node 16)."""
    def encode(text):
        return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["2", 1]}}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15-small.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA_NAME,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": encode("a red cube on a wooden table"),
        "4": encode("blurry"),
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "FISEditCacheCapture", "inputs": {"model": ["2", 0], "cache_name": "lora"}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 42, "steps": 4, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "FISEditCacheStore", "inputs": {"cache": ["6", 1], "latent": ["7", 0]}},
        "9": encode("a blue cube on a wooden table"),
        "10": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}},
        "11": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 48, "height": 40}},
        "12": {"class_type": "MaskComposite", "inputs": {"destination": ["10", 0], "source": ["11", 0], "x": 40,
                                                         "y": 32, "operation": "add"}},
        "13": {"class_type": "FISEditDifferenceMask", "inputs": {
            "model": ["17", 0], "cache": ["8", 0], "positive": ["9", 0], "mask_mode": "user", "user_mask": ["12", 0],
            "dilate": 1, "probe_steps": 0, "threshold": "otsu", "edit_size": 0.15, "attention_control": False}},
        "14": {"class_type": "FISEditSparseKSampler", "inputs": {"model": ["17", 0], "edit": ["13", 0]}},
        "15": {"class_type": "FISEditDifferenceMask", "inputs": {
            "model": ["17", 0], "cache": ["8", 0], "positive": ["3", 0], "mask_mode": "user", "user_mask": ["12", 0],
            "dilate": 1, "probe_steps": 0, "threshold": "otsu", "edit_size": 0.15, "attention_control": False}},
        "16": {"class_type": "FISEditSparseKSampler", "inputs": {"model": ["17", 0], "edit": ["15", 0]}},
        # the edit's model: the same checkpoint through its own LoraLoader (CLIP strength unchanged: same prompts)
        "17": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA_NAME,
                                                      "strength_model": strength_for_edit, "strength_clip": 1.0}},
    }


@pytest.fixture(scope="module")
def lora(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    count = write_lora(folder / LORA_NAME)
    comfy_host.add_model_folder("loras", folder)
    return count


def test_a_lora_model_is_captured_and_edited_exactly(lora):
    from fisedit_engine.registry import registry
    run = comfy_host.run_prompt(lora_workflow(1.0), "lora-same", outputs=["7", "8", "14", "16"])
    original = run.outputs["7"][0][0]["samples"]
    cache = registry().get("lora")
    assert cache.settings.model_patches == (f"weights ({lora} LoRA weight patches at strength 1)",)
    edited, unchanged = run.outputs["14"][0][0]["samples"], run.outputs["16"][0][0]["samples"]
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, 4 - 1:9 + 1, 5 - 1:11 + 1] = True  # the 48x40 px box at (40, 32), in latent pixels, dilated by 1
    assert_i4(edited, original, mask)
    assert_i3(unchanged, original)


def test_an_edit_with_another_lora_strength_misses_the_cache_naming_both(lora):
    with pytest.raises(comfy_host.WorkflowError) as refused:
        comfy_host.run_prompt(lora_workflow(0.5), "lora-other", outputs=["8", "14"])
    message = str(refused.value)
    assert "FISEditDifferenceMask" in message and "(its weights, LoRAs or patches differ" in message
    assert f"this model has weights ({lora} LoRA weight patches at strength 0.5)" in message
    assert f"the capture's had weights ({lora} LoRA weight patches at strength 1)" in message
