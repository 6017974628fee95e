"""benchmarks/quality_compare.py: means over the pairs both runs hold, and a count of indices whose edits differ."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_compare import compare  # noqa: E402


def run(pairs):
    methods = {"iou_grid_undilated": 0.0, "iou_grid": 0.0, "success": 0}
    return {"pairs": [{"pair": i, "kind": kind, "before": before, "after": "x",
                       "methods": {m: methods | {"iou_grid_undilated": iou, "success": ok}
                                   for m in ("fisedit_ac", "fisedit")}}
                      for i, kind, before, iou, ok in pairs]}


def test_compare_averages_the_common_pairs_and_names_those_whose_edits_differ():
    before = run([(0, "add", "a", 0.4, 0), (1, "add", "b", 0.6, 1), (2, "shape", "c", 0.9, 1)])
    after = run([(0, "add", "a", 0.8, 1), (1, "add", "other", 0.6, 1), (3, "shape", "d", 0.1, 0)])
    text = compare(before, after)
    assert text.startswith("2 pairs in both runs (1 of them with other captions: [1])")
    assert "| FISEdit, auto mask | add | 2 | 0.50 -> 0.70 | 0.00 -> 0.00 | 50% -> 100% |" in text
    assert "| shape |" not in text  # pair 2 and 3 are each in one run only
