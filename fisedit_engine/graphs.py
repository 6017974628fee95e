"""A model call captured once as a CUDA graph and replayed for the later steps (StepGraph): an edit's sparse steps
(SparseStepGraph, below) and a probe's dense steps (probe.ProbeStepGraph, the same way without a record).

On a GPU like the H100, ComfyUI's eager UNet call costs more in kernel launches than in arithmetic, and a sparse
step launches more (smaller) kernels than a dense one. Every shape of a sparse step is fixed for the whole edit (the
plan's tiles, the feed's buffers), so one graph serves every sparse step:
- the first sparse step is captured, then replayed. What a captured step reads besides its inputs is built before
  the capture (`EditState.prepare_capture`: the plan's index maps, the mask rows, the regions' positions and the
  channels-last conv weights on the device), since a capture cannot copy from pageable memory; each of those caches
  raises `NotPrepared` instead of building while a graph captures (`outside_capture`). Until a capture has succeeded
  on a device in this process, the first sparse step runs eagerly instead (a warm-up): it compiles the Triton kernels
  (a kernel's first launch never happens inside a capture: kernels/fused.py) and builds cuDNN's plans. A capture
  that fails for want of either is logged, and the edit warms up and captures at the next step;
- what the captured step records for the result cache is deferred: after each replay one set of row copies packs it
  into one buffer laid out as a row of the result store's planned storage (StepTensors.plan_rows), which moves to
  host memory in one copy (`Recording.flush`, capture.RowLander), so the host does no per-key work. The copies run
  outside the graph, on tables built once after the capture (a table filled once cannot live in the graph's memory
  pool, whose blocks the graph's own kernels reuse as scratch);
- every later sparse step copies its inputs (latent, timestep, conditioning tensors) into the graph's static
  inputs, runs `EditFeed.prepare` (which writes the step's cached values into the buffers the graph reads), and
  replays.
A second failed capture leaves the edit's steps eager, with the reason in the log. A probe step reads, besides its
inputs, the original queries of attention control, which its layers stage in device buffers before each call.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import torch

from . import warm

log = logging.getLogger("FISEdit")

_warm: set[tuple[str, str]] = set()  # (graph class, device) of the captures that succeeded in this process
_capture_streams: dict[str, torch.cuda.Stream] = {}


class NotPrepared(RuntimeError):
    """Something a captured step reads would be built during the capture (see the module docstring)."""


def outside_capture(device, what: str) -> None:
    """Raises NotPrepared if a CUDA graph is capturing on the current stream of `device` (a CUDA device): called by
    the per-edit caches before they build `what`."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise NotPrepared(f"{what} was not built before the CUDA graph's capture")


class StepGraph:
    """One model call per step captured once and replayed (see the module docstring); a subclass adds what its
    steps do around the capture and after each replay. `what` names the steps in the log."""
    what = "step"

    def __init__(self, device):
        self.device = torch.device(device)
        self.warm_up_first = (type(self).__name__, str(self.device)) not in _warm
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature = None
        self.static_args: list = []
        self.static_kwargs: dict = {}
        self.output: torch.Tensor | None = None
        self.eager_steps = 0
        self.replays = 0
        self.failed_captures: list[str] = []
        self.failure: str | None = None
        self.capture_seconds: CaptureTimes | None = None  # of the capture that made `graph`
        self.runs = 1  # the runs (edits, probes) that replayed this graph: above 1 once kept (warm.py)
        self.weights: tuple | None = None  # warm.weights_key of the model in this run (check_weights)
        self._check = True

    def restart(self) -> None:
        """Counts the next run's steps apart: a captured graph kept for another edit or probe (warm.py)."""
        self.eager_steps = self.replays = 0
        self.runs += 1
        self._check = True

    def check_weights(self, module) -> None:
        """At the first call of a run (inside the sampler, once ComfyUI has loaded the model): a graph reads the
        weights at the addresses they had at its capture, and ComfyUI moves them when it unloads and reloads the model
        or patches it, between two edits. A kept graph whose weights moved is let go and captured anew, here."""
        if not self._check:
            return
        self._check = False
        now = warm.weights_key(module)
        if self.graph is not None and now != self.weights:
            log.info("FISEdit: the model's weights moved since the kept %s graph was captured (ComfyUI reloaded or "
                     "patched the model); capturing it anew", self.what)
            self.close()
            self.runs, self.warm_up_first = 1, False  # its kernels compiled at the first capture
        self.weights = now

    @property
    def reusable(self) -> bool:
        """Whether a later run can replay this graph (it was captured)."""
        return self.graph is not None

    def captures_next(self) -> bool:
        """Whether the next run() captures the graph."""
        return self.failure is None and self.graph is None and not (self.warm_up_first and self.eager_steps == 0)

    def run(self, ctx, call, args: tuple, kwargs: dict, batch_layout=()):
        """One model call: eager (a warm-up, or after a failed capture), captured and replayed, or replayed.
        `batch_layout`: what else must match the captured call (the CFG chunks)."""
        signature = (tuple(batch_layout), _signature(args), _signature(kwargs))
        if self.failure is not None:
            return call(*args, **kwargs)
        if self.graph is None:
            if not self.captures_next():
                self.eager_steps += 1
                return call(*args, **kwargs)
            self._capture(ctx, call, args, kwargs, signature)
            if self.graph is None:
                self.eager_steps += 1
                return call(*args, **kwargs)
        elif signature != self.signature:  # e.g. ComfyUI split the CFG batch under memory pressure
            log.info("FISEdit: a %s with another batch layout than the captured one runs eagerly", self.what)
            return call(*args, **kwargs)
        for static, value in zip(self.static_args + list(self.static_kwargs.values()),
                                 list(args) + list(kwargs.values())):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        self.graph.replay()
        self.replays += 1
        self._replayed(ctx)
        return self.output.clone()

    def _capture(self, ctx, call, args, kwargs, signature) -> None:
        self.static_args = [_static(a) for a in args]
        self.static_kwargs = {k: _static(v) for k, v in kwargs.items()}
        (graph, kept_apart), error = _new_graph(), None
        self._begin(ctx)
        try:
            capturing = _capturing(graph, self.device, kept_apart)
            with capturing:
                self.output = call(*self.static_args, **self.static_kwargs)
                kept = self._in_capture(ctx)
            self.capture_seconds = capturing.times
            self._captured(ctx, kept)
        except Exception as e:  # noqa: BLE001 - any capture failure means: warm up, or run eagerly; say why
            frames = traceback.extract_tb(e.__traceback__)[-4:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
            error = f"{type(e).__name__}: {e} (at {where})"
        finally:
            self._end(ctx)
        if error is None:
            self.graph, self.signature = graph, signature
            _warm.add((type(self).__name__, str(self.device)))
            return
        self.failed_captures.append(error)
        self.static_args, self.static_kwargs, self.output = [], {}, None
        self._captured(ctx, None)
        if not self.warm_up_first:
            log.info("FISEdit: the first %s could not be captured as a CUDA graph without a warm-up step (%s); it "
                     "runs eagerly and the next one is captured", self.what, error)
            self.warm_up_first = True
        else:
            self.failure = error
            log.warning("FISEdit: the %s could not be captured as a CUDA graph; it runs eagerly (%s)", self.what,
                        self.failure)

    # what a subclass does around the capture and after each replay
    def _begin(self, ctx) -> None:
        pass

    def _in_capture(self, ctx):
        """Inside the capture, after the call: what _captured() receives."""
        return None

    def _captured(self, ctx, kept) -> None:
        """After the capture has ended (kept: None when it failed)."""

    def _end(self, ctx) -> None:
        pass

    def _replayed(self, ctx) -> None:
        pass

    def close(self) -> None:
        self.graph, self.output, self.static_args, self.static_kwargs = None, None, [], {}


class SparseStepGraph(StepGraph):
    """An edit's sparse steps: the record is deferred while the step captures, and flushed after each replay."""
    what = "sparse step"

    def __init__(self, device):
        super().__init__(device)
        self.recorded = None  # capture.PackedValues

    def run(self, ctx, call, args: tuple, kwargs: dict, batch_layout=()):
        return super().run(ctx, call, args, kwargs, batch_layout=tuple(ctx.chunks))

    def _begin(self, ctx) -> None:
        ctx.recording.deferred = []

    def _in_capture(self, ctx):
        return ctx.recording.take_deferred()  # the unplanned values' gathers belong to the graph

    def _captured(self, ctx, kept) -> None:
        self.recorded = None if kept is None else ctx.recording.packing(kept)

    def _end(self, ctx) -> None:
        ctx.recording.deferred = None

    def _replayed(self, ctx) -> None:
        ctx.recording.flush(self.recorded, ctx.step)

    def close(self) -> None:
        super().close()
        self.recorded = None


class CaptureTimes:
    """Host seconds of one capture: the captured call (its launches recorded, nothing run), ending the capture, and
    instantiating the graph (the driver's work per node). `instantiate` is None where torch ends and instantiates in
    one call (before 2.8: no keep_graph), and `end` then holds both."""

    def __init__(self, record: float, end: float, instantiate: float | None, segments: int = 0,
                 segment_bytes: int = 0):
        self.record, self.end, self.instantiate = record, end, instantiate
        self.segments, self.segment_bytes = segments, segment_bytes  # the device memory the recording allocated

    @property
    def total(self) -> float:
        return self.record + self.end + (self.instantiate or 0.0)

    def describe(self) -> str:
        if self.instantiate is None:
            parts = f"ending and instantiating {1e3 * self.end:.0f}"
        else:
            parts = f"ending {1e3 * self.end:.0f}, instantiating {1e3 * self.instantiate:.0f}"
        return (f"{1e3 * self.total:.0f} ms: recording {1e3 * self.record:.0f} (allocating {self.segments} "
                f"segments, {self.segment_bytes / 2**20:.0f} MiB), {parts}")


def _new_graph() -> tuple[torch.cuda.CUDAGraph, bool]:
    """A graph kept past the capture's end, to be instantiated apart (torch 2.8 and later), and True; else a plain
    one, which capture_end() instantiates, and False."""
    try:
        return torch.cuda.CUDAGraph(keep_graph=True), True
    except TypeError:
        return torch.cuda.CUDAGraph(), False


class _capturing:
    """torch.cuda.graph without its synchronize() and empty_cache() calls, which wait for the device and return its
    and the pinned host memory's cached blocks to the driver before every capture (and so before every edit), only
    for the steps after it to allocate them again (the capture runs nothing, and replays on the caller's stream, so
    nothing needs to wait); and in thread_local mode, so that the result's landing thread (capture.RowLander) may wait
    on its events meanwhile. An error inside the capture is raised as such, not as the failure of ending the capture
    that it invalidated. Where torch can keep the graph past the capture's end (keep_graph), it is instantiated here,
    apart, so that `times` tells the two costs apart."""

    def __init__(self, graph: torch.cuda.CUDAGraph, device: torch.device, kept: bool):
        self.graph, self.kept = graph, kept
        self.times: CaptureTimes | None = None
        self.device = device
        self._began, self._segments = 0.0, (0, 0)
        key = str(device)
        if key not in _capture_streams:
            _capture_streams[key] = torch.cuda.Stream(device)
        self.stream = torch.cuda.stream(_capture_streams[key])

    def __enter__(self):
        self.stream.__enter__()
        try:
            self.graph.capture_begin(capture_error_mode="thread_local")
        except BaseException:
            self.stream.__exit__(None, None, None)
            raise
        self._segments = _segments(self.device)
        self._began = time.perf_counter()

    def __exit__(self, kind, value, tb):
        try:
            recorded = time.perf_counter()
            segments = _segments(self.device)
            self.graph.capture_end()
            ended = time.perf_counter()
            if kind is None:
                if self.kept:
                    self.graph.instantiate()
                self.times = CaptureTimes(recorded - self._began, ended - recorded,
                                          time.perf_counter() - ended if self.kept else None,
                                          segments[0] - self._segments[0], segments[1] - self._segments[1])
        except Exception:
            if kind is None:
                raise
            log.debug("FISEdit: ending a capture that an error invalidated also failed", exc_info=True)
        finally:
            self.stream.__exit__(None, None, None)
        return False


def _segments(device) -> tuple[int, int]:
    """How many device memory segments the caching allocator has allocated in this process, and their bytes."""
    stats = torch.cuda.memory_stats(device)
    return stats.get("segment.all.allocated", 0), stats.get("reserved_bytes.all.allocated", 0)


def _signature(values) -> tuple:
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else (k, type(v).__name__)
                 for k, v in items)


def _static(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
