"""What an edit builds once and can hand to the next edit of the same source: the sparse steps' plan, feed and CUDA
graph (edit.py), and the probe's graph (probe.py).

Users change a few words and edit again, with the same mask (a painted one) or, with an automatic mask, one of
about the same size. Planning the sparse steps and capturing their graph took about 0.15 s of a 0.57 s edit at
SD2.1@768 (H200, benchmarks/step_phases.py), and the probe's capture another 40 ms; none of it depends on the prompt,
and of the mask only the index maps' values. So a finished edit keeps them, under a key of
everything they were built from, and the next edit takes them when its key is equal; otherwise they are closed and
the edit builds its own.

A key must name everything the kept objects read that is not copied in again per step: the source's store and
resident attention context (by address: kernels.row_copies' tables) and the kept objects' own buffers. So keys hold
the source's store and resident context as objects (compared by identity, held so their addresses cannot be reused),
the resident context's generation and every option and input shape the building read; not the mask, whose index
maps a kept plan takes in where they fit (edit.KeptEdit.refit, plan.py). A kept CUDA
graph also reads the model's weights at the addresses they had at its capture; ComfyUI may move them between two
edits (it unloads a model, reloads it, patches it), and only within sampling are they where the run reads them, so
the graph itself checks them at the first call of each run (`weights_key`, graphs.StepGraph.check_weights).

Kept objects hold GPU memory (a graph's pool, the feed's buffers, index maps): only one source keeps any at a time,
and the registry closes them when it lets the source go. FISEDIT_KEEP_GRAPHS=0 turns keeping off, FISEDIT_REFIT=0
only the refit for another mask.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref

import torch

from .fingerprint import tensor_version

log = logging.getLogger("FISEdit")

_lock = threading.Lock()
_owner: weakref.ref | None = None  # the source cache whose `kept` holds something


def enabled() -> bool:
    return _switch("FISEDIT_KEEP_GRAPHS", "set 1 to keep an edit's graphs for the next edit of the same source (the "
                   "default), or 0 to build them for every edit")


def refit_enabled() -> bool:
    """Whether an edit with another mask may take the kept sparse steps, its index maps written into theirs."""
    return _switch("FISEDIT_REFIT", "set 1 to let an edit with another mask take the kept sparse steps where its "
                   "tiles fit them (the default), or 0 to build them anew for every new mask")


def _switch(name: str, meaning: str) -> bool:
    value = os.environ.get(name, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"{name}={value!r}: {meaning}")
    return value in ("1", "true", "on", "yes")


def key(**parts) -> tuple:
    """A key of named parts (the log names those that differ), compared with ==: wrap objects in `same()` to compare
    them by identity; never tensors."""
    return tuple(parts.items())


class same:  # noqa: N801 - reads as a function in a key: same(source.store)
    """A key part equal only to a part wrapping the same object; holding the object, so that its address is not
    reused while the key lives."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def take(source, kind: str, key: tuple):
    """The `kind` (an object with close()) that an earlier edit of `source` kept under `key`, taken out (the caller
    keeps it again or closes it), or None. One kept under another key is closed, and so is what another source kept
    (before this edit allocates its own)."""
    if not enabled():
        release(source)
        return None
    with _lock:
        previous = _owner() if _owner is not None else None
        entry = source.kept.pop(kind, None)
    if previous is not None and previous is not source:
        release(previous)
    if entry is None:
        return None
    kept_key, value = entry
    if kept_key == key:
        return value
    log.info("FISEdit: not reusing the %s kept from the last edit: built for another %s", kind,
             _difference(kept_key, key))
    value.close()
    return None


def keep(source, kind: str, key: tuple, value) -> None:
    """Keeps `value` for the next edit of `source` (closing it instead when keeping is off); what another source
    kept is closed."""
    global _owner
    if not enabled():
        value.close()
        return
    with _lock:
        previous = _owner() if _owner is not None else None
        _owner = weakref.ref(source)
        replaced = source.kept.pop(kind, None)
        source.kept[kind] = (key, value)
    if replaced is not None:
        replaced[1].close()
    if previous is not None and previous is not source:
        release(previous)


def release(source) -> None:
    """Closes whatever `source` kept (the registry calls this when it lets the source go)."""
    with _lock:
        entries, source.kept = list(source.kept.values()), {}
    for _, value in entries:
        value.close()


def weights_key(module: torch.nn.Module) -> tuple:
    """The address and version of every parameter and buffer of `module`: a CUDA graph reads them where they were
    at its capture, and ComfyUI moves weights when it unloads and reloads a model, or replaces them with patched
    copies (LoRA). Read from each module's own tables (a weight two modules share counts twice): the walk of
    `parameters()` took twice as long (3.3 ms for an SD2.1 UNet on a CPU), once per edit."""
    return tuple(tensor_state(t) for m in module.modules()
                 for table in (m._parameters, m._buffers) for t in table.values() if t is not None)


def tensor_state(t: torch.Tensor) -> tuple:
    """(address, version counter): what changes when a tensor is replaced, moved or written in place."""
    return t.data_ptr(), tensor_version(t)


def conditioning_shapes(conditioning: list) -> tuple:
    """The shape and dtype of every tensor of a CONDITIONING: what a kept graph's static inputs were sized for."""
    return tuple((tuple(t.shape), t.dtype) for item in conditioning
                 for t in (item[0], *item[1].values()) if isinstance(t, torch.Tensor))


def _difference(kept: tuple, wanted: tuple) -> str:
    kept, wanted = dict(kept), dict(wanted)
    return ", ".join(name for name in wanted if name not in kept or kept[name] != wanted[name]) or "key"
