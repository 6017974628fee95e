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


def _digest(items, remember):
    from fisedit_engine.fingerprint import _update_with_tensors
    h = hashlib.sha256()
    _update_with_tensors(h, items, remember=remember)
    return h.hexdigest()


def _count_samples(monkeypatch) -> list:
    """The tensors `_sample` is called for from now on."""
    import fisedit_engine.fingerprint as fp
    sampled, original = [], fp._sample
    monkeypatch.setattr(fp, "_sample", lambda t, full: sampled.append(t) or original(t, full))
    return sampled


def test_remembered_samples_give_the_same_digest_and_are_not_sampled_again(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weights = [torch.nn.Parameter(torch.randn(40, 30, generator=gen)), torch.randn(500, generator=gen).half()]
    items = [(b"a", weights[0]), (b"b", weights[1])]
    first = _digest(items, remember=True)
    assert first == _digest(items, remember=False)
    sampled = _count_samples(monkeypatch)
    assert _digest(items, remember=True) == first and sampled == []
    assert _digest(items, remember=False) == first and len(sampled) == 2


def test_a_remembered_sample_is_taken_again_when_its_tensor_changes(monkeypatch):
    """In-place writes (version counter) and replaced storage (`.data =`, a move to another device) are sampled
    afresh. Inference tensors (made in inference mode, where ComfyUI runs its nodes) have no version counter: they
    are remembered by their storage."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(600, generator=gen))
    items = [(b"w", p)]
    before = _digest(items, remember=True)
    with torch.no_grad():
        p[-1] += 1.0  # the last element is always sampled
    after_write = _digest(items, remember=True)
    assert after_write != before and after_write == _digest(items, remember=False)
    p.data = torch.randn(600, generator=gen)
    replaced = _digest(items, remember=True)
    assert replaced not in (before, after_write) and replaced == _digest(items, remember=False)
    with torch.inference_mode():
        moved = torch.nn.Parameter(torch.randn(600, generator=gen))
        first = _digest([(b"w", moved)], remember=True)
        assert first == _digest([(b"w", moved)], remember=False)
        sampled = _count_samples(monkeypatch)
        assert _digest([(b"w", moved)], remember=True) == first and sampled == []
        moved.data = torch.randn(600, generator=gen)
        assert _digest([(b"w", moved)], remember=True) == _digest([(b"w", moved)], remember=False) != first


def test_the_memo_forgets_tensors_that_die():
    from fisedit_engine.fingerprint import _MEMO
    held = len(_MEMO)
    t = torch.randn(300)
    _digest([(b"t", t)], remember=True)
    assert len(_MEMO) == held + 1
    del t
    assert len(_MEMO) == held


def test_state_items_are_the_state_dict_and_a_module_with_state_dict_hooks_gets_its_real_one():
    from fisedit_engine.fingerprint import state_items

    class Block(torch.nn.Module):
        def __init__(self, shared=None):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.GroupNorm(2, 4)
            self.shared = shared if shared is not None else torch.nn.Linear(4, 4, bias=False)
            self.register_buffer("kept", torch.ones(3))
            self.register_buffer("scratch", torch.zeros(3), persistent=False)
            self.register_buffer("unset", None)
            self.register_parameter("absent", None)

    root = Block()
    root.inner = torch.nn.Sequential(Block(shared=root.shared), torch.nn.SiLU(), None)
    expected = sorted(root.state_dict(keep_vars=True).items())
    items = sorted(state_items(root))
    assert [n for n, _ in items] == [n for n, _ in expected] and all(a is b for (_, a), (_, b) in zip(items, expected))
    assert "scratch" not in dict(items) and "inner.0.shared.weight" in dict(items)  # a shared weight under both names

    root.inner[0].register_state_dict_post_hook(lambda module, state, prefix, local: state.update(
        {prefix + "extra": torch.zeros(1)}))
    assert sorted(n for n, _ in state_items(root)) == sorted(root.state_dict(keep_vars=True))
    assert "inner.0.extra" in dict(state_items(root))
