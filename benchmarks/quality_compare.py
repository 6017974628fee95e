"""Two runs of edit_quality.py on the pairs both hold: FISEdit's mask IoU and success per edit kind, before -> after.

    python benchmarks/quality_compare.py BEFORE.json AFTER.json
    python benchmarks/quality_compare.py <(git show REV:benchmarks/results/edit_quality.json) \
        benchmarks/results/edit_quality.json

A run cut short by --budget-seconds holds fewer pairs than another; comparing its summary with the other's would mix
different pairs. Here both are averaged over the same pairs.
"""
from __future__ import annotations

import json
import statistics
import sys

KINDS = ("colour", "shape", "size", "add", "remove")
METHODS = {"fisedit_ac": "FISEdit, auto mask + attention control", "fisedit": "FISEdit, auto mask"}


def compare(before: dict, after: dict) -> str:
    old = {p["pair"]: p for p in before["pairs"]}
    new = {p["pair"]: p for p in after["pairs"]}
    common = sorted(set(old) & set(new))
    # a pair's content depends on how many pairs its run drew at once (toyworld.edits.sample_edits), so an index
    # names the same edit only between runs sharded alike; say how many differ instead of comparing silently
    differ = [c for c in common if (old[c]["before"], old[c]["after"]) != (new[c]["before"], new[c]["after"])]
    lines = [f"{len(common)} pairs in both runs ({len(differ)} of them with other captions: {differ}); undilated "
             f"(dilated) latent-grid mask IoU and edit success, before -> after", "",
             "| method | kind | pairs | IoU undilated | IoU dilated | success |", "|---|---|---|---|---|---|"]
    for method, name in METHODS.items():
        for kind in (None, *KINDS):
            pairs = [c for c in common if kind is None or old[c]["kind"] == kind]
            if not pairs:
                continue

            def mean(run, metric):
                return statistics.mean(float(run[c]["methods"][method][metric]) for c in pairs)
            cells = [f"{mean(old, m):.2f} -> {mean(new, m):.2f}" for m in ("iou_grid_undilated", "iou_grid")]
            success = f"{100 * mean(old, 'success'):.0f}% -> {100 * mean(new, 'success'):.0f}%"
            lines.append(f"| {name} | {kind or 'all'} | {len(pairs)} | {cells[0]} | {cells[1]} | {success} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__)
    runs = []
    for path in argv:
        with open(path) as f:
            runs.append(json.load(f))
    print(compare(*runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
