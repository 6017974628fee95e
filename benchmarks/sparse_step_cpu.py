"""The reference (pure-torch) sparse path on CPU: full-size SD1.5 at 512x512, random weights, fp32.

Captures a 3-step generation, then edits it with centred square masks of 5%, 15% and 30% of the latent, and reports
per UNet call (one CFG step: cond + uncond, batch 1) the wall time and the FLOPs counted by torch's FlopCounterMode
(convolutions, matmuls, attention), next to the dense call. Shows that the reference path already scales with the
mask; the GPU path makes it fast.

    python benchmarks/sparse_step_cpu.py [--steps 2] [--out benchmarks/results/sparse_step_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

FRACTIONS = (0.05, 0.15, 0.30)


class UNetTimer:
    """Per UNet call, through an APPLY_MODEL wrapper: the first call's FLOPs (torch's FlopCounterMode, whose
    dispatch overhead would distort timings), the wall time of every later call."""

    def __init__(self):
        self.seconds, self.flops = [], []

    def __call__(self, executor, *args, **kwargs):
        from torch.utils.flop_counter import FlopCounterMode
        if not self.flops:
            counter = FlopCounterMode(display=False)
            with counter:
                out = executor(*args, **kwargs)
            self.flops.append(counter.get_total_flops())
            return out
        t0 = time.perf_counter()
        out = executor(*args, **kwargs)
        self.seconds.append(time.perf_counter() - t0)
        return out

    def __deepcopy__(self, memo):
        return self


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="UNet calls per run: the first counts FLOPs")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparse_step_cpu.json")
    a = parser.parse_args(argv)

    import comfy_host
    comfy_host.boot()
    import torch
    import comfy.sample
    import comfy.sd
    import make_test_checkpoint
    from fisedit_engine import api, edit
    from fisedit_engine.comfy_adapter import add_apply_model_wrapper
    from fisedit_engine.layout import UNetLayout

    ckpt = ROOT / ".cache" / "models" / "sd15.safetensors"
    if not ckpt.is_file():
        make_test_checkpoint.write_checkpoint(ckpt, "sd15", seed=0)
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    edited = [[torch.randn(1, 77, 768, generator=gen), {}]]
    lat = a.size // 8
    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)

    def timed(patcher):
        timer = UNetTimer()
        patched = patcher.clone()
        add_apply_model_wrapper(patched, timer)
        return patched, timer

    def generate(patcher):
        return comfy.sample.sample(patcher, noise, a.steps, 7.0, "euler", "normal", positive, negative, latent,
                                   seed=0, disable_pbar=True)

    sizes = UNetLayout.from_unet(model.model.diffusion_model).level_sizes(lat, lat)
    with torch.inference_mode():
        stock, dense_timer = timed(model)
        generate(stock)
        captured, handle = api.capture(model, "bench")
        api.store(handle, {"samples": generate(captured)})
        rows = [{"mask": "dense (stock UNet call)", "fraction": 1.0,
                 "seconds": min(dense_timer.seconds), "gflops": dense_timer.flops[0] / 1e9}]
        for fraction in FRACTIONS:
            side = round(math.sqrt(fraction) * lat)
            mask = torch.zeros(1, lat, lat, dtype=torch.bool)
            start = (lat - side) // 2
            mask[:, start:start + side, start:start + side] = True
            patched, timer = timed(model)
            edit.run_edit(patched, edit.EditSpec(handle, edited, mask), tile_size=a.tile)
            plan = edit.EditPlan.build(mask, sizes, handle.get().settings.sparse_levels, a.tile)
            rows.append({"mask": f"{100 * float(mask.float().mean()):.1f}% square", "fraction": float(mask.float().mean()),
                         "active": plan.describe(), "seconds": min(timer.seconds), "gflops": timer.flops[0] / 1e9})
    dense = rows[0]
    for r in rows:
        r["time_vs_dense"] = r["seconds"] / dense["seconds"]
        r["flops_vs_dense"] = r["gflops"] / dense["gflops"]
    result = {"machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, SDPA attention",
              "model": f"SD1.5 UNet (random weights) at {a.size}x{a.size}, batch 1 with CFG (2 rows)",
              "tile": a.tile, "steps": a.steps, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| mask | seconds per UNet call | x dense | GFLOPs | x dense |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask']} | {r['seconds']:.2f} | {r['time_vs_dense']:.2f} | {r['gflops']:.0f} | {r['flops_vs_dense']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
