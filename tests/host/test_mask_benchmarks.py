"""benchmarks/mask_signals.py and mask_variants.py on one small pair: the saved signals are the probe's, and every
rule is scored."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_mask_signals_and_variants_run_on_one_pair(host, tmp_path):
    out = tmp_path / "signals.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_signals.py"), "--pairs", "1", "--size",
                           "128", "--steps", "10", "--probe-steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, = torch.load(out)["records"]
    assert record["latent_diff"].shape == record["output_diff"].shape == record["entering_diff"].shape == (2, 4, 16, 16)
    assert torch.equal(record["entering_diff"][0], torch.zeros(4, 16, 16))  # the probe starts from the cached latent
    assert record["entering_diff"][1].abs().sum() > 0 and record["truth_grid"].shape == (16, 16)
    assert record["truth_grid"].any() and record["sigmas"].shape == (3,)
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_variants.py"), str(out)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "steps" in line]
    assert len(rows) == 29 and "the engine's rule" in table.stdout and "oracle cut" in table.stdout
    assert "hysteresis" in table.stdout
    assert "along the original image's edges" in table.stdout and record["source_image"].shape == (128, 128, 3)
    # the clean images of the probe's last step (step 2 of 2: the only one of steps 4 and 2 it ran), both runs
    assert record["x0_steps"] == [1] and record["x0_edited"].shape == record["x0_original"].shape == (1, 128, 128, 3)
    assert not torch.equal(record["x0_edited"], record["x0_original"])
    assert "2 steps: the engine's rule along the edges of the original and the predicted image" in table.stdout


def test_mask_control_scores_each_rule_and_merges(host, tmp_path):
    import json
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_control.py"), "--pairs", "1", "--kinds",
                           "colour", "--size", "128", "--steps", "10", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, = json.loads((tmp_path / "a" / "mask_control.json").read_text())["pairs"]
    assert record["pair"] == 0 and record["kind"] == "colour"
    for variant in ("off", "refine", "rescaled", "rescaled-1"):
        assert 0.0 <= record[variant]["iou"] <= 1.0 and 0.0 < record[variant]["mask_fraction"] < 1.0
    merged = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_control.py"), "--merge",
                             str(tmp_path / "a"), "--out", str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert merged.returncode == 0, merged.stderr[-3000:]
    table = (tmp_path / "m" / "mask_control.md").read_text()
    assert f"| colour | 1 | {record['off']['iou']:.3f} ± 0.000" in table and "rescaled, first probe step (the node's)" in table
