"""Content fingerprints that decide whether a cache belongs to a model, a conditioning or a noise tensor.

A model's fingerprint covers what changes its output: the architecture config, a strided sample of every base
weight (the unpatched value, so it does not depend on whether a LoRA clone is loaded right now), every weight patch
(LoRA and friends: strengths and a sample of the patch tensors), other packs' object patches, model-option patches
and wrappers. Sampling keeps it cheap (~256 values per tensor) while any retrained or swapped model changes it.
"""
from __future__ import annotations

import hashlib
import json
import weakref

import torch

from .comfy_adapter import foreign_wrapper_keys, short_module_name

_SAMPLES_PER_TENSOR = 256


def _update_with_tensor(h, t: torch.Tensor, full: bool = False) -> None:
    _update_with_tensors(h, [(b"", t)], full)


def _update_with_tensors(h, items: list[tuple[bytes, torch.Tensor]], full: bool = False,
                         remember: bool = False) -> None:
    """Hashes (prefix, tensor) pairs in order: the prefix, the tensor's shape and dtype, and its values (a strided
    sample unless `full`) as float32. The values reach the host in one copy per device: a copy per tensor, each a
    device sync, cost 0.13 s per fingerprint of an SD2.1 UNet on an H100, several times per edit. `remember`: reuse
    the records of tensors seen before (`_SampleMemo`); the hash then reads them in one piece."""
    memo = _MEMO if remember and not full else None
    records = [memo.get(t) if memo is not None else None for _, t in items]
    missing = [i for i, record in enumerate(records) if record is None]
    samples = {i: _sample(items[i][1], full) for i in missing}
    by_device: dict = {}
    for i in missing:
        by_device.setdefault(samples[i].device, []).append(i)
    for members in by_device.values():
        joined = torch.cat([samples[i].to(torch.float32) for i in members]).to("cpu")
        for i, values in zip(members, joined.split([samples[i].numel() for i in members]), strict=True):
            t = items[i][1]
            records[i] = f"{tuple(t.shape)}{t.dtype}".encode() + values.contiguous().numpy().tobytes()
            if memo is not None:
                memo.put(t, records[i])
    h.update(b"".join(part for (prefix, _), record in zip(items, records, strict=True) for part in (prefix, record)))


def _sample(t: torch.Tensor, full: bool) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if not full and flat.numel() > _SAMPLES_PER_TENSOR:
        # integer spacing: float32 linspace cannot address the last element of tensors over 2**24 elements
        idx = torch.arange(_SAMPLES_PER_TENSOR, device=flat.device) * (flat.numel() - 1) // (_SAMPLES_PER_TENSOR - 1)
        flat = flat[idx]
    return flat


_PLAIN_EXTRA_STATE = torch.nn.Module.get_extra_state


def state_items(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of `module.state_dict(keep_vars=True)`, read from the modules' own tables: the
    state dict's bookkeeping (an ordered dict and a hook check per module) took a third of an SD2.1 UNet's
    fingerprint on a CPU (benchmarks/edit_overhead.py). A module with state-dict hooks or extra state could add or
    change entries; such a model gets its real state dict."""
    items: list[tuple[str, torch.Tensor]] = []
    stack = [("", module)]
    while stack:
        prefix, m = stack.pop()
        if m._state_dict_hooks or m._state_dict_pre_hooks or type(m).get_extra_state is not _PLAIN_EXTRA_STATE:
            return list(module.state_dict(keep_vars=True).items())
        items.extend((prefix + name, p) for name, p in m._parameters.items() if p is not None)
        items.extend((prefix + name, b) for name, b in m._buffers.items()
                     if b is not None and name not in m._non_persistent_buffers_set)
        stack.extend((f"{prefix}{name}.", child) for name, child in m._modules.items() if child is not None)
    return items


def tensor_version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by in-place writes through autograd), or None for an inference tensor,
    which keeps none. Asked first, not caught: ComfyUI loads weights in inference mode, and an exception per weight
    made a walk over an SD2.1 UNet's 686 tensors take 14 ms instead of 4 on a CPU (benchmarks/edit_overhead.py)."""
    return None if t.is_inference() else t._version


class _SampleMemo:
    """The records (shape, dtype and host sample) of weights fingerprinted before. Sampling is a few device kernels
    per tensor: 0.18 s for the ~2,500 tensors of an SDXL UNet on an H200, and an edit fingerprints its model two or
    three times (benchmarks/e2e_phases.py). A sample is reused while its tensor lives with the same storage, shape,
    strides and version counter; in-place writes through autograd bump that counter. Writes through `.data` do not,
    and inference tensors (made in inference mode, where ComfyUI runs its nodes) have no counter at all. That leaves
    in-place writes that keep the storage; ComfyUI makes them when it patches weights in place, but it backs the
    original up first (the fingerprint reads the backup, `model_fingerprint`) and restores it when it unpatches;
    hook patches have no such backup in `patcher.backup`, so `model_fingerprint` remembers nothing while any are
    applied. A node that overwrote a loaded model's weights in place, with no backup, would go unseen: no ComfyUI
    node does, since patches are how ComfyUI changes weights."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}  # id(tensor) -> (weak reference, state, record)

    @staticmethod
    def _state(t: torch.Tensor):
        return tensor_version(t), t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride()

    def get(self, t: torch.Tensor) -> bytes | None:
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != self._state(t):
            return None
        return entry[2]

    def put(self, t: torch.Tensor, record: bytes) -> None:
        key = id(t)
        self._entries[key] = (weakref.ref(t, lambda _, key=key: self._forget(key)), self._state(t), record)

    def _forget(self, key: int) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is None:  # not a newer tensor that took the same id
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


_MEMO = _SampleMemo()


def _update_with_object(h, obj, full_tensors: bool) -> None:
    """Hashes nested tensors / numbers / strings; other objects by type name (their behaviour is code)."""
    if isinstance(obj, torch.Tensor):
        _update_with_tensor(h, obj, full_tensors)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _update_with_object(h, obj[k], full_tensors)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for v in obj:
            _update_with_object(h, v, full_tensors)
    elif isinstance(obj, (int, float, str, bool, type(None))):
        h.update(repr(obj).encode())
    elif hasattr(obj, "weights"):  # comfy.weight_adapter adapters (LoRA, LoHa, ...)
        h.update(type(obj).__name__.encode())
        _update_with_object(h, obj.weights, full_tensors)
    else:
        h.update(type(obj).__qualname__.encode())


def tensor_fingerprint(t: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    if t is None:
        h.update(b"none")
    else:
        _update_with_tensor(h, t, full=True)
    return h.hexdigest()[:16]


def conditioning_fingerprint(cond: list | None) -> str:
    """Exact over the embeddings and pooled outputs; other extras by key and value type."""
    h = hashlib.sha256()
    _update_with_object(h, cond or [], full_tensors=True)
    return h.hexdigest()[:16]


def model_fingerprint(patcher) -> str:
    model = patcher.model
    h = hashlib.sha256()
    config = getattr(getattr(model, "model_config", None), "unet_config", {})
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"{type(model).__name__}:{getattr(model, 'model_type', None)}".encode())
    sampling = getattr(model, "model_sampling", None)
    if sampling is not None:
        h.update(type(sampling).__name__.encode())
        for name in ("sigmas", "log_sigmas"):
            if isinstance(getattr(sampling, name, None), torch.Tensor):
                _update_with_tensor(h, getattr(sampling, name))
    backup = getattr(patcher, "backup", {})
    weights = []
    for name, tensor in sorted(state_items(model.diffusion_model)):
        full_name = f"diffusion_model.{name}"
        weights.append((full_name.encode(), backup[full_name].weight if full_name in backup else tensor))
    _update_with_tensors(h, weights, remember=not getattr(patcher, "hook_backup", None))
    for key in sorted(patcher.patches):
        h.update(key.encode())
        _update_with_object(h, [list(p) for p in patcher.patches[key]], full_tensors=False)
    # other packs' object patches change the model; FISEdit's own sparse forwards (marked) do not
    h.update(json.dumps(sorted(k for k, v in patcher.object_patches.items()
                               if not getattr(v, "fisedit_patch", False))).encode())
    h.update(json.dumps(foreign_wrapper_keys(patcher)).encode())
    to = patcher.model_options.get("transformer_options", {})
    patches, replacements = to.get("patches", {}), to.get("patches_replace", {})
    if not patches and not replacements:
        h.update(b"{}[]")  # what earlier versions hashed here: saved caches of unpatched models keep matching
    for name, fns in sorted(patches.items()):
        h.update(f"patch:{name}".encode())
        for fn in fns:
            _update_with_callable(h, fn)
    for name, replaced in sorted(replacements.items()):
        for key, fn in sorted(replaced.items(), key=str):
            h.update(f"replace:{name}:{key}".encode())
            _update_with_callable(h, fn)
    for name in ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function",
                 "model_function_wrapper"):
        if name in patcher.model_options:
            h.update(name.encode())
    return h.hexdigest()[:16]


_PLAIN = (int, float, str, bool)


def _update_with_callable(h, fn) -> None:
    """A patch function by what it is, not where it lives in memory (so a cache saved and loaded in another process
    still matches): its qualified name and the settings it closes over (numbers, strings, and tuples or dicts of
    them: FreeU's scales, PAG's scale). Cells that hold other objects, lists or None are skipped: patches keep
    run-time state there (ToMe's unmerge function is set during sampling)."""
    if isinstance(fn, tuple):  # forward_timestep_embed_patch entries: (layer class, handler)
        for part in fn:
            _update_with_callable(h, part)
        return
    fn = getattr(fn, "__func__", fn)
    module = short_module_name(getattr(fn, "__module__", "") or "")  # not the install path
    h.update(f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _is_plain_setting(value):
            _update_with_object(h, value, full_tensors=False)


def _is_plain_setting(value, nested: bool = False) -> bool:
    """Numbers and strings, and tuples or non-empty dicts of them. Lists and empty dicts are taken for state that
    a patch fills while it runs (FreeU's per-device fallback table starts empty)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, tuple):
        return all(_is_plain_setting(v, True) for v in value)
    if isinstance(value, dict) and (value or nested):
        return all(isinstance(k, _PLAIN) and _is_plain_setting(v, True) for k, v in value.items())
    return False


def vae_fingerprint(vae) -> str:
    """Which VAE decoded an image: a strided sample of its weights."""
    h = hashlib.sha256()
    weights = sorted(state_items(vae.first_stage_model))
    _update_with_tensors(h, [(name.encode(), t) for name, t in weights], remember=True)
    return h.hexdigest()[:16]
