"""Edit nodes: where to edit (FISEditDifferenceMask), the sparse re-sampling itself (FISEditSparseKSampler), and the
decode that pastes the edited region over the original image (FISEditDecode)."""
from __future__ import annotations

from fisedit_engine import api
from fisedit_engine import comfy_adapter as host
from fisedit_engine.edit import STATS_MODES
from fisedit_engine.plan import DEFAULT_TILE

from .cache_nodes import CACHE_TYPE
from .spec import In, NodeSpec, Out, Result

EDIT_TYPE = "FISEDIT_EDIT"


def _difference_mask(inputs: dict, hidden: dict):
    return api.difference_mask(inputs["model"], inputs["cache"], inputs["positive"], inputs["mask_mode"],
                               inputs["user_mask"], inputs["dilate"], inputs["probe_steps"], inputs["threshold"],
                               inputs["edit_size"], inputs["attention_control"], vae=inputs["vae"],
                               progress=host.progress_bar, control_steps=inputs["attention_control_steps"] or None,
                               word_attention=inputs["word_attention"])


def _sparse_sample(inputs: dict, hidden: dict):
    latent, cache = api.sparse_sample(inputs["model"], inputs["edit"], inputs["dense_tail"], inputs["gn_statistics"],
                                      inputs["tile_size"], progress=host.sampling_progress)
    if cache is inputs["edit"].cache:
        summary = "FISEdit: the mask is empty; the original is returned unchanged"
    else:
        summary = cache.edit_summary
    return Result((latent, cache), {"text": [summary]})


def _decode(inputs: dict, hidden: dict):
    return (api.decode(inputs["vae"], inputs["samples"], inputs["edit"]),)


DIFFERENCE_MASK = NodeSpec(
    node_id="FISEditDifferenceMask", display_name="FISEdit Difference Mask",
    description=("Finds where the edited prompt changes the cached image. auto: runs the first steps with the "
                 "edited prompt (the probe; its progress shows on this node) and keeps where the latent departs from "
                 "the cached one and the changed words look; user: your mask; auto+user: both. The sparse sampler continues from the probe "
                 "instead of redoing it."),
    inputs=(
        In("model", "MODEL", "The model of the cached generation."),
        In("cache", CACHE_TYPE, "The cached generation to edit (FISEditCacheStore or Load)."),
        In("positive", "CONDITIONING", "The edited prompt, encoded with the generation's CLIP."),
        In("mask_mode", "COMBO", ("auto: find the region from the prompt change (where the latent departs from the "
                                  "cached one, weighted by where the changed words look in the cross-attention). "
                                  "user: recompute the region of "
                                  "user_mask. auto+user: the union of both."),
           options=api.MASK_MODES, default="auto"),
        In("probe_steps", "INT", ("Steps run with the edited prompt to find the region (auto modes). 0: 20% of the "
                                  "cached steps, the paper's 10 of 50. They are not recomputed later."),
           default=0, min=0, max=10000),
        In("threshold", "COMBO", ("otsu: split the difference map automatically. edit_size: keep the edit_size share "
                                  "of the area that changed most."),
           options=api.THRESHOLDS, default="otsu"),
        In("edit_size", "FLOAT", "With threshold edit_size: the share of the image to recompute, at most (weak "
                                 "regions are dropped from it; dilate adds to it).",
           default=0.15, min=0.01, max=1.0, step=0.01),
        In("dilate", "INT", "Grow the mask by this many latent pixels (8 image pixels each) so the edit can blend in.",
           default=1, min=0, max=64),
        In("attention_control", "BOOLEAN", (
            "auto modes: during the probe, the cross-attention maps of the prompt positions the edit left unchanged "
            "(the common start of both prompts) follow the original's, at the share of attention the edited prompt "
            "gives them (new words keep theirs), so the change concentrates where the edited words act."),
           default=True),
        In("user_mask", "MASK", "user modes: the region to edit, at the image's size (white = edit).", optional=True),
        In("vae", "VAE", ("Optional, the generation's VAE: the auto mask (threshold otsu) then follows the edges of "
                          "the original image, and of the image the probe predicts (where an edit adds an object), "
                          "to the pixel instead of the latent grid's 8-pixel cells, and the preview shows the decoded "
                          "image. The decoded original is kept with the cache, so FISEditDecode does not decode it "
                          "again."), optional=True),
        In("attention_control_steps", "INT", ("With attention_control: control the first N probe steps only "
                                              "(prompt-to-prompt's cross_replace_steps); the later ones follow the "
                                              "edited prompt's own attention. 0: every probe step. 1 found added "
                                              "objects best on the toy model."),
           optional=True, default=api.CONTROL_STEPS, min=0, max=10000),
        In("word_attention", "BOOLEAN", ("auto modes: weight the latent difference by where the changed words look "
                                         "(their cross-attention in the probe, and the original's from the cache), "
                                         "so that other objects the model redraws stay out of the mask. Measured on "
                                         "the toy model only; off: the difference alone."),
           optional=True, default=True),
    ),
    outputs=(
        Out("edit", EDIT_TYPE, "The edit: connect it to FISEditSparseKSampler and FISEditDecode."),
        Out("mask", "MASK", "The region that will be recomputed, at image resolution (dilated)."),
        Out("preview", "IMAGE", ("The cached image (decoded with the vae if connected, else ComfyUI's fast latent "
                                 "preview) with the region tinted red.")),
    ),
    run=_difference_mask,
)

SPARSE_KSAMPLER = NodeSpec(
    node_id="FISEditSparseKSampler", display_name="FISEdit Sparse KSampler",
    description=("Re-runs the cached generation with the edited prompt, computing only the edit's region; "
                 "everything outside the mask stays exactly as it was. Sampler, steps, seed, cfg and the negative "
                 "prompt come from the cache. The probe steps are replayed (they pass at once on the progress bar)."),
    inputs=(
        In("model", "MODEL", "The same model the cached generation used."),
        In("edit", EDIT_TYPE, "The edit from FISEditDifferenceMask."),
        In("dense_tail", "FLOAT", ("Fraction of the last steps to compute densely (fresh context everywhere) to soften "
                                   "seams; outside the mask the result stays exact either way. 0 = fastest."),
           optional=True, default=0.0, min=0.0, max=1.0, step=0.05),
        In("gn_statistics", "COMBO", ("exact: GroupNorm statistics of the whole map (cached outside, fresh inside). "
                                      "cached: the original run's statistics (the paper's approximation)."),
           optional=True, options=STATS_MODES, default="exact"),
        In("tile_size", "INT", ("Side of the tiles the sparse levels are computed in, in latent pixels. 0: chosen "
                                "per level by a cost model calibrated on the GPU (the edit's summary names the sizes "
                                f"and the calibration; without one, {DEFAULT_TILE})."),
           optional=True, default=0, min=0, max=64),
    ),
    outputs=(
        Out("latent", "LATENT", "The edited latent: decode it with VAEDecode (or FISEditDecode)."),
        Out("cache", CACHE_TYPE, "The edited result as a new cache: the base for the next edit."),
    ),
    run=_sparse_sample,
)

DECODE = NodeSpec(
    node_id="FISEditDecode", display_name="FISEdit Decode",
    description=("Decodes an edit: only the edited region goes through the VAE and is pasted over the original "
                 "image, so every pixel outside the dilated mask is exactly the original's, and decoding costs a "
                 "fraction of a full decode."),
    inputs=(
        In("vae", "VAE", "The VAE of the generation."),
        In("samples", "LATENT", "The latent output of FISEditSparseKSampler."),
        In("edit", EDIT_TYPE, "The same edit that went into FISEditSparseKSampler."),
    ),
    outputs=(Out("image", "IMAGE", "The edited image."),),
    run=_decode,
)

SPECS = (DIFFERENCE_MASK, SPARSE_KSAMPLER, DECODE)
