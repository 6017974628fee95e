"""The committed edit-quality table is what its committed JSON renders to (benchmarks/edit_quality.py --render), with
the standard errors of the per-kind mask IoU."""
import shutil
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
    assert "| shape | 40 |" in rendered and "0.61 ± 0.04 / 0.60 ± 0.04" in rendered
