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
from dataclasses import dataclass, field

import torch

from .comfy_adapter import CHUNK_NAMES, COND


class CacheError(ValueError):
    """A cache cannot be used as asked; the message says what to change."""


def schedule_step(schedule: torch.Tensor, sigma) -> int:
    """The index of the schedule's sigma nearest to `sigma` (a number or a tensor whose first value is the sigma)."""
    value = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    return int(torch.argmin((schedule - value).abs()))


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
            raise CacheError(f"unknown settings fields {sorted(unknown)}: the cache was written by a newer FISEdit")
        d = dict(d)
        for k in ("sigmas", "latent_shape", "chunks", "sparse_levels"):
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


def _pinned(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


@dataclass
class StepTensors:
    """Host storage [steps, batch, ...] per (key, chunk), allocated on first write, with a written-flag per step."""
    steps: int
    batch: int
    tensors: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    written: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def slot(self, key: str, chunk: int, sample_shape, dtype, steps: int | None = None) -> torch.Tensor:
        t = self.tensors.get((key, chunk))
        if t is None:
            steps = self.steps if steps is None else steps
            t = self.tensors[(key, chunk)] = _pinned((steps, self.batch, *sample_shape), dtype)
            self.written[(key, chunk)] = torch.zeros(steps, dtype=torch.bool)
        return t

    @staticmethod
    def bytes_for(steps: int, batch: int, sample_shape, dtype) -> int:
        return steps * batch * math.prod(sample_shape) * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def missing(self) -> list[tuple[str, int, int]]:
        """(key, chunk, step) never written."""
        out = []
        for (key, chunk), flags in self.written.items():
            out.extend((key, chunk, int(s)) for s in torch.nonzero(~flags).flatten())
        return out


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

    def read(self, key: str, step: int, chunk: int = COND, sample: int | None = None) -> torch.Tensor:
        t = self.store.tensors.get((key, chunk))
        if t is None:
            raise CacheError(f"the cache holds no '{key}' for the {CHUNK_NAMES.get(chunk, chunk)} chunk")
        if not 0 <= step < t.shape[0]:
            raise CacheError(f"'{key}' is cached for {t.shape[0]} of the {self.settings.steps} steps, not step {step}")
        return t[step] if sample is None else t[step, sample]

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
