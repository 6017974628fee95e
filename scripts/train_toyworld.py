"""Trains FISEdit's toy-world model (VAE, then UNet + text encoder) within a time budget, on one GPU.

    python scripts/train_toyworld.py --out OUT [--weights-dir toyworld/weights] [--budget-seconds 480]
    python scripts/train_toyworld.py --out OUT --resume toyworld/weights [--budget-seconds 540]
    python scripts/train_toyworld.py --out OUT --smoke          # a few CPU steps, under a minute (CI)

--resume continues the diffusion stage from the weights set --name in that folder (the VAE and the latent
normalisation are kept), so the model can be trained over several runs of a time-limited machine.

Needs torch, safetensors, Pillow and ComfyUI's `comfy` package (found through COMFYUI_PATH, else the repo's
.comfyui/ made by scripts/setup_host.sh); the networks are ComfyUI's own classes, so the weights load into
ComfyUI unchanged. Data is generated on the fly; seeds are fixed. Writes the weights (fp16 safetensors, in shards
of at most --shard-mib) to --weights-dir and metrics.json, loss.png, samples.png to --out. The budget covers the
whole run from the process start, including imports and the finish; see toyworld/train.py for the stages.
"""
from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here, before the heavy imports

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toyworld import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for metrics.json, loss.png, samples.png")
    p.add_argument("--weights-dir", default=str(ROOT / "toyworld" / "weights"),
                   help="folder for the weights (default: toyworld/weights, where the loader node looks)")
    p.add_argument("--name", default="toyworld", help="weights name (file NAME.safetensors or its shards)")
    p.add_argument("--budget-seconds", type=float, default=480.0,
                   help="wall time for the whole run, startup and saving included (default 480)")
    p.add_argument("--vae-fraction", type=float, default=0.2, help="share of the training time for the VAE")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--shard-mib", type=float, default=15.0, help="largest weights file (MiB)")
    p.add_argument("--resume", default=None, metavar="FOLDER",
                   help="continue training the weights set --name in FOLDER (skips the VAE stage)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="print the kernel time table of this many diffusion steps (after two warm-up steps)")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="run the diffusion step's forwards through torch.compile with this mode (e.g. default, "
                        "max-autotune-no-cudagraphs); benchmarks/train_step.py measures which is fastest")
    p.add_argument("--smoke", action="store_true",
                   help="a few iterations of every stage on the CPU at 128 px (tests the pipeline, not quality)")
    a = p.parse_args(argv)

    import torch

    from toyworld import models
    resume = None
    if a.resume:
        sets = models.weight_sets(a.resume)
        if a.name not in sets:
            p.error(f"--resume {a.resume}: no complete weights set {a.name!r} there (found {sorted(sets) or 'none'})")
        resume = [str(path) for path in sets[a.name]]
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = train.TrainConfig(out=a.out, weights_dir=a.weights_dir, name=a.name, budget_seconds=a.budget_seconds,
                            vae_fraction=a.vae_fraction, batch=a.batch, vae_batch=a.vae_batch, lr=a.lr,
                            seed=a.seed, device=device, shard_mib=a.shard_mib, resume=resume,
                            profile_steps=a.profile_steps, compile=a.compile)
    if a.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        cfg.device = a.device or "cpu"
        # the step caps end a smoke run; a time budget would make it flaky on a loaded machine
        cfg.budget_seconds, cfg.finish_seconds = 3600.0, 60.0
        cfg.batch, cfg.vae_batch, cfg.image_size = 2, 2, 128
        cfg.max_vae_steps, cfg.max_steps, cfg.warmup_steps = 3, 3, 2
        cfg.pool_batches = 2
        cfg.fit_images, cfg.eval_images, cfg.grid_images, cfg.sample_steps = 4, 2, 2, 2
        cfg.log_every = 1
    train.run(cfg, start=START)
    return 0


if __name__ == "__main__":
    sys.exit(main())
