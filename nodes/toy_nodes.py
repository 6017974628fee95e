"""The toy-world model loader: the small text-to-image model trained on the procedural scenes of `toyworld/`,
as MODEL, CLIP and VAE for the stock nodes and FISEdit's (the built-in demo model and the quality benchmark's)."""
from __future__ import annotations

import os
from pathlib import Path

from .spec import In, NodeSpec, Out

WEIGHTS_ENV = "FISEDIT_TOYWORLD_DIR"
DEFAULT_NAME = "toyworld"
NONE_FOUND = "(no weights found)"


def weights_dir() -> Path:
    """FISEDIT_TOYWORLD_DIR if set, else toyworld/weights/ in this plugin."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "toyworld" / "weights"


def _sets() -> dict:
    from toyworld import models
    return models.weight_sets(weights_dir())


def _weight_names() -> list[str]:
    return sorted(_sets()) or [NONE_FOUND]


def _default_weights(names: list[str]) -> str:
    return DEFAULT_NAME if DEFAULT_NAME in names else names[0]


def _fingerprint(weights=None, **_):
    # retrained weights under the same name must be loaded again, not taken from ComfyUI's output cache
    files = _sets().get(weights or DEFAULT_NAME, [])
    return tuple((str(p), p.stat().st_mtime_ns) for p in files)


def _load(inputs: dict, hidden: dict):
    from toyworld import comfy_models
    weights = inputs["weights"]
    sets = _sets()
    if not sets:
        raise FileNotFoundError(
            f"FISEditToyModelLoader: no toy-model weights in {weights_dir()}. Train them with "
            "`python scripts/train_toyworld.py --out OUT` (about 8 minutes on one GPU), or point "
            f"{WEIGHTS_ENV} at a folder that holds them.")
    name = weights if weights and weights != NONE_FOUND else (DEFAULT_NAME if DEFAULT_NAME in sets else min(sets))
    if name not in sets:
        raise FileNotFoundError(f"FISEditToyModelLoader: no weights named {name!r} in {weights_dir()}; pick one of "
                                f"{', '.join(sorted(sets))} in 'weights' (or set {WEIGHTS_ENV} to the folder that "
                                f"holds {name!r})")
    model, clip, vae, _ = comfy_models.load(sets[name])
    return model, clip, vae


TOY_MODEL_LOADER = NodeSpec(
    node_id="FISEditToyModelLoader", display_name="FISEdit Toy Model Loader",
    description=("Loads FISEdit's toy-world model: a small text-to-image latent diffusion model (ComfyUI's own "
                 "SD1.5-style UNet, a causal text transformer, an 8x VAE) trained on procedural scenes of shapes "
                 "such as 'a large red circle at the top left, on a striped background'. Use it with "
                 "CLIPTextEncode, KSampler, VAEDecode and the FISEdit nodes at 256x256."),
    inputs=(
        In("weights", "COMBO", (
            f"Which trained weights to load, from this plugin's toyworld/weights folder (set {WEIGHTS_ENV} to use "
            "another folder). A name stands for NAME.safetensors or its shards NAME-0000i-of-0000n.safetensors. Train "
            "new ones with scripts/train_toyworld.py."),
           optional=True, options=_weight_names, default=_default_weights),
    ),
    outputs=(
        Out("model", "MODEL", ("The diffusion model (eps prediction, SD's 1000-step scaled-linear schedule); best "
                               "at 256x256.")),
        Out("clip", "CLIP", (
            "The text encoder. It knows the toy world's words only: sizes (small, large), colours (red, orange, "
            "yellow, green, blue, purple), shapes (circle, square, triangle, diamond), positions (at the top left, "
            "on the right, in the middle, ...) and backgrounds (plain, striped, checkered, dotted); other words are "
            "unknown to it.")),
        Out("vae", "VAE", "The autoencoder (8x down, 4 latent channels)."),
    ),
    run=_load, fingerprint=_fingerprint,
)

SPECS = (TOY_MODEL_LOADER,)
