"""The automatic mask with and without attention control, with control's two rules and steps, on toy-world edit pairs.

    python benchmarks/mask_control.py --kinds add --out DIR            # runs, writes DIR/mask_control.{json,md}
    python benchmarks/mask_control.py --merge DIR1 DIR2 --out DIR      # one table from several runs

Per pair (the generator's `sample_edits(--pairs, --seed)`, pairs --start to --end of them, with edit_quality.py's
seeds and settings; the generator draws each attribute for all pairs at once, so a pair's content depends on how
many are drawn: edit_quality.py's shard drawing --start + --pairs has the same pair i only where the counts agree):
the original generated through FISEditCacheCapture, then the engine's difference mask (the node's defaults, the VAE
connected, undilated) with attention control off, with prompt-to-prompt's refine (the original's probabilities at
the unchanged words, unscaled) and with the rescaled refine (attention_control.py), both in every probe step, and
with the rescaled refine in the first probe step only (the node's default) or the first two, each with the
difference weighted by where the changed words look (word_attention.py, the node's rule) and, for the node's control
and none, also without it, and the node's with a shorter probe (VARIANTS); scored
against the generator's truth on the latent grid as edit_quality.py scores it. Only the masks: no sparse sampling,
so it runs on a CPU (a few seconds a mask there), where edit_quality.py's 200 pairs of every method would take
hours.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks"), str(ROOT)]

VARIANTS = {  # name: (title, difference_mask's control arguments)
    "off": ("no control", {"attention_control": False}),
    "refine": ("refine, unscaled", {"control_mode": "refine", "control_steps": None}),
    "rescaled": ("refine, rescaled", {"control_mode": "rescaled", "control_steps": None}),
    "rescaled-1": ("rescaled, first probe step (the node's)", {"control_mode": "rescaled", "control_steps": 1}),
    "rescaled-2": ("rescaled, first 2 probe steps", {"control_mode": "rescaled", "control_steps": 2}),
    "rescaled-1-difference": ("rescaled, first probe step, the difference alone",
                              {"control_mode": "rescaled", "control_steps": 1, "word_attention": False}),
    "off-difference": ("no control, the difference alone", {"attention_control": False, "word_attention": False}),
    # a shorter probe is a cheaper edit: 4 probe steps of 20 cost a sixth of a regenerate at SD2.1@768 (README, Speed)
    "rescaled-1-probe-3": ("the node's, 3 probe steps", {"control_mode": "rescaled", "control_steps": 1,
                                                        "probe_steps": 3}),
    "rescaled-1-probe-2": ("the node's, 2 probe steps", {"control_mode": "rescaled", "control_steps": 1,
                                                        "probe_steps": 2}),
}


def run(a) -> list[dict]:
    import comfy_host
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    nodes = comfy_host.boot(work_dir=Path(tempfile.mkdtemp(prefix="fisedit-mask-control-")))
    from edit_quality import _mask_scores, _on_latent_grid, all_edits_slice
    from mask_signals import captured_original
    from fisedit_engine import api, registry
    from toyworld import comfy_models, models
    from toyworld import edits as edits_mod
    model, clip, vae, _ = comfy_models.load(models.weight_sets(ROOT / "toyworld" / "weights")["toyworld"])
    encode = nodes.CLIPTextEncode()
    edits = edits_mod.sample_edits(a.pairs, seed=a.seed)
    records = []
    for i in range(a.start, a.end or a.pairs):
        edit = all_edits_slice(edits, i)
        kind = edits_mod.EDIT_KINDS[int(edit.kind[0])]
        if kind not in a.kinds:
            continue
        old, new = edit.captions()[0][0], edit.captions()[1][0]
        truth = _on_latent_grid(edit.regions(a.size)[0][0])
        record = {"pair": i, "kind": kind, "before": old, "after": new}
        with torch.inference_mode():
            handle, _ = captured_original(model, clip, encode, old, a.seed * 100_003 + i, a, f"mask-control-{i}")
            positive = encode.encode(clip, new)[0]
            for variant in a.variants:
                t0 = time.perf_counter()
                spec, _, _ = api.difference_mask(model, handle, positive, "auto", dilate=0, vae=vae,
                                                 **VARIANTS[variant][1])
                mask = spec.mask[0].cpu()
                record[variant] = _mask_scores(mask, truth) | {"mask_fraction": float(mask.float().mean()),
                                                              "seconds": time.perf_counter() - t0}
        registry.registry().clear()
        records.append(record)
        print(f"pair {i} {kind}: " + "  ".join(f"{v} {record[v]['iou']:.2f}" for v in a.variants), flush=True)
    return records


def markdown(records: list[dict], settings: dict) -> str:
    variants = [v for v in VARIANTS if all(v in r for r in records)]
    from toyworld.edits import EDIT_KINDS
    kinds = [k for k in EDIT_KINDS if any(r["kind"] == k for r in records)]
    lines = [f"Attention control and the automatic mask: {len(records)} toy-world edit pairs ({settings}). Undilated "
             f"latent-grid IoU with the generator's truth, mean ± standard error of the mean; in brackets, masks "
             f"under 0.45.", "",
             "| kind | pairs | " + " | ".join(VARIANTS[v][0] for v in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for kind in (*kinds, None):
        rows = [r for r in records if kind is None or r["kind"] == kind]
        cells = []
        for v in variants:
            ious = [r[v]["iou"] for r in rows]
            se = statistics.stdev(ious) / len(ious) ** 0.5 if len(ious) > 1 else 0.0
            cells.append(f"{statistics.fmean(ious):.3f} ± {se:.3f} ({sum(x < 0.45 for x in ious)})")
        lines.append(f"| {kind or 'all'} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=200, help="pairs 0..N-1 of the generator (those of --kinds run)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--end", type=int, default=0, help="stop before this pair (0: --pairs); to split a run")
    p.add_argument("--kinds", default="add,shape", help="comma-separated: colour, shape, size, add, remove")
    p.add_argument("--variants", default="off,refine,rescaled,rescaled-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--merge", type=Path, nargs="+", help="combine these output folders into --out instead of running")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.kinds, a.variants = a.kinds.split(","), a.variants.split(",")
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if a.merge:
        runs = [json.loads((d / "mask_control.json").read_text()) for d in a.merge]
        records = sorted((r for run_ in runs for r in run_["pairs"]), key=lambda r: r["pair"])
        settings = "; ".join(run_["settings"] for run_ in runs)
    else:
        import torch
        records = run(a)
        settings = (f"seed {a.seed}, pairs {a.start}-{(a.end or a.pairs) - 1} of {a.pairs}, kinds "
                    f"{', '.join(a.kinds)}, {a.size}x{a.size}, euler/normal {a.steps} steps, cfg {a.cfg}, "
                    f"weights toyworld, {'CUDA' if torch.cuda.is_available() else 'CPU'}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "mask_control.json").write_text(json.dumps({"settings": settings, "pairs": records}, indent=1) + "\n")
    (a.out / "mask_control.md").write_text(markdown(records, settings) + "\n")
    print(markdown(records, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
