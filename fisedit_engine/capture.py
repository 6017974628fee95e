"""Recording a generation's activations during an ordinary sampler run.

`attach_capture(model, handle)` returns a clone of the MODEL with two keyed wrappers:
- OUTER_SAMPLE: for each sampling run, checks the sampler, starts a Recording on the handle, registers forward
  hooks on the UNet modules named by the layout, runs the sampler, and removes the hooks in `finally`;
- APPLY_MODEL: per model call, works out the step index and the CFG chunks from `transformer_options`, records the
  latent, and publishes the step context to the hooks through a ContextVar (multi-GPU ComfyUI calls the model from
  worker threads, so no global).
The hooks only read activations (copies go to host memory), so sampling stays bit-identical (invariant I1).
What cannot be recorded faithfully (several positive conditionings, area conds, a sampler that evaluates the model
between schedule steps) fails the recording with a reason that FISEditCacheStore reports; samplers known to
evaluate the model several times per step are refused before sampling starts.
"""
from __future__ import annotations

import contextvars
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import comfy_adapter as host
from . import resident
from . import other_packs
from .cache import (CacheError, FisEditCache, Region, SamplingSettings, StepTensors, pinned, same_sigma,
                    schedule_step, settings_differences, take_positions, to_storage)
from .fingerprint import conditioning_fingerprint, model_fingerprint, tensor_fingerprint
from .kernels import fused as K
from .kernels.reference import group_stats
from .kernels.row_copies import RowCopies, as_rows
from .layout import (DEFAULT_MIN_SPARSE_POSITIONS, LATENT_KEY, MODEL_OUTPUT_KEY, Target, UNetLayout, UnsupportedUNet,
                     is_probe_key, probe_record_steps)
from .registry import CacheRegistry

log = logging.getLogger("FISEdit")
SINGLE_EVALUATION = "use a single-evaluation sampler such as euler, euler_ancestral, dpmpp_2m or uni_pc"

# Samplers that call the model more than once per step (at sigmas between the schedule's steps).
MULTI_EVALUATION_SAMPLERS = frozenset({
    "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpm_fast", "dpm_adaptive", "seeds_2", "seeds_3", "sa_solver_pece",
    "exp_heun_2_x0", "exp_heun_2_x0_sde",
})


@dataclass
class StepContext:
    recording: "Recording"
    step: int
    chunks: list[int]     # cond_or_uncond of this model call: rows [i*batch:(i+1)*batch] belong to chunks[i]
    batch: int
    edit: object = None   # edit.EditState while an edit runs: the sparse forwards read it
    shared: dict = field(default_factory=dict)  # what the sparse forwards of this model call compute once for all


@dataclass
class Delta:
    """How an edit records its result: over the source's store, only the active region of each sparse level, in the
    steps before `whole_from` (later steps recompute whole maps and keep them whole)."""
    base: StepTensors
    regions: dict[str, Region]      # key -> its level's active positions
    whole_from: int

    def region(self, key: str, step: int) -> Region | None:
        return self.regions.get(key) if step < self.whole_from else None


@dataclass
class PackedValues:
    """What a captured sparse step records, as its graph leaves it after each replay: `buffer` (uint8), a step's row
    of the store's planned keys (StepTensors.rows), filled by `copies` (pack()), or None; `rest` (key, chunk,
    graph-owned value), stored key by key."""
    buffer: torch.Tensor | None
    rest: list
    copies: RowCopies | None = None
    layout: dict | None = None  # the row layout `buffer` follows (StepRows.layout)

    def pack(self) -> None:
        """Fills `buffer` from the graph's values (after a replay, before the buffer's copy to host memory:
        Recording.flush)."""
        if self.copies is not None:
            K.copy_rows(self.copies, 0)


def _stored_shape(value: torch.Tensor, positions: torch.Tensor | None) -> tuple:
    """The shape in which the store keeps `value` (to_storage), at `positions` (take_positions) if given."""
    if positions is not None:
        return (value.shape[0], len(positions), value.shape[1] if value.dim() == 4 else value.shape[-1])
    return tuple(to_storage(value).shape)


def _planned(delta: Delta, keys: set[str]) -> list[tuple[str, int, tuple, torch.dtype]]:
    """What each step of an edit records inside the model, as the source stores it: (key, chunk, one step's stored
    shape, dtype) of the recorded `keys` but the latent (recorded before the model call) and the probe keys (early
    steps only); a key of a region at its positions."""
    out = []
    for (key, chunk), t in delta.base.tensors.items():
        if key not in keys or key == LATENT_KEY or is_probe_key(key):
            continue
        shape = delta.base.step_shape(key, chunk)
        region = delta.regions.get(key)
        if region is not None:
            shape = (shape[0], len(region.positions), shape[-1])
        out.append((key, chunk, shape, t.dtype))
    return out


_step_context: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("fisedit_step", default=None)


SPARE_STAGING_BYTES = 256 << 20  # a staging row up to this size outlives its edit, for the next edit's lander
# A row waits in its staging row until the landing thread has copied it into the store; the sampler's step after
# next reuses it. Four rows landed by four threads were for landings into fresh pageable memory (3-6 ms of page
# faults per 46 MiB row); a result now records into the block its predecessor left (CacheRegistry.take_block).
# Sparse sampling with two rows and one thread against four and four, timed in palindromes on H200s
# (benchmarks/edit_wall.py --landers, results/edit_wall/nvidia-h200-2026-12-04-twelfth.md): SD2.1@768 0.190 s
# against 0.221, 0.189 against 0.193, 0.186 against 0.197; SDXL@1024 0.466 against 0.508, 0.469 against 0.451. Two
# rows hold half the pinned staging memory.
STAGING_SLOTS = 2
LANDING_THREADS = 1
_LANDING_ALIGN = 1 << 16
_spare_rows: list[torch.Tensor] = []  # the last lander's staging rows (flat bytes)
_spare_lock = threading.Lock()


def _staging_rows(nbytes: int, count: int) -> list[torch.Tensor]:
    """`count` pinned rows of at least `nbytes` bytes: the last lander's if large enough (pinning fresh memory costs
    about 0.55 s per GiB, 30 ms for SD2.1@768's two rows of a 5% edit: benchmarks/host_memory.py), else new ones."""
    with _spare_lock:
        rows, _spare_rows[:] = list(_spare_rows), []
    if len(rows) >= count and all(r.numel() >= nbytes for r in rows[:count]):
        return rows[:count]
    with torch.inference_mode(False):  # writable by the next lander, whether it runs in inference mode or not
        return [pinned((nbytes,), torch.uint8) for _ in range(count)]


def _landing_parts(nbytes: int, threads: int) -> list[slice]:
    size = -(-nbytes // threads // _LANDING_ALIGN) * _LANDING_ALIGN
    return [slice(start, min(start + size, nbytes)) for start in range(0, nbytes, size)]


class RowLander:
    """Replayed steps' packed rows on their way into the result store's pageable block (StepRows). A row is copied
    into one of STAGING_SLOTS pinned staging rows on a stream of its own, from the sampler's next model call on
    (`send`), so that the copy (about 46 MiB per step at SD2.1@768 with a 5% mask, a millisecond or more) overlaps the
    sampler's next step instead of delaying it (the sampler waits on the main stream every step); landing threads
    then wait for that copy to land and copy the staging row into the store in LANDING_THREADS parts, beside the
    main thread's next steps. A staging row is taken
    again STAGING_SLOTS steps later, once its landing has finished; the row on the device is refilled (`fill`) once
    the previous copy has read it. The staging rows pass to the next edit's lander when this one shuts down (up to
    SPARE_STAGING_BYTES each). On the CPU (tests) the same path runs without the GPU's streams and waits."""

    def __init__(self, shape, slots: int | None = None, threads: int | None = None):
        nbytes = math.prod(shape)
        self._flat = _staging_rows(nbytes, slots or STAGING_SLOTS)
        self._rows = [row[:nbytes].view(shape) for row in self._flat]
        self._parts = _landing_parts(nbytes, threads or LANDING_THREADS)
        self._landing: list[list[Future]] = [[] for _ in self._rows]
        self._workers = ThreadPoolExecutor(max_workers=len(self._parts), thread_name_prefix="fisedit-rows")
        self._stream = None
        self._read = None  # the event after which the last copy has read the device row
        self._pending = None  # the row put last, its copy not started yet (send)

    def put(self, row: torch.Tensor, into: torch.Tensor, step: int, fill=None) -> None:
        """Runs `fill` (which writes `row`), then moves `row` (bytes, on the GPU or the CPU) into `into` (a row of
        the store), without waiting for either. On a GPU the copy starts at `send`."""
        self.send()
        slot = step % len(self._rows)
        self._wait(slot)
        current = torch.cuda.current_stream(row.device) if row.is_cuda else None
        if current is not None and self._read is not None:
            current.wait_event(self._read)
        if fill is not None:
            fill()
        if current is None:
            self._rows[slot].copy_(row)
            self._land_later(slot, None, into)
            return
        self._pending = (row, into, slot)

    def send(self) -> None:
        """Starts the copy of the row put last, if not started yet. The sampler's next model call sends it once it
        has queued its own small copies to host memory (the step's sigma and latent): those would wait behind this
        one on the GPU's copy engine, and the step with them (0.8 ms at SD2.1@768, 5%: benchmarks/gpu_timeline.py).
        The copy waits for what the main stream has queued so far, not only for the fill: a copy engine takes copies
        in the order they become ready, and one waiting for the fill alone is ready before those small copies."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        row, into, slot = pending
        if self._stream is None:
            self._stream = torch.cuda.Stream(row.device)
        self._stream.wait_stream(torch.cuda.current_stream(row.device))
        with torch.cuda.stream(self._stream):
            self._rows[slot].copy_(row, non_blocking=True)
            self._read = landed = torch.cuda.Event()
            landed.record(self._stream)
        self._land_later(slot, landed, into)

    def _land_later(self, slot: int, landed, into: torch.Tensor) -> None:
        staged = self._rows[slot]
        if into.numel() != staged.numel():  # not a row of this size: the whole copy fails, raised as landings' are
            self._landing[slot] = [self._workers.submit(_land, landed, staged, into)]
            return
        source, target = staged.view(-1), into.view(-1)
        self._landing[slot] = [self._workers.submit(_land, landed, source[part], target[part])
                               for part in self._parts]

    def drain(self) -> None:
        """Sends the last row, and waits for every landing; raises what one raised."""
        self.send()
        for slot in range(len(self._landing)):
            self._wait(slot)

    def shutdown(self) -> None:
        """Ends the workers after their landings (their failures, if any, go unread: for a run that failed already),
        and hands the staging rows on: every copy into them has landed (each landing waits for its copy)."""
        self._workers.shutdown(wait=True)
        if self._flat[0].numel() <= SPARE_STAGING_BYTES:
            with _spare_lock:
                _spare_rows[:] = self._flat
        self._flat = self._rows = []

    def _wait(self, slot: int) -> None:
        landing, self._landing[slot] = self._landing[slot], []
        for part in landing:
            part.result()


def _land(landed, staged: torch.Tensor, into: torch.Tensor) -> None:
    if landed is not None:
        landed.synchronize()
    with torch.inference_mode():  # the store may hold inference tensors (ComfyUI samples in inference mode)
        into.copy_(staged)


class Recording:
    """One sampling run being recorded into host memory."""

    def __init__(self, name: str, registry: CacheRegistry, steps: int, batch: int, sigmas: torch.Tensor,
                 targets: list[Target], delta: "Delta | None" = None):
        self.name = name
        self.registry = registry
        self.store = StepTensors(steps, batch)
        self.delta = delta
        # a source may hold keys that this layout no longer records (a cache saved by an earlier version): an edit's
        # result leaves them out, as a new capture would
        self.keys = {t.key for t in targets} | {LATENT_KEY}
        if delta is not None:
            self.store.base = delta.base
            self.store.plan_rows(_planned(delta, self.keys), blocks=registry)
        self.deferred: list | None = None  # recorded by a step that packs its record: (key, chunk, value, positions)
        self.resident: resident.ResidentContext | None = None  # the attention context kept on the GPU
        self.probe_steps = probe_record_steps(steps)
        self.sigmas = sigmas.detach().float().cpu()
        self.targets = targets
        self.reserved = 0
        self.state = "recording"          # recording -> complete | failed; complete -> sealed
        self.failure: str | None = None
        self.evaluated: set[tuple[int, int]] = set()
        self._sigma_buffer: torch.Tensor | None = None  # pinned: the sigmas of model calls on a GPU, read later
        self._sigmas_pending: list = []                 # (buffer slot, CUDA event, step, chunks) not yet checked
        self._lander: RowLander | None = None          # replayed steps' packed rows on their way into the store
        self._adopted: PackedValues | None = None      # the packing whose planned keys' storage is taken
        self.last_step = -1
        self.partial_settings: dict = {}
        self.noise = self.latent_image = self.final_latent = None
        self.conds: dict = {}

    @property
    def active(self) -> bool:
        return self.state == "recording"

    # --- per model call ------------------------------------------------------------------------------
    def step_context(self, x: torch.Tensor, transformer_options: dict) -> StepContext | None:
        chunks = list(transformer_options.get("cond_or_uncond", []))
        sigmas = transformer_options.get("sigmas")
        if not chunks or sigmas is None:
            self.fail("the model was called without ComfyUI's sampling context (cond_or_uncond, sigmas): run the "
                      "captured MODEL through a sampler node (KSampler, KSamplerAdvanced, SamplerCustom)")
            return None
        if len(set(chunks)) != len(chunks) or any(c not in host.CHUNK_NAMES for c in chunks):
            self.fail("this generation has several positive or negative conditionings in one step (combined or "
                      "area conditioning); FISEdit supports one positive and one negative conditioning: remove "
                      "ConditioningCombine / ConditioningSetArea before the sampler")
            return None
        batch = x.shape[0] // len(chunks)
        if batch != self.store.batch or x.shape[-2:] != self.noise.shape[-2:]:
            self.fail(f"a model call covered {tuple(x.shape)} but the latent is {tuple(self.noise.shape)} "
                      f"(area conditioning crops the input); FISEdit needs whole-image conditioning: remove "
                      f"ConditioningSetArea / ConditioningSetMask before the sampler")
            return None
        sigma = sigmas.reshape(-1)[0]
        if sigma.device.type == "cpu":
            step = self._schedule_step(float(sigma), chunks)
            if step is None:
                return None
        else:
            # Reading a GPU value waits for the GPU to finish all queued work, which would keep the host from
            # preparing this step while the last one runs. A single-evaluation sampler evaluates each chunk once per
            # step, in order: the step is the next one of these chunks, checked against sigma once its copy lands.
            self._check_sigmas()
            if not self.active:
                return None
            step = max((s for s, c in self.evaluated if c in chunks), default=-1) + 1
            if step >= len(self.sigmas) - 1:
                self.fail(f"the sampler evaluated the model after the schedule's last step; only samplers that "
                          f"evaluate the model once per step can be cached: {SINGLE_EVALUATION}")
                return None
            self._sigma_later(sigma, step, chunks)
        for c in chunks:
            self.evaluated.add((step, c))
        self.last_step = max(self.last_step, step)
        return StepContext(self, step, chunks, batch)

    def _schedule_step(self, sigma: float, chunks: list[int], evaluated: set | None = None) -> int | None:
        """The schedule step at `sigma`, or None after failing: between the schedule's steps, or a chunk of this
        step evaluated before (in `evaluated`, by default the evaluations so far)."""
        evaluated = self.evaluated if evaluated is None else evaluated
        schedule = self.sigmas[:-1]
        step = schedule_step(schedule, sigma)
        if not same_sigma(float(schedule[step]), sigma):
            self.fail(f"the sampler evaluated the model at sigma {sigma:.4g}, between the schedule's steps; only "
                      f"samplers that evaluate the model once per step can be cached: {SINGLE_EVALUATION}")
            return None
        for c in chunks:
            if (step, c) in evaluated:
                self.fail(f"the model was evaluated twice at step {step} for the {host.CHUNK_NAMES[c]} chunk "
                          f"(a multi-evaluation sampler, or several conditionings of one kind): "
                          f"{SINGLE_EVALUATION}, with one positive and one negative conditioning")
                return None
        return step

    def _sigma_later(self, sigma: torch.Tensor, step: int, chunks: list[int]) -> None:
        """Copies a model call's sigma to host memory without waiting; `_check_sigmas` reads it once it landed."""
        if self._sigma_buffer is None:
            self._sigma_buffer = pinned((2 * len(self.sigmas) + 2,), torch.float64)  # calls of a 2-chunk run
        slot = self._sigmas_pending[-1][0] + 1 if self._sigmas_pending else 0
        if slot >= self._sigma_buffer.numel():  # every slot is waiting to be read: read them, start over
            self._check_sigmas(wait=True)
            slot = 0
        self._sigma_buffer[slot:slot + 1].copy_(sigma.reshape(1), non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        self._sigmas_pending.append((slot, landed, step, list(chunks)))

    def _check_sigmas(self, wait: bool = False) -> None:
        """Checks the sigmas of earlier model calls that have landed in host memory (all of them with `wait`) against
        the steps they were recorded as; a mismatch fails the recording with the reason a sigma read at once gives."""
        while self._sigmas_pending and self.active:
            slot, landed, step, chunks = self._sigmas_pending[0]
            if not wait and not landed.query():
                return
            landed.synchronize()
            self._sigmas_pending.pop(0)
            sigma = float(self._sigma_buffer[slot])
            if same_sigma(float(self.sigmas[step]), sigma):
                continue
            earlier = {(s, c) for s, c in self.evaluated if s < step or (s == step and c not in chunks)}
            if self._schedule_step(sigma, chunks, earlier) is not None:  # on the schedule, but not the next step
                self.fail(f"the sampler evaluated the model at step {schedule_step(self.sigmas[:-1], sigma)} where "
                          f"step {step} was next (it skipped or repeated steps): {SINGLE_EVALUATION}")

    def record(self, key: str, ctx: StepContext, rows: torch.Tensor) -> None:
        """Copies each chunk's rows of `rows` ([chunks*batch, ...]) into host memory at ctx.step."""
        if not self.active:
            return
        b = ctx.batch
        if rows.shape[0] != b * len(ctx.chunks):
            self.fail(f"'{key}' had {rows.shape[0]} rows, expected {b * len(ctx.chunks)}: a node patching the model "
                      f"changes its batch; sample without it")
            return
        probe_only = is_probe_key(key)
        if probe_only and ctx.step >= self.probe_steps:
            return
        for i, chunk in enumerate(ctx.chunks):
            if not probe_only or chunk == host.COND:
                self._write(key, chunk, ctx.step, rows[i * b:(i + 1) * b])

    def copy_step(self, source: StepTensors, ctx: StepContext, skip=()) -> None:
        """Records, for this step and the call's chunks, every tensor of `source` (a step that ran no model)."""
        if not self.active:
            return
        for (key, chunk), t in source.tensors.items():
            if key in skip or key not in self.keys or chunk not in ctx.chunks or ctx.step >= t.shape[0]:
                continue
            region = self.delta.region(key, ctx.step) if self.delta is not None else None
            if region is None:
                self._write(key, chunk, ctx.step, source.step(key, chunk, ctx.step))
            elif source is self.store.base:  # the delta's values at its region are its base's: read through
                self.store.regions[key] = region
                self._store_from_base(key, chunk, ctx.step, (len(region.positions), t.shape[-1]), t.dtype)
            else:
                self.store.regions[key] = region
                self._store(key, chunk, ctx.step, source.step_positions(key, chunk, ctx.step, region.positions))

    def record_latent(self, ctx: StepContext, x: torch.Tensor) -> None:
        written = self.store.written.get((LATENT_KEY, host.COND))
        if written is None or not written[ctx.step]:
            self._write(LATENT_KEY, host.COND, ctx.step, x[:ctx.batch])

    def _write(self, key: str, chunk: int, step: int, value: torch.Tensor) -> None:
        if not self.active:  # failed within this step (e.g. over budget): nothing more is kept or reserved
            return
        region = self.delta.region(key, step) if self.delta is not None else None
        if region is not None:
            self.store.regions[key] = region
        elif self.delta is not None and key in self.delta.regions:  # a step that recomputed the whole map
            nbytes = value.numel() * value.element_size()
            self.registry.reserve(nbytes, what=f"the FISEdit cache '{self.name}'")
            self.reserved += nbytes
            self.store.whole[(key, chunk, step)] = pinned(value.shape, value.dtype).copy_(value, non_blocking=True)
            value = take_positions(value, self.delta.regions[key].on(value.device))  # keeps the delta whole
        if self.deferred is not None:
            # taken at the end of the step (take_deferred): a region's values are gathered there, from the map as
            # the step leaves it (a sparse level's maps are written only by the op that makes them); a whole value
            # is copied now, as the eager path's store does
            positions = region.on(value.device) if region is not None else None
            self.deferred.append((key, chunk, value if region is not None else value.clone(), positions))
            return
        if region is not None:
            value = take_positions(value, region.on(value.device))
        self._store(key, chunk, step, value)

    def _slot(self, key: str, chunk: int, sample_shape, dtype) -> torch.Tensor:
        """The store's [steps, batch, ...] tensor of (key, chunk), its bytes reserved on first use."""
        steps = self.probe_steps if is_probe_key(key) else self.store.steps
        if (key, chunk) not in self.store.tensors:
            nbytes = StepTensors.bytes_for(steps, self.store.batch, sample_shape, dtype)
            self.registry.reserve(nbytes, what=f"the FISEdit cache '{self.name}'")
            self.reserved += nbytes
        return self.store.slot(key, chunk, sample_shape, dtype, steps)

    def _store(self, key: str, chunk: int, step: int, value: torch.Tensor) -> None:
        value = to_storage(value)
        slot = self._slot(key, chunk, value.shape[1:], value.dtype)
        slot[step].copy_(value.detach(), non_blocking=True)
        self.store.written[(key, chunk)][step] = True
        if self.delta is None and value.is_cuda and resident.is_attention_context(key):
            self._keep_on_device(key, chunk, step, value)

    def _store_from_base(self, key: str, chunk: int, step: int, sample_shape: tuple, dtype) -> None:
        """Marks `step` of a delta key as its base's values: nothing is copied (a replayed probe step, which gathered
        about 400 maps on the host per step, 80 ms each at SD2.1@768). The key's storage is still reserved and
        allocated here, for the steps that do compute."""
        self._slot(key, chunk, sample_shape, dtype)
        self.store.written[(key, chunk)][step] = True
        self.store.from_base.add((key, chunk, step))

    def _keep_on_device(self, key: str, chunk: int, step: int, value: torch.Tensor) -> None:
        """A generation's attention context stays on the GPU for its edits (resident.py). An edit's result records
        only its region (a delta), so its context is kept by the edits of it, from what they upload."""
        if self.resident is None:
            self.resident = resident.budget().context(value.device)
        if self.resident is not None:
            self.resident.keep(key, chunk, step, value)

    def take_deferred(self) -> tuple[dict, list]:
        """At the end of a captured step, what it recorded into `deferred`: ({(key, chunk): (value, positions)} of the
        planned keys (StepTensors.plan_rows), packed after each replay (`packing`); [(key, chunk, value)] of the rest,
        stored key by key: the probe keys, and everything should the step record other than what was planned. A
        region's values are gathered here, so inside the graph."""
        rows = self.store.rows
        planned, rest = {}, []
        for key, chunk, value, positions in self.deferred:
            if rows is None or (key, chunk) not in rows.layout or (key, chunk) in planned:
                rest.append((key, chunk, value, positions))
            else:
                planned[(key, chunk)] = (value, positions)
        if rows is None or planned.keys() != rows.layout.keys() or any(
                (_stored_shape(v, p), v.dtype) != rows.layout[k][1:3] for k, (v, p) in planned.items()):
            if planned:
                log.info("FISEdit: a captured sparse step records other tensors than planned; its record is "
                         "stored key by key")
            rest, planned = list(self.deferred), {}
        return planned, [(key, chunk, value if p is None else take_positions(value, p))
                         for key, chunk, value, p in rest]

    def packing(self, deferred: tuple[dict, list]) -> "PackedValues":
        """The row copies that pack a captured step's planned values (take_deferred) into one row of the store, built
        once the capture has ended (their tables live outside the graph's memory pool)."""
        planned, rest = deferred
        if not planned:
            return PackedValues(None, rest)
        rows = self.store.rows
        first = next(iter(planned.values()))[0]
        buffer = torch.empty(rows.block.shape[1], dtype=torch.uint8, device=first.device)
        copies = RowCopies(first.device, steps=1)
        for (key, chunk), (value, positions) in planned.items():
            offset, shape, dtype, _ = rows.layout[(key, chunk)]
            out = buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape[0], -1, shape[-1])
            copies.add([as_rows(value)], out, src_index=positions)
        packed = PackedValues(buffer, rest, copies, dict(rows.layout))
        self._adopt(packed)
        return packed

    def _adopt(self, packed: "PackedValues") -> None:
        """Takes the planned keys' storage for the rows that `packed` fills: at the capture, or at the first replay
        of a graph kept from an earlier edit (warm.py), whose recording planned its rows alike."""
        self._adopted = packed
        if packed.buffer is None:
            return
        if self.store.rows is None or self.store.rows.layout != packed.layout:
            raise CacheError(f"internal error: the CUDA graph kept from an earlier edit packs its record in another "
                             f"layout than this edit's result plans ('{self.name}'); set FISEDIT_KEEP_GRAPHS=0 and "
                             f"report this")
        for (key, chunk), (_, shape, dtype, _) in packed.layout.items():
            self._slot(key, chunk, shape[1:], dtype)

    def flush(self, packed: "PackedValues", step: int) -> None:
        """Stores, for `step`, what a replayed CUDA graph recorded (its static outputs, see `deferred`): the planned
        keys as one row, which a RowLander moves into the store beside the next steps, the rest key by key."""
        if not self.active:
            return
        if packed is not self._adopted:
            self._adopt(packed)
        if packed.buffer is not None:
            if self._lander is None:
                self._lander = RowLander(packed.buffer.shape)
            self._lander.put(packed.buffer, self.store.rows.block[step], step, fill=packed.pack)
            self.store.rows.written[:, step] = True
        for key, chunk, value in packed.rest:
            if not is_probe_key(key) or step < self.probe_steps:
                self._store(key, chunk, step, value)

    def send_rows(self) -> None:
        """Starts moving the last replayed step's row to the host (RowLander.send): called by a model call once it
        has queued its own copies to host memory."""
        if self._lander is not None:
            self._lander.send()

    def _drain(self) -> None:
        """Waits until every flushed row is in the store (raising what a landing raised), and ends the lander."""
        lander, self._lander = self._lander, None
        if lander is not None:
            try:
                lander.drain()
            finally:
                lander.shutdown()

    # --- lifecycle --------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        if self.state == "failed":
            return
        self.state = "failed"
        self.failure = reason
        self._free()
        log.warning("FISEdit: not recording this generation into '%s': %s", self.name, reason)

    def abort(self, exc: BaseException) -> None:
        if self.state != "recording":
            return
        steps = self.store.steps
        if host.is_interrupt(exc):
            self.fail(f"sampling was interrupted after step {self.last_step + 1} of {steps}; re-run the sampler")
        else:
            self.fail(f"sampling stopped after step {self.last_step + 1} of {steps} with "
                      f"{type(exc).__name__}: {exc}; re-run the sampler")

    def finish(self, final_latent: torch.Tensor) -> None:
        if self.state != "recording":
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before anyone reads them
        self._drain()
        self._check_sigmas(wait=True)
        if not self.active:
            return
        missing = self.store.missing()
        if missing:
            key, chunk, step = missing[0]
            self.fail(f"the run left {len(missing)} (tensor, chunk, step) entries unrecorded, e.g. '{key}' "
                      f"{host.CHUNK_NAMES[chunk]} step {step}; the sampler skipped steps: "
                      f"{SINGLE_EVALUATION}, which runs every step")
            return
        self.final_latent = final_latent.detach().cpu()
        self.state = "complete"

    def __del__(self):
        # A run recorded but never sealed (no FISEditCacheStore ran, or ComfyUI dropped the capture node's output
        # first) gives its reservation back when nothing holds it any more; otherwise the budget shrinks for good.
        if getattr(self, "reserved", 0):
            self.registry.release_later(self.reserved)

    def _free(self) -> None:
        if self._lander is not None:  # a failed run: its rows are dropped with the store, landed or not
            self._lander.shutdown()
            self._lander = None
        if self.resident is not None:
            self.resident.release()
            self.resident = None
        self.store = StepTensors(self.store.steps, self.store.batch)  # also lets go of an edit's source (its base)
        self.delta = None
        self.registry.release(self.reserved)
        self.reserved = 0

    def seal(self, settings: SamplingSettings) -> FisEditCache:
        cache = FisEditCache(self.name, settings, self.store, self.noise, self.latent_image, self.final_latent,
                             self.conds, resident=self.resident)
        self.resident = None
        self.registry.put(cache, reserved=self.reserved)
        self.reserved = 0
        self.state = "sealed"
        # The registry owns the tensors now. ComfyUI keeps this recording alive (through the handle in its output
        # cache) long after the registry may have evicted the cache; holding the store (or an edit's source store,
        # through the delta) here would keep their bytes.
        self.store = StepTensors(self.store.steps, self.store.batch)
        self.delta = None
        return cache


class CacheHandle:
    """FISEDIT_CACHE: names a cache in the registry; a capture handle also carries the run being recorded.

    The registry is keyed by name, and another capture may seal a different generation under the same name (two
    capture nodes with one cache_name, or a workflow re-run elsewhere) while ComfyUI still holds this handle in its
    output cache. So a handle remembers the settings of the generation it sealed or loaded, and refuses a cache
    under its name that is not that generation, naming what differs.

    ComfyUI deep-copies model options on every clone; the handle must stay one object, so copies return self."""

    def __init__(self, name: str, registry: CacheRegistry, min_sparse_positions: int = DEFAULT_MIN_SPARSE_POSITIONS,
                 delta: Delta | None = None):
        self.name = name
        self.registry = registry
        self.min_sparse_positions = min_sparse_positions
        self.delta = delta  # an edit's handle records its result as this delta over the source
        self.feed_stats = None  # an edit's handle: what its sparse steps uploaded (feed.FeedStats)
        self.graph_replays = 0  # an edit's handle: sparse steps replayed as a CUDA graph
        self.recording: Recording | None = None
        self.settings: SamplingSettings | None = None  # of the generation this handle sealed or loaded
        self.edit_summary: str | None = None  # set on the handle an edit returns

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def get(self) -> FisEditCache:
        cache = self.registry.get(self.name)
        if self.settings is not None and cache.settings != self.settings:
            raise CacheError(
                f"cache '{self.name}' now holds another generation than the one connected here; it differs in: "
                f"{'; '.join(settings_differences(self.settings, cache.settings))}. Another capture sealed its run "
                f"under the same cache_name: give each FISEditCacheCapture its own cache_name (or leave it empty), "
                f"and re-run this workflow's capture")
        return cache

    def __repr__(self):
        return f"CacheHandle({self.name!r})"


class _CaptureWrapper:
    """Base for the wrappers: holds the handle; copies are the same object (see CacheHandle)."""

    def __init__(self, handle: CacheHandle):
        self.handle = handle

    def __deepcopy__(self, memo):
        return self


class CaptureOuterSample(_CaptureWrapper):
    def __init__(self, handle: CacheHandle, known_fingerprint: str | None = None, known_layout=None):
        """`known_fingerprint`: the sampled model's, where the caller knows it (an edit samples a clone of the model
        it checked against its source, plus FISEdit's own patches, which fingerprints leave out); fingerprinting an
        SD2.1 UNet takes 6-7 ms of host time (benchmarks/edit_overhead.py). `known_layout`: (UNet, its UNetLayout),
        where the caller built it (1.5 ms), used when the sampled UNet is that one."""
        super().__init__(handle)
        self.known_fingerprint = known_fingerprint
        self.known_layout = known_layout

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        a = host.outer_sample_args(args, kwargs)
        sampler = host.sampler_name(a["sampler"])
        if sampler in MULTI_EVALUATION_SAMPLERS:
            raise CacheError(f"FISEdit cannot cache sampler '{sampler}': it evaluates the model several times per "
                             f"step; {SINGLE_EVALUATION} (or dpmpp_2m_sde, ddim, lcm) with FISEditCacheCapture")
        if a.get("denoise_mask") is not None:
            raise CacheError("FISEdit cannot cache an inpainting run (the latent has a noise mask); remove "
                             "SetLatentNoiseMask, or sample without FISEditCacheCapture")
        unet = host.diffusion_model_of_guider(guider)
        try:
            known_unet, layout = self.known_layout or (None, None)
            if known_unet is not unet:
                layout = UNetLayout.from_unet(unet)
        except UnsupportedUNet as e:
            raise CacheError(f"FISEdit supports SD1.x/SD2.x/SDXL UNets; this model is not one ({e}): capture a "
                             f"generation of an SD1.x, SD2.x or SDXL checkpoint") from e
        noise, sigmas = a["noise"], a["sigmas"]
        batch, _, height, width = noise.shape
        sparse = layout.sparse_levels(height, width, self.handle.min_sparse_positions)
        patches = other_packs.check_capture(guider.model_patcher, layout, sparse)
        rec = Recording(self.handle.name, self.handle.registry, len(sigmas) - 1, batch, sigmas, layout.targets(sparse),
                        self.handle.delta)
        rec.noise = noise.detach().cpu()
        rec.latent_image = a["latent_image"].detach().cpu()
        rec.conds = host.guider_conds(guider)
        if any(host.carries_control(item) for items in rec.conds.values() for item in items):
            rec.fail("this generation uses a ControlNet or T2I-Adapter, which adds to the UNet's block outputs after "
                     "FISEdit records them, so no edit could rebuild what the network read; the image is unaffected: "
                     "capture a generation without Apply ControlNet")
        rec.partial_settings = dict(
            sampler=sampler, sampler_extra_options=host.sampler_extra_options(a["sampler"]),
            sampler_inpaint_options=host.sampler_inpaint_options(a["sampler"]),
            seed=a.get("seed"), sigmas=tuple(float(s) for s in rec.sigmas), cfg=float(getattr(guider, "cfg", 1.0)),
            sparse_levels=tuple(sparse), min_sparse_positions=self.handle.min_sparse_positions,
            model_fingerprint=self.known_fingerprint or model_fingerprint(guider.model_patcher),
            model_patches=tuple(v.patch.describe() for v in patches),
            negative_fingerprint=conditioning_fingerprint(rec.conds.get("negative")),
            positive_fingerprint=conditioning_fingerprint(rec.conds.get("positive")),
            noise_fingerprint=tensor_fingerprint(rec.noise),
            latent_image_fingerprint=tensor_fingerprint(rec.latent_image),
        )
        previous, self.handle.recording = self.handle.recording, rec
        if previous is not None and previous.state in ("recording", "complete"):
            previous.fail("superseded by a newer run of the captured model")
        hooks = _install_hooks(unet, rec)
        try:
            out = executor(*args, **kwargs)
            rec.finish(out)  # outer_sample returns the LATENT as nodes receive it
            return out
        except BaseException as e:
            rec.abort(e)
            raise
        finally:
            for h in hooks:
                h.remove()


class CaptureApplyModel(_CaptureWrapper):
    def __init__(self, handle: CacheHandle, edit=None):
        super().__init__(handle)
        self.edit = edit

    def __call__(self, executor, *args, **kwargs):
        rec = self.handle.recording
        if rec is None or not rec.active:
            return executor(*args, **kwargs)
        x, transformer_options = host.apply_model_args(args, kwargs)
        ctx = rec.step_context(x, transformer_options)
        if ctx is None:
            return executor(*args, **kwargs)
        rec.record_latent(ctx, x)
        rec.send_rows()
        ctx.edit = self.edit
        if self.edit is not None and self.edit.replays(ctx.step):
            return self.edit.replay(ctx, x, args[1] if len(args) > 1 else kwargs["t"], executor.class_obj.model_sampling)
        token = _step_context.set(ctx)
        try:
            return executor(*args, **kwargs)
        finally:
            _step_context.reset(token)


def current_step() -> StepContext | None:
    """The model call in progress, as the APPLY_MODEL wrapper published it (None outside FISEdit runs)."""
    return _step_context.get()


def _current(rec: Recording) -> StepContext | None:
    ctx = _step_context.get()
    return ctx if ctx is not None and ctx.recording is rec and rec.active else None


def _install_hooks(unet, rec: Recording) -> list:
    modules = dict(unet.named_modules())
    handles = []
    for t in rec.targets:
        module = modules.get(t.module_path)
        if module is None:
            raise CacheError(f"FISEdit layout names '{t.module_path}', which this UNet does not have (a node replaced "
                             f"its blocks): capture with the checkpoint's own model, without that node")
        key = t.key
        if t.what == "stats":
            groups = module.num_groups

            def hook(m, inputs, key=key, groups=groups):
                ctx = _current(rec)
                if ctx is not None:
                    rec.record(key, ctx, group_stats(inputs[0], groups))
            handles.append(module.register_forward_pre_hook(hook))
        elif t.what == "input":
            def hook(m, inputs, key=key):
                ctx = _current(rec)
                if ctx is not None:
                    rec.record(key, ctx, inputs[0])
            handles.append(module.register_forward_pre_hook(hook))
        else:  # a module's output: block outputs, attention keys / values, the model output
            def hook(m, inputs, output, key=key):
                ctx = _current(rec)
                if ctx is not None:
                    rec.record(key, ctx, output)
            handles.append(module.register_forward_hook(hook))
    return handles


def attach_capture(model, handle: CacheHandle):
    """A clone of `model` that records every sampling run into `handle`; the input model is left untouched."""
    patched = model.clone()
    host.add_outer_sample_wrapper(patched, CaptureOuterSample(handle))
    host.add_apply_model_wrapper(patched, CaptureApplyModel(handle))
    return patched


def seal(handle: CacheHandle, latent_samples: torch.Tensor) -> FisEditCache:
    """Checks the handle's last run is complete and produced `latent_samples`; registers it as a sealed cache."""
    rec = handle.recording
    if rec is None:
        raise CacheError("nothing was recorded into this cache: connect FISEditCacheCapture's MODEL output to the "
                         "sampler whose LATENT output goes into FISEditCacheStore")
    if rec.state == "failed":
        raise CacheError(f"the captured generation cannot be cached: {rec.failure}")
    if rec.state == "recording":
        raise CacheError(f"the captured generation is incomplete (sampling stopped after step {rec.last_step + 1} "
                         f"of {rec.store.steps}); re-run the sampler")
    produced = rec.final_latent
    if not torch.isfinite(produced).all():
        rec.fail("the captured generation produced NaN or infinite values (a diverged model, fp16 overflow, or NaN "
                 "in its inputs); there is nothing to edit: fix the generation, then re-run the capture")
        raise CacheError(rec.failure)
    given = latent_samples.detach().cpu().to(produced.dtype)
    if given.shape != produced.shape or not torch.equal(given, produced):
        raise CacheError(f"this LATENT ({tuple(given.shape)}) is not the output of the sampler that ran the captured "
                         f"model ({tuple(produced.shape)}); connect that sampler's LATENT to FISEditCacheStore")
    if rec.state == "sealed":
        return handle.get()
    chunks = tuple(sorted({c for _, c in rec.evaluated}))
    dtype = rec.store.tensors[(MODEL_OUTPUT_KEY, chunks[0])].dtype  # activations' dtype; the latent is always fp32
    settings = SamplingSettings(latent_shape=tuple(rec.noise.shape), dtype=str(dtype).removeprefix("torch."),
                                chunks=chunks, **rec.partial_settings)
    cache = rec.seal(settings)
    handle.settings = settings
    handle.delta = None  # the result's store has its base; the handle must not keep the source alive on its own
    log.info("%s", cache.summary_text())
    return cache
