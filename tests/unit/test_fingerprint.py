"""Fingerprints: cheap, but sensitive to every sampled value."""
import hashlib

import torch

from fisedit_engine.fingerprint import _update_with_tensor, conditioning_fingerprint


def test_tensor_sampling_reaches_the_last_element_of_large_tensors():
    """Fingerprints sample large weights; float32 index arithmetic overflowed past 2**24 elements."""
    big = torch.zeros(29491200)
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    _update_with_tensor(h1, big)
    big[-1] = 1.0
    _update_with_tensor(h2, big)
    assert h1.hexdigest() != h2.hexdigest()


def test_conditioning_fingerprint_sees_embeddings_and_pooled_outputs():
    base = [[torch.zeros(1, 77, 8), {"pooled_output": torch.zeros(1, 4)}]]
    changed_embedding = [[torch.zeros(1, 77, 8).index_fill(1, torch.tensor([76]), 1e-3), {"pooled_output": torch.zeros(1, 4)}]]
    changed_pooled = [[torch.zeros(1, 77, 8), {"pooled_output": torch.ones(1, 4)}]]
    prints = {conditioning_fingerprint(c) for c in (base, changed_embedding, changed_pooled)}
    assert len(prints) == 3 and conditioning_fingerprint(base) == conditioning_fingerprint([[torch.zeros(1, 77, 8), {"pooled_output": torch.zeros(1, 4)}]])


def _one_tensor_at_a_time(h, t, full=False):
    """The per-tensor hashing the fingerprints of saved caches were made with (a host copy per tensor)."""
    flat = t.detach().reshape(-1)
    if not full and flat.numel() > 256:
        flat = flat[torch.arange(256) * (flat.numel() - 1) // 255]
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())


def test_hashing_many_tensors_in_one_copy_gives_the_per_tensor_digest():
    """Saved caches keep matching: batching the host copies must not change a single hashed byte."""
    from fisedit_engine.fingerprint import _update_with_tensors
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=gen).half(), torch.randn(700, generator=gen).bfloat16(),
               torch.randn(40, 40, generator=gen), torch.randn(9, generator=gen).double() * 1e-40,
               torch.randint(-5, 5, (300,), generator=gen), torch.rand(17, generator=gen) > 0.5,
               torch.empty(0, 4), torch.randn(2, 3, 4, 5, generator=gen)[:, 1]]
    items = [(f"w{i}".encode(), t) for i, t in enumerate(tensors)]
    for full in (False, True):
        expected, batched = hashlib.sha256(), hashlib.sha256()
        for prefix, t in items:
            expected.update(prefix)
            _one_tensor_at_a_time(expected, t, full)
        _update_with_tensors(batched, items, full)
        assert batched.hexdigest() == expected.hexdigest()
    changed = [(p, t.clone()) for p, t in items]
    changed[2][1][-1, -1] += 1
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    _update_with_tensors(h1, items)
    _update_with_tensors(h2, changed)
    assert h1.hexdigest() != h2.hexdigest()
