"""What a sparse step reads from the cache, moved to the device once per step: only the read region of each map.

The sparse ops read a map of a sparse level only at its level's read region (plan.py: the active tiles and their
halo rings). So per step each cached map is uploaded at those positions only and written into a device-resident
*canvas* of the map's full size, whose other positions are never read (they start as NaN, so a read there would
poison the result and fail the tests). The sparse forwards scatter their fresh tiles into the canvas in place, so
the canvas is also the block's output.

Uploaded whole: a map that a dense op reads (the last map of a sparse level feeding a dense level below it), the
self-attention keys and values (the attention context of every inactive token), the GroupNorm statistics and the
model output. The attention context mostly does not move at all: where the source cache keeps it on the GPU
(resident.py) it is copied from there, and what is uploaded is kept there for the next edit. GroupNorm statistics
stay exact from the uploaded data alone: the cached statistics of the whole map, minus the cached values on the
active region, plus the fresh ones (`kernels.fused.exact_group_stats`).

A step's data moves in two stages: `upload` brings it into device landing buffers (on a side stream on a GPU), and
`activate` (on the compute stream, after the upload's event) writes it into the canvases and whole buffers that the
sparse ops read. Those keep their addresses for the whole edit, which is what lets a sparse step be replayed as a
CUDA graph (graphs.py). `prepare` runs both for one step; on a GPU, `prefetch` uploads the next step while the device
computes the current one.

Every step moves the same shapes, so the moves are planned once per edit (`kernels.row_copies`): per step, the
upload is one launch per element size of a kernel that reads the step's rows from the pinned cache in place (the
GPU addresses pinned host memory; only the read region's rows cross the bus) or from the resident context, and the
activation is another. Moved key by key, the host spent longer launching copies and gathers than the H200 spent on
the sparse step (SD2.1@768, 5%: 19 ms of host time against a 10 ms step).

A source that is itself an edit's result stores its region apart from its base (a delta), so its rows are assembled
on the host: such an edit moves key by key, staging each step in pinned memory in a worker thread first (`stage`),
and says so in the log. So does a cache outside pinned memory. Key by key, the GPU still gathers the maps it can
read in place (`kernels.fused.gather_rows`); `FeedStats.host_gathers` counts the others.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import resident
from .cache import FisEditCache, PinnedArena, from_storage
from .kernels import fused as K
from .kernels import reference as R
from .kernels.row_copies import RowCopies, as_rows
from .layout import MODEL_OUTPUT_KEY, UNetLayout
from .plan import EditPlan

log = logging.getLogger("FISEdit")

# Programs of one launch of a step's upload at most. The upload gathers from pinned host memory on its own stream
# while the step before runs; with a program per 32 rows, its programs held every SM while they waited on the host
# link, and the step's graph could not start until they were done (1.4 ms of 3.1 between replays at SD2.1@768, 5%,
# on an H200: benchmarks/gpu_timeline.py). Sparse sampling of that edit, 20 steps, by limit (edit_wall.py
# --upload-programs, one H200 run): none 0.287 s, 8 0.361, 16 0.283, 32 0.280, 64 0.266. None: no limit.
UPLOAD_PROGRAMS: int | None = 64


@dataclass
class FeedStats:
    steps: int = 0
    bytes_uploaded: int = 0
    bytes_resident: int = 0      # attention context read from the GPU-resident copy instead (summed over steps)
    stage_seconds: float = 0.0   # host time gathering into pinned memory
    host_gathers: int = 0        # maps of the read regions gathered on the host (the rest: by the GPU, in place)
    planned_steps: int = 0       # steps moved by the planned copies (the others key by key)

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_uploaded / max(self.steps, 1)


@dataclass
class _Entry:
    level: int
    whole: bool           # uploaded whole (and not at the read region only)
    context: bool = False  # self-attention K/V: may be resident on the GPU


@dataclass(frozen=True)
class _DeviceGather:
    """A staged part that the upload gathers on the device: `rows` [batch, positions, C] in pinned host memory."""
    rows: torch.Tensor
    positions: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.rows.shape[0], self.positions, self.rows.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def nbytes(self) -> int:
        return self.rows.shape[0] * self.positions * self.rows.shape[2] * self.rows.element_size()


def _canvas(shape, device, dtype) -> torch.Tensor:
    """A map's canvas [rows, C, H, W]: NaN, and channels-last in memory. Every access to a canvas is at positions
    (a tile's few columns, the active tokens, the rows of a copy), so with channels innermost each position's values
    are one contiguous run; channels-first, the copies and scatters wrote one element per memory sector."""
    return torch.empty(shape, device=device, dtype=dtype, memory_format=torch.channels_last).fill_(float("nan"))


def _nbytes(part) -> int:
    return part.nbytes if isinstance(part, _DeviceGather) else part.numel() * part.element_size()


@dataclass
class _PlannedSteps:
    """Every step's moves for one chunk layout, planned when the layout is first read (kernels.row_copies): the
    upload of the step's cached values into the landing buffers, and their activation into the buffers the sparse
    ops read, one launch per element size each instead of one or more per key."""
    upload: RowCopies                 # per step: cache (pinned host memory, or the resident context) -> landing
    activate: RowCopies               # landing -> canvases, staged copies, whole buffers (the same every step)
    device: dict                      # key -> what the sparse ops read (canvas or whole buffer)
    staged: dict                      # key -> [rows, P, C] the cached values at the read positions
    keep: list                        # per step: (key, chunk, landing rows) of attention context read from host
    host_bytes: list                  # per step: bytes read from host memory
    resident_bytes: list              # per step: bytes read from the resident context on the GPU


@dataclass
class EditFeed:
    plan: EditPlan
    source: FisEditCache
    entries: dict[str, _Entry]
    stats: FeedStats = field(default_factory=FeedStats)
    _step: tuple | None = None
    _staged_at: tuple | None = None                 # (step, chunks) of what stage() last staged
    _host: dict = field(default_factory=dict)       # key -> [host tensors per chunk] staged for the next upload
    _resident: dict = field(default_factory=dict)   # key -> [device tensors per chunk] the next step reads in place
    _landing: dict = field(default_factory=dict)    # key -> device tensor the upload lands in
    _device: dict = field(default_factory=dict)     # key -> what the sparse ops read (canvas or whole buffer)
    _staged: dict = field(default_factory=dict)     # key -> [rows, C, P] device values at the read positions
    _staging: dict = field(default_factory=dict)    # (key, chunk index) -> pinned host buffer of a gather
    _uploaded: object = None                        # the last upload's CUDA event
    _activated: object = None                       # the last activation's CUDA event
    _prefetch: dict | None = None                   # a worker thread staging and uploading the next step
    _arena: PinnedArena = field(default_factory=PinnedArena)
    _pinned: dict = field(default_factory=dict)     # storage address -> whether it is pinned (asked once)
    _planned: dict = field(default_factory=dict)    # chunks -> _PlannedSteps, or None: that layout moves key by key
    _uploaded_step: tuple | None = None             # (step, chunks) a planned upload last brought in

    @classmethod
    def build(cls, plan: EditPlan, source: FisEditCache, layout: UNetLayout) -> "EditFeed":
        sparse = {lvl for lvl, lp in plan.levels.items() if not lp.full}
        entries = {}

        def add(key, level, whole):
            entries[key] = _Entry(level, whole, context=resident.is_attention_context(key))

        for b in layout.blocks:
            if b.level not in sparse:
                continue
            add(b.path, b.level, whole=any(c.level not in sparse for c in layout.consumers(b.path)))
            if b.kind == "resblock":
                add(f"{b.path}:h", b.level, whole=False)
                for gn in ("in_layers.0", "out_layers.0"):
                    add(f"{b.path}.{gn}:stats", b.level, whole=True)
            elif b.kind == "transformer":
                add(f"{b.path}.norm:stats", b.level, whole=True)
                for j in range(b.depth):
                    for kv in ("k", "v"):
                        add(f"{b.path}.transformer_blocks.{j}.attn1:{kv}", b.level, whole=True)
        if 0 in sparse:
            add("out.0:stats", 0, whole=True)
            add(MODEL_OUTPUT_KEY, 0, whole=True)
        return cls(plan, source, entries)

    def has(self, key: str) -> bool:
        return key in self.entries

    # --- the three stages ---------------------------------------------------------------------------------------
    def prepare(self, step: int, chunks: list[int], device) -> None:
        """Makes this step's cached values readable on `device` (once per step and chunk layout)."""
        wanted = (step, tuple(chunks))
        if self._step == wanted:
            return
        planned = self._plan(chunks, device)
        if planned is not None:
            if self._uploaded_step != wanted:
                self._upload_planned(planned, step, chunks, device)
            self._activate_planned(planned, step, device)
            self._step = wanted
            return
        if self._collect_prefetch() != wanted:
            self.stage(step, chunks, device)
            self.upload(device)
        self.activate(device)
        self._step = wanted

    def prefetch(self, step: int, chunks: list[int], device) -> None:
        """Uploads `step` while the device runs the current step (GPU only): planned moves on the copy stream,
        otherwise staged and uploaded by a worker thread; the next prepare() of that step only activates it."""
        if torch.device(device).type != "cuda":
            return
        planned = self._plan(chunks, device)
        if planned is not None:  # a launch or two: no worker needed
            self._upload_planned(planned, step, chunks, device)
            return
        self._collect_prefetch()
        job = {"step": (step, tuple(chunks)), "error": None}
        inference = torch.is_inference_mode_enabled()  # thread-local: the worker writes the caller's tensors

        def work():
            try:
                with torch.inference_mode(inference):
                    self.stage(step, chunks, device)
                    self.upload(device)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
                job["error"] = e
        job["thread"] = threading.Thread(target=work, name="fisedit-prefetch", daemon=True)
        job["thread"].start()
        self._prefetch = job

    def _collect_prefetch(self):
        """Waits for a prefetch in flight; returns the (step, chunks) it staged and uploaded, or None."""
        job, self._prefetch = self._prefetch, None
        if job is None:
            return None
        job["thread"].join()
        if job["error"] is not None:
            raise job["error"]
        return job["step"]

    def stage(self, step: int, chunks: list[int], device=None) -> None:
        """Host side: the step's values per key and chunk, in pinned memory (for a GPU `device`, the maps it can
        gather itself are only pointed at)."""
        t0 = time.perf_counter()
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous upload has finished reading the staging buffers
        self._host, self._resident, self._staged_at = {}, {}, (step, tuple(chunks))
        kept = self.source.resident
        for key, e in self.entries.items():
            on_device = [kept.get(key, c, step) for c in chunks] if e.context and kept is not None else [None]
            if all(t is not None for t in on_device):
                self._resident[key] = on_device
                self.stats.bytes_resident += sum(t.numel() * t.element_size() for t in on_device)
            elif e.whole:
                self._host[key] = [self.source.read_stored(key, step, c) for c in chunks]
            else:
                positions = self.plan.levels[e.level].read_positions("cpu")
                rows = [self._device_gatherable(key, step, c, device) for c in chunks]
                if all(r is not None for r in rows):
                    self._host[key] = [_DeviceGather(r, len(positions)) for r in rows]
                else:
                    self._host[key] = [self._gather(key, i, step, c, positions) for i, c in enumerate(chunks)]
                    self.stats.host_gathers += len(chunks)
        self.stats.steps += 1
        self.stats.stage_seconds += time.perf_counter() - t0
        self.stats.bytes_uploaded += sum(_nbytes(p) for parts in self._host.values() for p in parts)

    def upload(self, device) -> None:
        """The staged values into device landing buffers, on a side stream when the device is a GPU."""
        with self._uploading(device):
            for key, parts in self._host.items():
                rows = sum(p.shape[0] for p in parts)
                landing = self._landing.get(key)
                if landing is None or landing.shape[0] != rows:
                    landing = self._landing[key] = torch.empty((rows, *parts[0].shape[1:]), device=device,
                                                               dtype=parts[0].dtype)
                at = 0
                for p in parts:
                    if isinstance(p, _DeviceGather):
                        lp = self.plan.levels[self.entries[key].level]
                        K.gather_rows(p.rows, lp.read_positions(device), landing[at:at + p.shape[0]])
                    else:
                        landing[at:at + p.shape[0]].copy_(p, non_blocking=True)
                    at += p.shape[0]

    def activate(self, device) -> None:
        """Landing buffers into the canvases and whole buffers the sparse ops read (fixed addresses)."""
        with self._activating(device):
            self._activate_by_key(device)

    def _activate_by_key(self, device) -> None:
        copies = []  # (target, value): issued together at the end, a few launches instead of one per tensor
        for key, parts in self._resident.items():
            self._whole_target(key, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]), parts[0].dtype, device)
            at = 0
            for part in parts:
                copies.append((self._device[key][at:at + part.shape[0]], part))
                at += part.shape[0]
        if self._resident:
            resident.budget().touch(self.source.resident)
        for key in self._host:
            e, landing = self.entries[key], self._landing[key]
            if e.whole:
                value = from_storage(landing)
                copies.append((self._whole_target(key, value.shape, value.dtype, device), value))
                if e.context:
                    self._keep_context(key, landing, device)
            else:
                target = self._device.get(key)
                lp = self.plan.levels[e.level]
                shape = (landing.shape[0], landing.shape[2], lp.height, lp.width)
                if target is None or target.shape != shape:
                    target = self._device[key] = _canvas(shape, device, landing.dtype)
                target.view(*shape[:2], -1).index_copy_(2, lp.read_positions(device), landing.transpose(1, 2))
                staged = self._staged.get(key)  # a copy: the next upload may land while this step still runs
                if staged is None or staged.shape != landing.shape:
                    staged = self._staged[key] = torch.empty_like(landing)
                copies.append((staged, landing))
        _copy_all(copies)

    @contextmanager
    def _uploading(self, device):
        """The block's copies into the landing buffers: on a GPU on the copy stream, after the last activation has
        read them, and `_uploaded` recorded after them."""
        if torch.device(device).type != "cuda":
            yield
            return
        copy_stream = _copy_stream(device)
        if self._activated is not None:
            copy_stream.wait_event(self._activated)
        with torch.cuda.stream(copy_stream):
            yield
        self._uploaded = torch.cuda.Event()
        self._uploaded.record(copy_stream)

    @contextmanager
    def _activating(self, device):
        """The block's reads of the landing buffers: on the compute stream after the upload, `_activated` recorded
        after them (the next upload waits for it)."""
        if self._uploaded is not None:
            torch.cuda.current_stream(device).wait_event(self._uploaded)
        yield
        if torch.device(device).type == "cuda":
            self._activated = torch.cuda.Event()
            self._activated.record(torch.cuda.current_stream(device))

    def _resident_context(self, device) -> resident.ResidentContext | None:
        """The source's resident attention context, made on first use (None where nothing can be kept)."""
        if self.source.resident is None:
            self.source.resident = resident.budget().context(device)
        return self.source.resident

    def _whole_target(self, key: str, shape, dtype, device) -> torch.Tensor:
        target = self._device.get(key)
        if target is None or target.shape != tuple(shape):
            target = self._device[key] = torch.empty(shape, device=device, dtype=dtype)
        return target

    def _keep_context(self, key: str, landing: torch.Tensor, device) -> None:
        """Keeps an uploaded attention context on the GPU for the next edit of the same source (resident.py)."""
        kept = self._resident_context(device)
        if kept is None:
            return
        step, chunks = self._staged_at
        at = 0
        for c, part in zip(chunks, self._host[key], strict=True):
            if not kept.keep(key, c, step, landing[at:at + part.shape[0]]):
                return
            at += part.shape[0]

    # --- planned moves: every step's copies as tables, one launch per element size ---------------------------
    def _plan(self, chunks: list[int], device) -> _PlannedSteps | None:
        """The planned moves of this chunk layout, or None where some value must be assembled on the host (an edit's
        result as the source stores its region apart from its base) or cannot be read by `device` in place."""
        chunks = tuple(chunks)
        if chunks not in self._planned:
            reason = self._unplannable(chunks, device)
            if reason is not None:
                log.info("FISEdit: this edit moves its cached values key by key (%s)", reason)
            self._planned[chunks] = None if reason is not None else self._build_plan(chunks, device)
        return self._planned[chunks]

    def _unplannable(self, chunks: tuple, device) -> str | None:
        store, steps = self.source.store, self.source.settings.steps
        cuda = torch.device(device).type == "cuda"
        for key in self.entries:
            if key in store.regions:
                return f"the source is an edit's result, whose '{key}' holds its region apart from its base"
            for c in chunks:
                t = store.tensors.get((key, c))
                if t is None or t.shape[0] < steps:
                    self.source.read_check(key, steps - 1, c)  # raises, naming the re-capture
                if t.device.type != "cpu" or (cuda and not t.is_pinned()):
                    return f"the cached '{key}' is not in pinned host memory"
        return None

    def _build_plan(self, chunks: tuple, device) -> _PlannedSteps:
        steps, batch_rows = self.source.settings.steps, len(chunks)
        upload, activate = RowCopies(device, steps, max_programs=UPLOAD_PROGRAMS), RowCopies(device, 1)
        out = _PlannedSteps(upload, activate, {}, {}, [[] for _ in range(steps)], [0] * steps, [0] * steps)
        kept = self.source.resident
        for key, e in self.entries.items():
            stored = [self.source.store.tensors[(key, c)][:steps] for c in chunks]  # [steps, batch, ...] each
            batch, sample = stored[0].shape[1], stored[0].shape[2:]
            rows = batch * batch_rows
            positions = None if e.whole else self.plan.levels[e.level].read_positions(device)
            landing = torch.empty((rows, *(sample if positions is None else (len(positions), sample[-1]))),
                                  device=device, dtype=stored[0].dtype)
            n = batch * (math.prod(sample) if positions is None else len(positions) * sample[-1])
            for i, (c, t) in enumerate(zip(chunks, stored)):
                part = landing[i * batch:(i + 1) * batch]
                near = [kept.get(key, c, step) if e.context and kept is not None else None for step in range(steps)]
                near = [r if r is not None and (r.shape, r.stride()) == (t.shape[1:], t.stride()[1:]) else None
                        for r in near]
                for step, r in enumerate(near):
                    if r is None:
                        out.host_bytes[step] += n * t.element_size()
                        if e.context:
                            out.keep[step].append((key, c, part))
                    else:
                        out.resident_bytes[step] += n * t.element_size()
                # the cache's [steps, ...] tensor as it is (a step per index), or per step where the GPU keeps some
                sources = t if all(r is None for r in near) else [t[s] if r is None else r for s, r in enumerate(near)]
                if positions is None:
                    upload.add_whole(sources, part)
                elif isinstance(sources, torch.Tensor):  # views, never copies: the tables hold addresses
                    upload.add(sources.view(steps, batch, -1, sample[-1]), part, src_index=positions)
                else:
                    upload.add([s.view(batch, -1, sample[-1]) for s in sources], part, src_index=positions)
            if positions is None:
                value = from_storage(landing)
                target = out.device[key] = torch.empty(value.shape, device=device, dtype=value.dtype)
                if landing.dim() == 4:  # a map: channels-last landing into the [rows, C, H, W] buffer
                    activate.add([landing.flatten(1, 2)], as_rows(target))
                else:
                    activate.add_whole([landing], target)
            else:
                lp = self.plan.levels[e.level]
                canvas = out.device[key] = _canvas((rows, sample[-1], lp.height, lp.width), device, landing.dtype)
                activate.add([landing], as_rows(canvas), out_index=positions)
                out.staged[key] = torch.empty_like(landing)  # a copy: the next upload lands while this step runs
                activate.add_whole([landing], out.staged[key])
        return out

    def _upload_planned(self, planned: _PlannedSteps, step: int, chunks, device) -> None:
        with self._uploading(device):
            K.copy_rows(planned.upload, step)
        self._uploaded_step = (step, tuple(chunks))
        self.stats.steps += 1
        self.stats.planned_steps += 1
        self.stats.bytes_uploaded += planned.host_bytes[step]
        self.stats.bytes_resident += planned.resident_bytes[step]

    def _activate_planned(self, planned: _PlannedSteps, step: int, device) -> None:
        with self._activating(device):  # the keeps read the landing too
            K.copy_rows(planned.activate, 0)
            self._device, self._staged = planned.device, planned.staged
            for key, chunk, rows in planned.keep[step]:
                kept = self._resident_context(device)
                if kept is None or not kept.keep(key, chunk, step, rows):
                    break
            if planned.resident_bytes[step]:
                resident.budget().touch(self.source.resident)

    # --- what the sparse ops read -------------------------------------------------------------------------------
    def map(self, key: str) -> torch.Tensor:
        """The step's cached map (valid at the level's read region) or whole tensor; sparse ops write into it."""
        return self._device[key]

    def cached_active(self, key: str) -> R.AtPositions:
        """The cached values of a map at its level's active positions (`stat_positions`), where they lie: [rows, C,
        positions] at them (not gathered: the statistics kernel reads them in place)."""
        lp = self.plan.levels[self.entries[key].level]
        if self.entries[key].whole:
            return R.AtPositions(self._device[key].flatten(2), lp.stat_positions(self._device[key].device)[0])
        staged = self._staged[key]  # [rows, P, C]
        return R.AtPositions(staged.transpose(1, 2), lp.stat_positions(staged.device)[1])

    def restart(self) -> None:
        """Readies the feed for another edit of its source with the same plan (warm.py): buffers and planned moves
        stay, the step bookkeeping and the statistics start over."""
        self._collect_prefetch()
        self._step = self._staged_at = self._uploaded_step = None
        self.stats = FeedStats()

    def close(self) -> None:
        """Lets go of every buffer (device memory is released when the edit ends)."""
        self._collect_prefetch()
        for d in (self._host, self._resident, self._landing, self._device, self._staged, self._staging,
                  self._planned):
            d.clear()
        self._uploaded_step = None
        self._uploaded, self._activated, self._arena = None, None, PinnedArena()

    def _device_gatherable(self, key: str, step: int, chunk: int, device) -> torch.Tensor | None:
        """The stored rows of `key` that the GPU `device` can gather in place, or None (see the module docstring)."""
        if device is None or torch.device(device).type != "cuda" or K.backend("gather_rows", device) != "triton":
            return None
        rows = self.source.stored_rows(key, step, chunk)
        if rows is None:
            return None
        pinned = self._pinned.get(rows.untyped_storage().data_ptr())
        if pinned is None:
            pinned = self._pinned[rows.untyped_storage().data_ptr()] = rows.is_pinned()
        return rows if pinned else None

    def _gather(self, key: str, index: int, step: int, chunk: int, positions: torch.Tensor) -> torch.Tensor:
        buf = self._staging.get((key, index))
        if buf is None:
            batch, channels, dtype = self.source.stored_channels(key, chunk)
            buf = self._staging[(key, index)] = self._arena.empty((batch, len(positions), channels), dtype)
        return self.source.read_positions(key, step, chunk, positions, out=buf)


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """target.copy_(value) for every pair, as foreach copies: one call per group of the same dtypes and contiguity
    (PyTorch's multi-tensor kernel takes a group in a few launches where it can, and copies one by one where not)."""
    groups: dict = {}
    for target, value in copies:
        kind = (target.dtype, value.dtype, target.is_contiguous() and value.is_contiguous())
        groups.setdefault(kind, ([], []))
        groups[kind][0].append(target)
        groups[kind][1].append(value)
    for targets, values in groups.values():
        torch._foreach_copy_(targets, values)


_streams: dict = {}


def _copy_stream(device):
    device = torch.device(device)
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
