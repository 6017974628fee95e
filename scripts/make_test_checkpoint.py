"""Writes a random-weight, single-file checkpoint that ComfyUI detects as a real SD1.5 / SD2.1-v / SDXL model.

    python scripts/make_test_checkpoint.py OUT.safetensors --arch {sd15,sd15-small,sd21v,sdxl} [--seed N] [--verify]

No weights are downloaded: every tensor is drawn from a seeded generator, so the same arch and seed give a
byte-identical file. Key names and shapes come from ComfyUI's own modules built on the `meta` device (UNetModel,
AutoencoderKL, the CLIP-L text model); the OpenCLIP text towers (SD2.x ViT-H, SDXL bigG) are written in the
open_clip layout that real checkpoints use, which ComfyUI converts on load.

Values (fp16): conv/linear weights U(+-1/sqrt(fan_in)) (PyTorch's default bound), norm weights 1, biases 0,
embeddings N(0, 0.02), open_clip `logit_scale` ln(1/0.07), CLIP-L `position_ids` 0..76 (int64, as in the original
files). Each tensor has its own generator, seeded from (seed, key), so values do not depend on the order in which
tensors are made, and a tensor shared by two archs under the same key (CLIP-L, VAE) is identical in both.

The file is streamed: the safetensors header is computed from the shapes, then one tensor at a time is drawn and
written, so even SDXL (~7 GB) needs only about one tensor of RAM. It is written to a temporary file in the target
directory and moved into place with os.replace.

Archs:
  sd15        SD1.5 (UNet 859,520,964 params), detected as comfy.supported_models.SD15, EPS.
  sd15-small  The smallest UNet still detected as SD15 without registering a config (see SMALL_SD15 below);
              CLIP-L and the VAE stay full size (their configs are fixed in ComfyUI).
  sd21v       SD2.1-768-v: detected as SD20 with model type V_PREDICTION (see VPRED_KEY below).
  sdxl        SDXL base: detected as SDXL, EPS.

Importable: unet_config(arch), build_state_dict(arch, seed), meta_state_dict(arch), iter_state_dict(arch, seed),
write_checkpoint(path, arch, seed), detect(state_dict), verify_checkpoint(path, arch).
Anything that touches ComfyUI boots it first through scripts/comfy_host.py (CPU mode, no plugin), unless the
process has already imported ComfyUI (for example inside a running ComfyUI or a test session that booted it).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

ARCHS = ("sd15", "sd15-small", "sd21v", "sdxl")

# What ComfyUI must make of each arch: class name in comfy.supported_models and ModelType name.
EXPECTED = {
    "sd15": ("SD15", "EPS"),
    "sd15-small": ("SD15", "EPS"),
    "sd21v": ("SD20", "V_PREDICTION"),
    "sdxl": ("SDXL", "EPS"),
}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# --- UNet configs -------------------------------------------------------------------------------------------------
# Each dict is exactly what ComfyUI's detection produces for such a file (model_detection.detect_unet_config) plus
# the matched class's unet_extra_config, i.e. what BaseModel hands to UNetModel (less dtype/device/operations).

_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

_UNET_CONFIGS = {
    # = the SD15 reference dict in model_detection.unet_config_from_diffusers_unet, + SD15.unet_extra_config
    "sd15": dict(_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1),
    # SMALL_SD15: the smallest UNet that SD15.matches() still accepts and that detection reconstructs exactly.
    # SD15 matches on context_dim=768, model_channels=320, use_linear_in_transformer=False (1x1-conv proj_in),
    # adm_in_channels=None (no label_emb), use_temporal_attention=False; in_channels must stay 4 (8 would be taken
    # by Stable_Zero123 / SD15_instructpix2pix first). Everything else is free, within what detection can read back:
    # - two levels (the minimum with a Downsample/Upsample); channel_mult [1, 1] keeps level 1 at 320 channels;
    # - one ResBlock per level: detection derives channel_mult from each level's ResBlock, so a level without one
    #   would be read back as mult 0 and the weights would not load;
    # - one SpatialTransformer (depth 1) after level 0's encoder ResBlock (attention at full resolution), none in
    #   the decoder or at level 1;
    # - no middle block (transformer_depth_middle -2; detection reads "no middle_block keys" as -2).
    "sd15-small": dict(_COMMON, adm_in_channels=None, num_res_blocks=[1, 1], channel_mult=[1, 1],
                       transformer_depth=[1, 0], transformer_depth_middle=-2,
                       transformer_depth_output=[0, 0, 0, 0],
                       use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1),
    # = the SD21 reference dict, + SD20.unet_extra_config
    "sd21v": dict(_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                  transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                  use_linear_in_transformer=True, context_dim=1024, num_heads=-1, num_head_channels=64,
                  attn_precision=torch.float32),
    # = the SDXL reference dict, + BASE.unet_extra_config (SDXL has none of its own)
    "sdxl": dict(_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_linear_in_transformer=True, context_dim=2048, num_heads=-1, num_head_channels=64),
}

# SD20.model_type (comfy/supported_models.py) calls a 4-channel SD2.x UNet V_PREDICTION when
#     torch.std(state_dict[prefix + "output_blocks.11.1.transformer_blocks.0.norm1.bias"], unbiased=False) > 0.09
# (a trained 768-v model has a spread-out bias there; a zero-initialised or EPS one does not). For sd21v this
# LayerNorm bias (320 values) is written as +0.1, -0.1, +0.1, ... : mean 0, population std 0.1 (0.09998 in fp16),
# safely above the threshold. All other biases are 0, so sd15/sdxl are unaffected and the same UNet with a zero
# bias there would be detected as EPS.
VPRED_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
VPRED_BIAS = 0.1

# VAE: the SD/SDXL KL autoencoder exactly as comfy.sd.VAE builds it (sd.py, "default SD1.x/SD2.x VAE parameters").
_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# OpenCLIP text towers: (layers, width, mlp width); context 77, vocab 49408, projection width x width.
_OPEN_CLIP = {"vit_h": (24, 1024, 4096), "vit_bigg": (32, 1280, 5120)}

# Text encoders per arch: (kind, prefix).
_TEXT_ENCODERS = {
    "sd15": [("clip_l", "cond_stage_model.transformer.")],
    "sd15-small": [("clip_l", "cond_stage_model.transformer.")],
    "sd21v": [("vit_h", "cond_stage_model.model.")],
    "sdxl": [("clip_l", "conditioner.embedders.0.transformer."), ("vit_bigg", "conditioner.embedders.1.model.")],
}


def unet_config(arch: str) -> dict:
    """The UNet config as ComfyUI's UNetModel takes it: `UNetModel(**unet_config(arch))` builds this arch's UNet
    (add device=/operations=/dtype= as needed). A fresh copy on every call."""
    _check_arch(arch)
    return copy.deepcopy(_UNET_CONFIGS[arch])


def _check_arch(arch: str):
    if arch not in _UNET_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")


# --- ComfyUI access -----------------------------------------------------------------------------------------------

def ensure_comfy():
    """Boots ComfyUI (CPU mode, no plugin) unless this process has already imported it."""
    if "comfy.model_management" in sys.modules:
        return
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import comfy_host
    comfy_host.boot(load_plugin=False)


# --- tensor specs -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    key: str
    shape: tuple
    dtype: torch.dtype
    init: str            # uniform | ones | zeros | normal | arange | const | alternating
    param: float = 0.0   # uniform bound, normal std, const value, alternating amplitude


def _module_specs(module: torch.nn.Module, prefix: str, skip: tuple = ()) -> list[Spec]:
    """Specs for every parameter of a module built on the meta device, classified by the owning layer type."""
    conv_linear = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    out = []
    for mname, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if name in skip:
                continue
            shape = tuple(p.shape)
            key = prefix + name
            if isinstance(mod, conv_linear) and pname == "weight":
                fan_in = math.prod(shape[1:])
                out.append(Spec(key, shape, torch.float16, "uniform", 1.0 / math.sqrt(fan_in)))
            elif isinstance(mod, norms) and pname == "weight":
                out.append(Spec(key, shape, torch.float16, "ones"))
            elif isinstance(mod, conv_linear + norms) and pname == "bias":
                out.append(Spec(key, shape, torch.float16, "zeros"))
            elif isinstance(mod, torch.nn.Embedding) and pname == "weight":
                out.append(Spec(key, shape, torch.float16, "normal", 0.02))
            else:
                raise TypeError(f"{key}: no init rule for {type(mod).__name__}.{pname}")
        for bname, b in mod.named_buffers(recurse=False):
            if bname not in mod._non_persistent_buffers_set:
                raise TypeError(f"{prefix}{mname}.{bname}: unexpected persistent buffer")
    return out


def _unet_specs(arch: str) -> list[Spec]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**unet_config(arch), device="meta", operations=comfy.ops.disable_weight_init)
    specs = _module_specs(unet, UNET_PREFIX)
    if arch == "sd21v":
        specs = [Spec(s.key, s.shape, s.dtype, "alternating", VPRED_BIAS) if s.key == VPRED_KEY else s
                 for s in specs]
        assert any(s.key == VPRED_KEY for s in specs), VPRED_KEY
    return specs


def _vae_specs() -> list[Spec]:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(_VAE_DDCONFIG), embed_dim=4)
    return _module_specs(vae, VAE_PREFIX)


def _clip_l_specs(prefix: str) -> list[Spec]:
    """CLIP-L in the HF layout (`<prefix>text_model.*`), as the original SD1.5/SDXL files have it: no
    text_projection (the HF CLIPTextModel has none) and an int64 `embeddings.position_ids` buffer."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    cfg_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = json.loads(cfg_path.read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    specs = _module_specs(model, prefix, skip=("text_projection.weight",))
    specs.append(Spec(prefix + "text_model.embeddings.position_ids", (1, config["max_position_embeddings"]),
                      torch.int64, "arange"))
    return specs


def _open_clip_specs(kind: str, prefix: str) -> list[Spec]:
    """An OpenCLIP text tower in open_clip's own key layout (what SD2.x `cond_stage_model.model.*` and SDXL
    `conditioner.embedders.1.model.*` hold); ComfyUI maps it with utils.clip_text_transformers_convert."""
    layers, width, mlp = _OPEN_CLIP[kind]
    ctx, vocab = 77, 49408
    f16 = torch.float16
    u = lambda fan_in: 1.0 / math.sqrt(fan_in)  # noqa: E731
    specs = [
        Spec(prefix + "positional_embedding", (ctx, width), f16, "normal", 0.02),
        Spec(prefix + "token_embedding.weight", (vocab, width), f16, "normal", 0.02),
        Spec(prefix + "ln_final.weight", (width,), f16, "ones"),
        Spec(prefix + "ln_final.bias", (width,), f16, "zeros"),
        Spec(prefix + "text_projection", (width, width), f16, "uniform", u(width)),  # used as x @ text_projection
        Spec(prefix + "logit_scale", (), f16, "const", math.log(1 / 0.07)),
    ]
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        specs += [
            Spec(p + "ln_1.weight", (width,), f16, "ones"),
            Spec(p + "ln_1.bias", (width,), f16, "zeros"),
            Spec(p + "attn.in_proj_weight", (3 * width, width), f16, "uniform", u(width)),
            Spec(p + "attn.in_proj_bias", (3 * width,), f16, "zeros"),
            Spec(p + "attn.out_proj.weight", (width, width), f16, "uniform", u(width)),
            Spec(p + "attn.out_proj.bias", (width,), f16, "zeros"),
            Spec(p + "ln_2.weight", (width,), f16, "ones"),
            Spec(p + "ln_2.bias", (width,), f16, "zeros"),
            Spec(p + "mlp.c_fc.weight", (mlp, width), f16, "uniform", u(width)),
            Spec(p + "mlp.c_fc.bias", (mlp,), f16, "zeros"),
            Spec(p + "mlp.c_proj.weight", (width, mlp), f16, "uniform", u(mlp)),
            Spec(p + "mlp.c_proj.bias", (width,), f16, "zeros"),
        ]
    return specs


_SPEC_CACHE: dict = {}


def tensor_specs(arch: str) -> list[Spec]:
    """Every tensor of the checkpoint (key, shape, dtype, init rule), sorted by key: the file's order."""
    _check_arch(arch)
    if arch not in _SPEC_CACHE:
        ensure_comfy()
        specs = _unet_specs(arch) + _vae_specs()
        for kind, prefix in _TEXT_ENCODERS[arch]:
            specs += _clip_l_specs(prefix) if kind == "clip_l" else _open_clip_specs(kind, prefix)
        specs.sort(key=lambda s: s.key)
        keys = [s.key for s in specs]
        assert len(set(keys)) == len(keys), "duplicate keys"
        _SPEC_CACHE[arch] = specs
    return list(_SPEC_CACHE[arch])


def part_of(key: str) -> str:
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    return "text"


# --- values -------------------------------------------------------------------------------------------------------

def _seed_for(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"fisedit-test-ckpt/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def materialize(spec: Spec, seed: int) -> torch.Tensor:
    """The tensor for one spec; depends only on (seed, spec), never on other tensors."""
    if spec.init == "arange":
        n = spec.shape[-1]
        return torch.arange(n, dtype=spec.dtype).reshape(spec.shape)
    t = torch.empty(spec.shape, dtype=spec.dtype)
    if spec.init == "uniform":
        t.uniform_(-spec.param, spec.param, generator=torch.Generator().manual_seed(_seed_for(seed, spec.key)))
    elif spec.init == "normal":
        t.normal_(0.0, spec.param, generator=torch.Generator().manual_seed(_seed_for(seed, spec.key)))
    elif spec.init == "ones":
        t.fill_(1.0)
    elif spec.init == "zeros":
        t.zero_()
    elif spec.init == "const":
        t.fill_(spec.param)
    elif spec.init == "alternating":
        flat = t.view(-1)
        flat[0::2] = spec.param
        flat[1::2] = -spec.param
    else:
        raise ValueError(spec.init)
    return t


def iter_state_dict(arch: str, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time, in file order; nothing is kept."""
    for spec in tensor_specs(arch):
        yield spec.key, materialize(spec, seed)


def build_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole checkpoint in memory (sdxl: ~7 GB). Same values as the file written by write_checkpoint."""
    return dict(iter_state_dict(arch, seed))


_CHEAP_INITS = ("arange", "const", "alternating")  # seed-independent; detection may read their values


def meta_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Key -> tensor with the real shape and dtype but no data (meta device), except the few seed-independent
    constants that detection reads values from (the SD2 v-prediction bias, position_ids, logit_scale), which are
    real. Enough for comfy.model_detection and for model_type()."""
    return {s.key: materialize(s, 0) if s.init in _CHEAP_INITS else torch.empty(s.shape, dtype=s.dtype, device="meta")
            for s in tensor_specs(arch)}


def param_counts(arch: str) -> dict[str, int]:
    """Elements per part (as comfy.utils.calculate_parameters counts them: every tensor under the prefix)."""
    counts = {"unet": 0, "text": 0, "vae": 0}
    for s in tensor_specs(arch):
        counts[part_of(s.key)] += math.prod(s.shape)
    return counts


# --- safetensors writer -------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def _header(specs: list[Spec], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        n = math.prod(s.shape) * (torch.finfo(s.dtype).bits if s.dtype.is_floating_point
                                  else torch.iinfo(s.dtype).bits) // 8
        header[s.key] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def write_checkpoint(path: str | os.PathLike, arch: str, seed: int = 0) -> dict:
    """Streams the checkpoint to `path` (atomically). Returns {"bytes", "seconds", "counts"}."""
    t0 = time.perf_counter()
    specs = tensor_specs(arch)
    metadata = {"format": "pt", "fisedit_test_arch": arch, "fisedit_test_seed": str(seed),
                "generator": "FISEdit scripts/make_test_checkpoint.py (random weights)"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header(specs, metadata))
            for spec in specs:
                t = materialize(spec, seed)
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # raw little-endian bytes, no copy
                del t
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return {"bytes": path.stat().st_size, "seconds": time.perf_counter() - t0, "counts": param_counts(arch)}


# --- detection and verification -----------------------------------------------------------------------------------

def detect(state_dict: dict) -> tuple[str, str, dict]:
    """What ComfyUI's checkpoint loader concludes from these keys/shapes (and the few values it reads):
    (config class name, ModelType name, detected unet_config incl. the class's extra config)."""
    ensure_comfy()
    import comfy.model_detection
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    model_config = comfy.model_detection.model_config_from_unet(state_dict, prefix)
    if model_config is None:
        raise RuntimeError("ComfyUI could not detect the model type")
    model_type = model_config.model_type(state_dict, prefix)
    return type(model_config).__name__, model_type.name, dict(model_config.unet_config)


def _sample_once(model, clip, vae, seed: int = 0, size: int = 64) -> dict:
    import nodes
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    samples = nodes.common_ksampler(model, seed, 1, 7.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    image = vae.decode(samples)
    return {"latent": samples, "image": image}


def verify_checkpoint(path: str | os.PathLike, arch: str, sample: bool = True, size: int = 64) -> dict:
    """Loads the file with comfy.sd.load_checkpoint_guess_config, checks the detected class and model type and
    that no UNet/VAE/CLIP weights were reported missing, and (sample=True) runs a 1-step euler KSampler at
    `size` px plus VAE decode, checking that everything is finite. Returns what it found; raises on failure."""
    import logging
    ensure_comfy()
    import comfy.sd
    import comfy.utils

    warnings: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    info: dict = {}
    try:
        t0 = time.perf_counter()
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        info["load_s"] = time.perf_counter() - t0
        base = model.model
        info["config"] = type(base.model_config).__name__
        info["model_type"] = base.model_type.name
        info["unet_params"] = sum(p.numel() for p in base.diffusion_model.parameters())
        want_cls, want_type = EXPECTED[arch]
        if (info["config"], info["model_type"]) != (want_cls, want_type):
            raise AssertionError(f"{path}: detected {info['config']}/{info['model_type']}, "
                                 f"expected {want_cls}/{want_type}")
        detected = {k: v for k, v in base.model_config.unet_config.items() if k != "dtype"}
        if detected != unet_config(arch):
            raise AssertionError(f"detected unet_config differs from unet_config({arch!r}):\n"
                                 f"  {detected}\n  {unet_config(arch)}")
        if sample:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = _sample_once(model, clip, vae, size=size)
            info["sample_s"] = time.perf_counter() - t0
            info["latent_finite"] = bool(torch.isfinite(out["latent"]).all())
            info["image_finite"] = bool(torch.isfinite(out["image"]).all())
            info["image_mean"] = float(out["image"].float().mean())
            if not (info["latent_finite"] and info["image_finite"]):
                raise AssertionError(f"non-finite output: {info}")
    finally:
        root.removeHandler(handler)
    info["warnings"] = warnings
    missing = [w for w in warnings if "missing" in w.lower()]
    if missing:
        raise AssertionError(f"ComfyUI reported missing weights: {missing}")
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action="store_true",
                        help="then load it with ComfyUI's checkpoint loader and run 1 KSampler step at 64x64")
    a = parser.parse_args(argv)
    t0 = time.perf_counter()
    ensure_comfy()
    cls, mtype, _ = detect(meta_state_dict(a.arch))
    want = EXPECTED[a.arch]
    if (cls, mtype) != want:
        raise SystemExit(f"{a.arch}: the key/shape layout is detected as {cls}/{mtype}, expected {want[0]}/{want[1]}")
    res = write_checkpoint(a.out, a.arch, a.seed)
    c = res["counts"]
    line = (f"arch={a.arch} seed={a.seed} detected={cls}/{mtype} params: unet={c['unet']:,} text={c['text']:,} "
            f"vae={c['vae']:,} file={res['bytes']:,} B ({res['bytes'] / 2**30:.2f} GiB) "
            f"write={res['seconds']:.1f}s")
    if a.verify:
        info = verify_checkpoint(a.out, a.arch)
        line += (f" verify: loaded as {info['config']}/{info['model_type']} in {info['load_s']:.1f}s, "
                 f"1-step 64px sample+decode {info['sample_s']:.1f}s, finite, image mean {info['image_mean']:.3f}")
    print(line + f" total={time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
