"""The committed edit-quality table is what its committed JSON renders to (benchmarks/edit_quality.py --render), with
the standard errors of the per-kind mask IoU."""
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import edit_quality  # noqa: E402


def test_the_committed_table_renders_from_the_committed_json(tmp_path):
    results = ROOT / "benchmarks" / "results"
    shutil.copyfile(results / "edit_quality.json", tmp_path / "edit_quality.json")
    assert edit_quality.main(["--render", "--out", str(tmp_path)]) == 0
    rendered = (tmp_path / "edit_quality.md").read_text()
    assert rendered == (results / "edit_quality.md").read_text()
    # the shape row's undilated grid IoU with its standard error, computed here from the pairs
    pairs = [p for p in json.loads((results / "edit_quality.json").read_text())["pairs"] if p["kind"] == "shape"]
    cells = []
    for method in ("fisedit_ac", "fisedit"):
        values = [p["methods"][method]["iou_grid_undilated"] for p in pairs]
        cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values) / math.sqrt(len(values)):.2f}")
    assert f"| shape | {len(pairs)} |" in rendered and " / ".join(cells) in rendered
