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


@pytest.mark.parametrize("fault", sorted(tiny_models.SAMPLER_FAULTS))
def test_sigmas_on_the_gpu_are_checked_after_the_fact_with_the_same_verdicts(host, fault):
    """On a GPU each model call's sigma is copied to host memory without waiting and checked once it landed (at the
    latest when the run finishes): a sampler off the schedule fails the recording as on the CPU
    (tests/host/test_capture.py), and an ordinary run passes every check."""
    from fisedit_engine import api
    from fisedit_engine.cache import CacheError
    model = tiny_models.build("sd15", seed=2, dtype=torch.float16)
    captured, handle = api.capture(model, f"gpu-fault-{fault}")
    out = tiny_models.faulty_sample(captured, "sd15", fault)
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    assert handle.recording._sigma_buffer is not None  # the sigmas were on the GPU: the deferred check ran
    with pytest.raises(CacheError, match=tiny_models.SAMPLER_FAULTS[fault]):
        api.store(handle, {"samples": out})
    captured, handle = api.capture(model, "gpu-no-fault")
    api.store(handle, {"samples": sample(captured, "sd15", batch=2, cfg=6.0, sampler="dpmpp_2m", size=32)})
