"""The only module that knows ComfyUI's APIs and how they differ between versions.

Verified against the pinned host (ComfyUI 0.3.75+, f8b981ae) and upstream v0.33.0 (2f35f4a0); see the README's
"Verified ComfyUI versions". Differences that matter here, and how they are met:
- `caches.outputs.get` is a coroutine from v0.17 (`cached_output`);
- the guider's OUTER_SAMPLE call gains keyword arguments over time (`latent_shapes`), so wrappers pass **kwargs on
  and `outer_sample_args` names only what it knows;
- `comfy.ops.cast_bias_weight` returns a handle whose type changed (v0.8) and streams weights with dynamic VRAM
  (v0.12): `cast_weights` hands it back to `uncast_bias_weight` untouched and nothing reads `module.weight`;
- the checkpoint loader builds MODEL and CLIP differently over time: CLIP takes its state dict in the constructor
  (v0.3.76), the MODEL is a CoreModelPatcher whose weights are assigned after it exists (v0.12, dynamic VRAM),
  `set_inference_dtype` takes the load device (v0.24); `build_model` / `build_clip` follow whichever the host does;
- new patch slots (`middle_block_after_patch`, `noise_refiner`, ...) and `forward_timestep_embed_patch` applying to
  every layer (v0.20) reach other_packs.py through `model_patches`, which lists whatever slots the MODEL carries.
ComfyUI is imported lazily so that the rest of the engine imports without it.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
from dataclasses import dataclass
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


def add_conditioning_on_device(patcher) -> None:
    """A SAMPLER_SAMPLE wrapper that moves the conditioning to the model's device once per sampling run (see
    `conditioning_on_device`)."""
    patcher.add_wrapper_with_key(wrappers_mp().SAMPLER_SAMPLE, WRAPPER_KEY, conditioning_on_device)


def conditioning_on_device(executor, guider, *args, **kwargs):
    """ComfyUI keeps the conditioning (CLIPTextEncode's output) in host memory and copies it to the device in every
    model call (BaseModel._apply_model), a copy from pageable memory that waits for the device to finish the previous
    step: the host cannot prepare a step while the GPU runs the last one. Here, once the guider has processed its
    conditionings (inner_sample), their tensors move to the device for the run; the values are the same."""
    import torch
    device = guider.model_patcher.load_device
    for conds in guider.conds.values():
        for cond in conds:
            for value in cond.get("model_conds", {}).values():
                if isinstance(getattr(value, "cond", None), torch.Tensor):
                    value.cond = value.cond.to(device)
    return executor(guider, *args, **kwargs)


def has_fisedit_wrappers(patcher) -> bool:
    return any(WRAPPER_KEY in keyed for keyed in patcher.wrappers.values())


def foreign_wrapper_keys(patcher) -> list[str]:
    """Wrapper keys other packs registered on this patcher (they may change the model's output)."""
    return sorted(f"{kind}:{key}" for kind, keyed in patcher.wrappers.items() for key in keyed if key != WRAPPER_KEY)


@dataclass(frozen=True)
class ModelPatch:
    """One thing another node put on a MODEL that can change what sampling computes (other_packs.py judges it)."""
    slot: str             # ComfyUI's name for it: "attn1_patch", "attn1 replace", "output_block_patch",
                          # "sampler_post_cfg_function", "object patch", "wrapper", "weights"
    target: tuple = ()    # replace patches: (block name, number[, transformer index]); object patches: (path,);
                          # wrappers: (wrapper type, key)
    origin: str = ""      # the node whose code made it, e.g. "FreeU_V2 (comfy_extras.nodes_freelunch)"
    detail: str = ""      # weights: how many and at which strengths

    @property
    def node(self) -> str:
        return self.origin.split(" (", 1)[0] or "another node"

    def describe(self) -> str:
        where = f" at {self.target}" if self.slot.endswith("replace") else (
            f" on {self.target[0]}" if self.slot == "object patch" else (
                f" {self.target[0]}:{self.target[1]}" if self.slot == "wrapper" else ""))
        what = f"{self.slot}{where}"
        if self.detail:
            what += f" ({self.detail})"
        return f"{what} from {self.origin}" if self.origin else what


# model_options entries that ComfyUI's sampling calls (besides transformer_options)
_SAMPLING_FUNCTIONS = ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function",
                       "sampler_calc_cond_batch_function", "model_function_wrapper", "denoise_mask_function")


def origin_of(fn) -> str:
    """The node a patch function comes from: the outermost class of its qualified name (node classes define their
    patches inside their execute/patch method) and its module."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # bound methods
    target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
    qualname = getattr(target, "__qualname__", repr(target))
    owner = qualname.split(".<locals>", 1)[0].split(".", 1)[0]
    module = short_module_name(getattr(target, "__module__", "") or "")
    return f"{owner} ({module})" if module else owner


def short_module_name(module: str) -> str:
    """ComfyUI names the modules of comfy_extras and custom node packs by their file path; keep the part that names
    the pack ("comfy_extras/nodes_freelunch", "custom_nodes/SomePack/nodes"), not where ComfyUI is installed."""
    parts = module.replace("\\", "/").split("/")
    if len(parts) == 1:
        return module
    if "custom_nodes" in parts:
        return "/".join(parts[parts.index("custom_nodes"):])
    return "/".join(parts[-2:])


def model_patches(patcher) -> list[ModelPatch]:
    """Everything on `patcher` besides FISEdit's own wrappers and object patches that can change sampling: weight
    patches (LoRA and friends), UNet patches and attention replacements in transformer_options, sampling functions
    in model_options, object patches and other packs' wrappers."""
    found = []
    strengths: dict[tuple, int] = {}
    for key, patches in patcher.patches.items():
        for p in patches:
            value = p[1]
            if isinstance(value, (tuple, list)):  # ("lora", (...)) in older ComfyUI, (tensor,) for model merges
                kind = value[0] if value and isinstance(value[0], str) else "weight"
            else:  # comfy.weight_adapter: LoRAAdapter, LoHaAdapter, ...
                kind = type(value).__name__.removesuffix("Adapter")
            group = (kind, float(p[0]), float(p[2]))
            strengths[group] = strengths.get(group, 0) + 1
    for (kind, strength, model_strength), count in sorted(strengths.items()):
        detail = f"{count} {kind} weight patches at strength {strength:g}"
        if model_strength != 1.0:
            detail += f", base weight x{model_strength:g}"
        found.append(ModelPatch("weights", detail=detail))
    to = patcher.model_options.get("transformer_options", {})
    for name, fns in sorted(to.get("patches", {}).items()):
        for fn in fns:
            found.append(ModelPatch(name, origin=origin_of(fn[1] if isinstance(fn, tuple) else fn)))
    for name, replacements in sorted(to.get("patches_replace", {}).items()):
        for target, fn in sorted(replacements.items(), key=str):
            found.append(ModelPatch(f"{name} replace", tuple(target), origin_of(fn)))
    for name in _SAMPLING_FUNCTIONS:
        fns = patcher.model_options.get(name)
        for fn in (fns if isinstance(fns, list) else [fns] if fns is not None else []):
            found.append(ModelPatch(name, origin=origin_of(fn)))
    for path, obj in sorted(patcher.object_patches.items()):
        if not getattr(obj, "fisedit_patch", False):
            found.append(ModelPatch("object patch", (path,), origin_of(obj)))
    for kind, keyed in sorted(patcher.wrappers.items()):
        for key, fns in sorted(keyed.items()):
            if key != WRAPPER_KEY:
                found.extend(ModelPatch("wrapper", (kind, key), origin_of(fn)) for fn in fns)
    return found


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


def carries_control(item) -> bool:
    """Whether a CONDITIONING entry [tensor, extras] carries a ControlNet, T2I-Adapter or control LoRA (what
    ControlNetApply and its variants set), which adds its residuals to the UNet's block outputs."""
    return item[1].get("control") is not None


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


def geglu_feed_forward(ff) -> bool:
    """Whether `ff` is ComfyUI's FeedForward with a GEGLU input projection (SD1.x, SD2.x, SDXL): net = (GEGLU,
    Dropout, Linear)."""
    import torch
    from comfy.ldm.modules.attention import GEGLU, FeedForward
    net = getattr(ff, "net", ())
    return (type(ff) is FeedForward and len(net) == 3 and type(net[0]) is GEGLU
            and type(net[1]) is torch.nn.Dropout and hasattr(net[2], "weight"))


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


def probe_guider(model, positive, negative, cfg: float, uncond_denoised, on_denoised=None):
    """A CFG guider that runs the model on the positive conditioning only and takes the negative prediction from
    `uncond_denoised(x, sigma)`, combining them exactly as ComfyUI's sampling_function does; `on_denoised(x0)` is
    called with each step's combined prediction of the clean latent."""
    import math
    import comfy.samplers

    class ProbeGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            cond = self.conds.get("positive")
            cond_pred = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, timestep, model_options)[0]
            cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
            # with cfg 1 ComfyUI skips the negative branch and combines with zeros; so do we
            uncond_pred = cond_pred.new_zeros(cond_pred.shape) if cfg1 else uncond_denoised(x, timestep)
            denoised = comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x, timestep,
                                                   model_options=model_options, cond=cond,
                                                   uncond=None if cfg1 else self.conds.get("negative"))
            if on_denoised is not None:
                on_denoised(denoised)
            return denoised

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
# --- building a MODEL, CLIP and VAE from state dicts (the toy model's loader) ------------------------------------
# comfy.sd's checkpoint loader changed how it builds these: CLIP takes its state dict in the constructor, before it
# loads the text encoder onto the device (v0.3.76); the MODEL is a CoreModelPatcher (ModelPatcherDynamic on GPUs
# when the server enables dynamic VRAM) created before the weights are loaded, which are then assigned rather than
# copied (v0.12); set_inference_dtype takes the load device (v0.24). These follow whichever the host does.

def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def build_model(model_config, unet_state_dict: dict, model_type: str = "EPS"):
    """A MODEL (ModelPatcher) around `model_config.get_model`-style BaseModel holding `unet_state_dict`, built as
    the host's checkpoint loader builds one. Returns (patcher, missing keys, unexpected keys)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    params = sum(v.numel() for v in unet_state_dict.values())
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=model_config.supported_inference_dtypes,
                               weight_dtype=next(iter(unet_state_dict.values())).dtype)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    if _accepts(model_config.set_inference_dtype, "device"):
        model_config.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
    else:
        model_config.set_inference_dtype(unet_dtype, manual_cast)
    base = comfy.model_base.BaseModel(model_config, model_type=getattr(comfy.model_base.ModelType, model_type),
                                      device=mm.unet_inital_load_device(params, unet_dtype))
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(base, load_device=load_device, offload_device=mm.unet_offload_device())
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()
    missing, unexpected = base.diffusion_model.load_state_dict(unet_state_dict, strict=False, assign=dynamic)
    return patcher, list(missing), list(unexpected)


def build_clip(clip_target, state_dict: dict, embedding_directory):
    """A CLIP from a ClipTarget and its full state dict, as the host's checkpoint loader builds one. Returns (clip,
    missing keys, unexpected keys)."""
    import comfy.sd
    params = sum(v.numel() for v in state_dict.values())
    if not _accepts(comfy.sd.CLIP.__init__, "state_dict"):
        clip = comfy.sd.CLIP(clip_target, embedding_directory=embedding_directory, parameters=params)
        missing, unexpected = clip.load_sd(state_dict, full_model=True)
        return clip, list(missing), list(unexpected)
    # the constructor loads the weights (before moving the encoder to its device) and only logs what did not fit
    clip = comfy.sd.CLIP(clip_target, embedding_directory=embedding_directory, parameters=params,
                         state_dict=dict(state_dict))
    expected = set(clip.cond_stage_model.state_dict())
    return clip, sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)


def build_vae(state_dict: dict, ddconfig: dict, embed_dim: int):
    """A VAE (comfy.sd.VAE) of the KL autoencoder with this explicit config (its state-dict detection assumes SD's
    width)."""
    import comfy.sd
    return comfy.sd.VAE(sd=state_dict, config={"params": {"ddconfig": dict(ddconfig), "embed_dim": embed_dim}})


def embedding_directories():
    """Where textual-inversion embeddings are looked up, or None in scripts that use comfy without its folders."""
    try:
        import folder_paths
        return folder_paths.get_folder_paths("embeddings")
    except (ImportError, KeyError):
        return None

