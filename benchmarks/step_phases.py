"""Where a replayed sparse step's time goes: the host time of each phase of one edit's steps (the feed's stage,
upload and activate, key by key or planned, the result's flush, the graph launch) and the GPU time of the graph
replay itself.

    python benchmarks/step_phases.py [--models sd21v@768,sdxl@1024] [--fraction 0.05] [--steps 20]

The phases are timed by wrapping the methods for this measurement only (this process); the wrapped GPU time is
taken with CUDA events around each replay. A planned upload is launched for the next step while the GPU runs the
current one; key by key, staging and upload run in the prefetch worker. Two edits are timed after warm-up edits,
each with another prompt: one with a new mask (its sparse steps planned and captured) and one with that mask again
(taking the steps the last edit kept: fisedit_engine/warm.py).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]


def timed_methods(times: dict, targets: list[tuple[type, str, bool]]):
    """Wraps each (class, method, on_gpu) to append its wall ms (and, on_gpu, its CUDA-event ms) to `times`."""
    import torch

    def wrap(cls, name, on_gpu):
        original = getattr(cls, name)
        label = label_of(cls, name)

        def timed(*args, **kwargs):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            times.setdefault(label, []).append(1000 * (time.perf_counter() - t0))
            if on_gpu:
                end.record()
                end.synchronize()
                times.setdefault(gpu_label_of(cls, name), []).append(start.elapsed_time(end))
            return out
        setattr(cls, name, timed)
        return original

    return [(cls, name, wrap(cls, name, on_gpu)) for cls, name, on_gpu in targets]


def label_of(owner, name: str) -> str:
    """'Class.method' or 'module.function'."""
    return f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"


def gpu_label_of(owner, name: str) -> str:
    """Where timed_methods puts a wrapped method's CUDA-event times."""
    return f"{label_of(owner, name)} (GPU)"


def once_per_edit():
    """(owner, name) of what an edit does once, besides its steps (timed like the phases), in the order it does
    them: the checks and the plan, the first sparse step's capture (what it builds ahead, the capture with the graph's
    instantiation, the record's packing tables and landing rows), and the end of the run."""
    import torch
    from fisedit_engine import cache, capture, cost, edit, feed, graphs, plan, registry, tiling
    from fisedit_engine.kernels import triton_ops
    return [(edit, "check_model"), (edit, "_kept_key"), (cost, "level_costs"), (tiling, "choose_tiles"),
            (plan.EditPlan, "build"),
            (feed.EditFeed, "build"), (cache.StepTensors, "plan_rows"), (feed.EditFeed, "_build_plan"),
            (edit.EditState, "prepare_capture"), (graphs.SparseStepGraph, "_capture"),
            (torch.cuda.CUDAGraph, "capture_end"), (capture.Recording, "packing"),
            (triton_ops.RowCopyLaunches, "__init__"), (capture.RowLander, "__init__"), (capture.Recording, "finish"),
            (edit, "seal"), (registry.CacheRegistry, "put"), (edit.EditState, "close")]


def run(arch: str, size: int, fraction: float, steps: int) -> None:
    import torch
    import comfy.sample
    import speed
    from fisedit_engine import api, capture, feed
    from fisedit_engine.comfy_adapter import add_apply_model_wrapper
    from fisedit_engine.edit import EditSpec, run_edit

    once = once_per_edit()
    model, _ = speed.load_model(arch)
    lat = size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        captured, handle = api.capture(model, f"phases-{arch}")
        out = comfy.sample.sample(captured, noise, steps, 7.0, "euler", "normal", speed.conditioning(arch, 1, size),
                                  speed.conditioning(arch, 2, size), latent, seed=0, disable_pbar=True)
        api.store(handle, {"samples": out})
        timer = speed.CallTimer()
        patched = model.clone()
        add_apply_model_wrapper(patched, timer)

        def spec(prompt_seed, shift):
            return EditSpec(handle, speed.conditioning(arch, prompt_seed, size),
                            speed.region_mask(lat, fraction, "rect", shift))
        for prompt_seed, shift in ((3, 2), (4, 0)):  # compile the kernels for both masks' tile sizes, plan cuDNN
            _, warm = run_edit(patched, spec(prompt_seed, shift))
            api.registry().remove(warm.name)
        for name, prompt_seed, shift in (("new mask", 4, 2), ("the last edit's mask", 5, 2)):
            timer.seconds.clear()
            times: dict = {}
            wrapped = timed_methods(times, [(feed.EditFeed, "stage", False), (feed.EditFeed, "upload", False),
                                            (feed.EditFeed, "activate", False),
                                            (feed.EditFeed, "_upload_planned", False),
                                            (feed.EditFeed, "_activate_planned", False),
                                            (capture.Recording, "flush", False),
                                            (capture.RowLander, "_wait", False), (capture, "_land", False),
                                            (torch.cuda.CUDAGraph, "replay", True)]
                                    + [(owner, n, False) for owner, n in once])
            try:
                t0 = time.perf_counter()
                _, result = run_edit(patched, spec(prompt_seed, shift))
                torch.cuda.synchronize()
                total = time.perf_counter() - t0
            finally:
                for cls, n, original in wrapped:
                    setattr(cls, n, original)
            api.registry().remove(result.name)
            report(f"{arch}@{size}, {100 * fraction:.0f}% rectangle, {steps} steps, {name}", total, timer.seconds,
                   result, times, once)


def report(title: str, total: float, calls: list, result, times: dict, once: list) -> None:
    print(f"{title}: edit {total:.2f} s, model call (synchronised) median {1000 * statistics.median(calls[2:]):.1f} "
          f"ms")
    print(f"  model calls 1-4: {', '.join(f'{1000 * s:.1f}' for s in calls[:4])} ms")
    print(f"  {result.edit_summary}")
    once_labels = {label_of(owner, n) for owner, n in once}
    for name, values in times.items():
        if name in once_labels:
            print(f"  {name:30s} {', '.join(f'{v:.1f}' for v in values)} ms (once per edit)")
            continue
        later = values[2:] or values  # the first steps build buffers and capture the graph
        print(f"  {name:30s} median {statistics.median(later):7.2f} ms over {len(later)} steps")


def main(argv=None) -> int:
    import speed
    return speed.per_model_main(
        argv, __doc__, "benchmarks/step_phases.py times CUDA graph replays",
        lambda parser: parser.add_argument("--steps", type=int, default=20),
        lambda arch, size, a: run(arch, size, a.fraction, a.steps))


if __name__ == "__main__":
    sys.exit(main())
