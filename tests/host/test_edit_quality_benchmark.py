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
    merged = edit_quality.merge([out], tmp_path / "merged")
    assert merged["summary"]["all"] == result["summary"]["all"]
    assert (tmp_path / "merged" / "edit_quality_examples.png").is_file()
