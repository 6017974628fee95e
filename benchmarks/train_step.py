"""Times the toy model's diffusion training step (toyworld.train.DiffusionStep) per batch size and torch.compile
mode, to choose the trainer's --batch and --compile: the trainer's budget is fixed, so examples per second is
the model's quality.

    python benchmarks/train_step.py [--batches 256,1024] [--compile eager,default] [--steps 20] [--out DIR]

Random-weight networks of the toy model's configuration, the trainer's own step (pool refresh, CFG dropout,
forward, min-SNR loss, backward, AdamW, EMA). Per variant: the first step's seconds (compilation) and the median
of the following steps, as milliseconds per step and examples per second; written to DIR/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from toyworld import models, train


def time_variant(batch: int, mode: str | None, steps: int, device: torch.device, image_size: int) -> dict:
    cfg = train.TrainConfig(out="", weights_dir="", batch=batch, device=str(device), image_size=image_size,
                            pool_batches=2, compile=mode)
    torch.manual_seed(0)
    vae = models.build_vae(device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    pool = train.latent_pool(cfg, device, vae, (0.0, 1.0), 0, g)
    step = train.DiffusionStep(cfg, models.build_unet(device), models.build_text_encoder(device), pool, g, device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(i, cfg.lr)
        float(loss.detach())  # waits for the device
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[1:]) * 1e3
    return {"batch": batch, "compile": mode or "eager", "first_step_s": times[0], "median_ms": ms,
            "examples_per_s": batch / ms * 1e3, "finite": bool(torch.isfinite(loss))}


def write(folder: str, device: torch.device, rows: list[dict]) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (out / "train_step.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="256,1024")
    p.add_argument("--compile", default="eager,default", help="comma list of modes; eager = no torch.compile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for train_step.json")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models.import_comfy()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rows = []
    for mode in a.compile.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            try:
                row = time_variant(batch, None if mode == "eager" else mode, a.steps, device, a.image_size)
            except Exception as e:  # a mode that does not compile here is a result, not the end of the sweep
                row = {"batch": batch, "compile": mode, "error": f"{type(e).__name__}: {e}"[:500]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:  # after every variant: a sweep stopped by a time limit keeps what it measured
                write(a.out, device, rows)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("| batch | compile | first step, s | ms / step | examples / s |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['compile']} | failed: {r['error'][:80]} | | |")
        else:
            print(f"| {r['batch']} | {r['compile']} | {r['first_step_s']:.1f} | {r['median_ms']:.1f} | "
                  f"{r['examples_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
