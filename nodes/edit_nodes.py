"""Edit nodes: where to edit (FISEditDifferenceMask) and the sparse re-sampling itself (FISEditSparseKSampler)."""
from __future__ import annotations

from fisedit_engine import api
from fisedit_engine.edit import STATS_MODES
from fisedit_engine.plan import DEFAULT_TILE

from .cache_nodes import CACHE_TYPE, CATEGORY

EDIT_TYPE = "FISEDIT_EDIT"


class FISEditDifferenceMask:
    DESCRIPTION = ("Finds where the edited prompt changes the cached image. auto: runs the first steps with the "
                   "edited prompt (the probe) and keeps where the latent departs from the cached one; user: your "
                   "mask; auto+user: both. The sparse sampler continues from the probe instead of redoing it.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = (EDIT_TYPE, "MASK", "IMAGE")
    RETURN_NAMES = ("edit", "mask", "preview")
    OUTPUT_TOOLTIPS = ("The edit: connect it to FISEditSparseKSampler and FISEditDecode.",
                       "The region that will be recomputed, at image resolution (dilated).",
                       "The cached image (ComfyUI's fast latent preview) with the region tinted red.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model of the cached generation."}),
                "cache": (CACHE_TYPE, {"tooltip": "The cached generation to edit (FISEditCacheStore or Load)."}),
                "positive": ("CONDITIONING", {"tooltip": "The edited prompt, encoded with the generation's CLIP."}),
                "mask_mode": (list(api.MASK_MODES), {"default": "auto", "tooltip": (
                    "auto: find the region from the prompt change. user: recompute the region of user_mask. "
                    "auto+user: the union of both.")}),
                "probe_steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": (
                    "Steps run with the edited prompt to find the region (auto modes). 0: 20% of the cached steps, "
                    "the paper's 10 of 50. They are not recomputed later.")}),
                "threshold": (list(api.THRESHOLDS), {"default": "otsu", "tooltip": (
                    "otsu: split the difference map automatically. edit_size: keep the edit_size share of the "
                    "area that changed most.")}),
                "edit_size": ("FLOAT", {"default": 0.15, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                    "With threshold edit_size: the share of the image to recompute.")}),
                "dilate": ("INT", {"default": 1, "min": 0, "max": 64, "tooltip": (
                    "Grow the mask by this many latent pixels (8 image pixels each) so the edit can blend in.")}),
                "attention_control": ("BOOLEAN", {"default": True, "tooltip": (
                    "auto modes: during the probe, the cross-attention maps of the prompt positions the edit left "
                    "unchanged (the common start of both prompts) are the original's, so the change concentrates "
                    "where the edited words act.")}),
            },
            "optional": {
                "user_mask": ("MASK", {"tooltip": "user modes: the region to edit, at the image's size (white = edit)."}),
            },
        }

    def execute(self, model, cache, positive, mask_mode, probe_steps, threshold, edit_size, dilate, attention_control,
                user_mask=None):
        return api.difference_mask(model, cache, positive, mask_mode, user_mask, dilate, probe_steps, threshold,
                                   edit_size, attention_control)


class FISEditSparseKSampler:
    DESCRIPTION = ("Re-runs the cached generation with the edited prompt, computing only the edit's region; "
                   "everything outside the mask stays exactly as it was. Sampler, steps, seed, cfg and the negative "
                   "prompt come from the cache.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("LATENT", CACHE_TYPE)
    RETURN_NAMES = ("latent", "cache")
    OUTPUT_TOOLTIPS = ("The edited latent: decode it with VAEDecode (or FISEditDecode).",
                       "The edited result as a new cache: the base for the next edit.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The same model the cached generation used."}),
                "edit": (EDIT_TYPE, {"tooltip": "The edit from FISEditDifferenceMask."}),
            },
            "optional": {
                "dense_tail": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "Fraction of the last steps to compute densely (fresh context everywhere) to soften seams; "
                    "outside the mask the result stays exact either way. 0 = fastest.")}),
                "gn_statistics": (list(STATS_MODES), {"default": "exact", "tooltip": (
                    "exact: GroupNorm statistics of the whole map (cached outside, fresh inside). cached: the "
                    "original run's statistics (the paper's approximation).")}),
                "tile_size": ("INT", {"default": DEFAULT_TILE, "min": 1, "max": 64, "tooltip": (
                    "Side of the tiles the sparse levels are computed in, in latent pixels.")}),
            },
        }

    def execute(self, model, edit, dense_tail=0.0, gn_statistics="exact", tile_size=DEFAULT_TILE):
        latent, cache = api.sparse_sample(model, edit, dense_tail, gn_statistics, tile_size)
        if cache is edit.cache:
            summary = "FISEdit: the mask is empty; the original is returned unchanged"
        else:
            summary = cache.edit_summary
        return {"ui": {"text": [summary]}, "result": (latent, cache)}


class FISEditDecode:
    DESCRIPTION = ("Decodes an edit: only the edited region goes through the VAE and is pasted over the original "
                   "image, so every pixel outside the dilated mask is exactly the original's, and decoding costs a "
                   "fraction of a full decode.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The edited image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The VAE of the generation."}),
                "samples": ("LATENT", {"tooltip": "The latent output of FISEditSparseKSampler."}),
                "edit": (EDIT_TYPE, {"tooltip": "The same edit that went into FISEditSparseKSampler."}),
            },
        }

    def execute(self, vae, samples, edit):
        return (api.decode(vae, samples, edit),)


NODE_CLASS_MAPPINGS = {
    "FISEditDifferenceMask": FISEditDifferenceMask,
    "FISEditSparseKSampler": FISEditSparseKSampler,
    "FISEditDecode": FISEditDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FISEditDifferenceMask": "FISEdit Difference Mask",
    "FISEditSparseKSampler": "FISEdit Sparse KSampler",
    "FISEditDecode": "FISEdit Decode",
}
