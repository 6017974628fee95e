"""Capture on CUDA in half precision: bit-identical sampling, pinned fp16/bf16 host buffers, copies landed.

Skipped without CUDA (tests/conftest.py). Run on a GPU machine with `bash scripts/run_tests.sh tests/gpu`.
"""
import pytest
import torch

import tiny_models
from tiny_models import sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_capture_on_gpu_is_bit_identical_and_pinned(host, arch, dtype):
    from fisedit_engine import api
    model = tiny_models.build(arch, seed=2, dtype=dtype)
    size = 64  # latent 64x64: levels 64 and 32 (and 16 for the SDXL structure) run sparse
    ref = sample(model, arch, batch=2, cfg=6.0, sampler="dpmpp_2m", size=size)
    captured, handle = api.capture(model, f"gpu-{arch}-{dtype}")
    out = sample(captured, arch, batch=2, cfg=6.0, sampler="dpmpp_2m", size=size)
    assert torch.equal(ref, out)
    cache, _ = api.store(handle, {"samples": out})
    assert cache.settings.dtype == str(dtype).removeprefix("torch.")
    for (key, _), t in cache.store.tensors.items():
        assert t.is_pinned(), key
        assert t.dtype == (torch.float32 if key.endswith(":stats") or key == "x" else dtype), key
        assert torch.isfinite(t.float()).all(), key
    # non-blocking device-to-host copies have landed: the last step's model output is not the empty buffer's
    # garbage but what the model computes for the recorded latent
    last = cache.settings.steps - 1
    assert cache.read("out", last, chunk=0).abs().sum() > 0
    assert not torch.equal(cache.read("out", last, chunk=0), cache.read("out", last - 1, chunk=0))
