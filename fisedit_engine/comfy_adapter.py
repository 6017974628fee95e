"""The only module that knows ComfyUI's APIs and how they differ between versions.

Verified against the pinned host (ComfyUI 0.3.75+, f8b981ae). Differences in newer upstream that matter here
(see the README's compatibility section):
- `caches.outputs.get` is a coroutine from v0.17;
- the guider's OUTER_SAMPLE call gains keyword arguments over time (`latent_shapes`), so wrappers pass **kwargs on.
ComfyUI is imported lazily so that the rest of the engine imports without it.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable

WRAPPER_KEY = "fisedit"

# ComfyUI's cond_or_uncond values: which conditioning a batch chunk belongs to.
COND = 0
UNCOND = 1
CHUNK_NAMES = {COND: "cond", UNCOND: "uncond"}


def wrappers_mp():
    import comfy.patcher_extension
    return comfy.patcher_extension.WrappersMP


def add_outer_sample_wrapper(patcher, fn: Callable):
    patcher.add_wrapper_with_key(wrappers_mp().OUTER_SAMPLE, WRAPPER_KEY, fn)


def add_apply_model_wrapper(patcher, fn: Callable):
    patcher.add_wrapper_with_key(wrappers_mp().APPLY_MODEL, WRAPPER_KEY, fn)


def add_diffusion_model_wrapper(patcher, fn: Callable):
    """Around the UNet's forward itself (inside apply_model, after ComfyUI's own input and timestep handling)."""
    patcher.add_wrapper_with_key(wrappers_mp().DIFFUSION_MODEL, WRAPPER_KEY, fn)


def has_fisedit_wrappers(patcher) -> bool:
    return any(WRAPPER_KEY in keyed for keyed in patcher.wrappers.values())


def foreign_wrapper_keys(patcher) -> list[str]:
    """Wrapper keys other packs registered on this patcher (they may change the model's output)."""
    return sorted(f"{kind}:{key}" for kind, keyed in patcher.wrappers.items() for key in keyed if key != WRAPPER_KEY)


def diffusion_model_of_guider(guider):
    """The UNetModel that an OUTER_SAMPLE wrapper's guider will run."""
    return guider.model_patcher.model.diffusion_model


def outer_sample_args(args: tuple, kwargs: dict) -> dict:
    """Names CFGGuider.outer_sample's arguments (noise, latent_image, sampler, sigmas, denoise_mask, callback,
    disable_pbar, seed)."""
    names = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed")
    named = dict(zip(names, args, strict=False))  # later ComfyUI versions pass more
    named.update({k: v for k, v in kwargs.items() if k in names})
    return named


def apply_model_args(args: tuple, kwargs: dict) -> tuple[Any, dict]:
    """(x, transformer_options) of a BaseModel.apply_model call as its APPLY_MODEL wrappers see it."""
    x = args[0] if args else kwargs["x"]
    transformer_options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    return x, transformer_options


def sampler_name(sampler) -> str:
    """ComfyUI's sampler name for a KSAMPLER ('euler', 'dpmpp_2m', 'uni_pc', ...), or the function's name."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", type(sampler).__name__)
    if name == "sample_unipc":
        return "uni_pc"
    if name == "sample_unipc_bh2":
        return "uni_pc_bh2"
    if name.endswith("_function"):  # dpm_fast / dpm_adaptive are closures named <name>_function
        return name[: -len("_function")]
    return name[len("sample_"):] if name.startswith("sample_") else name


def sampler_extra_options(sampler) -> dict:
    return dict(getattr(sampler, "extra_options", {}) or {})


def sampler_inpaint_options(sampler) -> dict:
    return dict(getattr(sampler, "inpaint_options", {}) or {})


def guider_conds(guider) -> dict[str, list]:
    """The guider's conditionings back in CONDITIONING form ([[tensor, extras], ...]) per kind."""
    out = {}
    for kind, conds in getattr(guider, "original_conds", {}).items():
        items = []
        for c in conds:
            extras = {k: v for k, v in c.items() if k not in ("cross_attn", "model_conds", "uuid")}
            if c.get("model_conds"):
                extras["model_conds"] = c["model_conds"]
            items.append([c.get("cross_attn"), extras])
        out[kind] = items
    return out


def is_interrupt(exc: BaseException) -> bool:
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    return isinstance(exc, mm.InterruptProcessingException)


def cached_output(outputs_cache, node_id: str):
    """An executor output-cache entry; `get` became a coroutine in v0.17."""
    entry = outputs_cache.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return entry


def workflow_identity(extra_pnginfo: dict | None, prompt: dict | None) -> str | None:
    """The UI workflow's id when the frontend sent one, else None."""
    workflow = (extra_pnginfo or {}).get("workflow") if isinstance(extra_pnginfo, dict) else None
    if isinstance(workflow, dict) and workflow.get("id"):
        return str(workflow["id"])
    return None


def cache_folder() -> str:
    """Where persisted caches live: <ComfyUI models dir>/fisedit_caches."""
    import os
    import folder_paths
    path = os.path.join(folder_paths.models_dir, "fisedit_caches")
    if "fisedit_caches" not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths["fisedit_caches"] = ([path], {".safetensors"})
    return folder_paths.get_folder_paths("fisedit_caches")[0]


class cast_weights:
    """Context manager: a module's (weight, bias) cast for `like`'s device and dtype, through ComfyUI's casting
    (LoRA weight functions, low-VRAM offload, fp8 and dynamic-VRAM weights), released on exit."""

    def __init__(self, module, like):
        self.module, self.like = module, like

    def __enter__(self):
        import comfy.ops
        self.weight, self.bias, self._handle = comfy.ops.cast_bias_weight(self.module, self.like, offloadable=True)
        return self.weight, self.bias

    def __exit__(self, *exc):
        import comfy.ops
        comfy.ops.uncast_bias_weight(self.module, self.weight, self.bias, self._handle)
        return False


def attention():
    """ComfyUI's attention function, the same one its CrossAttention layers call."""
    from comfy.ldm.modules.attention import optimized_attention
    return optimized_attention


def make_sampler(name: str, extra_options: dict, inpaint_options: dict):
    """The KSAMPLER a cache was captured with, rebuilt from its recorded name and options."""
    import comfy.samplers
    if name in ("uni_pc", "uni_pc_bh2"):
        from comfy.extra_samplers import uni_pc
        fn = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
        return comfy.samplers.KSAMPLER(fn, extra_options, inpaint_options)
    return comfy.samplers.ksampler(name, extra_options, inpaint_options)


def sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, seed, callback=None):
    """What SamplerCustom runs: the guider, sampler and sigmas given, no noise mask."""
    import comfy.sample
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                      callback=callback, disable_pbar=False, seed=seed)


def probe_guider(model, positive, negative, cfg: float, uncond_denoised):
    """A CFG guider that runs the model on the positive conditioning only and takes the negative prediction from
    `uncond_denoised(x, sigma)`, combining them exactly as ComfyUI's sampling_function does."""
    import math
    import comfy.samplers

    class ProbeGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            cond = self.conds.get("positive")
            cond_pred = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, timestep, model_options)[0]
            cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
            # with cfg 1 ComfyUI skips the negative branch and combines with zeros; so do we
            uncond_pred = cond_pred.new_zeros(cond_pred.shape) if cfg1 else uncond_denoised(x, timestep)
            return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x, timestep,
                                               model_options=model_options, cond=cond,
                                               uncond=None if cfg1 else self.conds.get("negative"))

    guider = ProbeGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider



def v3_node_api():
    """(io, ComfyExtension) of the host's V3 node API (`comfy_api.latest`: the pinned 0.3.75 has it), or None where
    the host has none. Only the stable core of it is used: Schema, the typed Input/Output classes, Custom, Hidden,
    NodeOutput, ComfyNode and ComfyExtension."""
    try:
        from comfy_api.latest import ComfyExtension, io
    except ImportError:
        return None
    needed = ("ComfyNode", "Schema", "NodeOutput", "Custom", "Hidden", "Combo", "Int", "Float", "String", "Boolean")
    return (io, ComfyExtension) if all(hasattr(io, n) for n in needed) else None


def progress_bar(total: int) -> Callable[[int], None]:
    """A progress bar on the node that is running (ComfyUI's ProgressBar, which the UI draws on the node); returns
    `update(done)`."""
    import comfy.utils
    bar = comfy.utils.ProgressBar(total)
    return lambda done: bar.update_absolute(done, total)


def sampling_progress(model, steps: int) -> Callable:
    """A sampler callback that does what KSampler's does: the running node's progress bar, one tick per step, with
    ComfyUI's latent preview when one is enabled."""
    import latent_preview
    return latent_preview.prepare_callback(model, steps)
