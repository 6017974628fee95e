"""Scores rules for the automatic mask on the probe signals that benchmarks/mask_signals.py saved.

    python benchmarks/mask_variants.py out/mask_signals.pt [more files...]

Each rule turns a pair's per-step difference maps into a mask on the latent grid; scored against the
generator's true region on that grid: IoU (undilated and dilated by one latent pixel), recall, and the share of
empty masks, over all pairs and per edit kind. The rules are built from the engine's own functions
(fisedit_engine.mask), so a rule chosen here is the rule the node runs; the earlier rule's 3x3 opening, gone from
the engine, is written out here, and so is the map before smoothing. Hysteresis (as Canny's edges) grows the
engine's mask into the connected cells above a fraction of its Otsu cut, for the cells at an object's rim that hold
a few changed pixels. Segment completion adds to the engine's mask (with the VAE's edge guide) every small region of
the original image (neighbouring pixels closer than a tolerance in colour, at most a tenth of the image) that the mask
covers a share of: a shape change redraws the old object, whose unchanged inside the difference cannot show
(the engine's rule fills a region's concavities for the same reason, a row shows it without). The engine drops
regions whose strongest difference is under half the map's (echoes on other objects); rows vary that share. The
oracle rows cut each pair's map where IoU
with the truth is best: no threshold on that map can do better. Where the file holds the original images (saved by
mask_signals.py since the mask can follow them), the engine's rule is also scored along the image's edges, and,
where it holds the clean image the probe predicts, along the edges of the mean of both (the node with a VAE
connected). Besides the latent difference the engine uses, the engine's rule is also scored on the
difference of the positive model output (eps) and of the predicted clean latent (x0). The rules here cut the
difference alone; the node weights it by where the changed words look first (word_attention.py), which
benchmarks/mask_attention.py scores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import torch
import torch.nn.functional as F

from edit_quality import _mask_scores
from fisedit_engine import mask as M


def scores(mask: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(IoU, recall), as the quality benchmark scores a mask."""
    s = _mask_scores(mask, truth)
    return s["iou"], s["recall"]


def signal(r: dict, kind: str) -> torch.Tensor:
    """[K, H, W] channel-summed |edited - cached| per probe step: of the latent leaving the step, of the positive
    model output, or of the predicted clean latent (x - sigma * eps) entering the step."""
    if kind == "latent":
        d = r["latent_diff"]
    elif kind == "eps":
        d = r["output_diff"]
    else:
        d = r["entering_diff"] - r["sigmas"][:len(r["output_diff"]), None, None, None] * r["output_diff"]
    return d.abs().sum(1)


def diff(r: dict, k: int, kind: str = "latent", smoothed: bool = True) -> torch.Tensor:
    """The engine's difference_map of the first k probe steps (its noise floor from step 1's magnitude)."""
    floor = M.NOISE_FLOOR * r["latent_scale"]
    total = M.normalised_sum([torch.where(d > floor, d, torch.zeros_like(d))[None] for d in signal(r, kind)[:k]])
    return (M.smooth(total) if smoothed else total)[0]


def oracle_cut(values: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The best of 100 quantile cuts of `values`, chosen with the truth: a bound on any threshold rule."""
    cuts = torch.quantile(values.flatten(), torch.linspace(0.5, 0.995, 100))
    return max((values > c for c in cuts), key=lambda m: scores(m, truth)[0])


def hysteresis(d: torch.Tensor, seeds: torch.Tensor, share: float) -> torch.Tensor:
    """The 8-connected regions of `d > share * Otsu cut` that hold a seed, holes filled."""
    weak = d > share * M.otsu_threshold(d)
    labels = M.components(weak[None])[0]
    return M.fill_holes(torch.isin(labels, labels[seeds & weak])[None] & weak)[0]


def image_segments(image: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[H, W] labels of the 4-connected regions of `image` [H, W, 3] whose neighbouring pixels differ by less than
    `tolerance` in every channel (each region labelled with its smallest flat index)."""
    h, w, _ = image.shape
    labels = torch.arange(h * w).view(h, w)
    right = (image[:, 1:] - image[:, :-1]).abs().amax(-1) < tolerance
    down = (image[1:] - image[:-1]).abs().amax(-1) < tolerance
    none = h * w
    while True:
        new = labels.clone()
        new[:, 1:] = torch.minimum(new[:, 1:], torch.where(right, labels[:, :-1], none))
        new[:, :-1] = torch.minimum(new[:, :-1], torch.where(right, labels[:, 1:], none))
        new[1:] = torch.minimum(new[1:], torch.where(down, labels[:-1], none))
        new[:-1] = torch.minimum(new[:-1], torch.where(down, labels[1:], none))
        new = new.flatten()[new.flatten()].view(h, w)  # a label's own label: long regions in few rounds
        if torch.equal(new, labels):
            return labels
        labels = new


def complete_segments(mask: torch.Tensor, image: torch.Tensor, tolerance: float, share: float,
                      largest: float = 0.1) -> torch.Tensor:
    """`mask` [h, w] plus the cells of every region of `image` (image_segments) of at most `largest` of the image
    whose pixels lie in the mask for at least `share` of them."""
    h, w = mask.shape
    scale = image.shape[0] // h
    labels = image_segments(image.float(), tolerance).flatten()
    inside = mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1).flatten().double()
    area = torch.bincount(labels, minlength=labels.numel()).double()
    covered = torch.bincount(labels, weights=inside, minlength=labels.numel())
    taken = ((area > 0) & (area <= largest * labels.numel()) & (covered >= share * area))[labels]
    return mask | (F.max_pool2d(taken.view(1, 1, h * scale, w * scale).float(), scale)[0, 0] > 0)


def table(records: list[dict], rules: dict) -> str:
    kinds = sorted({r["kind"] for r in records}, key=["colour", "shape", "size", "add", "remove"].index)
    lines = ["| rule | IoU | recall | precision | IoU dilated 1 | recall dilated 1 | empty | "
             + " | ".join(f"{k} IoU / d1" for k in kinds) + " |", "|---" * (7 + len(kinds)) + "|"]
    for name, rule in rules.items():
        rows = []
        for r in records:
            m = rule(r)
            i0, rec0 = scores(m, r["truth_grid"])
            prec0 = float((m & r["truth_grid"]).sum()) / float(m.sum()) if m.any() else 1.0
            d = M.dilate(m[None], 1)[0]
            i1, rec1 = scores(d, r["truth_grid"])
            rows.append((r["kind"], i0, i1, rec1, not m.any(), rec0, prec0))
        def mean(j, rs=rows):
            return statistics.fmean(x[j] for x in rs)
        per_kind = " | ".join(f"{mean(1, [x for x in rows if x[0] == k]):.2f} / "
                              f"{mean(2, [x for x in rows if x[0] == k]):.2f}" for k in kinds)
        lines.append(f"| {name} | {mean(1):.2f} | {mean(5):.2f} | {mean(6):.2f} | {mean(2):.2f} | {mean(3):.2f} | "
                     f"{mean(4):.0%} | {per_kind} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("signals", type=Path, nargs="+", help="files of mask_signals.py (their pairs are pooled)")
    a = p.parse_args(argv)
    files = [torch.load(f) for f in a.signals]
    records = [r for data in files for r in data["records"]]
    settings = [(d["settings"]["seed"], d["settings"]["pairs"]) for d in files]
    print(f"{len(records)} pairs (seed, pairs: {settings}), probe of "
          f"{min(d['settings']['probe_steps'] for d in files)} steps")

    def opening(m):
        """The earlier rule's cleaning: a centred 3x3 opening, outside the map counting as set."""
        e = -F.max_pool2d(F.pad(-m[None, None].float(), (1, 1, 1, 1), value=-1.0), 3, stride=1)
        return (F.max_pool2d(e, 3, stride=1, padding=1) > 0)[0, 0]

    def unsmoothed_otsu(r, k):
        d = diff(r, k, smoothed=False)
        return d > M.otsu_threshold(d)

    def otsu(r, k):
        d = diff(r, k)
        return d, d > M.otsu_threshold(d)

    def weak_dropped(r, k):
        d, cut = otsu(r, k)
        return M.drop_weak_components(cut[None], d[None])[0]

    rules = {}
    for k in (2, 4, 6):
        rules[f"{k} steps: Otsu, 3x3 opening (the earliest rule)"] = lambda r, k=k: opening(unsmoothed_otsu(r, k))
        rules[f"{k} steps: the engine's rule on the map before smoothing (the previous rule)"] = (
            lambda r, k=k: M.threshold_mask(diff(r, k, smoothed=False)[None], dilate_px=0)[0])
        rules[f"{k} steps: Otsu alone"] = lambda r, k=k: otsu(r, k)[1]
        rules[f"{k} steps: Otsu, holes filled"] = lambda r, k=k: M.fill_holes(otsu(r, k)[1][None])[0]
        rules[f"{k} steps: Otsu, weak regions dropped"] = lambda r, k=k: weak_dropped(r, k)
        rules[f"{k} steps: the engine's rule (Otsu, weak regions dropped, holes filled)"] = (
            lambda r, k=k: M.threshold_mask(diff(r, k)[None], dilate_px=0)[0])
        if all("source_image" in r for r in records):
            rules[f"{k} steps: the engine's rule along the original image's edges"] = (
                lambda r, k=k: M.threshold_mask(diff(r, k)[None], dilate_px=0, image=r["source_image"][None])[0])
        if all(k - 1 in r.get("x0_steps", ()) for r in records):
            rules[f"{k} steps: the engine's rule along the edges of the original and the predicted image (a VAE "
                  f"connected)"] = lambda r, k=k: M.threshold_mask(diff(r, k)[None], dilate_px=0, image=M.edge_guide(
                      r["source_image"], r["x0_edited"][r["x0_steps"].index(k - 1)].float())[None])[0]

    if all(3 in r.get("x0_steps", ()) for r in records):
        def with_edges(r, hull_growth=M.HULL_GROWTH, min_peak=M.MIN_PEAK):
            guide = M.edge_guide(r["source_image"], r["x0_edited"][r["x0_steps"].index(3)].float())
            return M.threshold_mask(diff(r, 4)[None], dilate_px=0, image=guide[None], max_hull_growth=hull_growth,
                                    min_peak=min_peak)[0]
        for growth, what in ((1.0, "concavities not filled (the rule before the fourteenth session)"),
                             (1.2, "concavities filled where the hull is at most 1.2x the region"),
                             (2.0, "concavities filled where the hull is at most 2x the region")):
            rules[f"4 steps: along both images' edges, {what}"] = lambda r, g=growth: with_edges(r, g)
        for peak in (0.3, 0.7, 0.8, 0.9, 1.0):
            rules[f"4 steps: along both images' edges, regions whose peak is under {peak} of the map's dropped"] = (
                lambda r, p=peak: with_edges(r, min_peak=p))
        for tolerance, share in ((0.03, 0.2), (0.04, 0.2), (0.04, 0.4), (0.06, 0.2)):
            rules[f"4 steps: along both images' edges, completed to the original's segments (tolerance {tolerance}, "
                  f"share {share})"] = lambda r, t=tolerance, s=share: complete_segments(with_edges(r),
                                                                                        r["source_image"], t, s)
    for share in (0.7, 0.5):
        rules[f"4 steps: the engine's rule grown by hysteresis into cells above {share} of the cut"] = (
            lambda r, share=share: hysteresis(diff(r, 4), M.threshold_mask(diff(r, 4)[None], dilate_px=0)[0], share))
    for k in (2, 4, 6):
        rules[f"{k} steps: oracle cut (chosen with the truth, an upper bound)"] = (
            lambda r, k=k: oracle_cut(diff(r, k), r["truth_grid"]))
    for kind in ("x0", "eps"):
        rules[f"4 steps, {kind} difference: the engine's rule"] = (
            lambda r, kind=kind: M.threshold_mask(diff(r, 4, kind)[None], dilate_px=0)[0])
    print(table(records, rules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
