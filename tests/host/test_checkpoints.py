"""Random test checkpoints (scripts/make_test_checkpoint.py) against the real ComfyUI host.

- sd15-small is written to a file, loaded with comfy.sd.load_checkpoint_guess_config and sampled for one step;
- every arch (sd21v and sdxl included) is detected from its key/shape dict built on the meta device, with no file.
The `host` fixture (tests/conftest.py) boots ComfyUI with comfy_host.boot() before any of this touches comfy.*.
"""
from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))

import make_test_checkpoint as mtc  # noqa: E402  (imports no ComfyUI module until a function is called)

SD15_SMALL_UNET_PARAMS = 24_504_324
FULL_UNET_PARAMS = {"sd15": 859_520_964, "sd21v": 865_910_724, "sdxl": 2_567_463_684}
# What ComfyUI itself tolerates silently (debug log only) when a checkpoint's CLIP-L comes in the HF layout,
# as in the original SD1.5/SDXL files: no logit_scale/text_projection, an extra position_ids buffer.
CLIP_L_TOLERATED_MISSING = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
CLIP_L_TOLERATED_UNEXPECTED = {"clip_l.transformer.text_model.embeddings.position_ids"}


@pytest.fixture(scope="module")
def sd15_small_file(host, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sd15-small.safetensors"
    mtc.write_checkpoint(path, "sd15-small", seed=0)
    return path


def test_sd15_small_loads_as_sd15_eps_and_samples(sd15_small_file):
    info = mtc.verify_checkpoint(sd15_small_file, "sd15-small", sample=True, size=64)
    assert info["config"] == "SD15"
    assert info["model_type"] == "EPS"
    assert info["unet_params"] == SD15_SMALL_UNET_PARAMS
    assert info["latent_finite"] and info["image_finite"]
    assert not [w for w in info["warnings"] if "missing" in w.lower()]


def test_sd15_small_has_downsample_and_attention_at_level_0(host):
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample
    with torch.device("meta"):
        unet = UNetModel(**mtc.unet_config("sd15-small"), device="meta", operations=comfy.ops.disable_weight_init)
    assert isinstance(unet.input_blocks[1][1], SpatialTransformer)      # level 0, after the first ResBlock
    assert isinstance(unet.input_blocks[2][0], Downsample)
    assert any(isinstance(m, Upsample) for m in unet.output_blocks.modules())
    assert sum(p.numel() for p in unet.parameters()) == SD15_SMALL_UNET_PARAMS


def test_file_is_deterministic_and_matches_build_state_dict(sd15_small_file, tmp_path):
    again = tmp_path / "again.safetensors"
    mtc.write_checkpoint(again, "sd15-small", seed=0)
    assert filecmp.cmp(sd15_small_file, again, shallow=False)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was moved into place

    from safetensors import safe_open
    keys = ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "first_stage_model.decoder.conv_in.weight"]
    specs = {s.key: s for s in mtc.tensor_specs("sd15-small")}
    with safe_open(str(sd15_small_file), "pt") as f:
        assert sorted(f.keys()) == sorted(specs)
        for k in keys:
            assert torch.equal(f.get_tensor(k), mtc.materialize(specs[k], 0))
            assert not torch.equal(f.get_tensor(k), mtc.materialize(specs[k], 1))


@pytest.mark.parametrize("arch", mtc.ARCHS)
def test_detected_from_meta_state_dict(host, arch):
    sd = mtc.meta_state_dict(arch)
    cls_name, model_type, detected = mtc.detect(sd)
    assert (cls_name, model_type) == mtc.EXPECTED[arch]
    assert detected == mtc.unet_config(arch)  # detection reconstructs the exact UNet: all weights load
    if arch in FULL_UNET_PARAMS:
        assert mtc.param_counts(arch)["unet"] == FULL_UNET_PARAMS[arch]

    # The text encoder keys map onto ComfyUI's text encoder exactly (open_clip layout converted for sd21v/sdxl).
    import comfy.model_detection
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    model_config = comfy.model_detection.model_config_from_unet(sd, prefix)
    clip_sd = model_config.process_clip_state_dict(dict(sd))
    with torch.device("meta"):
        te = model_config.clip_target(state_dict=sd).clip(device="meta", dtype=torch.float16)
    ref = {k: tuple(v.shape) for k, v in te.state_dict().items()}
    assert set(ref) - set(clip_sd) <= CLIP_L_TOLERATED_MISSING
    assert set(clip_sd) - set(ref) <= CLIP_L_TOLERATED_UNEXPECTED
    assert {k: tuple(clip_sd[k].shape) for k in ref if k in clip_sd} == {k: s for k, s in ref.items() if k in clip_sd}


def test_sd21v_prediction_comes_from_the_norm_bias(host):
    sd = mtc.meta_state_dict("sd21v")
    assert torch.std(sd[mtc.VPRED_KEY].float(), unbiased=False) > 0.09
    sd[mtc.VPRED_KEY] = torch.zeros_like(sd[mtc.VPRED_KEY])
    assert mtc.detect(sd)[:2] == ("SD20", "EPS")
