"""Tiny random-weight models with the structures of SD1.5, SD2.1-v and SDXL, built by ComfyUI's own classes.

Small enough for CPU tests (a UNet call takes milliseconds) while keeping what the engine meets in real models:
two or three resolution levels, ResBlocks with and without skip convs, Down/Upsample, SpatialTransformers with 1x1-
conv (SD1.5) or linear (SD2/SDXL) projections, several transformer blocks per level (SDXL), label embedding (SDXL),
epsilon and v prediction.
"""
from __future__ import annotations

import torch

ARCHS = ("sd15", "sd21v", "sdxl")
STEPS = 4

_BASE = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
             channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
             transformer_depth_output=[1, 1, 1, 1], use_spatial_transformer=True, legacy=False,
             use_temporal_resblock=False, use_temporal_attention=False, use_checkpoint=False)

CONFIGS = {
    "sd15": dict(_BASE, context_dim=64, use_linear_in_transformer=False, adm_in_channels=None,
                 num_heads=4, num_head_channels=-1),
    "sd21v": dict(_BASE, context_dim=96, use_linear_in_transformer=True, adm_in_channels=None,
                  num_heads=-1, num_head_channels=16),
    # three levels, two transformer blocks at the middle level (SDXL stacks several), label embedding
    "sdxl": dict(_BASE, context_dim=128, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                 num_heads=-1, num_head_channels=16, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                 transformer_depth=[1, 2, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 2, 2, 0, 0]),
}


def build(arch: str = "sd15", seed: int = 0, dtype=torch.float32):
    """A ComfyUI ModelPatcher around a random-weight tiny UNet of the given structure."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models_base

    cfg = dict(CONFIGS[arch])
    extra = {"num_heads": cfg.pop("num_heads"), "num_head_channels": cfg.pop("num_head_channels")}

    class TinyConfig(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = extra
        latent_format = comfy.latent_formats.SDXL if arch == "sdxl" else comfy.latent_formats.SD15
        memory_usage_factor = 1.0

    model_config = TinyConfig(cfg)
    model_config.set_inference_dtype(dtype, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if arch == "sd21v" else comfy.model_base.ModelType.EPS
    model_cls = comfy.model_base.SDXL if arch == "sdxl" else comfy.model_base.BaseModel
    model = model_cls(model_config, model_type=model_type, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim == 1:  # norms scale 1 +- noise, biases small: keeps activations O(1) through the net
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / fan_in ** 0.5)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def with_control_net(conditioning, arch: str, latent_hw: tuple[int, int], seed: int = 0):
    """`conditioning` with a random-weight ControlNet of the tiny model's structure (ComfyUI's cldm.ControlNet) and a
    random hint image, as ControlNetApply attaches one."""
    import inspect
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    params = inspect.signature(comfy.cldm.cldm.ControlNet.__init__).parameters
    cfg = {k: v for k, v in CONFIGS[arch].items() if k in params}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu",
                                     dtype=torch.float32, **cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    hint = torch.rand(1, 3, latent_hw[0] * 8, latent_hw[1] * 8, generator=gen)
    control = comfy.controlnet.ControlNet(net, load_device=torch.device("cpu")).copy().set_cond_hint(hint, 1.0)
    return [[t, dict(extras, control=control, control_apply_to_uncond=False)] for t, extras in conditioning]


def conditioning(arch: str, seed: int, batch: int = 1):
    """A random CONDITIONING for the tiny model (with the pooled output and sizes SDXL's label embedding needs)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = CONFIGS[arch]["context_dim"]
    extras = {}
    if arch == "sdxl":
        extras = {"pooled_output": torch.randn(batch, 1280, generator=gen), "width": 256, "height": 256}
    return [[torch.randn(batch, 77, ctx, generator=gen), extras]]


def sample(model, arch, batch=1, cfg=7.0, sampler="euler", seed=3, size=16, steps=STEPS, callback=None,
           prompt_seed=11, scheduler="normal", denoise=1.0, negative_seed=12):
    """What KSampler runs (txt2img), with every KSampler widget settable."""
    import comfy.sample
    latent = torch.zeros(batch, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conditioning(arch, prompt_seed), conditioning(arch, negative_seed)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise,
                                   seed=seed, callback=callback, disable_pbar=True)


def with_lora(model, seed: int = 0, rank: int = 4, strength: float = 1.0):
    """The model with a random LoRA on every attention projection, applied by ComfyUI's own LoRA loader."""
    import comfy.lora
    import comfy.sd
    gen = torch.Generator().manual_seed(seed)
    weights = dict(model.model.diffusion_model.named_parameters())
    lora = {}
    for lora_key, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        name = target.removeprefix("diffusion_model.") if isinstance(target, str) else None
        projection = name is not None and name.endswith(("to_q.weight", "to_v.weight"))
        if not lora_key.startswith("lora_unet_") or name not in weights or not projection:
            continue
        out_f, in_f = weights[name].shape
        lora[f"{lora_key}.lora_up.weight"] = 0.1 * torch.randn(out_f, rank, generator=gen)
        lora[f"{lora_key}.lora_down.weight"] = 0.1 * torch.randn(rank, in_f, generator=gen)
    assert lora, "no attention projection found for the LoRA"
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched


def faulty_sample(model, arch, fault: str, steps=STEPS):
    """Samples with a custom sampler that breaks the one-evaluation-per-step rule at step 1: it evaluates the model
    `between` steps 1 and 2, `twice` at step 1, or `skips` step 1."""
    import comfy.sample
    import comfy.samplers

    def sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            if fault == "skips" and i == 1:
                continue
            sigma = (sigmas[1] + sigmas[2]) / 2 if fault == "between" and i == 1 else sigmas[i]
            denoised = model_k(x, sigma * s_in, **(extra_args or {}))
            if fault == "twice" and i == 1:
                denoised = model_k(x, sigma * s_in, **(extra_args or {}))
            x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
        return x

    latent = torch.zeros(1, 4, 16, 16)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 3), 7.0,
                                          comfy.samplers.KSAMPLER(sampler), sigmas, conditioning(arch, 11),
                                          conditioning(arch, 12), latent, seed=3, disable_pbar=True)


SAMPLER_FAULTS = {"between": "between the schedule's steps", "twice": "evaluated twice at step 1",
                  "skips": "skipped"}
