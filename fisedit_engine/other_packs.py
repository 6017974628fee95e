"""Other node packs' patches on a MODEL: which FISEdit honours, which need every edit step dense, which it refuses.

Checked before sampling starts, by the capture (which refuses what no edit could use) and by the edit (which also
refuses what its sparse steps cannot honour), so no run is wasted. A sparse step computes only the active tokens of
each block at its level, from cached values outside them; its output head composites every CFG prediction with the
cached one outside the mask. So:
- supported: weight patches (LoRA and other weight-space nodes: the weights are patched before sampling and the sparse
  ops read them through ComfyUI's casting; the model fingerprint covers them, so an edit must use the same patches at
  the same strengths); the time-embedding patch (one vector per sample, the same at every position); attention
  replacements at levels that run dense (the block's own forward runs there); object patches outside the UNet
  (ModelSamplingDiscrete and friends: the cache records the sigmas); `denoise_mask_function` (acts only on a latent
  noise mask, which FISEdit refuses anyway).
- dense only: patches that see a whole feature map or every token of a transformer block: FreeU's
  output_block_patch (statistics and a Fourier filter over the whole skip map: no value of it is local, so no region
  can be recomputed on its own), ToMe's attn1 patches (merge tokens across the map), attention replacements and
  object patches inside the sparse levels. A sparse step cannot reproduce them; an edit whose every step runs dense
  (dense_tail 1.0) runs the UNet's own forwards, which honour them, and still composites outside the mask.
- refused: whatever changes how the predictions are combined or evaluated: cfg functions (RescaleCFG's statistics
  over the whole image, PerturbedAttentionGuidance's and SelfAttentionGuidance's second model evaluation per step),
  model_function_wrapper, calc_cond_batch_function and other packs' sampling wrappers (EasyCache skips model calls).
  The outside-of-mask exactness rests on the combination being per position and on one evaluation per step and
  chunk; these break it in every step, dense or not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from . import comfy_adapter as host
from .cache import CacheError

log = logging.getLogger("FISEdit")

SUPPORTED, DENSE, REFUSED = "supported", "dense only", "refused"

_WHOLE_MAP = ("input_block_patch", "input_block_patch_after_skip", "output_block_patch", "middle_block_after_patch",
              "forward_timestep_embed_patch")
EVERY_TOKEN_PATCHES = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch", "middle_patch")
_BLOCK_PREFIX = {"input": "input_blocks.{}.", "output": "output_blocks.{}.", "middle": "middle_block."}


@dataclass(frozen=True)
class Verdict:
    patch: host.ModelPatch
    support: str
    why: str


def assess(patcher, layout, sparse_levels) -> list[Verdict]:
    """Each of `patcher`'s patches with whether the sparse edit supports it and why, for a generation whose
    `sparse_levels` (of `layout`, a layout.UNetLayout) run sparse."""
    sparse = set(sparse_levels)
    out = []
    for p in host.model_patches(patcher):
        support, why = _judge(p, layout, sparse)
        out.append(Verdict(p, support, why))
    return out


def _judge(p: host.ModelPatch, layout, sparse: set) -> tuple[str, str]:
    slot = p.slot
    if slot == "weights":
        return SUPPORTED, "weight patches are applied to the weights before sampling"
    if slot == "emb_patch":
        return SUPPORTED, "the time embedding is one vector per sample, the same at every position"
    if slot == "denoise_mask_function":
        return SUPPORTED, "it acts only on a latent noise mask, which FISEdit refuses anyway"
    if slot.endswith(" replace"):
        levels = _levels_of(layout, p.target)
        if levels and not levels & sparse:
            return SUPPORTED, "it replaces attention in a block that runs dense at this size"
        return DENSE, "it replaces attention in a block that runs sparse at this size"
    if slot == "object patch":
        if not p.target[0].startswith("diffusion_model."):
            return SUPPORTED, "it patches the model outside the UNet"
        return DENSE, f"it substitutes {p.target[0]}, inside the UNet the sparse steps compute themselves"
    if slot in _WHOLE_MAP:
        return DENSE, ("it rewrites whole feature maps between UNet blocks (FreeU rescales the skip features with "
                       "statistics and a Fourier filter over the whole map), so no region can be recomputed on its own")
    if slot in EVERY_TOKEN_PATCHES:
        return DENSE, ("it rewrites the attention inputs or outputs of every transformer block over all tokens (ToMe "
                       "merges tokens across the map), which a step that computes only the active tokens cannot "
                       "reproduce")
    if slot in ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function"):
        return REFUSED, ("it changes how the positive and negative predictions are combined in every step (over the "
                         "whole image, or with another model evaluation, as PerturbedAttentionGuidance and "
                         "SelfAttentionGuidance do), so pixels outside the edit's mask would change")
    if slot in ("model_function_wrapper", "sampler_calc_cond_batch_function"):
        return REFUSED, "it takes over the model calls of every step, and FISEdit cannot tell what it computes"
    if slot == "wrapper":
        return REFUSED, ("it wraps sampling or the model call (EasyCache, for instance, skips model calls), and "
                         "FISEdit cannot tell what it computes")
    return DENSE, "FISEdit does not know this UNet patch"


def _levels_of(layout, target: tuple) -> set[int]:
    """Resolution levels of the SpatialTransformers an attention replacement (block name, number[, index]) hits."""
    if len(target) < 2 or target[0] not in _BLOCK_PREFIX:
        return set()
    prefix = _BLOCK_PREFIX[target[0]].format(target[1])
    return {b.level for b in layout.blocks if b.kind == "transformer" and b.path.startswith(prefix)}


def _fix(v: Verdict) -> str:
    return f"remove {v.patch.node} from the model given to FISEditCacheCapture and to the edit nodes"


def check_capture(patcher, layout, sparse_levels) -> list[Verdict]:
    """Refuses, before sampling, a model no edit could use; warns about patches that will make edits run dense.
    Returns the verdicts."""
    verdicts = assess(patcher, layout, sparse_levels)
    refused = [v for v in verdicts if v.support == REFUSED]
    if refused:
        raise CacheError("FISEdit cannot cache this generation: " + "; ".join(
            f"{v.patch.describe()}: {v.why}. Fix: {_fix(v)}" for v in refused))
    for v in verdicts:
        if v.support == DENSE:
            log.warning("FISEdit: the captured model carries %s: %s. Edits of this capture must run every step dense "
                        "(FISEditSparseKSampler dense_tail 1.0), or %s", v.patch.describe(), v.why, _fix(v))
    return verdicts


def check_edit(patcher, layout, sparse_levels, every_step_dense: bool) -> list[Verdict]:
    """Refuses, before sampling, patches the edit cannot honour: refused ones always, dense-only ones unless every
    step of the edit runs dense. Returns the verdicts."""
    verdicts = assess(patcher, layout, sparse_levels)
    problems = [v for v in verdicts if v.support == REFUSED or (v.support == DENSE and not every_step_dense)]
    if problems:
        raise CacheError("FISEdit cannot run this edit: " + "; ".join(
            f"{v.patch.describe()}: {v.why}. Fix: " + (
                _fix(v) if v.support == REFUSED else
                f"set FISEditSparseKSampler's dense_tail to 1.0 (every step dense: exact outside the mask, no "
                f"speed-up), or {_fix(v)} and capture again") for v in problems))
    return verdicts
