"""The host work an edit does once, outside its model calls, by function: on the CPU or a GPU.

    python benchmarks/edit_overhead.py [--model sd21v@768] [--size 256] [--steps 3] [--repeat 3] [--new-mask]
        [--profile [LINES]]

`gpu_timeline.py` showed a warm SD2.1@768 edit on an H200 leaving the GPU idle for about 58 ms before its first
replayed step and 10 ms after its last, of an edit of about 300 ms: the edit's checks, its recording's setup and its
seal, which do not depend on the GPU. This times them on a full-size random-weight model (the size of the latent
matters little to them, so on the CPU a small one keeps the eager sparse steps short), loaded in inference mode as
ComfyUI loads checkpoints (its weights are inference tensors): after a capture and two warm edits, `--repeat` edits
with the same prompt and mask, each function's wall time (median over the edits) and the edit's wall time outside
its model calls. `--profile` adds cProfile's table of the repeated edits by own time, model calls included (they
are the UNet's modules and torch ops; the rest is the host work this script is about). `--new-mask` moves the mask
before each edit, so that each refits the kept steps with it (edit.KeptEdit.refit) or, where it does not fit them or
with FISEDIT_REFIT=0, builds its plan, its feed's planned moves (and on a GPU their tables and the sparse step's
graph) anew, and times those too: most of building runs inside the first sparse model call, so it is not in "outside
its model calls". Which levels run sparse depends on the latent's size (256 positions at least): SD2.1 at 512 px has
three sparse levels, as at 768.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]


def once_per_edit():
    """(owner, name): what an edit runs once, outside its model calls (the owner is where its callers look it up)."""
    import comfy.model_management
    from fisedit_engine import cache, capture, edit, graphs, layout, warm
    return [(edit, "check_model"), (edit, "model_fingerprint"), (layout.UNetLayout, "from_unet"),
            (edit, "_kept_key"), (capture, "model_fingerprint"), (capture, "conditioning_fingerprint"),
            (capture, "tensor_fingerprint"), (capture, "_install_hooks"), (comfy.model_management, "load_models_gpu"),
            (graphs.StepGraph, "check_weights"), (warm, "weights_key"), (capture.Recording, "finish"),
            (cache.StepTensors, "missing"), (capture.Recording, "seal"), (edit, "seal")]


def once_per_mask():
    """(owner, name): what an edit with a new mask builds once besides, some of it inside its first sparse model
    call (the plan, its index maps, the feed's planned moves and their tables, the graph's capture)."""
    from fisedit_engine import edit, feed, graphs, plan, tiling
    from fisedit_engine.kernels import fused
    targets = [(edit.KeptEdit, "refit"), (plan.EditPlan, "refill"), (edit, "_build"), (tiling, "choose_tiles"),
               (plan.EditPlan, "build"), (plan.EditPlan, "prepare"),
               (feed.EditFeed, "build"), (feed.EditFeed, "_build_plan"), (edit.EditState, "prepare_capture"),
               (graphs.StepGraph, "_capture")]
    module = fused.triton_module()
    return targets + ([(module.RowCopyLaunches, "__init__")] if module is not None else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21v@768", help="arch@size: the architecture (the size is --size's)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (the latent is 1/8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--new-mask", action="store_true",
                        help="move the mask before each edit (a latent pixel down and right), so that each builds its "
                             "plan, moves and graph anew, and time what that builds too")
    parser.add_argument("--profile", type=int, nargs="?", const=40, default=0, metavar="LINES",
                        help="also print cProfile's top LINES functions by own time over the repeated edits")
    a = parser.parse_args(argv)
    import comfy_host
    comfy_host.boot()
    import torch
    import comfy.sample
    import speed
    from step_phases import label_of, timed_methods
    from fisedit_engine import api
    from fisedit_engine.comfy_adapter import add_apply_model_wrapper
    from fisedit_engine.edit import EditSpec, run_edit

    arch = a.model.split("@")[0]
    with torch.inference_mode():  # as ComfyUI's executor runs the checkpoint loader: the weights are inference tensors
        model, _ = speed.load_model(arch)
    lat = a.size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        captured, handle = api.capture(model, f"overhead-{arch}")
        out = comfy.sample.sample(captured, noise, a.steps, 7.0, "euler", "normal", speed.conditioning(arch, 1, a.size),
                                  speed.conditioning(arch, 2, a.size), latent, seed=0, disable_pbar=True)
        api.store(handle, {"samples": out})
        timer = speed.CallTimer()
        patched = model.clone()
        add_apply_model_wrapper(patched, timer)
        edits = iter(range(2 + a.repeat))

        def next_spec():  # the same mask every time, or (--new-mask) another one
            shift = next(edits) if a.new_mask else 0
            return EditSpec(handle, speed.conditioning(arch, 3, a.size),
                            speed.region_mask(lat, a.fraction, "rect", shift))
        for _ in range(2):
            run_edit(patched, next_spec())
        once = once_per_edit() + (once_per_mask() if a.new_mask else [])
        times: dict = {}
        outside, walls = [], []
        wrapped = timed_methods(times, [(owner, name, False) for owner, name in once])
        profiler = cProfile.Profile() if a.profile else None
        try:
            for _ in range(a.repeat):
                timer.seconds.clear()
                sync()
                t0 = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                spec = next_spec()
                _, result = run_edit(patched, spec)
                sync()
                if profiler is not None:
                    profiler.disable()
                walls.append(time.perf_counter() - t0)
                outside.append(walls[-1] - sum(timer.seconds))
        finally:
            for cls, name, original in wrapped:
                setattr(cls, name, original)
        api.registry().remove(result.name)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{arch} at {a.size}x{a.size}, {a.steps} steps, mask {100 * a.fraction:.0f}% rectangle"
          f"{', a new one each edit' if a.new_mask else ''}, {device}: edit "
          f"{1000 * statistics.median(walls):.1f} ms, outside its model calls {1000 * statistics.median(outside):.1f} "
          f"ms (medians of {a.repeat})")
    print(f"  {result.edit_summary}")
    for owner, name in once:
        values = times.get(label_of(owner, name), [])
        if values and len(values) % a.repeat:  # not in every edit (--new-mask: a refit, or a build where it failed)
            print(f"  {label_of(owner, name):34s} {len(values)} call(s) in the {a.repeat} edits, "
                  f"{statistics.median(values):7.2f} ms each (median), {sum(values) / a.repeat:7.2f} ms per edit "
                  f"(mean)")
        elif values:
            n = len(values) // a.repeat
            per_edit = [sum(values[i * n:(i + 1) * n]) for i in range(a.repeat)]
            print(f"  {label_of(owner, name):34s} {n} call(s) per edit, "
                  f"{statistics.median(values):7.2f} ms each (median), {statistics.median(per_edit):7.2f} ms per edit")
    if profiler is not None:
        print(f"cProfile over the {a.repeat} edits (times are sums; profiling slows Python calls):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
