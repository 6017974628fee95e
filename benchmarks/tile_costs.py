"""Calibrates the tile-size cost model (fisedit_engine/tiling.py) on this GPU, and checks its choices.

    python benchmarks/tile_costs.py [--models sd15@512,sd21v@768,sdxl@1024] [--combos 10] [--steps 8] [--write]

Per model (random weights, fp16, batch 1 with CFG) and mask (a centred rectangle and a blob of 5, 15 and 30% of the
latent), edits run with `--combos` combinations of tile sizes per sparse level: every level at each of
tiling.CANDIDATES, then random others (seeded). Each edit's sparse steps replay its CUDA graph; the sample is the
median GPU time of its replays (CUDA events). The fit (tiling.fit: non-negative coefficients, one intercept per
model) is printed with its residuals; then per model and mask the cost model's choice over every combination is
measured too, beside tile 4 everywhere and the best measured combination. `--write` stores the coefficients for
this GPU in fisedit_engine/tile_costs.json; the samples and the table go to `--out` (benchmarks/results/tile_costs).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import random
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "benchmarks")]

MASKS = [(shape, fraction) for fraction in (0.05, 0.15, 0.30) for shape in ("rect", "blob")]


class Bench:
    """One model: its source cache (captured once) and the replay time of an edit at given tile sizes."""

    def __init__(self, arch: str, size: int, steps: int, replays: dict):
        import torch
        import comfy.sample
        import speed
        from fisedit_engine import api, tiling
        from fisedit_engine.cost import level_costs
        from fisedit_engine.layout import UNetLayout

        self.name, self.arch, self.lat, self.replays = f"{arch}@{size}", arch, size // 8, replays
        self.model, _ = speed.load_model(arch)
        latent = torch.zeros(1, 4, self.lat, self.lat)
        noise = comfy.sample.prepare_noise(latent, 0)
        with torch.inference_mode():
            captured, self.handle = api.capture(self.model, f"tiles-{arch}")
            out = comfy.sample.sample(captured, noise, steps, 7.0, "euler", "normal", speed.conditioning(arch, 1, size),
                                      speed.conditioning(arch, 2, size), latent, seed=0, disable_pbar=True)
            api.store(self.handle, {"samples": out})
        self.edited = speed.conditioning(arch, 3, size)
        s = self.handle.get().settings
        unet = self.model.model.diffusion_model
        layout = UNetLayout.from_unet(unet)
        self.levels = sorted(s.sparse_levels)
        self.level_sizes = layout.level_sizes(*s.latent_shape[-2:])
        self.rows = s.latent_shape[0] * len(s.chunks)
        costs = level_costs(unet, layout, self.level_sizes, self.edited[0][0].shape[1])
        self.work = tiling.level_work(unet, layout, costs, self.levels)

    def mask(self, shape: str, fraction: float):
        import speed
        return speed.region_mask(self.lat, fraction, shape)

    def features(self, mask, tiles: dict[int, int]):
        from fisedit_engine import plan, tiling
        return tiling.plan_features(self.work, plan.active_tiles(mask, self.level_sizes, self.levels, tiles), self.rows)

    def replay_ms(self, mask, tiles: dict[int, int]) -> float:
        import torch
        from fisedit_engine import api
        from fisedit_engine.edit import EditSpec, run_edit
        self.replays.clear()
        with torch.inference_mode():
            _, result = run_edit(self.model, EditSpec(self.handle, self.edited, mask), tile_size=tiles)
        api.registry().remove(result.name)
        if not self.replays:
            raise SystemExit(f"{self.name}: the edit at tiles {tiles} replayed no CUDA graph: {result.edit_summary}")
        return statistics.median(self.replays)


def combos(levels: list[int], count: int, rng: random.Random) -> list[dict[int, int]]:
    from fisedit_engine.tiling import CANDIDATES
    uniform = [tuple(t for _ in levels) for t in CANDIDATES]
    others = [c for c in itertools.product(CANDIDATES, repeat=len(levels)) if c not in uniform]
    rng.shuffle(others)
    return [dict(zip(levels, c)) for c in (uniform + others)[:max(count, len(uniform))]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15@512,sd21v@768,sdxl@1024")
    parser.add_argument("--combos", type=int, default=10, help="tile-size combinations measured per model and mask")
    parser.add_argument("--steps", type=int, default=8, help="steps of the source and so of each edit")
    parser.add_argument("--write", action="store_true", help="store the fit in fisedit_engine/tile_costs.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tile_costs")
    a = parser.parse_args(argv)
    import comfy_host
    comfy_host.boot()
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tile_costs.py times CUDA graph replays: run it on a machine with CUDA")
    import step_phases
    from fisedit_engine import tiling
    from fisedit_engine.plan import DEFAULT_TILE

    gpu = torch.cuda.get_device_name()
    times: dict = {}
    wrapped = step_phases.timed_methods(times, [(torch.cuda.CUDAGraph, "replay", True)])
    replays = times.setdefault(step_phases.gpu_label_of(torch.cuda.CUDAGraph, "replay"), [])
    rng = random.Random(0)
    benches, samples = [], []
    a.out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    try:
        for spec in a.models.split(","):
            arch, size = spec.split("@")
            bench = Bench(arch, int(size), a.steps, replays)
            benches.append(bench)
            bench.replay_ms(bench.mask("rect", 0.05), {lvl: DEFAULT_TILE for lvl in bench.levels})  # compiles
            for shape, fraction in MASKS:
                mask = bench.mask(shape, fraction)
                for tiles in combos(bench.levels, a.combos, rng):
                    ms = bench.replay_ms(mask, tiles)
                    samples.append({"model": bench.name, "mask": f"{shape} {fraction:.0%}", "tiles": tiles,
                                    "features": bench.features(mask, tiles), "ms": ms})
                    print(f"{bench.name} {shape} {fraction:.0%} tiles {list(tiles.values())}: {ms:.3f} ms", flush=True)
            (a.out / f"{stem}-samples.json").write_text(json.dumps(samples) + "\n")  # kept if a later model fails

        coef, intercepts = tiling.fit([s["features"] for s in samples], [s["ms"] / 1e3 for s in samples],
                                      [s["model"] for s in samples])
        calibration = tiling.Calibration(gpu, "cuda", coef, "")
        for s in samples:
            s["predicted_ms"] = 1e3 * (calibration.predict(s["features"]) + intercepts[s["model"]])
        errors = [s["predicted_ms"] - s["ms"] for s in samples]
        rms = statistics.fmean(e * e for e in errors) ** 0.5
        lines = [f"# Tile-size cost model on {gpu}", "",
                 f"`python benchmarks/tile_costs.py --models {a.models} --combos {a.combos} --steps {a.steps}`, "
                 f"{datetime.date.today()}, torch {torch.__version__}: {len(samples)} edits, each sample the median "
                 f"GPU time of one edit's replayed sparse steps.", "",
                 "Fit, seconds per 10^12: " + ", ".join(f"{name} {c * 1e12:.4g}"
                                                        for name, c in zip(tiling.FEATURES, coef)) + "; intercepts "
                 + ", ".join(f"{m} {1e3 * v:.2f} ms" for m, v in intercepts.items())
                 + f". Residuals: rms {rms:.3f} ms, largest {max(errors, key=abs):+.3f} ms.", "",
                 "| model | mask | tile 4, ms | best measured (tiles), ms | cost model's choice (tiles), ms "
                 "| choice / tile 4 |", "|---|---|---|---|---|---|"]
        for bench in benches:
            for shape, fraction in MASKS:
                mask, label = bench.mask(shape, fraction), f"{shape} {fraction:.0%}"
                measured = [s for s in samples if s["model"] == bench.name and s["mask"] == label]
                choice = tiling.choose_tiles(mask, bench.level_sizes, bench.levels, bench.work, bench.rows,
                                             calibration).tiles
                choice_ms = next((s["ms"] for s in measured if s["tiles"] == choice), None)
                if choice_ms is None:
                    choice_ms = bench.replay_ms(mask, choice)
                default_ms = next(s["ms"] for s in measured if set(s["tiles"].values()) == {DEFAULT_TILE})
                best = min(measured, key=lambda s: s["ms"])
                lines.append(f"| {bench.name} | {label} | {default_ms:.3f} | {best['ms']:.3f} "
                             f"({list(best['tiles'].values())}) | {choice_ms:.3f} ({list(choice.values())}) | "
                             f"{choice_ms / default_ms:.3f} |")
    finally:
        for cls, name, original in wrapped:
            setattr(cls, name, original)
    table = "\n".join(lines) + "\n"
    print(table)
    (a.out / f"{stem}-samples.json").unlink()
    (a.out / f"{stem}.json").write_text(json.dumps({"gpu": gpu, "coefficients": coef, "intercepts": intercepts,
                                                    "samples": samples}, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(table)
    if a.write:
        entries = json.loads(tiling.CALIBRATIONS.read_text()) if tiling.CALIBRATIONS.exists() else {}
        entries[gpu] = {"kind": "cuda", "seconds": list(coef),
                        "fitted": (f"benchmarks/tile_costs.py --models {a.models}, {datetime.date.today()}, "
                                   f"{len(samples)} edits, residual rms {rms:.3f} ms")}
        tiling.CALIBRATIONS.write_text(json.dumps(entries, indent=1) + "\n")
        print(f"wrote the calibration of {gpu} to {tiling.CALIBRATIONS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
