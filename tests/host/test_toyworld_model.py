"""The toy model in the real ComfyUI, on random weights: the loader node's MODEL/CLIP/VAE work with the stock nodes
and with FISEdit's, the text encoder is causal and equals the training path, and the weights fit the budget."""
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128  # 16x16 latent: level 0 (256 positions) still runs sparse; keeps the CPU tier fast


@pytest.fixture(scope="module")
def toy_weights(host, tmp_path_factory):
    """Random toy-model weights, sharded as the trainer writes them, in a folder the loader node is pointed at (for
    this module's tests only: later modules' toy workflows run on the committed weights)."""
    from toyworld import models
    folder = tmp_path_factory.mktemp("toyworld_weights")
    sd, meta = models.random_weights(seed=0)
    paths = models.save_weights(folder, "toyworld", sd, meta, max_shard_bytes=15 * 2**20)
    old = os.environ.get("FISEDIT_TOYWORLD_DIR")
    os.environ["FISEDIT_TOYWORLD_DIR"] = str(folder)
    yield {"folder": folder, "paths": paths, "sd": sd, "meta": meta}
    if old is None:
        os.environ.pop("FISEDIT_TOYWORLD_DIR", None)
    else:
        os.environ["FISEDIT_TOYWORLD_DIR"] = old


def _run(prompt, outputs=None):
    import comfy_host
    return comfy_host.run_prompt(prompt, prompt_id="toyworld-test", outputs=outputs)


def test_weights_fit_the_budget_and_shards_reassemble(toy_weights):
    from toyworld import models
    counts = models.parameter_counts(toy_weights["sd"])
    assert counts == {"unet": 11_010_628, "text": 3_187_201, "vae": 3_884_295}
    assert len(toy_weights["paths"]) == 3 and all(p.stat().st_size <= 15 * 2**20 + 2**16 for p in toy_weights["paths"])
    assert sum(p.stat().st_size for p in toy_weights["paths"]) <= 50e6
    assert models.weight_sets(toy_weights["folder"]) == {"toyworld": toy_weights["paths"]}
    sd, meta = models.load_weights(toy_weights["paths"])
    assert sd.keys() == toy_weights["sd"].keys() and all(v.dtype == torch.float16 for v in sd.values())
    assert json.loads(meta["vocab"])[:3] == ["<unk>", "<start>", "<end>"]


def test_loader_outputs_run_text_to_image_with_stock_nodes(toy_weights):
    prompt = {
        "1": {"class_type": "FISEditToyModelLoader", "inputs": {"weights": "toyworld"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a large red circle in the middle, on a plain background",
                                                          "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    run = _run(prompt, outputs=["7", "8"])
    latent = run.outputs["5"][0][0]["samples"]
    image = run.outputs["6"][0][0]
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all()
    assert image.shape == (1, SIZE, SIZE, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert run.outputs["7"][0][0]["samples"].shape == latent.shape  # the VAE is 8x both ways
    cond = run.outputs["2"][0][0][0][0]
    assert cond.shape == (1, 77, 256)


def test_text_encoder_is_causal_and_equals_the_training_path(toy_weights):
    """ComfyUI's CLIP (tokenizer + SDClipModel) gives what training computed from bulk token ids, and an unchanged
    caption prefix keeps bit-identical embeddings (FISEdit's attention control relies on it)."""
    import nodes
    from toyworld import captions, comfy_models, models
    _, clip, _, _ = comfy_models.load(toy_weights["paths"])
    old = "a large red circle at the top left, on a striped background"
    new = "a large blue circle at the top left, on a striped background"
    with torch.inference_mode():
        a = nodes.CLIPTextEncode().encode(clip, old)[0][0][0][0]
        b = nodes.CLIPTextEncode().encode(clip, new)[0][0][0][0]
    changed = 1 + captions.words(old).index("red")           # position of the first changed word (after <start>)
    assert torch.equal(a[:changed], b[:changed])
    assert (a[changed:] != b[changed:]).any(dim=-1).all()     # everything after it changes (causal, padded)
    text = models.build_text_encoder()
    prefix = models.TEXT_PREFIX + models.CLIP_NAME + ".transformer."
    text.load_state_dict({k[len(prefix):]: v.float() for k, v in toy_weights["sd"].items() if k.startswith(prefix)})
    with torch.no_grad():
        ref = models.encode_tokens(text, captions.token_ids(captions.parse(old)))[0]
    assert torch.allclose(a, ref, atol=1e-5, rtol=0)


def test_fisedit_edit_workflow_runs_on_the_toy_model(toy_weights):
    """workflows/edit_auto_toy_api.json (the demo's workflow, shortened): capture, store, difference mask, sparse
    sampling and FISEditDecode on the loader's outputs; outside the dilated mask the edited image is the original's."""
    prompt = json.loads((ROOT / "workflows" / "edit_auto_toy_api.json").read_text())
    for node in ("19", "20", "23", "24", "25", "26", "27"):  # saved latents and the stock regenerate
        del prompt[node]
    prompt["7"]["inputs"]["save_path"] = ""
    prompt["5"]["inputs"].update(width=SIZE, height=SIZE)
    prompt["6"]["inputs"]["steps"] = 4
    # A random UNet localises nothing (its automatic mask may be most of the image): add a user box.
    prompt["11"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    prompt["12"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 40, "height": 32}}
    prompt["13"] = {"class_type": "MaskComposite", "inputs": {"destination": ["11", 0], "source": ["12", 0],
                                                              "x": 72, "y": 48, "operation": "add"}}
    prompt["14"]["inputs"].update(mask_mode="auto+user", user_mask=["13", 0])
    run = _run(prompt)
    original = run.outputs["8"][0][0]
    edited = run.outputs["16"][0][0]
    mask = run.outputs["14"][1][0] > 0.5
    assert mask.shape == (1, SIZE, SIZE) and mask[0, 48:80, 72:112].all() and float(mask.float().mean()) < 1
    assert torch.equal(edited[~mask], original[~mask])
    assert not torch.equal(edited[mask], original[mask])


def test_sampling_schedule_and_latent_format_match_comfyui(toy_weights):
    import comfy.samplers

    from toyworld import comfy_models, train
    model, _, _, meta = comfy_models.load(toy_weights["paths"])
    ms = model.get_model_object("model_sampling")
    assert torch.allclose(train.normal_sigmas(ms, 12), comfy.samplers.normal_scheduler(ms, 12))
    assert torch.equal(train._schedule()[1].sigmas, ms.sigmas)  # training used the schedule ComfyUI samples with
    fmt = model.model.latent_format
    assert fmt.scale_factor == float(meta["latent_scale"])
    x = torch.randn(1, 4, 4, 4)
    assert torch.allclose(fmt.process_out(fmt.process_in(x)), x, atol=1e-6)
    shifted = fmt.__class__()
    shifted.shift_factor, shifted.scale_factor = 0.5, 2.0  # what the trainer's fit would store
    assert torch.allclose(shifted.process_in(x), (x - 0.5) * 2.0)
    assert fmt.latent_rgb_factors == json.loads(meta["latent_rgb_factors"])


def test_loader_without_weights_says_how_to_get_them(host, tmp_path, monkeypatch):
    from node_api import combo_options, run_node
    loader = host.NODE_CLASS_MAPPINGS["FISEditToyModelLoader"]
    monkeypatch.setenv("FISEDIT_TOYWORLD_DIR", str(tmp_path))
    assert combo_options(loader.INPUT_TYPES()["optional"]["weights"]) == ["(no weights found)"]
    with pytest.raises(FileNotFoundError, match="train_toyworld.py"):
        run_node(loader)
