"""Edit quality on the toy world: FISEdit against the usual ways to edit a generated image, with exact ground truth.

    python benchmarks/edit_quality.py [--pairs 200] [--size 256] [--steps 20] [--weights toyworld]
    python benchmarks/edit_quality.py --pairs 4 --size 128 --steps 4 --random-weights --out /tmp/q   # plumbing
    python benchmarks/edit_quality.py --start 100 --pairs 100 --out R/shard2; ... --merge R/shard1 R/shard2 --out R
    python benchmarks/edit_quality.py --pairs 240 --workers 6        # six shards at once on one GPU, then merged
    python benchmarks/edit_quality.py --render --out R              # R/edit_quality.md again from R's JSON
    (--budget-seconds S stops before a pair that would not finish in time; the shard then holds fewer pairs)

Edit pairs come from toyworld.edits (colour, shape, size, add, remove in turn): a caption, its edited caption, and
the pixels the edit affects. For each pair the original is generated from the first caption (KSampler through
FISEditCacheCapture, stored), and then edited by each method, all through ComfyUI's real nodes, in process:
- fisedit_ac / fisedit: FISEditDifferenceMask (auto mask, with / without attention control) ->
  FISEditSparseKSampler -> FISEditDecode;
- regenerate: a stock KSampler with the edited caption and the same seed, VAEDecode;
- inpaint: SetLatentNoiseMask on the original latent with FISEdit's mask (the same region, so the comparison is
  between ways of filling it), KSampler with the edited caption, VAEDecode;
- diffdiff: DifferentialDiffusion with that mask grown and blurred into a soft map (a binary map would make it
  plain inpainting), KSampler, VAEDecode;
- img2img: KSampler on the original latent with the edited caption at denoise 0.8, VAEDecode.
Metrics per method and pair, against the original image and the generator's truth (the `affected` region):
mask IoU and recall on pixels and on the latent grid (masked methods; also FISEdit's undilated mask), PSNR and maximum error (8-bit levels) of the
pixels outside the true region, the maximum change outside the method's own mask (FISEdit: 0 by construction),
edit success (toyworld.judge reads the edited object's cell: the requested colour, shape and size, or nothing for
a removal), and the seconds of the method's own nodes (the FISEdit mask nodes get the VAE, so their masks follow
the original image's edges; the original is decoded once and kept with the cache, in whichever FISEdit variant runs
first, whose seconds include it). The originals are judged too: edits of an original that does not show its
caption are reported separately.

Writes edit_quality.json (every pair and the summaries), edit_quality.md (the tables) and edit_quality_examples.png
to --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

METHODS = ("fisedit_ac", "fisedit", "regenerate", "inpaint", "diffdiff", "img2img")
LABELS = {"fisedit_ac": "FISEdit, auto mask + attention control", "fisedit": "FISEdit, auto mask",
          "regenerate": "regenerate (same seed)", "inpaint": "inpaint (SetLatentNoiseMask, FISEdit's mask)",
          "diffdiff": "differential diffusion (FISEdit's mask, soft)", "img2img": "img2img (denoise 0.8)"}
# The nodes whose time is the method's own (shared work: the original generation, the edited prompt's encoding)
METHOD_NODES = {"fisedit_ac": ("20", "21", "22"), "fisedit": ("25", "26", "27"), "regenerate": ("30", "31"),
                "inpaint": ("40", "41", "42"), "diffdiff": ("50", "51", "52", "53", "54", "55", "56", "57"),
                "img2img": ("60", "61")}
IMAGE_NODE = {"fisedit_ac": "22", "fisedit": "27", "regenerate": "31", "inpaint": "42", "diffdiff": "57",
              "img2img": "61"}
MASK_NODE = {"fisedit_ac": "20", "fisedit": "25", "inpaint": "20", "diffdiff": "20"}
# What the run must compute (plain VAEDecode nodes are no output nodes, so name them)
OUTPUTS = ["7", "8", "23", "28", *IMAGE_NODE.values()]
PSNR_CAP = 100.0  # dB, for pixels that are exactly the original's
MASK_KEYS = ("iou", "recall", "iou_grid", "recall_grid", "iou_undilated", "recall_undilated", "iou_grid_undilated",
             "recall_grid_undilated", "mask_fraction")


def pair_prompt(i: int, old: str, new: str, a) -> dict:
    """One ComfyUI API prompt with the original generation and every method's edit of it."""
    seed = a.seed * 100_003 + i
    ks = {"seed": seed, "steps": a.steps, "cfg": a.cfg, "sampler_name": a.sampler, "scheduler": a.scheduler}
    mask = {"mask_mode": "auto", "probe_steps": a.probe_steps, "threshold": a.threshold, "edit_size": 0.15}

    def sampler(model, positive, latent, denoise=1.0):
        return {"class_type": "KSampler", "inputs": {"model": model, "positive": positive, "negative": ["4", 0],
                                                     "latent_image": latent, "denoise": denoise, **ks}}

    def decode(samples):
        return {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["1", 2]}}

    def fisedit(attention_control, dilate):
        return {"class_type": "FISEditDifferenceMask", "inputs": {
            "model": ["1", 0], "cache": ["7", 0], "positive": ["10", 0], "dilate": dilate,
            "attention_control": attention_control, "attention_control_steps": a.control_steps,
            "word_attention": a.word_attention == "on", "vae": ["1", 2],
            **mask}}

    return {
        "1": {"class_type": "FISEditToyModelLoader", "inputs": {"weights": a.weights}},
        "2": {"class_type": "FISEditCacheCapture", "inputs": {"model": ["1", 0], "cache_name": f"edit-quality-{i}"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": old, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": a.size, "height": a.size, "batch_size": 1}},
        "6": sampler(["2", 0], ["3", 0], ["5", 0]),
        "7": {"class_type": "FISEditCacheStore", "inputs": {"cache": ["2", 1], "latent": ["6", 0]}},
        "8": decode(["6", 0]),
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": new, "clip": ["1", 1]}},
        "20": fisedit(True, a.dilate),
        "21": {"class_type": "FISEditSparseKSampler", "inputs": {"model": ["1", 0], "edit": ["20", 0]}},
        "22": {"class_type": "FISEditDecode", "inputs": {"vae": ["1", 2], "samples": ["21", 0], "edit": ["20", 0]}},
        "23": fisedit(True, 0),  # the undilated mask, for IoU only
        "25": fisedit(False, a.dilate),
        "26": {"class_type": "FISEditSparseKSampler", "inputs": {"model": ["1", 0], "edit": ["25", 0]}},
        "27": {"class_type": "FISEditDecode", "inputs": {"vae": ["1", 2], "samples": ["26", 0], "edit": ["25", 0]}},
        "28": fisedit(False, 0),
        "30": sampler(["1", 0], ["10", 0], ["5", 0]),
        "31": decode(["30", 0]),
        "40": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["6", 0], "mask": ["20", 1]}},
        "41": sampler(["1", 0], ["10", 0], ["40", 0]),
        "42": decode(["41", 0]),
        "50": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["1", 0]}},
        "51": {"class_type": "GrowMask", "inputs": {"mask": ["20", 1], "expand": a.size // 32, "tapered_corners": True}},
        "52": {"class_type": "MaskToImage", "inputs": {"mask": ["51", 0]}},
        "53": {"class_type": "ImageBlur", "inputs": {"image": ["52", 0], "blur_radius": a.size // 32,
                                                     "sigma": a.size / 64}},
        "54": {"class_type": "ImageToMask", "inputs": {"image": ["53", 0], "channel": "red"}},
        "55": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["6", 0], "mask": ["54", 0]}},
        "56": sampler(["50", 0], ["10", 0], ["55", 0]),
        "57": decode(["56", 0]),
        "60": sampler(["1", 0], ["10", 0], ["6", 0], denoise=0.8),
        "61": decode(["60", 0]),
    }


def _mask_scores(mask, truth) -> dict:
    inter = float((mask & truth).sum())
    union = float((mask | truth).sum())
    return {"iou": inter / union if union else 1.0, "recall": inter / float(truth.sum()) if truth.any() else 1.0}


def _on_latent_grid(pixels):
    """[H, W] bool -> [H/8, W/8]: the latent cells that hold any of the pixels. A FISEdit mask is made on this grid
    (its pixel form repeats each cell 8x8), and a cell with one changed pixel is a cell the edit must recompute, so
    this is the truth a mask can reach; on pixels, the corners of a cell that a circle or triangle misses cap IoU
    well below 1 even for a perfect mask."""
    import torch.nn.functional as F

    from fisedit_engine.decode import LATENT_SCALE
    return F.max_pool2d(pixels[None, None].float(), LATENT_SCALE)[0, 0] > 0


def _grid_scores(mask, truth) -> dict:
    scores = _mask_scores(_on_latent_grid(mask), _on_latent_grid(truth))
    return {"iou_grid": scores["iou"], "recall_grid": scores["recall"]}


def _outside_scores(image, original, region) -> dict:
    """PSNR (dB, capped) and max error (8-bit levels) of the pixels outside `region` ([H, W] bool)."""
    keep = ~region
    diff = (image.float() - original.float())[keep]
    mse = float(diff.square().mean()) if diff.numel() else 0.0
    return {"psnr_out": PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1 / mse)),
            "max_err_out": float(diff.abs().max()) * 255 if diff.numel() else 0.0}


def measure_pair(run, i: int, edit, a) -> dict:
    """Scores of every method for one pair, from the executed prompt's outputs."""
    from toyworld import edits as edits_mod
    from toyworld import judge
    truth = edit.regions(a.size)[0][0]
    original = run.outputs["8"][0][0][0]                                              # [H, W, 3]
    chw = lambda img: img.permute(2, 0, 1)[None].float()
    record = {
        "pair": i, "kind": edits_mod.EDIT_KINDS[int(edit.kind[0])], "edit": edit.describe()[0],
        "before": edit.captions()[0][0], "after": edit.captions()[1][0],
        "truth_fraction": float(truth.float().mean()),
        "original_correct": bool(judge.objects_correct(chw(original), edit.before).all()),
        "original_seconds": sum(run.seconds.get(n, 0.0) for n in ("6", "7", "8")),
        "methods": {},
    }
    for m in METHODS:
        image = run.outputs[IMAGE_NODE[m]][0][0][0]
        scores = {"success": bool(judge.edit_success(chw(image), edit)[0]),
                  "seconds": sum(run.seconds.get(n, 0.0) for n in METHOD_NODES[m]),
                  **_outside_scores(image, original, truth)}
        if m in MASK_NODE:
            mask = run.outputs[MASK_NODE[m]][1][0][0] > 0.5
            scores.update(_mask_scores(mask, truth), **_grid_scores(mask, truth))
            scores["max_err_outside_own_mask"] = _outside_scores(image, original, mask)["max_err_out"]
            if m.startswith("fisedit"):
                raw = run.outputs["23" if m == "fisedit_ac" else "28"][1][0][0] > 0.5
                undilated = {**_mask_scores(raw, truth), **_grid_scores(raw, truth)}
                scores.update({f"{k}_undilated": v for k, v in undilated.items()},
                              mask_fraction=float(mask.float().mean()))
        record["methods"][m] = scores
    record["images"] = {"original": original, **{m: run.outputs[IMAGE_NODE[m]][0][0][0] for m in METHODS},
                        "mask": run.outputs["20"][1][0][0] > 0.5, "truth": truth}
    return record


# --- summaries ----------------------------------------------------------------------------------------------------

def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(records: list[dict]) -> dict:
    """Per method: means over pairs (all pairs, and pairs whose original shows its caption), per edit kind too."""
    def block(recs):
        out = {}
        for m in METHODS:
            rows = [r["methods"][m] for r in recs]
            if not rows:
                continue
            s = {"pairs": len(rows), "success": _mean([float(x["success"]) for x in rows]),
                 "psnr_out": _mean([x["psnr_out"] for x in rows]),
                 "max_err_out_mean": _mean([x["max_err_out"] for x in rows]),
                 "max_err_out_max": max(x["max_err_out"] for x in rows),
                 "seconds": _mean([x["seconds"] for x in rows])}
            for key in MASK_KEYS:
                if key in rows[0]:
                    s[key] = _mean([x[key] for x in rows])
            if "iou_grid_undilated" in rows[0] and len(rows) > 1:  # how far the mean may be from the truth's
                s["iou_grid_undilated_se"] = statistics.stdev(x["iou_grid_undilated"] for x in rows) / len(rows) ** 0.5
            if "max_err_outside_own_mask" in rows[0]:
                s["max_err_outside_own_mask"] = max(x["max_err_outside_own_mask"] for x in rows)
            out[m] = s
        return out

    from toyworld.edits import EDIT_KINDS
    good = [r for r in records if r["original_correct"]]
    return {
        "pairs": len(records),
        "original_correct": _mean([float(r["original_correct"]) for r in records]),
        "original_seconds": _mean([r["original_seconds"] for r in records]),
        "all": block(records),
        "original_correct_only": block(good),
        "by_kind": {k: block([r for r in records if r["kind"] == k]) for k in EDIT_KINDS
                    if any(r["kind"] == k for r in records)},
        "by_kind_correct": {k: block([r for r in good if r["kind"] == k]) for k in EDIT_KINDS
                            if any(r["kind"] == k for r in good)},
    }


def _fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def _with_se(s: dict) -> str:
    se = s.get("iou_grid_undilated_se")
    return _fmt(s.get("iou_grid_undilated")) + ("" if se is None else f" ± {se:.2f}")


def _control_steps(n: int | None) -> str:
    if n is None:  # a run from before the option
        return ""
    steps = "every probe step" if n == 0 else "the first probe step" if n == 1 else f"the first {n} probe steps"
    return f", attention control in {steps}"


def _word_attention(setting: str | None) -> str:
    if setting is None:  # a run from before the option (before word_attention.py: the difference alone)
        return ""
    return (", the mask weighted by where the changed words look" if setting == "on"
            else ", the mask cut from the difference alone (word attention off)")


def markdown(summary: dict, settings: dict) -> str:
    workers = settings.get("workers", 1)
    lines = [(f"Edit quality on the toy world: {summary['pairs']} edit pairs "
              f"({settings['size']}x{settings['size']}, {settings['sampler']}/{settings['scheduler']}, "
              f"{settings['steps']} steps, cfg {settings['cfg']}, weights `{settings['weights']}`, "
              f"device {settings['device']}"
              + _control_steps(settings.get("control_steps"))
              + _word_attention(settings.get("word_attention"))
              + (f", {workers} worker processes sharing it, so the seconds are each method's under that load"
                 if workers > 1 else "")
              + f"). Originals that show their caption (judge): "
              f"{_fmt(100 * (summary['original_correct'] or 0), '.0f')}%. Mask IoU is given on the latent grid "
              "(the cells that hold a changed pixel: the resolution a mask has) and on pixels; in brackets, the "
              "undilated mask."), ""]

    def iou(s, key):
        return _fmt(s.get(key)) + (f" ({_fmt(s[key + '_undilated'])})" if key + "_undilated" in s else "")

    def table(block, title):
        lines.extend([f"**{title}**", "",
                      ("| method | mask IoU, latent grid | mask IoU, pixels | mask recall, grid | PSNR outside truth "
                       "(dB) | max error outside truth (mean / max, 8-bit) | max change outside own mask | "
                       "edit success | s per edit |"),
                      "|---|---|---|---|---|---|---|---|---|"])
        for m in METHODS:
            if m not in block:
                continue
            s = block[m]
            lines.append(f"| {LABELS[m]} | {iou(s, 'iou_grid')} | {iou(s, 'iou')} | {_fmt(s.get('recall_grid'))} | "
                         f"{_fmt(s['psnr_out'], '.1f')} | "
                         f"{_fmt(s['max_err_out_mean'], '.0f')} / {_fmt(s['max_err_out_max'], '.0f')} | "
                         f"{_fmt(s.get('max_err_outside_own_mask'), '.0f')} | {_fmt(100 * s['success'], '.0f')}% | "
                         f"{_fmt(s['seconds'], '.2f')} |")
        lines.append("")

    table(summary["all"], "All pairs")
    if summary["original_correct_only"]:
        table(summary["original_correct_only"], "Pairs whose original shows its caption")
    for title, key in (("all pairs", "by_kind"), ("pairs whose original shows its caption", "by_kind_correct")):
        if not summary.get(key):
            continue
        lines.extend([f"**By edit kind, {title}** (FISEdit with attention control vs regenerate; the undilated grid "
                      "IoU of both FISEdit masks with the standard error of its mean)", "",
                      ("| kind | pairs | FISEdit IoU, grid | FISEdit IoU, pixels | undilated grid IoU, with / without "
                       "control | FISEdit success | regenerate success | FISEdit PSNR out | regenerate PSNR out |"),
                      "|---|---|---|---|---|---|---|---|---|"])
        for kind, block in summary[key].items():
            f, r, plain = block["fisedit_ac"], block["regenerate"], block.get("fisedit", {})
            lines.append(f"| {kind} | {f['pairs']} | {iou(f, 'iou_grid')} | {iou(f, 'iou')} | "
                         f"{_with_se(f)} / {_with_se(plain)} | "
                         f"{_fmt(100 * f['success'], '.0f')}% | {_fmt(100 * r['success'], '.0f')}% | "
                         f"{_fmt(f['psnr_out'], '.1f')} | {_fmt(r['psnr_out'], '.1f')} |")
        lines.append("")
    return "\n".join(lines)


def examples_figure(records: list[dict], path: Path) -> None:
    """Per example pair, a row: original, truth (red), FISEdit's mask (red), then each method's image."""
    import torch

    from toyworld import plots
    red = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    tiles = []
    for r in records:
        im = r["images"]
        base = im["original"].permute(2, 0, 1).float()
        tiles += [base] + [base * (1 - 0.5 * m) + red * 0.5 * m for m in (im["truth"].float(), im["mask"].float())]
        tiles += [im[m].permute(2, 0, 1).float() for m in METHODS]
    if tiles:
        plots.image_grid(torch.stack(tiles), path, columns=3 + len(METHODS))


# --- running ------------------------------------------------------------------------------------------------------

def run_pairs(a) -> tuple[list[dict], dict]:
    import comfy_host
    import torch
    comfy_host.boot(work_dir=Path(tempfile.mkdtemp(prefix="fisedit-edit-quality-")))
    from fisedit_engine import api, registry
    if a.control_steps is None:
        a.control_steps = api.CONTROL_STEPS
    from toyworld import edits as edits_mod
    all_edits = edits_mod.sample_edits(a.start + a.pairs, seed=a.seed)
    executor = comfy_host.new_executor()  # one executor: the loader's output is reused across pairs
    records, examples = [], []
    t0 = time.perf_counter()
    for i in range(a.start, a.start + a.pairs):
        elapsed = time.perf_counter() - t0
        if a.budget_seconds and records and elapsed + elapsed / len(records) > a.budget_seconds:
            print(f"stopping after {len(records)} pairs: the next would pass --budget-seconds", flush=True)
            break
        edit = all_edits_slice(all_edits, i)
        if edits_mod.EDIT_KINDS[int(edit.kind[0])] not in a.kinds:
            continue
        old, new = edit.captions()[0][0], edit.captions()[1][0]
        prompt = pair_prompt(i, old, new, a)
        comfy_host.validate(prompt)  # raises with ComfyUI's messages
        with torch.inference_mode():
            run = comfy_host.run_prompt(prompt, prompt_id=f"edit-quality-{i}", executor=executor, outputs=OUTPUTS)
            record = measure_pair(run, i, edit, a)
        images = record.pop("images")
        if len(examples) < a.examples:
            examples.append({"images": images})
        records.append(record)
        registry.registry().clear()  # each pair's caches are done with; keep host memory flat
        f = record["methods"]["fisedit_ac"]
        print(f"[{time.perf_counter() - t0:7.1f}s] pair {i} {record['edit']}: FISEdit IoU {f['iou']:.2f} "
              f"success {f['success']} | regenerate success {record['methods']['regenerate']['success']}",
              flush=True)
    settings = {k: getattr(a, k) for k in ("start", "seed", "size", "steps", "cfg", "sampler", "scheduler",
                                           "weights", "probe_steps", "threshold", "dilate", "control_steps",
                                           "word_attention")}
    if set(a.kinds) != set(edits_mod.EDIT_KINDS):
        settings["kinds"] = a.kinds
    settings["pairs"] = len(records)
    settings["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    settings["seconds"] = time.perf_counter() - t0
    return records, {"settings": settings, "examples": examples}


def all_edits_slice(e, i: int):
    from toyworld.edits import Edits
    return Edits(e.before[i], e.after[i], e.kind[i:i + 1], e.slot_before[i:i + 1], e.slot_after[i:i + 1])


def write(out: Path, records: list[dict], settings: dict, examples: list[dict]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records)
    result = {"settings": settings, "summary": summary, "pairs": records}
    (out / "edit_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "edit_quality.md").write_text(markdown(summary, settings) + "\n")
    if examples:
        examples_figure(examples, out / "edit_quality_examples.png")
    return result


def merge(folders: list[Path], out: Path, workers: int = 1) -> dict:
    """Combines shard results (run with --start/--pairs) into one result; `workers`: how many of the shards ran at
    once (their times are then each under that load)."""
    parts = [json.loads((f / "edit_quality.json").read_text()) for f in folders]
    records = sorted((r for p in parts for r in p["pairs"]), key=lambda r: r["pair"])
    if len({r["pair"] for r in records}) != len(records):
        raise SystemExit("the shards overlap: a pair appears twice")
    seconds = [p["settings"]["seconds"] for p in parts]
    settings = dict(parts[0]["settings"], pairs=len(records), start=records[0]["pair"] if records else 0,
                    seconds=max(seconds) if workers > 1 else sum(seconds), shards=[str(f) for f in folders],
                    workers=workers)
    result = write(out, records, settings, [])
    figure = folders[0] / "edit_quality_examples.png"  # the first shard's examples are the first pairs
    if figure.is_file() and figure.resolve() != (out / figure.name).resolve():
        shutil.copyfile(figure, out / figure.name)
    return result


def run_workers(argv: list[str], a) -> dict:
    """Runs the pairs in `a.workers` processes at once (contiguous shards under OUT/shards/), then merges them
    into OUT. One process leaves most of a GPU idle: the toy model's steps are launch-bound."""
    import subprocess
    passed = []
    skip = False
    for arg in argv:  # this command line without the options that each shard sets itself
        if skip:
            skip = False
        elif arg in ("--workers", "--start", "--pairs", "--out"):
            skip = True
        elif not arg.startswith(("--workers=", "--start=", "--pairs=", "--out=")):
            passed.append(arg)
    n = max(1, min(a.workers, a.pairs))
    bounds = [a.start + a.pairs * k // n for k in range(n + 1)]
    folders = [a.out / "shards" / f"{k + 1:02d}" for k in range(n)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    procs = [subprocess.Popen([sys.executable, __file__, *passed, "--start", str(lo), "--pairs", str(hi - lo),
                               "--out", str(folder)], env=env)
             for lo, hi, folder in zip(bounds, bounds[1:], folders, strict=False)]
    failed = [k + 1 for k, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise SystemExit(f"shard(s) {failed} failed: see their output above")
    return merge(folders, a.out, workers=n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--start", type=int, default=0, help="first pair index (to split a run into shards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--probe-steps", type=int, default=0, help="FISEditDifferenceMask probe_steps (0: 20%%)")
    p.add_argument("--control-steps", type=int, default=None,
                   help="FISEditDifferenceMask attention_control_steps (0: every probe step; default: the node's)")
    p.add_argument("--word-attention", default="on", choices=("on", "off"),
                   help="FISEditDifferenceMask word_attention (on, the node's default: the difference weighted by "
                        "where the changed words look)")
    p.add_argument("--threshold", default="otsu", choices=("otsu", "edit_size"))
    p.add_argument("--dilate", type=int, default=1)
    from toyworld.edits import EDIT_KINDS
    p.add_argument("--kinds", default=",".join(EDIT_KINDS),
                   help="run only the pairs of these edit kinds (comma-separated); pair i stays the same pair")
    p.add_argument("--weights", default="toyworld", help="weights name for FISEditToyModelLoader")
    p.add_argument("--random-weights", action="store_true",
                   help="use freshly initialised weights in a temporary folder (tests the plumbing only)")
    p.add_argument("--examples", type=int, default=6, help="pairs shown in edit_quality_examples.png")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="start no pair that would end after this many seconds (the results cover the pairs done; "
                        "continue with --start and combine with --merge)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--merge", type=Path, nargs="+", help="combine these shard folders into --out instead of running")
    p.add_argument("--render", action="store_true",
                   help="write --out's edit_quality.md (and the JSON's summary) again from its JSON's pairs")
    p.add_argument("--workers", type=int, default=1,
                   help="run the pairs in this many processes at once and merge them (for a GPU: 6 keep an H100 "
                        "busy); each method's seconds are then measured under that shared load")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.kinds = a.kinds.split(",")
    if set(a.kinds) - set(EDIT_KINDS):
        p.error(f"unknown kinds {sorted(set(a.kinds) - set(EDIT_KINDS))}; choose from {list(EDIT_KINDS)}")
    if a.render:
        kept = json.loads((a.out / "edit_quality.json").read_text())
        result = write(a.out, kept["pairs"], kept["settings"], [])
    elif a.merge:
        result = merge(a.merge, a.out)
    elif a.workers > 1:
        result = run_workers(argv, a)
    else:
        old_dir = os.environ.get("FISEDIT_TOYWORLD_DIR")
        try:
            if a.random_weights:
                from toyworld import models
                folder = Path(tempfile.mkdtemp(prefix="toyworld-random-"))
                sd, meta = models.random_weights(seed=a.seed)
                models.save_weights(folder, a.weights, sd, meta)
                os.environ["FISEDIT_TOYWORLD_DIR"] = str(folder)
            records, extra = run_pairs(a)
        finally:
            if old_dir is None:
                os.environ.pop("FISEDIT_TOYWORLD_DIR", None)
            else:
                os.environ["FISEDIT_TOYWORLD_DIR"] = old_dir
        result = write(a.out, records, extra["settings"], extra["examples"])
    print(markdown(result["summary"], result["settings"]))
    print(f"wrote {a.out / 'edit_quality.json'} and {a.out / 'edit_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
