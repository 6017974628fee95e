"""scripts/train_toyworld.py --smoke: every stage runs on the CPU and what it writes loads into ComfyUI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _smoke(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toyworld.py"), "--smoke", "--name", "smoke",
                           "--out", str(out), "--weights-dir", str(out / "weights"), *extra],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "a"
    _smoke(out)
    return out


def test_smoke_training_writes_loadable_weights_and_reports(host, first_run):
    out, weights = first_run, first_run / "weights"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timings"]["vae_steps"] == 3 and metrics["timings"]["diffusion_steps"] == 3
    assert metrics["parameters_total"] == sum(metrics["parameters"].values()) < 25_000_000
    assert metrics["latent"]["latent_scale"] > 0 and len(metrics["loss"]["diffusion"]) == 3
    assert 0 <= metrics["evaluation"]["object_accuracy"] <= 1
    for name in ("loss.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(weights.glob("smoke*.safetensors"))
    assert [p.name for p in files] == [f"smoke-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(p.stat().st_size <= 15 * 2**20 + 2**16 for p in files)

    import nodes
    from toyworld import comfy_models
    model, clip, vae, meta = comfy_models.load(files)
    assert json.loads(meta["training"])["diffusion_steps"] == 3
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a small green diamond on the left, on a dotted background")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        samples = nodes.common_ksampler(model, 0, 1, 1.0, "euler", "normal", pos, pos, latent)[0]
        image = nodes.VAEDecode().decode(vae, samples)[0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_smoke_training_resumes_from_its_own_weights(host, first_run, tmp_path):
    """A resumed run loads the earlier weights, keeps their VAE and latent normalisation, skips the VAE stage,
    trains the UNet further and numbers its steps on from the earlier run's."""
    proc = _smoke(tmp_path / "b", "--resume", str(first_run / "weights"))
    runs = (first_run, tmp_path / "b")
    assert "resumed from" in proc.stdout
    before, after = (json.loads((run / "metrics.json").read_text()) for run in runs)
    assert after["timings"]["vae_steps"] == 0 and after["loss"]["vae"] == []
    assert after["training"]["diffusion_steps_total"] == 6 and after["training"]["runs"] == 2
    assert before["training"]["examples_total"] == 3 * 2 and after["training"]["examples_total"] == 6 * 2
    assert after["training"]["vae_steps"] == before["training"]["vae_steps"] == 3
    assert [step for step, _ in before["loss"]["diffusion"]] == [0, 1, 2]
    assert [step for step, _ in after["loss"]["diffusion"]] == [3, 4, 5]
    assert after["latent"]["latent_scale"] == before["latent"]["latent_scale"]

    from toyworld import models
    sd_a, sd_b = (models.load_weights(models.weight_sets(run / "weights")["smoke"])[0] for run in runs)
    assert sd_a.keys() == sd_b.keys()
    vae = [k for k in sd_a if k.startswith(models.VAE_PREFIX)]
    unet = [k for k in sd_a if k.startswith(models.UNET_PREFIX)]
    assert vae and all(torch.equal(sd_a[k], sd_b[k]) for k in vae)
    assert any(not torch.equal(sd_a[k], sd_b[k]) for k in unet)


def test_the_step_benchmark_times_the_trainers_own_step(host, tmp_path):
    """benchmarks/train_step.py on tiny settings: one row per batch size, finite losses, the JSON written."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--batches", "1,2",
                           "--compile", "eager", "--steps", "3", "--image-size", "64", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [(r["batch"], r["compile"]) for r in rows] == [(1, "eager"), (2, "eager")]
    assert all(r["finite"] and r["median_ms"] > 0 and r["examples_per_s"] > 0 for r in rows)
    assert "| 2 | eager |" in proc.stdout
