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
