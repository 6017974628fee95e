"""The example workflow through scripts/run_workflow.py, in a fresh process, on the sd15-small checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "scripts" / "run_workflow.py")]


def run(workflow: Path, models: Path, out: Path):
    proc = subprocess.run(RUN + [str(workflow), "--models", str(models), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_capture_store_workflow_runs_and_saves_a_loadable_cache(models_dir, tmp_path):
    from fisedit_engine import persistence
    proc, summary = run(ROOT / "workflows" / "capture_store_api.json", models_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["ok"]
    nodes = summary["nodes"]
    assert nodes["6"]["class_type"] == "KSampler" and nodes["6"]["seconds"] > 0
    assert "FISEdit cache 'demo'" in proc.stdout and "euler/8 steps" in proc.stdout
    cache_file, = nodes["7"]["files"]
    image, = nodes["9"]["files"]
    latent, = nodes["10"]["files"]
    assert Path(image).suffix == ".png" and Path(image).is_file() and Path(latent).is_file()
    cache = persistence.load(cache_file)
    assert cache.settings.steps == 8 and cache.settings.chunks == (0, 1) and cache.settings.seed == 42
    from safetensors.torch import load_file
    saved_latent = load_file(latent)["latent_tensor"]
    assert saved_latent.shape == cache.final_latent.shape == (1, 4, 16, 16)
    # the cache keeps the model-space latent; the LATENT is it divided by SD1.5's scale factor
    assert torch.allclose(saved_latent, cache.final_latent / 0.18215, rtol=1e-6, atol=1e-6)


def test_a_node_error_fails_with_the_hosts_message(models_dir, tmp_path):
    workflow = json.loads((ROOT / "workflows" / "capture_store_api.json").read_text())
    workflow["6"]["inputs"]["steps"] = 0  # below KSampler's minimum
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(workflow))
    proc, summary = run(bad, models_dir, tmp_path / "out")
    assert proc.returncode == 1 and not summary["ok"]
    assert "node 6 (KSampler)" in proc.stderr and "steps" in proc.stderr
