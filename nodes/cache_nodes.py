"""Cache nodes: capture a generation's activations, seal them into a cache, load a saved cache."""
from __future__ import annotations

from fisedit_engine import api

from .spec import In, NodeSpec, Out, Result

CACHE_TYPE = "FISEDIT_CACHE"


def _capture(inputs: dict, hidden: dict):
    name = api.cache_name_for(inputs["cache_name"], hidden["unique_id"], hidden["prompt"], hidden["extra_pnginfo"])
    return api.capture(inputs["model"], name)


def _store(inputs: dict, hidden: dict):
    sealed, saved = api.store(inputs["cache"], inputs["latent"], inputs["save_path"])
    ui = {"text": [sealed.summary_text() + (f"; saved to {saved}" if saved else "")]}
    if saved:
        ui["files"] = [str(saved)]
    return Result((api.sealed_handle(sealed),), ui)


def _load(inputs: dict, hidden: dict):
    return (api.load(inputs["cache_file"]),)


CAPTURE = NodeSpec(
    node_id="FISEditCacheCapture", display_name="FISEdit Cache Capture",
    description=("Returns a copy of the model that records, while any sampler runs it, what later FISEdit edits "
                 "need. Sampling results are bit-identical to the unpatched model. Connect its MODEL to KSampler (the "
                 "sampler's own progress bar shows the recorded steps) and its cache, with the sampler's LATENT, to "
                 "FISEdit Cache Store."),
    inputs=(
        In("model", "MODEL", "The model of the generation you will edit later."),
        In("cache_name", "STRING", (
            "Name of the cache in memory. Leave empty to derive one from this workflow and node, so two workflows "
            "never share a cache by accident."), default=""),
    ),
    outputs=(
        Out("model", "MODEL", "The model to sample with: connect it to KSampler (or any sampler node)."),
        Out("cache", CACHE_TYPE, "The cache being recorded: connect it to FISEditCacheStore."),
    ),
    run=_capture, hidden=("unique_id", "prompt", "extra_pnginfo"),
)

STORE = NodeSpec(
    node_id="FISEditCacheStore", display_name="FISEdit Cache Store",
    description=("Seals the recorded cache once the sampler has finished: checks that it is complete and belongs to "
                 "this latent, records the sampling settings, keeps it in memory, and optionally saves it."),
    inputs=(
        In("cache", CACHE_TYPE, "The cache output of FISEditCacheCapture."),
        In("latent", "LATENT", ("The LATENT output of the sampler that ran the captured model. It also makes this "
                                "node run after the sampler.")),
        In("save_path", "STRING", (
            "Optional file name to save the cache under, inside models/fisedit_caches. Written atomically; load it "
            "later with FISEditCacheLoad. Empty: keep it in memory only."), optional=True, default=""),
    ),
    outputs=(Out("cache", CACHE_TYPE, "The sealed cache: the base for FISEdit edits."),),
    run=_store, output_node=True,
)

LOAD = NodeSpec(
    node_id="FISEditCacheLoad", display_name="FISEdit Cache Load",
    description="Loads a cache saved by FISEditCacheStore into memory.",
    inputs=(
        In("cache_file", "COMBO", "A cache file in models/fisedit_caches, saved by FISEditCacheStore's save_path.",
           options=api.list_cache_files),
    ),
    outputs=(Out("cache", CACHE_TYPE, "The loaded cache: the base for FISEdit edits."),),
    run=_load, fingerprint=lambda cache_file=None, **_: api.cache_file_mtime(cache_file),
)

SPECS = (CAPTURE, STORE, LOAD)
