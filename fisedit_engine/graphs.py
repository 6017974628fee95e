"""A sparse step captured once per edit as a CUDA graph and replayed for the later sparse steps.

On a GPU like the H100, ComfyUI's eager UNet call costs more in kernel launches than in arithmetic, and a sparse
step launches more (smaller) kernels than a dense one. Every shape of a sparse step is fixed for the whole edit (the
plan's tiles, the feed's buffers), so one graph serves every sparse step:
- the first sparse step runs eagerly (it builds the index maps, the feed's buffers, cuDNN's plans, and compiles
  the kernels), and records as the graph will;
- the second is captured, with the recording deferred: what the step records for the result cache is packed by
  the graph (one set of row copies) into one buffer laid out as a row of the result store's planned storage,
  copied to host memory after each replay in one copy (`Recording.flush`; StepTensors.plan_rows), so the host does
  no per-key work;
- every later sparse step copies its inputs (latent, timestep, conditioning tensors) into the graph's static
  inputs, runs `EditFeed.prepare` (which writes the step's cached values into the buffers the graph reads), and
  replays.
A capture that fails falls back to eager steps, with the reason in the log.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path

import torch

log = logging.getLogger("FISEdit")

EAGER_WARMUP_STEPS = 1


class SparseStepGraph:
    def __init__(self):
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature = None
        self.static_args: list = []
        self.static_kwargs: dict = {}
        self.output: torch.Tensor | None = None
        self.recorded = None  # capture.PackedValues
        self._warm_record = None  # the warm-up step's, until the capture takes over its kernel tables
        self.eager_steps = 0
        self.replays = 0
        self.failure: str | None = None

    def captures_next(self) -> bool:
        """Whether the next run() captures the graph."""
        return self.failure is None and self.graph is None and self.eager_steps >= EAGER_WARMUP_STEPS

    def run(self, ctx, call, args: tuple, kwargs: dict):
        """One sparse model call: eager (warm-up, or after a failed capture), captured, or replayed."""
        signature = (tuple(ctx.chunks), _signature(args), _signature(kwargs))
        if self.failure is not None:
            return call(*args, **kwargs)
        if self.eager_steps < EAGER_WARMUP_STEPS:
            self.eager_steps += 1
            return self._warm_up(ctx, call, args, kwargs)
        if self.graph is None:
            self._capture(ctx, call, args, kwargs, signature)
            if self.graph is None:
                return call(*args, **kwargs)
        elif signature != self.signature:  # e.g. ComfyUI split the CFG batch under memory pressure
            log.info("FISEdit: a sparse step with another batch layout than the captured one runs eagerly")
            return call(*args, **kwargs)
        for static, value in zip(self.static_args + list(self.static_kwargs.values()),
                                 list(args) + list(kwargs.values())):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        self.graph.replay()
        self.replays += 1
        ctx.recording.flush(self.recorded, ctx.step)
        return self.output.clone()

    def _warm_up(self, ctx, call, args, kwargs):
        """An eager step that records as a replay does (packed, then flushed), so that the capture meets no kernel
        it would have to compile, and can take over the packing's kernel tables."""
        out, self._warm_record = _packed_call(ctx.recording, call, args, kwargs)
        ctx.recording.flush(self._warm_record, ctx.step)
        return out

    def _capture(self, ctx, call, args, kwargs, signature) -> None:
        self.static_args = [_static(a) for a in args]
        self.static_kwargs = {k: _static(v) for k, v in kwargs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.output, recorded = _packed_call(ctx.recording, call, self.static_args, self.static_kwargs,
                                                     reuse=self._warm_record)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this edit eagerly, and say why
            frames = traceback.extract_tb(e.__traceback__)[-4:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
            self.failure = f"{type(e).__name__}: {e} (at {where})"
        finally:
            self._warm_record = None
        if self.failure is not None:
            log.warning("FISEdit: the sparse step could not be captured as a CUDA graph; this edit runs eagerly "
                        "(%s)", self.failure)
            self.static_args, self.static_kwargs, self.output = [], {}, None
            return
        recorded.ready()
        self.graph, self.signature, self.recorded = graph, signature, recorded

    def close(self) -> None:
        self.graph, self.output, self.static_args, self.static_kwargs, self.recorded = None, None, [], {}, None
        self._warm_record = None


def _packed_call(rec, call, args, kwargs, reuse=None):
    """(the model call's output, what it recorded: capture.PackedValues), its record deferred and packed."""
    rec.deferred = []
    try:
        return call(*args, **kwargs), rec.pack_deferred(reuse)
    finally:
        rec.deferred = None


def _signature(values) -> tuple:
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else (k, type(v).__name__)
                 for k, v in items)


def _static(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
