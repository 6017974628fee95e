"""The example API-format workflows through scripts/run_workflow.py, each in a fresh process: on the sd15-small
checkpoint and on the toy model (the demo, the chained edit and the user-mask edit)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "scripts" / "run_workflow.py")]


def run(workflow: Path, models: Path, out: Path):
    # The toy workflows run on the committed weights, whatever folder another test points the loader at
    env = {k: v for k, v in os.environ.items() if k != "FISEDIT_TOYWORLD_DIR"}
    proc = subprocess.run(RUN + [str(workflow), "--models", str(models), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
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
    assert saved_latent.shape == (1, 4, 16, 16)
    assert torch.equal(saved_latent, cache.final_latent)  # the cache keeps the sampler's LATENT exactly


def test_a_node_error_fails_with_the_hosts_message(models_dir, tmp_path):
    workflow = json.loads((ROOT / "workflows" / "capture_store_api.json").read_text())
    workflow["6"]["inputs"]["steps"] = 0  # below KSampler's minimum
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(workflow))
    proc, summary = run(bad, models_dir, tmp_path / "out")
    assert proc.returncode == 1 and not summary["ok"]
    assert "node 6 (KSampler)" in proc.stderr and "steps" in proc.stderr


def test_edit_workflow_with_a_user_mask(models_dir, tmp_path):
    """Capture, store, edit with a user mask, save the latents: outside the dilated mask the edited latent is the
    original, exactly (I4); inside it changed."""
    from safetensors.torch import load_file
    proc, summary = run(ROOT / "workflows" / "edit_user_mask_api.json", models_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = summary["nodes"]
    original = load_file(nodes["19"]["files"][0])["latent_tensor"]
    edited = load_file(nodes["20"]["files"][0])["latent_tensor"]
    assert all(Path(f).is_file() for n in ("9", "17", "18", "22") for f in nodes[n]["files"])
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, 4 - 1:9 + 1, 5 - 1:11 + 1] = True  # the 48x40 px box at (40, 32) in latent pixels, dilated by 1
    outside = ~mask[:, None].expand_as(edited)
    assert torch.equal(edited[outside], original[outside])
    assert not torch.equal(edited[~outside], original[~outside])
    assert nodes["15"]["seconds"] > 0
    # FISEditDecode: outside the dilated mask the saved pixels are the original image's, bit for bit
    import numpy as np
    from PIL import Image
    pixels = {n: np.asarray(Image.open(nodes[n]["files"][0])) for n in ("9", "17", "22")}
    pixel_mask = mask[0].repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    assert (pixels["17"][~pixel_mask] == pixels["9"][~pixel_mask]).all()
    assert (pixels["17"][pixel_mask] != pixels["9"][pixel_mask]).any()
    assert (pixels["22"][~pixel_mask] != pixels["9"][~pixel_mask]).any()  # a plain VAEDecode changes more


def test_auto_edit_workflow_end_to_end(models_dir, tmp_path):
    """Generate, capture, store, edit with an automatic (+user) mask, sample sparsely, decode with FISEditDecode,
    next to a stock regenerate: the region contains the user box, and outside it the latent and the pixels are the
    original's, bit for bit."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    proc, summary = run(ROOT / "workflows" / "edit_auto_api.json", models_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = summary["nodes"]
    region = np.asarray(Image.open(nodes["27"]["files"][0]).convert("L")) > 127
    assert region[32:72, 40:88].all()  # the user box (48x40 px at (40, 32))
    latent_region = torch.from_numpy(region[::8, ::8].copy())[None]
    original = load_file(nodes["19"]["files"][0])["latent_tensor"]
    edited = load_file(nodes["20"]["files"][0])["latent_tensor"]
    outside = ~latent_region[:, None].expand_as(edited)
    assert torch.equal(edited[outside], original[outside])
    pixels = {n: np.asarray(Image.open(nodes[n]["files"][0])) for n in ("9", "17")}
    assert (pixels["17"][~region] == pixels["9"][~region]).all()
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_report.py"), str(tmp_path / "summary.json")],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0 and "stock regenerate" in report.stdout and "% of the image" in report.stdout


def test_the_demo_workflow_edits_only_the_changed_object_on_the_trained_toy_model(tmp_path):
    """The README's main job (workflows/edit_auto_toy_api.json on the committed toy weights): the automatic mask is
    local, FISEditDecode keeps every pixel outside it, and the report prints."""
    import numpy as np
    from PIL import Image
    proc, summary = run(ROOT / "workflows" / "edit_auto_toy_api.json", tmp_path / "no-models", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = summary["nodes"]
    region = np.asarray(Image.open(nodes["27"]["files"][0]).convert("L")) > 127
    assert 0 < region.mean() < 0.5  # the caption changed one object's colour: a local mask
    pixels = {n: np.asarray(Image.open(nodes[n]["files"][0])) for n in ("9", "17", "25")}
    assert (pixels["17"][~region] == pixels["9"][~region]).all()
    assert not (pixels["17"][region] == pixels["9"][region]).all()
    assert not (pixels["25"][~region] == pixels["9"][~region]).all()  # a stock regenerate changes the rest too


def _png(path):
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def _latent_region(pixel_region):
    """Latent pixels of a mask at image size that FISEditDifferenceMask drew (whole 8x8 cells)."""
    return torch.from_numpy(pixel_region[::8, ::8].copy())[None, None]


def test_the_chained_edit_workflow_keeps_each_edit_outside_the_next_ones_mask(tmp_path):
    """workflows/edit_chained_toy_api.json on the toy model: edit 1 (blue -> green square) and edit 2 (green square
    -> green diamond) on edit 1's result cache. Edit 1 is the original outside its mask, edit 2 is edit 1 outside
    its own mask (latents and FISEditDecode's pixels, bit for bit), and the original outside both."""
    from safetensors.torch import load_file
    proc, summary = run(ROOT / "workflows" / "edit_chained_toy_api.json", tmp_path / "no-models", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = summary["nodes"]
    first, second = (_png(nodes[n]["files"][0])[..., 0] > 127 for n in ("23", "25"))
    assert 0 < first.mean() < 0.5 and 0 < second.mean() < 0.5
    assert "edit of 'chained-toyworld'" in proc.stdout and proc.stdout.count("FISEdit edit of") == 2
    latents = {n: load_file(nodes[n]["files"][0])["latent_tensor"] for n in ("26", "27", "28")}
    outside_first = ~_latent_region(first).expand_as(latents["26"])
    outside_second = ~_latent_region(second).expand_as(latents["26"])
    assert torch.equal(latents["27"][outside_first], latents["26"][outside_first])
    assert torch.equal(latents["28"][outside_second], latents["27"][outside_second])
    assert not torch.equal(latents["28"][~outside_second], latents["27"][~outside_second])
    pixels = {n: _png(nodes[n]["files"][0]) for n in ("9", "14", "20")}
    assert (pixels["14"][~first] == pixels["9"][~first]).all()
    assert (pixels["20"][~second] == pixels["14"][~second]).all()
    assert (pixels["20"][~(first | second)] == pixels["9"][~(first | second)]).all()
    assert (pixels["20"][second] != pixels["14"][second]).any()


def test_the_toy_user_mask_workflow_edits_inside_the_box_only(tmp_path):
    """workflows/edit_user_mask_toy_api.json: the user's 64x64 box around the square (dilate 0) is the region; the
    latent and FISEditDecode's pixels are the original's outside it, bit for bit, and change inside."""
    from safetensors.torch import load_file
    proc, summary = run(ROOT / "workflows" / "edit_user_mask_toy_api.json", tmp_path / "no-models", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = summary["nodes"]
    box = torch.zeros(256, 256, dtype=torch.bool)
    box[96:160, 96:160] = True
    original, edited = (load_file(nodes[n]["files"][0])["latent_tensor"] for n in ("19", "20"))
    outside = ~_latent_region(box.numpy()).expand_as(original)
    assert torch.equal(edited[outside], original[outside])
    assert not torch.equal(edited[~outside], original[~outside])
    before, after = _png(nodes["9"]["files"][0]), _png(nodes["17"]["files"][0])
    assert (after[~box.numpy()] == before[~box.numpy()]).all()
    assert (after[box.numpy()] != before[box.numpy()]).any()
    preview = _png(nodes["18"]["files"][0]).astype(int)
    assert preview.shape == (256, 256, 3)
    # half red over the box: red at least half, blue at most half of full scale there
    assert (preview[box.numpy()][:, 0] >= 127).all() and (preview[box.numpy()][:, 2] <= 128).all()
