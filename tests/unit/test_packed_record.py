"""A replayed sparse step's record, packed into one buffer and stored as one row per step (capture.PackedValues),
gives the store that recording key by key gives. Run here without a graph: the packing and the host side are the
same code a CUDA-graph capture runs (tests/gpu/test_graph_gpu.py compares whole edits on a GPU)."""
import torch

from fisedit_engine.cache import Region, StepTensors
from fisedit_engine.capture import Delta, Recording, StepContext
from fisedit_engine.registry import CacheRegistry

STEPS, BATCH, CHUNKS = 5, 2, [1, 0]
REGION = Region(torch.tensor([1, 4, 5, 9]))


def values(step: int) -> list[tuple[str, torch.Tensor]]:
    """What one step records: a map of a sparse level (a region key), token rows (a region key), statistics in
    fp32 and a whole map (not region keys), and a probe key; each a different function of the step."""
    g = torch.Generator().manual_seed(step)
    rows = BATCH * len(CHUNKS)
    return [("input_blocks.1.0", torch.randn(rows, 6, 4, 4, generator=g).half()),
            ("input_blocks.1.1.transformer_blocks.0.attn1:k", torch.randn(rows, 16, 3, generator=g).half()),
            ("input_blocks.1.0.in_layers.0:stats", torch.randn(rows, 2, 2, generator=g)),
            ("out", torch.randn(rows, 4, 4, 4, generator=g).half()),
            ("input_blocks.1.1.transformer_blocks.0.attn2:q", torch.randn(rows, 16, 3, generator=g).half())]


def recording() -> Recording:
    base = StepTensors(STEPS, BATCH)
    delta = Delta(base, {"input_blocks.1.0": REGION, "input_blocks.1.1.transformer_blocks.0.attn1:k": REGION},
                  whole_from=STEPS)
    return Recording("packed", CacheRegistry(budget_bytes=1 << 30), STEPS, BATCH, torch.linspace(10, 0, STEPS + 1),
                     [], delta)


def test_a_packed_replay_stores_what_key_by_key_recording_stores():
    by_key, packed_rec = recording(), recording()
    for step in range(STEPS):
        ctx = StepContext(by_key, step, CHUNKS, BATCH)
        for key, value in values(step):
            by_key.record(key, ctx, value)
    # the packed recording: step 0 eager (key by key), step 1 captured, every later step a replay of it
    ctx = StepContext(packed_rec, 0, CHUNKS, BATCH)
    for key, value in values(0):
        packed_rec.record(key, ctx, value)
    before = {k: t.data_ptr() for k, t in packed_rec.store.tensors.items()}
    graph_inputs = {key: value.clone() for key, value in values(1)}  # the captured step's own buffers
    packed_rec.deferred = []
    ctx = StepContext(packed_rec, 1, CHUNKS, BATCH)
    for key, value in graph_inputs.items():
        packed_rec.record(key, ctx, value)
    packed = packed_rec.adopt_packed(packed_rec.pack_deferred())
    packed_rec.deferred = None
    assert packed.buffer.numel() % packed.ALIGN == 0
    assert [k for k, *_ in packed.layout].count("input_blocks.1.1.transformer_blocks.0.attn2:q") == 0  # probe: rest
    assert len(packed.rest) == 1  # the positive chunk only, while step < probe_steps
    assert all(packed_rec.store.tensors[k].data_ptr() != p for k, p in before.items())  # all moved
    for step in range(1, STEPS):
        # a replay recomputes the graph's buffers in place: here, what the step's values pack into
        packed_rec.deferred = []
        for key, value in values(step):
            packed_rec.record(key, StepContext(packed_rec, step, CHUNKS, BATCH), value)
        again = packed_rec.pack_deferred()
        packed_rec.deferred = None
        assert again.layout == packed.layout
        packed.buffer.copy_(again.buffer)
        fresh = {(key, chunk): value for key, chunk, value in again.rest}  # probe keys: recorded in early steps
        for key, chunk, kept in packed.rest:
            kept.copy_(fresh.get((key, chunk), torch.full_like(kept, float("nan"))))
        packed_rec.flush(packed, step)
    a, b = by_key.store, packed_rec.store
    assert a.tensors.keys() == b.tensors.keys() and not a.missing() and not b.missing()
    for k in a.tensors:
        assert a.tensors[k].shape == b.tensors[k].shape and a.tensors[k].dtype == b.tensors[k].dtype, k
        assert torch.equal(a.tensors[k], b.tensors[k]), k
        assert torch.equal(a.written[k], b.written[k]), k
