"""What the nodes call: one function per node action."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from . import comfy_adapter as host
from . import persistence
from .cache import CacheError, FisEditCache
from .capture import CacheHandle, attach_capture, seal
from .layout import DEFAULT_MIN_SPARSE_POSITIONS
from .registry import registry

CACHE_SUFFIX = ".safetensors"


def cache_name_for(cache_name: str, node_id: str | None, prompt: dict | None, extra_pnginfo: dict | None) -> str:
    """The user's name, or one derived from the workflow and node, so two workflows never share a cache."""
    name = (cache_name or "").strip()
    if name:
        return name
    workflow = host.workflow_identity(extra_pnginfo, prompt)
    if workflow is None:
        # API-format prompts carry no workflow id: use the graph's shape (node ids and types, not widget values,
        # so that editing the prompt text keeps the name).
        shape = sorted((nid, n.get("class_type")) for nid, n in (prompt or {}).items())
        workflow = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]
    return f"wf-{workflow[:12]}-node{node_id}"


def capture(model, cache_name: str, min_sparse_positions: int = DEFAULT_MIN_SPARSE_POSITIONS):
    """`min_sparse_positions`: the smallest level (in positions) whose steps the edit runs sparse (layout.py)."""
    handle = CacheHandle(cache_name, registry(), min_sparse_positions)
    return attach_capture(model, handle), handle


def resolve_cache_path(save_path: str) -> Path:
    """A path inside the cache folder; absolute paths, '..' and links that leave the folder are refused."""
    folder = Path(host.cache_folder()).resolve()
    if any(ord(c) < 32 for c in save_path):
        raise CacheError(f"save_path {save_path!r} has control characters; use a plain file name")
    rel = Path(save_path.strip())
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise CacheError(f"save_path '{save_path}' must be a plain name or relative path inside the FISEdit cache "
                         f"folder ({folder}); absolute paths and '..' are not allowed")
    if rel.suffix != CACHE_SUFFIX:
        rel = rel.with_name(rel.name + CACHE_SUFFIX)
    try:
        target = (folder / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name the file system cannot hold
        raise CacheError(f"save_path '{save_path}' cannot be used: {e}; choose another name") from e
    if folder not in target.parents:
        raise CacheError(f"save_path '{save_path}' leads outside the FISEdit cache folder ({folder}): use a "
                         f"plain name such as 'my-edit'")
    return target


def store(handle: CacheHandle, latent: dict, save_path: str = "") -> tuple[FisEditCache, Path | None]:
    """Seals the handle's run; saves it when `save_path` is given. Returns the cache and the file written."""
    if not isinstance(handle, CacheHandle):
        raise CacheError(f"FISEditCacheStore's 'cache' got {type(handle).__name__}: connect the FISEDIT_CACHE "
                         f"output of FISEditCacheCapture")
    target = resolve_cache_path(save_path) if save_path and save_path.strip() else None
    cache = seal(handle, latent["samples"])
    if target is not None:
        persistence.save(cache, target)
    return cache, target


def sealed_handle(cache: FisEditCache) -> CacheHandle:
    """What FISEditCacheStore outputs: a handle fixed to the generation just sealed. Not the capture's own handle:
    ComfyUI shares one capture node's output between workflows whose capture nodes are identical, and that handle
    follows whichever run sealed last, while this workflow's downstream nodes must keep meeting this run."""
    handle = CacheHandle(cache.name, registry(), cache.settings.min_sparse_positions)
    handle.settings = cache.settings
    return handle


def list_cache_files() -> list[str]:
    folder = Path(host.cache_folder())
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(f"*{CACHE_SUFFIX}")
                  if not p.name.startswith("."))


def load(cache_file: str) -> CacheHandle:
    path = resolve_cache_path(cache_file)
    if not path.is_file():
        raise CacheError(f"no cache file '{cache_file}' in {host.cache_folder()}: pick one from cache_file's list "
                         f"(reload the page after saving), or save one with FISEditCacheStore's save_path")
    name = f"file:{Path(cache_file).with_suffix('').as_posix()}"
    cache = persistence.load(path, name=name)
    registry().put(cache)
    return sealed_handle(cache)


def cache_file_mtime(cache_file: str) -> float:
    try:
        return os.path.getmtime(resolve_cache_path(cache_file))
    except (CacheError, OSError):
        return float("nan")  # unequal to itself, so ComfyUI re-runs the load and reports the error


MASK_MODES = ("auto", "auto+user", "user")
THRESHOLDS = ("otsu", "edit_size")
DEFAULT_PROBE_FRACTION = 0.2  # the paper's 10 probe steps of 50
CONTROL_STEPS = 1  # attention control in the probe's first step only (attention_control.py says why)


def difference_mask(model, cache: CacheHandle, positive: list, mask_mode: str, user_mask=None, dilate: int = 1,
                    probe_steps: int = 0, threshold: str = "otsu", edit_size: float = 0.15,
                    attention_control: bool = True, vae=None,
                    progress: Callable[[int], Callable[[int], None]] | None = None, control_mode: str = "rescaled",
                    control_steps: int | None = CONTROL_STEPS, word_attention: bool = True):
    """FISEditDifferenceMask: the edit spec, the mask at image resolution, and a preview image.

    auto: probe steps find where the edited prompt changes the latent; user: the user's mask; auto+user: both.
    `probe_steps` 0 means 20% of the cached steps (the paper's 10 of 50). With a `vae`, the Otsu cut follows the
    edges of the original image (decoded once and kept with the cache) and of the image the probe predicts
    (`edge_guide`, mask.along_edges). `progress(total)` returns
    `update(done)`: called once per probe step (the node layer passes the host's progress bar). `control_mode`:
    how attention control treats the unchanged words (attention_control.MODES), `control_steps`: in how many of the
    first probe steps (None: all); `word_attention`: whether the probe's difference is weighted by where the changed
    words look (word_attention.py); the node runs the defaults."""
    import torch
    import torch.nn.functional as F
    from .decode import image_preview, latent_preview, original_image
    from .edit import EditSpec, check_model, latent_mask
    from .mask import threshold_mask
    from .probe import run_probe
    if not isinstance(cache, CacheHandle):
        raise CacheError(f"FISEditDifferenceMask's 'cache' got {type(cache).__name__}: connect the FISEDIT_CACHE "
                         f"output of FISEditCacheStore or FISEditCacheLoad")
    if mask_mode not in MASK_MODES:
        raise CacheError(f"mask_mode must be one of {MASK_MODES}, got '{mask_mode}'")
    if threshold not in THRESHOLDS:
        raise CacheError(f"threshold must be one of {THRESHOLDS}, got '{threshold}'")
    if dilate < 0:
        raise CacheError(f"dilate is a number of latent pixels, 0 or more (got {dilate})")
    source = cache.get()
    check_model(model, source)
    check_conditioning(positive, "positive")
    batch, _, h, w = source.settings.latent_shape
    masks, probe = [], None
    if mask_mode in ("auto", "auto+user"):
        if source.settings.steps < 2:
            raise CacheError(f"mask_mode '{mask_mode}' runs probe steps before the sparse ones, which needs a "
                             f"generation of at least 2 steps; this cache has {source.settings.steps}: use "
                             f"mask_mode 'user'")
        if threshold == "edit_size" and not 0.0 < edit_size <= 1.0:
            raise CacheError(f"edit_size is a share of the image area, above 0 and at most 1 (got {edit_size})")
    if mask_mode in ("user", "auto+user"):
        if user_mask is None:
            raise CacheError(f"mask_mode '{mask_mode}' needs a user_mask: connect a MASK of the image's size")
        if user_mask.dim() == 3 and user_mask.shape[0] not in (1, batch):
            raise CacheError(f"the mask has {user_mask.shape[0]} images but the cached generation has batch {batch}: "
                             f"give one mask for all images, or one per image")
        masks.append(latent_mask(user_mask, (h, w), dilate))
    image = original_image(vae, source) if vae is not None else None  # for the edge-following cut and the preview
    if mask_mode in ("auto", "auto+user"):
        steps = probe_steps or max(1, round(DEFAULT_PROBE_FRACTION * source.settings.steps))
        probe, _ = run_probe(model, source, positive, steps, attention_control_on=attention_control,
                             on_step=progress(steps) if progress is not None else None, control_mode=control_mode,
                             control_steps=control_steps, word_attention_on=word_attention)
        # On the model's device: along the image's edges, the cut filters every pixel of the image.
        device = torch.device(model.load_device)
        masks.append(threshold_mask(probe.edit_map.to(device), threshold, edit_size, dilate_px=dilate,
                                    image=edge_guide(vae, image, probe)).cpu())
    mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
    image_mask = F.interpolate(mask[:, None].float(), scale_factor=8, mode="nearest")[:, 0]
    spec = EditSpec(cache, positive, mask, mode=mask_mode, probe=probe)
    if image is not None:
        return spec, image_mask, image_preview(image, mask)
    return spec, image_mask, latent_preview(model, source, mask)


def edge_guide(vae, image, probe):
    """[B, H, W, 3] or None: the image whose edges the Otsu cut follows: the mean of the original and of the clean
    image the probe's last step predicts, decoded. The original alone shows no edge where an edit adds an object;
    the prediction shows the new object, blurred, and the original's edges sharp (benchmarks/mask_variants.py: on
    the toy world's added objects, grid IoU 0.58 with the original alone, 0.67 with the mean)."""
    from .mask import edge_guide as mean_guide
    if image is None or probe.predicted is None:
        return image
    return mean_guide(image, vae.decode(probe.predicted))


def check_conditioning(conditioning, what: str) -> None:
    """A CONDITIONING with NaN or infinite values would make the edited region NaN, one with a ControlNet would be
    applied where a sparse step cannot honour it: refuse them before any work."""
    import torch
    for i, item in enumerate(conditioning or []):
        if host.carries_control(item):
            raise CacheError(f"the {what} conditioning (entry {i}) carries a ControlNet or T2I-Adapter, which FISEdit "
                             f"cannot apply in a sparse step: connect the text encoder's output without Apply "
                             f"ControlNet")
        tensors = [item[0]] + [v for v in item[1].values() if isinstance(v, torch.Tensor)]
        if any(t is not None and t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
            raise CacheError(f"the {what} conditioning (entry {i}) has NaN or infinite values: check the text "
                             f"encoder and any conditioning nodes before it")


def sparse_sample(model, edit, dense_tail: float, gn_statistics: str, tile_size: int,
                  progress: Callable[[object, int], Callable] | None = None):
    """FISEditSparseKSampler. `tile_size` 0 lets the cost model choose per level (tiling.py). `progress(model,
    steps)` returns a sampler callback (the node layer passes one that draws the host's progress bar, one tick per
    step, as KSampler's does)."""
    from .edit import EditSpec, run_edit
    if not isinstance(edit, EditSpec):
        raise CacheError(f"FISEditSparseKSampler's 'edit' got {type(edit).__name__}: connect the FISEDIT_EDIT output "
                         f"of FISEditDifferenceMask")
    callback = progress(model, edit.cache.get().settings.steps) if progress is not None else None
    samples, handle = run_edit(model, edit, dense_tail=dense_tail, stats_mode=gn_statistics,
                               tile_size=tile_size or None, callback=callback)
    edit.result = handle if handle is not edit.cache else None
    return {"samples": samples}, handle


def decode(vae, samples: dict, edit):
    """FISEditDecode: the edited image, exactly the original outside the edit's dilated mask."""
    from .decode import decode_edit
    from .edit import EditSpec
    if not isinstance(edit, EditSpec):
        raise CacheError(f"FISEditDecode's 'edit' got {type(edit).__name__}: connect the FISEDIT_EDIT output of "
                         f"FISEditDifferenceMask (the same one that went into FISEditSparseKSampler)")
    result = edit.result.get() if edit.result is not None else None
    return decode_edit(vae, samples["samples"], edit.mask, edit.cache.get(), result)
