"""Cache nodes: capture a generation's activations, seal them into a cache, load a saved cache."""
from __future__ import annotations

from fisedit_engine import api

CATEGORY = "FISEdit"
CACHE_TYPE = "FISEDIT_CACHE"


class FISEditCacheCapture:
    DESCRIPTION = ("Returns a copy of the model that records, while any sampler runs it, what later FISEdit edits "
                   "need. Sampling results are bit-identical to the unpatched model.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = ("MODEL", CACHE_TYPE)
    RETURN_NAMES = ("model", "cache")
    OUTPUT_TOOLTIPS = ("The model to sample with: connect it to KSampler (or any sampler node).",
                       "The cache being recorded: connect it to FISEditCacheStore.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model of the generation you will edit later."}),
                "cache_name": ("STRING", {"default": "", "tooltip": (
                    "Name of the cache in memory. Leave empty to derive one from this workflow and node, so two "
                    "workflows never share a cache by accident.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def execute(self, model, cache_name, unique_id=None, prompt=None, extra_pnginfo=None):
        name = api.cache_name_for(cache_name, unique_id, prompt, extra_pnginfo)
        return api.capture(model, name)


class FISEditCacheStore:
    DESCRIPTION = ("Seals the recorded cache once the sampler has finished: checks that it is complete and belongs "
                   "to this latent, records the sampling settings, keeps it in memory, and optionally saves it.")
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = (CACHE_TYPE,)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("The sealed cache: the base for FISEdit edits.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cache": (CACHE_TYPE, {"tooltip": "The cache output of FISEditCacheCapture."}),
                "latent": ("LATENT", {"tooltip": (
                    "The LATENT output of the sampler that ran the captured model. It also makes this node run "
                    "after the sampler.")}),
            },
            "optional": {
                "save_path": ("STRING", {"default": "", "tooltip": (
                    "Optional file name to save the cache under, inside models/fisedit_caches. Written atomically; "
                    "load it later with FISEditCacheLoad. Empty: keep it in memory only.")}),
            },
        }

    def execute(self, cache, latent, save_path=""):
        sealed, saved = api.store(cache, latent, save_path)
        ui = {"text": [sealed.summary_text() + (f"; saved to {saved}" if saved else "")]}
        if saved:
            ui["files"] = [str(saved)]
        return {"ui": ui, "result": (api.sealed_handle(sealed),)}


class FISEditCacheLoad:
    DESCRIPTION = "Loads a cache saved by FISEditCacheStore into memory."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    RETURN_TYPES = (CACHE_TYPE,)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("The loaded cache: the base for FISEdit edits.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"cache_file": (api.list_cache_files(), {
            "tooltip": "A cache file in models/fisedit_caches, saved by FISEditCacheStore's save_path."})}}

    @classmethod
    def IS_CHANGED(cls, cache_file):
        return api.cache_file_mtime(cache_file)

    def execute(self, cache_file):
        return (api.load(cache_file),)


NODE_CLASS_MAPPINGS = {
    "FISEditCacheCapture": FISEditCacheCapture,
    "FISEditCacheStore": FISEditCacheStore,
    "FISEditCacheLoad": FISEditCacheLoad,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FISEditCacheCapture": "FISEdit Cache Capture",
    "FISEditCacheStore": "FISEdit Cache Store",
    "FISEditCacheLoad": "FISEdit Cache Load",
}
