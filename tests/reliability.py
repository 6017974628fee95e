"""Checks shared by the reliability tests: after a fault, the registry is consistent and holds what it held before,
a sealed cache's contents are intact, and the model is unpatched (invariant I6)."""
from __future__ import annotations

import hashlib
import json

import torch


def registry_snapshot() -> tuple[dict, int]:
    """(name -> cache object, reserved bytes) of the engine's registry."""
    from fisedit_engine.registry import registry
    reg = registry()
    with reg._lock:
        reg._settle()
        return dict(reg._caches), reg._reserved


def assert_registry_consistent() -> None:
    from fisedit_engine.registry import registry
    reg = registry()
    caches, reserved = registry_snapshot()
    assert all(cache.name == name for name, cache in caches.items())
    stores = [cache.store for cache in caches.values()]
    # an edit's result is a delta over its source's store: that store must be one the registry counts
    assert all(s.base is None or any(s.base is other for other in stores) for s in stores)
    assert reserved >= 0 and reg.used <= reg.budget
    assert reg.used == sum(c.nbytes for c in caches.values()) + reserved + reg.spare_bytes


def assert_registry_unchanged(before: tuple[dict, int]) -> None:
    """The same caches (the same objects: nothing replaced or dropped) as `before`, and no more bytes reserved (fewer
    when the garbage collector meanwhile freed an unsealed recording of an earlier test)."""
    caches, reserved = before
    now, now_reserved = registry_snapshot()
    assert set(now) == set(caches), (sorted(set(now) ^ set(caches)))
    assert all(now[name] is cache for name, cache in caches.items())
    assert now_reserved <= reserved
    assert_registry_consistent()


def cache_digest(cache) -> str:
    """A content hash of everything an edit reads from a cache: its settings and every tensor, bit for bit (an edit's
    result assembled over its source, so the hash does not depend on how the result is stored)."""
    h = hashlib.sha256(json.dumps(cache.settings.to_json(), sort_keys=True).encode())
    tensors = [(f"{k}/{c}", cache.store.whole_tensor(k, c)) for (k, c) in sorted(cache.store.tensors)]
    tensors += [("noise", cache.noise), ("latent_image", cache.latent_image), ("final_latent", cache.final_latent)]
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fisedit_leftovers(model, substituted_forwards: bool = False) -> list[str]:
    """What FISEdit could have left on the MODEL it was given: wrappers, object patches, hooks on the UNet's modules
    (FISEdit patches only clones, and removes its hooks in `finally`).

    With `substituted_forwards`, also FISEdit's forwards still set on the shared modules. ComfyUI applies a clone's
    object patches when it loads the clone and takes them off only when it loads another patcher, so they are
    looked for after a stock run has loaded the plain model (assert_unpatched)."""
    from fisedit_engine import comfy_adapter
    unet = model.model.diffusion_model
    found = []
    if comfy_adapter.has_fisedit_wrappers(model):
        found.append("wrappers on the MODEL")
    found += [f"object patch {k}" for k in model.object_patches]
    for path, m in unet.named_modules():
        if substituted_forwards and getattr(vars(m).get("forward"), "fisedit_patch", False):
            found.append(f"substituted forward on {path}")
        if m._forward_hooks or m._forward_pre_hooks:
            found.append(f"hooks on {path}")
    return found


def assert_unpatched(model, stock_run, stock_result) -> None:
    """Invariant I6: a stock sampler on the same MODEL gives the stock result, and nothing of FISEdit stays on it."""
    assert torch.equal(stock_run(), stock_result)
    assert fisedit_leftovers(model, substituted_forwards=True) == []


CHECKPOINT = "sd15-small.safetensors"


def edit_workflow(cache_name: str, seed: int, text: str, edited_text: str, box=(40, 32, 48, 40), size: int = 128,
                  steps: int = 4, with_edit: bool = True, mask_mode: str = "user") -> dict:
    """An API-format prompt on the built-in checkpoint: capture -> KSampler -> store, then (with_edit) a user-box
    edit whose LATENT goes to SaveLatent. Node ids: 6 KSampler, 7 Store, 14 DifferenceMask, 15 SparseKSampler."""
    x, y, w, h = box
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "FISEditCacheCapture", "inputs": {"model": ["1", 0], "cache_name": cache_name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": seed,
            "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "FISEditCacheStore", "inputs": {"cache": ["2", 1], "latent": ["6", 0]}},
    }
    if with_edit:
        prompt.update({
            "10": {"class_type": "CLIPTextEncode", "inputs": {"text": edited_text, "clip": ["1", 1]}},
            "11": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}},
            "12": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": w, "height": h}},
            "13": {"class_type": "MaskComposite", "inputs": {
                "destination": ["11", 0], "source": ["12", 0], "x": x, "y": y, "operation": "add"}},
            "14": {"class_type": "FISEditDifferenceMask", "inputs": {
                "model": ["1", 0], "cache": ["7", 0], "positive": ["10", 0], "mask_mode": mask_mode,
                "user_mask": ["13", 0], "dilate": 1, "probe_steps": 0, "threshold": "otsu", "edit_size": 0.15,
                "attention_control": True}},
            "15": {"class_type": "FISEditSparseKSampler", "inputs": {"model": ["1", 0], "edit": ["14", 0]}},
            "16": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": "reliability/edit"}},
        })
    return prompt
