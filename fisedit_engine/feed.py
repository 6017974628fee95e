"""What a sparse step reads from the cache, moved to the device once per step: only the read region of each map.

The sparse ops read a map of a sparse level only at its level's read region (plan.py: the active tiles and their
halo rings). So per step each cached map is uploaded at those positions only and written into a device-resident
*canvas* of the map's full size, whose other positions are never read (they start as NaN, so a read there would
poison the result and fail the tests). The sparse forwards scatter their fresh tiles into the canvas in place, so
the canvas is also the block's output.

Uploaded whole: a map that a dense op reads (the last map of a sparse level feeding a dense level below it), the
self-attention keys and values (the attention context of every inactive token), the GroupNorm statistics and the
model output. GroupNorm statistics stay exact from the uploaded data alone: the cached statistics of the whole map,
minus the cached values on the active region, plus the fresh ones (`kernels.reference.exact_group_stats`).

Host side, a step's upload is one gather per map from the cache's pinned memory into pinned staging buffers, then
asynchronous copies on a side stream; the compute stream waits on an event before the step's first read.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .cache import FisEditCache, pinned
from .layout import MODEL_OUTPUT_KEY, UNetLayout
from .plan import EditPlan


@dataclass
class FeedStats:
    steps: int = 0
    bytes_uploaded: int = 0

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_uploaded / max(self.steps, 1)


@dataclass
class _Entry:
    key: str
    level: int
    whole: bool           # uploaded whole (and not at the read region only)
    tokens: bool = False  # [B, tokens, C] attention keys/values rather than a [B, C, H, W] map


@dataclass
class EditFeed:
    plan: EditPlan
    source: FisEditCache
    entries: dict[str, _Entry]
    stats: FeedStats = field(default_factory=FeedStats)
    _step: tuple | None = None
    _device: dict = field(default_factory=dict)     # key -> the device tensor read this step (canvas or whole)
    _staged: dict = field(default_factory=dict)     # key -> [rows, C, P] device values at the read positions
    _canvases: dict = field(default_factory=dict)   # (key, rows) -> canvas
    _staging: dict = field(default_factory=dict)    # (key, rows) -> pinned host buffer
    _ready: object = None                           # the upload's CUDA event

    @classmethod
    def build(cls, plan: EditPlan, source: FisEditCache, layout: UNetLayout) -> "EditFeed":
        sparse = {lvl for lvl, lp in plan.levels.items() if not lp.full}
        entries = {}
        for b in layout.blocks:
            if b.level not in sparse:
                continue
            dense_reader = any(c.level not in sparse for c in layout.consumers(b.path))
            entries[b.path] = _Entry(b.path, b.level, whole=dense_reader)
            if b.kind == "resblock":
                entries[f"{b.path}:h"] = _Entry(f"{b.path}:h", b.level, whole=False)
            elif b.kind == "transformer":
                for j in range(b.depth):
                    for kv in ("k", "v"):
                        key = f"{b.path}.transformer_blocks.{j}.attn1:{kv}"
                        entries[key] = _Entry(key, b.level, whole=True, tokens=True)
        return cls(plan, source, entries)

    def has(self, key: str) -> bool:
        return key in self.entries

    def prepare(self, step: int, chunks: list[int], device, dtype) -> None:
        """Uploads this step's region of every map (once per step and chunk layout)."""
        if self._step == (step, tuple(chunks)):
            return
        self._step = (step, tuple(chunks))
        cuda = torch.device(device).type == "cuda"
        stream = torch.cuda.current_stream(device) if cuda else None
        copy_stream = _copy_stream(device) if cuda else None
        if cuda:
            copy_stream.wait_stream(stream)  # the previous step's reads of the canvases are done
        uploaded = 0
        if self._ready is not None:
            self._ready.synchronize()  # the previous upload out of the staging buffers has finished
        with torch.cuda.stream(copy_stream) if cuda else nullcontext():
            for key, e in self.entries.items():
                lp = self.plan.levels[e.level]
                if e.whole:
                    parts = [self.source.read(key, step, c) for c in chunks]
                    self._device[key], self._staged[key] = self._upload(key, parts, device, dtype), None
                else:
                    positions = lp.read_positions("cpu")
                    parts = [self.source.read_positions(key, step, c, positions) for c in chunks]
                    staged = self._upload(key, parts, device, dtype)
                    canvas = self._canvas(key, len(chunks), staged.shape[:2], (lp.height, lp.width), device, dtype)
                    canvas.view(*canvas.shape[:2], -1).index_copy_(2, lp.read_positions(device), staged)
                    self._device[key], self._staged[key] = canvas, staged
                uploaded += sum(p.numel() * p.element_size() for p in parts)
            if cuda:
                self._ready = torch.cuda.Event()
                self._ready.record(copy_stream)
        if cuda:
            stream.wait_event(self._ready)
            for value in list(self._device.values()) + [v for v in self._staged.values() if v is not None]:
                value.record_stream(stream)
        self.stats.steps += 1
        self.stats.bytes_uploaded += uploaded

    def map(self, key: str) -> torch.Tensor:
        """The step's cached map (valid at the level's read region) or whole tensor; sparse ops write into it."""
        return self._device[key]

    def cached_active(self, key: str) -> torch.Tensor:
        """[rows, C, active positions]: the cached values of a map at its level's active positions."""
        lp = self.plan.levels[self.entries[key].level]
        staged = self._staged[key]
        if staged is None:
            return self._device[key].flatten(2).index_select(2, lp.tokens(self._device[key].device))
        return staged.index_select(2, lp.active_in_read(staged.device))

    def _upload(self, key: str, parts: list[torch.Tensor], device, dtype) -> torch.Tensor:
        """Concatenates the chunks' rows into the key's pinned staging buffer and copies it to the device."""
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        buf = self._staging.get((key, len(parts)))
        if buf is None or buf.shape != shape:
            buf = self._staging[(key, len(parts))] = pinned(shape, parts[0].dtype)
        torch.cat(parts, out=buf)
        return buf.to(device, dtype, non_blocking=True)

    def _canvas(self, key, n_chunks, rows_channels, hw, device, dtype) -> torch.Tensor:
        canvas = self._canvases.get((key, n_chunks))
        if canvas is None:
            canvas = torch.full((*rows_channels, *hw), float("nan"), device=device, dtype=dtype)
            self._canvases[(key, n_chunks)] = canvas
        return canvas


_streams: dict = {}


def _copy_stream(device):
    device = torch.device(device)
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
