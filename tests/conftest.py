"""Test tiers: tests/unit (engine without ComfyUI), tests/host (the real ComfyUI), tests/gpu (skipped without CUDA)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "scripts", ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real ComfyUI backend, booted once per test session with this plugin loaded; returns `nodes`."""
    import torch
    import comfy_host
    if torch.cuda.is_available():
        # The host tier checks fp32 semantics (e.g. I3 within 1e-5); TF32 convs and matmuls round at 1e-3. The GPU
        # tier tests half precision with its own bounds.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return comfy_host.boot(work_dir=tmp_path_factory.mktemp("comfy"))


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir(host):
    """A folder with the built-in sd15-small checkpoint (deterministic; built once and reused, as the demo does)."""
    import make_test_checkpoint
    folder = ROOT / ".cache" / "models"
    ckpt = folder / "sd15-small.safetensors"
    if not ckpt.is_file():
        make_test_checkpoint.write_checkpoint(ckpt, "sd15-small", seed=0)
    return folder


@pytest.fixture(scope="session")
def checkpoints(models_dir):
    """The in-process host finds the built-in checkpoint by name, as CheckpointLoaderSimple in a server would."""
    import comfy_host
    comfy_host.add_model_folder("checkpoints", models_dir)
    return models_dir
