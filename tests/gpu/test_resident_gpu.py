"""The attention context a GPU capture keeps on the device (resident.py): every self-attention K/V of every step
and chunk is there, an edit reads it instead of uploading it, and the edit is bit-identical to one that uploads it.
Skipped without CUDA."""
import torch

import tiny_models
from tiny_models import sample


def test_capture_keeps_the_attention_context_and_edits_read_it_exactly(host, monkeypatch):
    from fisedit_engine import api, resident
    from fisedit_engine.edit import EditSpec, run_edit
    arch, steps = "sd15", 5
    model = tiny_models.build(arch, seed=4, dtype=torch.float16)
    captured, handle = api.capture(model, "gpu-resident")
    api.store(handle, {"samples": sample(captured, arch, batch=2, cfg=6.0, sampler="euler", size=64, steps=steps)})
    cache = handle.get()
    context = {k for k in cache.keys() if resident.is_attention_context(k)}
    assert cache.resident is not None and context
    assert set(cache.resident.tensors) == {(k, c, s) for k in context for c in (0, 1) for s in range(steps)}
    for (key, chunk, step), value in cache.resident.tensors.items():
        assert value.is_cuda and torch.equal(value.cpu(), cache.read_stored(key, step, chunk))

    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 12:28, 30:50] = True
    spec = EditSpec(handle, tiny_models.conditioning(arch, 77, 2), mask)
    with torch.inference_mode():
        edited, result = run_edit(model, spec, cuda_graph=True)
    assert result.feed_stats.bytes_resident == cache.resident.nbytes  # every sparse step read it on the device

    kept, cache.resident = cache.resident, None
    monkeypatch.setattr(resident, "_budget", resident.DeviceBudget(budget_bytes=0))  # nothing kept: all uploaded
    try:
        with torch.inference_mode():
            uploaded, plain = run_edit(model, spec, cuda_graph=True)
    finally:
        cache.resident = kept
    assert plain.feed_stats.bytes_resident == 0
    assert plain.feed_stats.bytes_uploaded == result.feed_stats.bytes_uploaded + result.feed_stats.bytes_resident
    assert torch.equal(edited, uploaded)
    a, b = result.get(), plain.get()
    for key in context:
        for chunk in (0, 1):
            for step in range(steps):
                assert torch.equal(a.read(key, step, chunk), b.read(key, step, chunk)), (key, chunk, step)
