"""scripts/train_toyworld.py --smoke: every stage runs on the CPU and what it writes loads into ComfyUI."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_training_writes_loadable_weights_and_reports(host, tmp_path):
    out, weights = tmp_path / "out", tmp_path / "weights"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toyworld.py"), "--smoke", "--out", str(out),
                           "--weights-dir", str(weights), "--name", "smoke"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
