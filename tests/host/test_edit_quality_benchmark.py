"""benchmarks/edit_quality.py on random weights (plumbing, not quality), and its metrics on known inputs."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import edit_quality


def test_mask_and_outside_metrics():
    truth = torch.zeros(8, 8, dtype=torch.bool)
    truth[2:6, 2:6] = True                                   # 16 pixels
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:4] = True                                    # 8 of them
    assert edit_quality._mask_scores(mask, truth) == {"iou": 0.5, "recall": 0.5}
    # on the latent grid (8x8 pixels a cell): a circle-like truth that fills few pixels of its cells still
    # counts whole cells, and a mask made of those cells matches it exactly
    thin = torch.zeros(32, 32, dtype=torch.bool)
    thin[3:13, 5:9] = True                                    # cells (0, 0), (0, 1), (1, 0), (1, 1)
    cells = torch.zeros(32, 32, dtype=torch.bool)
    cells[0:16, 0:16] = True
    assert edit_quality._grid_scores(cells, thin) == {"iou_grid": 1.0, "recall_grid": 1.0}
    assert edit_quality._mask_scores(cells, thin)["iou"] == 40 / 256
    half = torch.zeros(32, 32, dtype=torch.bool)
    half[0:8, 0:16] = True
    assert edit_quality._grid_scores(half, thin) == {"iou_grid": 0.5, "recall_grid": 0.5}
    original = torch.zeros(8, 8, 3)
    image = original.clone()
    image[3, 3] = 1.0                                        # inside the truth: ignored
    assert edit_quality._outside_scores(image, original, truth) == {"psnr_out": edit_quality.PSNR_CAP,
                                                                    "max_err_out": 0.0}
    image[0, 0, 0] = 0.5                                     # one channel of one outside pixel
    scores = edit_quality._outside_scores(image, original, truth)
    assert scores["max_err_out"] == pytest.approx(127.5)
    assert scores["psnr_out"] == pytest.approx(10 * torch.log10(torch.tensor(48 * 3 / 0.25)).item())


def test_benchmark_runs_every_method_through_comfyui(host, tmp_path):
    out = tmp_path / "results"
    assert edit_quality.main(["--pairs", "4", "--size", "128", "--steps", "3", "--random-weights",
                              "--examples", "2", "--out", str(out)]) == 0
    result = json.loads((out / "edit_quality.json").read_text())
    pairs = result["pairs"]
    assert [p["kind"] for p in pairs] == ["colour", "shape", "size", "add"]
    for p in pairs:
        assert set(p["methods"]) == set(edit_quality.METHODS)
        assert 0 < p["truth_fraction"] < 0.5
        for m in ("fisedit_ac", "fisedit"):
            assert p["methods"][m]["max_err_outside_own_mask"] == 0  # FISEditDecode: exact outside its mask
        for m, s in p["methods"].items():
            assert isinstance(s["success"], bool) and s["seconds"] >= 0 and 0 <= s["psnr_out"] <= 100
    summary = result["summary"]["all"]
    assert set(summary) == set(edit_quality.METHODS) and summary["fisedit_ac"]["pairs"] == 4
    table = (out / "edit_quality.md").read_text()
    assert all(label in table for label in edit_quality.LABELS.values())
    assert (out / "edit_quality_examples.png").read_bytes()[:4] == b"\x89PNG"
    for p in pairs:
        for m in ("fisedit_ac", "fisedit", "inpaint", "diffdiff"):
            s = p["methods"][m]
            assert 0 <= s["iou"] <= s["iou_grid"] + 1e-9 <= 1 + 1e-9  # whole cells can only add overlap
    merged = edit_quality.merge([out], tmp_path / "merged")
    assert merged["summary"]["all"] == result["summary"]["all"]
    assert (tmp_path / "merged" / "edit_quality_examples.png").is_file()


def test_workers_run_shards_at_once_and_merge_them_into_the_same_pairs(host, tmp_path):
    out = tmp_path / "parallel"
    assert edit_quality.main(["--pairs", "3", "--size", "128", "--steps", "2", "--random-weights",
                              "--examples", "1", "--workers", "2", "--out", str(out)]) == 0
    result = json.loads((out / "edit_quality.json").read_text())
    assert [p["pair"] for p in result["pairs"]] == [0, 1, 2]
    assert result["settings"]["workers"] == 2 and len(result["settings"]["shards"]) == 2
    assert "2 worker processes" in (out / "edit_quality.md").read_text()
    alone = json.loads((out / "shards" / "02" / "edit_quality.json").read_text())
    assert [p["pair"] for p in alone["pairs"]] == [1, 2]
    assert alone["pairs"][0]["methods"]["regenerate"]["psnr_out"] == result["pairs"][1]["methods"]["regenerate"]["psnr_out"]


def test_kinds_runs_only_those_pairs_under_their_own_indices(host, tmp_path):
    out = tmp_path / "kinds"
    assert edit_quality.main(["--pairs", "4", "--size", "128", "--steps", "2", "--random-weights", "--examples", "0",
                              "--kinds", "shape,add", "--out", str(out)]) == 0
    result = json.loads((out / "edit_quality.json").read_text())
    assert [(p["pair"], p["kind"]) for p in result["pairs"]] == [(1, "shape"), (3, "add")]
    assert result["settings"]["kinds"] == ["shape", "add"]
    with pytest.raises(SystemExit):
        edit_quality.main(["--kinds", "recolour", "--out", str(out)])
