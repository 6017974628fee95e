"""The toy model's three networks, built from ComfyUI's own classes, and its weights files.

- UNet: comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel with SD1.5's structure at a small width: three
  levels (64, 128, 128 channels) with two ResBlocks each, a SpatialTransformer (self- and cross-attention, 1x1-conv
  projections as in SD1.5) after every ResBlock and in the middle block, eps prediction. At 256x256 images the
  latent is 32x32, so levels 0 and 1 (1024 and 256 positions) run sparse in FISEdit's layout and level 2 (8x8)
  runs dense, as the 64x64/32x32/16x16 levels and the 8x8 level of SD1.5 at 512 px do.
- Text encoder: ComfyUI's CLIP text transformer (causal attention, final LayerNorm, SD1's "last" layer), 4 layers
  of width 256 over the caption grammar's word vocabulary instead of CLIP's 49408 BPE tokens.
- VAE: ComfyUI's AutoencoderKL (the SD VAE's Encoder/Decoder) at width 32, ch_mult [1, 2, 4, 4]: 8x down, 4 latent
  channels, as FISEdit assumes.

Weights are one safetensors file, or shards NAME-0000i-of-0000n.safetensors when a size cap is given (the GPU
machine returns files of at most 16 MiB), with the keys of an SD checkpoint (model.diffusion_model.,
cond_stage_model., first_stage_model.) and a metadata header that makes the file self-describing: the three
configs, the vocabulary, the latent shift and scale and the latent-to-RGB preview factors fitted after VAE
training.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import captions

FORMAT = "fisedit-toyworld/1"
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."
CLIP_NAME = "toyworld"  # the text encoder's key in ComfyUI's token dicts and state dict

UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1],
    "context_dim": 256, "use_linear_in_transformer": False, "num_heads": -1, "num_head_channels": 32,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_temporal_resblock": False, "use_temporal_attention": False, "use_checkpoint": False,
}
TEXT_CONFIG = {
    "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024,
    "hidden_act": "gelu", "max_position_embeddings": captions.MAX_TOKENS, "eos_token_id": captions.END,
    "vocab_size": len(captions.VOCAB),
}
VAE_CONFIG = {
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "embed_dim": 4,
}
LATENT_DOWNSCALE = 8


# --- ComfyUI ------------------------------------------------------------------------------------------------------

def comfyui_path() -> Path:
    """COMFYUI_PATH, else the ComfyUI this plugin sits in (custom_nodes/<plugin>), else the repo's .comfyui/."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if repo.parent.name == "custom_nodes":
        return repo.parent.parent
    return repo / ".comfyui"


def import_comfy() -> None:
    """Makes ComfyUI's `comfy` package importable for scripts (training, benchmarks) without booting the host:
    puts it on sys.path and sets the flags that must precede comfy.model_management's import (CPU mode without
    CUDA, PyTorch SDPA attention). A no-op inside a running ComfyUI."""
    if "comfy.model_management" in sys.modules:
        return
    path = comfyui_path()
    if not (path / "comfy" / "model_patcher.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path}: set COMFYUI_PATH, or run scripts/setup_host.sh")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options  # noqa: F401  (argument parsing stays off: args keep their defaults)
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    args.use_pytorch_cross_attention = True


def _text_transformer_class():
    import comfy.clip_model

    class ToyTextTransformer(comfy.clip_model.CLIPTextModel):
        """ComfyUI's CLIP text model with an embedding table of the grammar's size instead of CLIP's 49408 BPE
        tokens (CLIPTextModel_ hard-codes that size), and no text projection (nothing reads the pooled output:
        SD1-style UNets take only the per-token sequence)."""

        def __init__(self, config_dict, dtype, device, operations):
            super().__init__(config_dict, dtype, "meta", operations)  # meta: skip allocating the 49408-row table
            self.text_model.embeddings = comfy.clip_model.CLIPEmbeddings(
                config_dict["hidden_size"], vocab_size=config_dict["vocab_size"],
                num_positions=config_dict["max_position_embeddings"], dtype=dtype, device=device,
                operations=operations)
            self.text_projection = torch.nn.Identity()
            self.to_empty(device=device or "cpu")  # the meta-built rest gets real (uninitialised) storage

    return ToyTextTransformer


def text_transformer_class():
    global _TEXT_CLS
    if _TEXT_CLS is None:
        _TEXT_CLS = _text_transformer_class()
    return _TEXT_CLS


_TEXT_CLS = None


# --- building the networks for training ---------------------------------------------------------------------------

def _reset(module: torch.nn.Module) -> None:
    """PyTorch's default initialisation. ComfyUI's ops make reset_parameters a no-op (weights normally come from
    a file), so call the torch.nn base class's own."""
    for m in module.modules():
        for base in type(m).__mro__:
            if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
                base.reset_parameters(m)
                break


def _zero(*modules) -> None:
    for m in modules:
        for p in m.parameters():
            torch.nn.init.zeros_(p)


def build_unet(device="cpu", config: dict | None = None, zero_init: bool = True) -> torch.nn.Module:
    """The UNet with fresh weights: PyTorch's default init, and (zero_init) SD's zero init of every residual
    branch's last layer and of the output conv, so each block starts as the identity and training starts stable.
    Without it every layer is random, so that the text reaches the output (tests of untrained weights)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
    unet = UNetModel(**(config or UNET_CONFIG), device=device, operations=comfy.ops.disable_weight_init)
    _reset(unet)
    if not zero_init:
        return unet
    for m in unet.modules():
        if isinstance(m, ResBlock):
            _zero(m.out_layers[-1])
        elif isinstance(m, SpatialTransformer):
            _zero(m.proj_out)
    _zero(unet.out[-1])
    return unet


def _layer_forward_out_of_place(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward with `x = x + ...` for its in-place `x += ...`, which autograd cannot
    differentiate through; the same arithmetic."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def build_text_encoder(device="cpu", config: dict | None = None) -> torch.nn.Module:
    """The text transformer (the `transformer` inside ComfyUI's SDClipModel) with fresh weights (CLIP's normal
    initialisation of the embeddings, PyTorch's default for the rest), made trainable: each layer's forward is
    replaced, on this instance only, by an out-of-place one."""
    import types
    import_comfy()
    import comfy.ops
    cfg = config or TEXT_CONFIG
    model = text_transformer_class()(dict(cfg), torch.float32, device, comfy.ops.disable_weight_init)
    _reset(model)
    emb = model.text_model.embeddings
    torch.nn.init.normal_(emb.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)
    for layer in model.text_model.encoder.layers:
        layer.forward = types.MethodType(_layer_forward_out_of_place, layer)
    return model


def encode_tokens(text_encoder: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, 77, width]: what ComfyUI's SDClipModel (layer "last", no attention mask: causal only) returns for these
    token ids, in a differentiable form for training."""
    return text_encoder(tokens, None, num_tokens=None, intermediate_output=None, dtype=torch.float32)[0]


def build_vae(device="cpu", config: dict | None = None) -> torch.nn.Module:
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    cfg = config or VAE_CONFIG
    vae = AutoencoderKL(ddconfig=dict(cfg["ddconfig"]), embed_dim=cfg["embed_dim"]).to(device)
    _reset(vae)
    return vae


# --- state dicts and files ----------------------------------------------------------------------------------------

def full_state_dict(unet, text_encoder, vae, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Checkpoint-style keys: what comfy_models.load() splits again. The text encoder sits inside SD1ClipModel
    (`<CLIP_NAME>.transformer.`), with SDClipModel's logit_scale, so ComfyUI's CLIP loads it without gaps."""
    sd = {}
    for prefix, module in ((UNET_PREFIX, unet), (TEXT_PREFIX + CLIP_NAME + ".transformer.", text_encoder),
                           (VAE_PREFIX, vae)):
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.detach().to("cpu", dtype).contiguous()
    sd[TEXT_PREFIX + CLIP_NAME + ".logit_scale"] = torch.tensor(4.6055, dtype=dtype)
    return sd


def metadata(latent_shift: float, latent_scale: float, rgb_factors: list, rgb_bias: list,
             training: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "unet_config": json.dumps(UNET_CONFIG),
        "text_config": json.dumps(TEXT_CONFIG),
        "vae_config": json.dumps(VAE_CONFIG),
        "vocab": json.dumps(list(captions.VOCAB)),
        "latent_shift": repr(float(latent_shift)),
        "latent_scale": repr(float(latent_scale)),
        "latent_rgb_factors": json.dumps(rgb_factors),
        "latent_rgb_factors_bias": json.dumps(rgb_bias),
        "training": json.dumps(training or {}),
    }


def random_weights(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """An untrained model's weights and metadata (tests run the whole pipeline on these)."""
    torch.manual_seed(seed)
    unet, text, vae = build_unet(zero_init=False), build_text_encoder(), build_vae()
    rgb = [[0.35, 0.23, 0.32], [0.33, 0.50, 0.24], [-0.28, 0.18, 0.27], [-0.21, -0.26, -0.72]]
    return full_state_dict(unet, text, vae), metadata(0.0, 1.0, rgb, [0.0, 0.0, 0.0], {"random_init_seed": seed})


def shard_names(name: str, n: int) -> list[str]:
    if n == 1:
        return [f"{name}.safetensors"]
    return [f"{name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def save_weights(folder: str | os.PathLike, name: str, sd: dict[str, torch.Tensor], meta: dict,
                 max_shard_bytes: int | None = None) -> list[Path]:
    """Writes `sd` as NAME.safetensors, or as shards of at most `max_shard_bytes` each; every shard carries the
    metadata. Files are written under a temporary name and renamed. Returns the paths."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    paths = []
    for part, fname in zip(shards, shard_names(name, len(shards)), strict=True):
        path = folder / fname
        tmp = path.with_name(f".{fname}.tmp")
        save_file(part, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def weight_sets(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Name -> its files, for every complete weights set in `folder` (NAME.safetensors or all n shards)."""
    import re
    folder = Path(folder)
    sets: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return sets
    shard = re.compile(r"^(?P<name>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
    groups: dict[tuple[str, int], list[Path]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        m = shard.match(path.name)
        if m:
            groups.setdefault((m["name"], int(m["n"])), []).append(path)
        else:
            sets[path.name[: -len(".safetensors")]] = [path]
    for (name, n), paths in groups.items():
        if len(paths) == n:
            sets.setdefault(name, paths)
    return sets


def load_weights(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    sd, meta = {}, None
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta = meta or f.metadata()
            for k in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sd[k] = f.get_tensor(k)
    if not meta or meta.get("format") != FORMAT:
        raise ValueError(f"{paths[0]} is not a FISEdit toy-world weights file (metadata format "
                         f"{(meta or {}).get('format')!r}, expected {FORMAT!r})")
    return sd, meta


def parameter_counts(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    counts = {"unet": 0, "text": 0, "vae": 0}
    for k, v in sd.items():
        part = "unet" if k.startswith(UNET_PREFIX) else "text" if k.startswith(TEXT_PREFIX) else "vae"
        counts[part] += v.numel()
    return counts


def fit_latent_preview(latents: torch.Tensor, images: torch.Tensor) -> tuple[list, list]:
    """Least-squares linear map from a (scaled) latent pixel to its 8x8 block's mean colour in -1..1: ComfyUI's
    latent preview (and FISEdit's mask preview) draws latents with it, without the VAE."""
    blocks = torch.nn.functional.avg_pool2d(images.float() * 2 - 1, LATENT_DOWNSCALE)       # [B, 3, h, w]
    x = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = blocks.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    sol = torch.linalg.lstsq(x1, y).solution                                                 # [C + 1, 3]
    return sol[:-1].tolist(), sol[-1].tolist()


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"

