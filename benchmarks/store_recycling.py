"""What the registry's spare block (registry.py) saves on this host: an edit's result replacing the last one of the
same name, with a fresh store each time against a store in the spare block.

    python benchmarks/store_recycling.py [--mib 922] [--steps 20] [--repeat 5]

A result's planned store is one [steps, bytes] block (cache.StepTensors.plan_rows): 922 MiB at SD2.1@768, 20 steps,
5% mask (edit_wall.py prints it). Per round, as an edit does: plan the next result's store, write every step's row
into it (the recorded rows landing; a fresh block is first touched here), then seal it over the last result of the
same name (CacheRegistry.put, which lets the last one go). Timed per round: planning, writing the rows, the seal;
medians over the rounds after the first two. No GPU is needed: these are host-memory costs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from fisedit_engine.cache import FisEditCache, SamplingSettings, StepTensors  # noqa: E402
from fisedit_engine.registry import CacheRegistry  # noqa: E402

MiB = 2**20


def result(name: str, store: StepTensors) -> FisEditCache:
    settings = SamplingSettings(
        sampler="euler", sampler_extra_options={}, sampler_inpaint_options={}, seed=0, sigmas=(1.0, 0.0), cfg=7.0,
        latent_shape=(1, 4, 8, 8), dtype="float16", chunks=(0,), sparse_levels=(0,), min_sparse_positions=256,
        model_fingerprint="m", negative_fingerprint="n", positive_fingerprint="p", noise_fingerprint="z",
        latent_image_fingerprint="l")
    empty = torch.zeros(0)
    return FisEditCache(name, settings, store, empty, empty, empty)


def rounds(mib: int, steps: int, repeat: int, recycle: bool) -> dict[str, float]:
    reg = CacheRegistry(budget_bytes=8 * mib * MiB)
    width = mib * MiB // steps // 2  # fp16 values per step row
    row = torch.ones(width, dtype=torch.float16)
    times: dict[str, list[float]] = {"plan": [], "rows": [], "seal": []}
    for _ in range(repeat + 2):
        t0 = time.perf_counter()
        store = StepTensors(steps=steps, batch=1)
        store.plan_rows([("h", 0, (1, width), torch.float16)], blocks=reg if recycle else None)
        t1 = time.perf_counter()
        column = store.slot("h", 0, (width,), torch.float16)
        for step in range(steps):
            column[step, 0].copy_(row)
        del column
        t2 = time.perf_counter()
        reg.put(result("edit", store))  # the last result of this name leaves the registry: freed, or the spare
        t3 = time.perf_counter()
        del store
        for key, value in (("plan", t1 - t0), ("rows", t2 - t1), ("seal", t3 - t2)):
            times[key].append(value)
    reg.clear()
    return {key: 1000 * statistics.median(values[2:]) for key, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=922)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    a = parser.parse_args(argv)
    print(f"a {a.mib} MiB result store of {a.steps} steps replacing the last of its name, medians of {a.repeat} "
          f"rounds (ms):")
    for recycle in (False, True, False, True):
        t = rounds(a.mib, a.steps, a.repeat, recycle)
        print(f"  {'spare block' if recycle else 'fresh block'}: plan {t['plan']:7.1f}, write the rows "
              f"{t['rows']:7.1f}, seal {t['seal']:7.1f}, in all {sum(t.values()):7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
