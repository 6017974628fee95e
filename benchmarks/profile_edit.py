"""Where a sparse step's time goes: one edit of a random-weight model on the GPU under torch's profiler and cProfile.

    python benchmarks/profile_edit.py [--model sd21v@768] [--fraction 0.05] [--graph]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21v@768")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--graph", action="store_true")
    a = parser.parse_args(argv)
    import comfy_host
    comfy_host.boot()
    import torch
    import comfy.sample
    from torch.profiler import ProfilerActivity, profile
    import speed
    from fisedit_engine import api
    from fisedit_engine.edit import EditSpec, run_edit

    arch, size = a.model.split("@")
    size = int(size)
    model, _ = speed.load_model(arch)
    lat = size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    negative = speed.conditioning(arch, 2, size)
    with torch.inference_mode():
        captured, handle = api.capture(model, "profile")
        out = comfy.sample.sample(captured, noise, a.steps, 7.0, "euler", "normal", speed.conditioning(arch, 1, size),
                                  negative, latent, seed=0, disable_pbar=True)
        api.store(handle, {"samples": out})
        spec = EditSpec(handle, speed.conditioning(arch, 3, size), speed.region_mask(lat, a.fraction, "rect"))
        run_edit(model, spec, cuda_graph=a.graph)  # warm
        prof = cProfile.Profile()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            prof.enable()
            _, result = run_edit(model, spec, cuda_graph=a.graph)
            prof.disable()
            torch.cuda.synchronize()
    print(result.edit_summary)
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(35)
    print(stream.getvalue()[:9000])
    stream = io.StringIO()  # the main thread's own time (waits included), not what it called
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(25)
    print(stream.getvalue()[:7000])
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
    print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
