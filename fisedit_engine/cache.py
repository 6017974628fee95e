"""The activation cache of one generation: per recorded tensor and CFG chunk, one host tensor [steps, batch, ...].

Keys name what was recorded (see layout.py): a block path ("input_blocks.1.0"), a ResBlock's inner activation
("input_blocks.1.0:h"), attention keys/values ("...attn1:k"), GroupNorm statistics ("...:stats", fp32
[batch, groups, 2] = mean, var), the model output ("out") and the latent ("x", the same for every chunk, stored
under the cond chunk). Activations keep the model's dtype (fp16/bf16 on GPU, fp32 on CPU) and are pinned when
CUDA is present, because sparse steps upload slices of them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import weakref
from dataclasses import dataclass, field

import torch

from .comfy_adapter import CHUNK_NAMES, COND
from .graphs import outside_capture


class CacheError(ValueError):
    """A cache cannot be used as asked; the message says what to change."""


def schedule_step(schedule: torch.Tensor, sigma) -> int:
    """The index of the schedule's sigma nearest to `sigma` (a number or a tensor whose first value is the sigma)."""
    value = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    return int(torch.argmin((schedule - value).abs()))


def same_sigma(scheduled: float, sigma: float) -> bool:
    """Whether a model call's sigma is the schedule's (within float32 rounding of the sampler's arithmetic)."""
    return math.isclose(scheduled, sigma, rel_tol=1e-4, abs_tol=1e-6)


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that must match between the captured generation and an edit of it."""
    sampler: str
    sampler_extra_options: dict
    sampler_inpaint_options: dict
    seed: int | None
    sigmas: tuple[float, ...]
    cfg: float
    latent_shape: tuple[int, ...]          # model-space latent [B, C, H, W]
    dtype: str                              # activation dtype
    chunks: tuple[int, ...]                 # CFG chunks the model evaluated: (0,) with cfg 1, (0, 1) otherwise
    sparse_levels: tuple[int, ...]
    min_sparse_positions: int
    model_fingerprint: str
    negative_fingerprint: str
    positive_fingerprint: str
    noise_fingerprint: str
    latent_image_fingerprint: str
    model_patches: tuple[str, ...] = ()     # what the fingerprint covers besides the weights, in words (messages)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def describe(self) -> str:
        b, _, h, w = self.latent_shape
        return (f"{w * 8}x{h * 8} (latent {w}x{h}), batch {b}, {self.sampler}/{self.steps} steps, cfg {self.cfg:g}, "
                f"seed {self.seed}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SamplingSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise CacheError(f"unknown settings fields {sorted(unknown)}: the cache was written by a newer FISEdit; "
                             f"update FISEdit, or re-capture the generation with this one")
        d = dict(d)
        for k in ("sigmas", "latent_shape", "chunks", "sparse_levels", "model_patches"):
            if k in d:  # caches written before model_patches existed lack it
                d[k] = tuple(d[k])
        return cls(**d)


def settings_differences(expected: SamplingSettings, found: SamplingSettings) -> list[str]:
    """What differs between two generations' settings, in the words of ComfyUI's widgets ("seed 4 (was 3)").

    The sigmas stand for steps, scheduler and denoise together: their count gives the steps; with equal counts a
    schedule that starts lower is a denoise below 1 (ComfyUI drops the first sigmas of a longer schedule), one that
    starts at the same sigma is another scheduler."""
    out = []

    def was(what, new, old):
        out.append(f"{what} {new} (was {old})")

    e, f = expected, found
    if e.model_fingerprint != f.model_fingerprint:
        out.append("model (its weights, LoRAs or patches)")
    if e.sampler != f.sampler:
        was("sampler", f.sampler, e.sampler)
    if (e.sampler_extra_options, e.sampler_inpaint_options) != (f.sampler_extra_options, f.sampler_inpaint_options):
        out.append("sampler options")
    if e.seed != f.seed:
        was("seed", f.seed, e.seed)
    if e.steps != f.steps:
        was("steps", f.steps, e.steps)
    elif e.sigmas != f.sigmas:
        if not math.isclose(e.sigmas[0], f.sigmas[0], rel_tol=1e-6):
            out.append(f"denoise or scheduler (the schedule starts at sigma {f.sigmas[0]:.4g}, was {e.sigmas[0]:.4g})")
        else:
            out.append("scheduler (same steps and first sigma, other sigmas in between)")
    if e.cfg != f.cfg:
        was("cfg", f"{f.cfg:g}", f"{e.cfg:g}")
    (eb, _, eh, ew), (fb, _, fh, fw) = e.latent_shape, f.latent_shape
    if (eh, ew) != (fh, fw):
        was("size", f"{fw * 8}x{fh * 8}", f"{ew * 8}x{eh * 8}")
    if eb != fb:
        was("batch", fb, eb)
    if e.negative_fingerprint != f.negative_fingerprint:
        out.append("negative prompt")
    if e.positive_fingerprint != f.positive_fingerprint:
        out.append("positive prompt")
    # the noise follows from the seed and the shape, the empty latent from the shape: named only when they alone differ
    same_shape = e.latent_shape == f.latent_shape
    if e.noise_fingerprint != f.noise_fingerprint and e.seed == f.seed and same_shape:
        out.append("initial noise")
    if e.latent_image_fingerprint != f.latent_image_fingerprint and same_shape:
        out.append("input latent (img2img source)")
    if e.dtype != f.dtype:
        was("precision", f.dtype, e.dtype)
    if not out and e != f:  # what remains is derived from the above (CFG chunks, sparse levels)
        out.extend(n for n in (x.name for x in dataclasses.fields(e)) if getattr(e, n) != getattr(f, n))
    return out


def pinned(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


class PinnedArena:
    """Many pinned tensors carved from few pinned blocks. Pinning is a driver call of about a millisecond plus 0.3 ms
    per MiB, and a cache or an edit's result makes hundreds of tensors. The blocks double from FIRST_BLOCK to BLOCK:
    an edit's result keeps a few MiB here (what its planned rows do not hold), for which a first block of 64 MiB
    took 18 ms (H200)."""
    FIRST_BLOCK = 1 << 20
    BLOCK = 64 << 20
    ALIGN = 64

    def __init__(self):
        self._block: torch.Tensor | None = None
        self._offset = 0
        self._next = self.FIRST_BLOCK

    def empty(self, shape, dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        padded = -(-nbytes // self.ALIGN) * self.ALIGN
        if self._block is None or self._offset + padded > self._block.numel():
            if padded >= self.BLOCK:  # a large tensor gets a block of its own; the current one stays open
                return pinned(shape, dtype)
            size = max(self._next, padded)
            self._next = min(2 * size, self.BLOCK)
            self._block, self._offset = pinned((size,), torch.uint8), 0
        view = self._block[self._offset:self._offset + nbytes].view(dtype).view(shape)
        self._offset += padded
        return view


@dataclass
class StepRows:
    """Storage planned by StepTensors.plan_rows: `block` [steps, bytes]; `layout` (key, chunk) -> (byte offset,
    one step's shape, dtype, row of `written`); `written` [entries, steps], the keys' written flags.

    The block is pageable memory: an edit's result is about 1 GiB at SD2.1@768 (5% mask), which the H200's host took
    0.55 s to pin (2 GiB and 1.1 s as PyTorch's pinned allocator rounds it up) against 0.1 s to first touch
    (benchmarks/host_memory.py), and results stay in the registry, so every edit would pin anew. The rows that a
    replayed step records reach it through a pinned staging row (capture.RowLander)."""
    ALIGN = 16
    layout: dict
    block: torch.Tensor
    written: torch.Tensor

    def column(self, key: str, chunk: int, shape: tuple, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the [steps, ...] view of `key`'s column, its written flags), or None when not planned as `shape`."""
        planned = self.layout.get((key, chunk))
        if planned is None or (self.block.shape[0], *planned[1]) != tuple(shape) or planned[2] != dtype:
            return None
        offset, sample, dtype, row = planned
        nbytes = math.prod(sample) * dtype.itemsize
        view = self.block[:, offset:offset + nbytes].view(dtype).view(self.block.shape[0], *sample)
        return view, self.written[row]


@dataclass(frozen=True)
class Region:
    """Where a delta holds values: sorted flat positions (of H*W for maps, token indices for tokens)."""
    positions: torch.Tensor
    _on: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, device) -> torch.Tensor:
        """The positions on `device` (copied once: a sparse step may be running as a CUDA graph capture)."""
        key = str(device)
        if key not in self._on:
            outside_capture(device, "a region's positions")
            self._on[key] = self.positions.to(device)
        return self._on[key]

    def release(self) -> None:
        """Drops the device copies (the region outlives its edit in the result cache)."""
        self._on.clear()

    def handover(self, positions: torch.Tensor) -> "Region":
        """A region of `positions` (as many as this one's) that takes this one's device copies, with the new
        positions written into them: what reads them (a kept CUDA graph) reads the new region from then on. This
        region keeps its positions (a result cache holds it) and makes device copies again when asked."""
        if positions.shape != self.positions.shape:
            raise ValueError(f"{len(positions)} positions cannot take over a region of {len(self.positions)}")
        region = Region(positions)
        for key, copy in self._on.items():
            if copy.data_ptr() == self.positions.data_ptr():  # on the positions' own device, the positions: kept
                continue
            outside_capture(copy.device, "a region's positions")
            region._on[key] = copy.copy_(positions)
        self._on.clear()
        return region


def to_storage(value: torch.Tensor) -> torch.Tensor:
    """A per-step value as the store keeps it: activation maps [B, C, H, W] channels-last ([B, H, W, C]), so that
    the values of a set of positions are contiguous runs of C elements (an edit gathers its region per step)."""
    return value.permute(0, 2, 3, 1) if value.dim() == 4 else value


def from_storage(stored: torch.Tensor) -> torch.Tensor:
    """The inverse of to_storage for one step's stored tensor (a view)."""
    return stored.permute(0, 3, 1, 2) if stored.dim() == 4 else stored


def take_positions(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The values of `positions` (flat spatial positions of a map [B, C, H, W], or token indices of [B, T, C]),
    as [B, P, C]."""
    if value.dim() == 4:
        return value.flatten(2).index_select(2, positions).transpose(1, 2)
    return value.index_select(1, positions)


def put_positions(full: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Writes `values` [B, P, C] (as take_positions returns them) into `full` in place; returns `full`."""
    if full.dim() == 4:
        full.view(*full.shape[:2], -1).index_copy_(2, positions, values.transpose(1, 2).to(full.dtype))
    else:
        full.index_copy_(1, positions, values.to(full.dtype))
    return full


@dataclass
class StepTensors:
    """Host storage [steps, batch, ...] per (key, chunk), allocated on first write, with a written-flag per step.

    Activation maps are stored channels-last (to_storage). An edit's result is stored as a delta over its source
    (`base`): a key in `regions` holds, per step, only the values at its positions (the edit's active region),
    [steps, batch, P, C]; everything else is the base's. A step that recomputed the whole map (a dense step) keeps
    it whole in `whole`; a replayed probe step holds the base's own values at the region, so it stores nothing and
    reads through to the base (`from_base`)."""
    steps: int
    batch: int
    tensors: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    written: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    base: "StepTensors | None" = None
    regions: dict[str, "Region"] = field(default_factory=dict)
    whole: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    from_base: set[tuple[str, int, int]] = field(default_factory=set)  # (key, chunk, step) that are the base's
    arena: PinnedArena = field(default_factory=PinnedArena, repr=False)
    rows: "StepRows | None" = None  # planned storage of the keys a step records, one row per step (plan_rows)

    def slot(self, key: str, chunk: int, sample_shape, dtype, steps: int | None = None) -> torch.Tensor:
        t = self.tensors.get((key, chunk))
        if t is None:
            steps = self.steps if steps is None else steps
            shape = (steps, self.batch, *sample_shape)
            planned = self.rows.column(key, chunk, shape, dtype) if self.rows is not None else None
            if planned is not None:
                t, self.written[(key, chunk)] = planned
            else:
                t = self.arena.empty(shape, dtype)
                self.written[(key, chunk)] = torch.zeros(steps, dtype=torch.bool)
            self.tensors[(key, chunk)] = t
        return t

    def plan_rows(self, entries: list[tuple[str, int, tuple, torch.dtype]], blocks=None) -> None:
        """Plans the storage of `entries` (key, chunk, one step's stored shape with the batch, dtype) as the
        columns of one [steps, bytes] block (pageable, see StepRows): what a step records of all of them is one row,
        which a replayed CUDA graph moves to host memory in one copy (graphs.py). slot() gives the columns out.
        `blocks` (the registry, see CacheRegistry.take_block) may hand over the block of a result that left memory,
        and gets this one back when this store is dropped."""
        entries = sorted(entries, key=lambda e: -e[3].itemsize)  # largest elements first: offsets stay aligned
        layout, offset = {}, 0
        for row, (key, chunk, shape, dtype) in enumerate(entries):
            layout[(key, chunk)] = (offset, tuple(shape), dtype, row)
            offset += math.prod(shape) * dtype.itemsize
        offset += -offset % StepRows.ALIGN
        block = blocks.take_block(self.steps * offset) if blocks is not None else None
        block = torch.empty(self.steps * offset, dtype=torch.uint8) if block is None else block
        self.rows = StepRows(layout, block.view(self.steps, offset),
                             torch.zeros(len(layout), self.steps, dtype=torch.bool))
        if blocks is not None:
            weakref.finalize(self.rows, blocks.give_block, block).atexit = False

    def step_shape(self, key: str, chunk: int) -> tuple:
        """One step's stored shape of `key` [batch, ...], whole (through a delta's base)."""
        if key in self.regions:
            return self.base.step_shape(key, chunk)
        return tuple(self.tensors[(key, chunk)].shape[1:])

    def step(self, key: str, chunk: int, step: int) -> torch.Tensor:
        """One step's whole value [batch, ...] in the model's layout (a delta is applied over a copy of the base's)."""
        if key not in self.regions:
            return from_storage(self.tensors[(key, chunk)][step])
        whole = self.whole.get((key, chunk, step))
        if whole is not None:
            return whole
        if (key, chunk, step) in self.from_base:
            return self.base.step(key, chunk, step)
        return put_positions(self.base.step(key, chunk, step).clone(), self.regions[key].positions,
                             self.tensors[(key, chunk)][step])

    def stored_step(self, key: str, chunk: int, step: int) -> torch.Tensor:
        """One step as the store keeps it (to_storage's layout), contiguous: what an upload copies."""
        if key not in self.regions:
            return self.tensors[(key, chunk)][step]
        return to_storage(self.step(key, chunk, step)).contiguous()

    def step_positions(self, key: str, chunk: int, step: int, positions: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """take_positions(self.step(key, chunk, step), positions), [batch, P, C], gathered from the stored layout
        (contiguous runs of C values) and without assembling a delta's whole map; into `out` if given (an edit's
        pinned staging buffer: one pass over the bytes instead of two)."""
        if key not in self.regions:
            stored = self.tensors[(key, chunk)][step]
            flat = stored.flatten(1, 2) if stored.dim() == 4 else stored
            return flat.index_select(1, positions) if out is None else torch.index_select(flat, 1, positions, out=out)
        if (key, chunk, step) in self.whole:
            values = take_positions(self.whole[(key, chunk, step)], positions)
            return values if out is None else out.copy_(values)
        values = self.base.step_positions(key, chunk, step, positions, out)
        if (key, chunk, step) in self.from_base:
            return values
        delta = self.tensors[(key, chunk)][step]
        where = _index_of(self.regions[key].positions, positions)  # each wanted position's index in the region
        hit = torch.nonzero(where >= 0).flatten()
        if len(hit):
            values = values if out is not None else values.clone()  # never write into the base's store
            values.index_copy_(1, hit, delta.index_select(1, where[hit]).to(values.dtype))
        return values

    def whole_tensor(self, key: str, chunk: int) -> torch.Tensor:
        """All steps of one (key, chunk) in the stored layout, a delta assembled over its base."""
        t = self.tensors[(key, chunk)]
        if key not in self.regions:
            return t
        return torch.stack([self.stored_step(key, chunk, s) for s in range(t.shape[0])])

    def materialized(self) -> "StepTensors":
        """This store standing alone: a delta's keys assembled whole over its base (the values do not change), so
        that the base can be freed. A store without a base is returned as it is."""
        if self.base is None:
            return self
        out = StepTensors(self.steps, self.batch)
        for (key, chunk), t in self.tensors.items():
            if key in self.regions:
                first = self.stored_step(key, chunk, 0)
                t = out.arena.empty((t.shape[0], *first.shape), first.dtype)
                for s in range(t.shape[0]):
                    t[s].copy_(self.stored_step(key, chunk, s))
            out.tensors[(key, chunk)] = t
            out.written[(key, chunk)] = self.written[(key, chunk)].clone()
        return out

    @staticmethod
    def bytes_for(steps: int, batch: int, sample_shape, dtype) -> int:
        return steps * batch * math.prod(sample_shape) * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        own = list(self.tensors.values()) + list(self.whole.values())
        return sum(t.numel() * t.element_size() for t in own)

    def missing(self) -> list[tuple[str, int, int]]:
        """(key, chunk, step) never written."""
        every_flag = list(self.written.values())
        if not every_flag or bool(torch.cat(every_flag).all()):  # one check, not one per key (1.4 ms per SD2.1 edit)
            return []
        out = []
        for (key, chunk), flags in self.written.items():
            out.extend((key, chunk, int(s)) for s in torch.nonzero(~flags).flatten())
        return out


def _index_of(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query, its index in the sorted 1-D `sorted_values`, or -1 when absent."""
    at = torch.searchsorted(sorted_values, queries).clamp(max=max(len(sorted_values) - 1, 0))
    found = sorted_values[at] == queries if len(sorted_values) else torch.zeros_like(queries, dtype=torch.bool)
    return torch.where(found, at, torch.full_like(at, -1))


@dataclass
class FisEditCache:
    """A sealed cache: complete, consistent with its generation's output, read-only for edits."""
    name: str
    settings: SamplingSettings
    store: StepTensors
    noise: torch.Tensor               # the sampler's initial noise [B, C, H, W]
    latent_image: torch.Tensor        # the sampler's input latent (zeros for txt2img; img2img source otherwise)
    final_latent: torch.Tensor        # the sampler's LATENT output, exactly as nodes received it
    conds: dict = field(default_factory=dict)  # "positive"/"negative" -> CONDITIONING ([[tensor, extras], ...])
    images: dict = field(default_factory=dict)  # VAE fingerprint -> decoded image [B, H, W, 3] (decode.py; in memory)
    resident: object = None  # resident.ResidentContext: the attention context kept on the GPU (in memory only)
    kept: dict = field(default_factory=dict, compare=False, repr=False)  # warm.py: what its last edit kept (memory)
    edited_from: tuple | None = None  # (weak reference to the source FisEditCache, edit mask) of an edit's result:
    # decode.py rebuilds its image from the source's, in whatever order the decodes run (in memory only; weak, so
    # that a chain of edits does not keep every source alive)

    def read(self, key: str, step: int, chunk: int = COND, sample: int | None = None) -> torch.Tensor:
        self.read_check(key, step, chunk)
        value = self.store.step(key, chunk, step)
        return value if sample is None else value[sample]

    def read_positions(self, key: str, step: int, chunk: int, positions: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """read() at a set of positions only, [batch, P, C] (see take_positions): what an edit uploads per step."""
        self.read_check(key, step, chunk)
        return self.store.step_positions(key, chunk, step, positions, out)

    def read_stored(self, key: str, step: int, chunk: int) -> torch.Tensor:
        """read() in the stored layout (channels-last maps), contiguous and pinned where the cache is."""
        self.read_check(key, step, chunk)
        return self.store.stored_step(key, chunk, step)

    def stored_rows(self, key: str, step: int, chunk: int) -> torch.Tensor | None:
        """One step's stored values as [batch, positions, C] (a view of the store: pinned host memory where the
        cache is), or None where the step is not stored whole (an edit's delta, whose rows are assembled)."""
        self.read_check(key, step, chunk)
        if key in self.store.regions:
            return None
        stored = self.store.tensors[(key, chunk)][step]
        return stored.flatten(1, 2) if stored.dim() == 4 else stored

    def stored_channels(self, key: str, chunk: int) -> tuple[int, int, torch.dtype]:
        """(batch, channels, dtype) of `key`'s values: the shape read_positions gives, less the positions."""
        self.read_check(key, 0, chunk)
        t = self.store.tensors[(key, chunk)]  # [steps, batch, ..., C]
        return int(t.shape[1]), int(t.shape[-1]), t.dtype

    def read_check(self, key: str, step: int, chunk: int) -> None:
        t = self.store.tensors.get((key, chunk))
        if t is None:
            raise CacheError(f"the cache holds no '{key}' for the {CHUNK_NAMES.get(chunk, chunk)} chunk: re-capture "
                             f"the generation with this FISEdit")
        if not 0 <= step < t.shape[0]:
            raise CacheError(f"'{key}' is cached for {t.shape[0]} of the {self.settings.steps} steps, not step {step}: "
                             f"re-capture the generation with this FISEdit")

    def cached_steps(self, key: str, chunk: int = COND) -> int:
        """For how many steps `key` is cached for that chunk (0: not at all)."""
        t = self.store.tensors.get((key, chunk))
        return 0 if t is None else int(t.shape[0])

    def keys(self) -> list[str]:
        return sorted({k for k, _ in self.store.tensors})

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + sum(t.numel() * t.element_size()
                                       for t in (self.noise, self.latent_image, self.final_latent))

    def bytes_per_step(self) -> int:
        return self.store.nbytes // max(self.settings.steps, 1)

    def summary(self) -> dict:
        s = self.settings
        return {
            "name": self.name,
            "settings": s.describe(),
            "steps": s.steps,
            "chunks": [CHUNK_NAMES[c] for c in s.chunks],
            "sparse_levels": list(s.sparse_levels),
            "recorded_tensors": len(self.keys()),
            "bytes_total": self.nbytes,
            "bytes_per_step": self.bytes_per_step(),
            "dtype": s.dtype,
        }

    def summary_text(self) -> str:
        d = self.summary()
        return (f"FISEdit cache '{d['name']}': {d['settings']}; {d['recorded_tensors']} tensors x {d['steps']} steps "
                f"x {len(d['chunks'])} chunks ({', '.join(d['chunks'])}), sparse levels {d['sparse_levels']}, "
                f"{d['bytes_per_step'] / 2**20:.1f} MiB/step, {d['bytes_total'] / 2**20:.1f} MiB total ({d['dtype']})")


def settings_json(settings: SamplingSettings) -> str:
    return json.dumps(settings.to_json(), sort_keys=True)
