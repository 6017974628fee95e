"""An edit's record of a replayed sparse step, packed into one buffer laid out as a row of the result store's
planned storage (StepTensors.plan_rows, capture.PackedValues), gives the store that recording key by key gives. Run
here without a graph: the packing and the host side are the same code a CUDA-graph capture and its replays run
(tests/gpu/test_graph_gpu.py compares whole edits on a GPU)."""
import pytest
import torch

from fisedit_engine.cache import Region, StepTensors, to_storage
from fisedit_engine.capture import Delta, Recording, RowLander, StepContext
from fisedit_engine.layout import Target
from fisedit_engine.registry import CacheRegistry

STEPS, BATCH, CHUNKS = 5, 2, [1, 0]
MAP, TOKENS, STATS, OUT = ("input_blocks.1.0", "input_blocks.1.1.transformer_blocks.0.attn1:k",
                           "input_blocks.1.0.in_layers.0:stats", "out")
PROBE = "input_blocks.1.1.transformer_blocks.0.attn2:q"
REGION = Region(torch.tensor([1, 4, 5, 9]))


def values(step: int, extra: bool = False) -> list[tuple[str, torch.Tensor]]:
    """What one step records: a map and token rows (region keys), fp32 statistics and a whole map, a probe key; each
    a different function of the step. `extra`: also a key the plan does not have, and not the whole map."""
    g = torch.Generator().manual_seed(step)
    rows = BATCH * len(CHUNKS)
    out = [(MAP, torch.randn(rows, 6, 4, 4, generator=g).half()),
           (TOKENS, torch.randn(rows, 16, 3, generator=g).half()),
           (STATS, torch.randn(rows, 2, 2, generator=g)), (OUT, torch.randn(rows, 4, 4, 4, generator=g).half()),
           (PROBE, torch.randn(rows, 16, 3, generator=g).half())]
    if extra:
        return out[:3] + out[4:] + [("input_blocks.2.0", torch.randn(rows, 6, 4, 4, generator=g).half())]
    return out


def recording() -> Recording:
    """An edit's recording over a source store that holds every key whole."""
    base = StepTensors(STEPS, BATCH)
    for key, value in values(0):
        for chunk in CHUNKS:
            base.slot(key, chunk, to_storage(value[:BATCH]).shape[1:], value.dtype)
    delta = Delta(base, {MAP: REGION, TOKENS: REGION}, whole_from=STEPS)
    targets = [Target(key, key, "output", 0) for key in (MAP, TOKENS, STATS, OUT, PROBE)]
    return Recording("packed", CacheRegistry(budget_bytes=1 << 30), STEPS, BATCH, torch.linspace(10, 0, STEPS + 1),
                     targets, delta)


def record(rec: Recording, step: int, deferred: bool, extra: bool = False):
    """Records one step's values; deferred, as while a graph captures: returns what the capture keeps
    (Recording.take_deferred)."""
    rec.deferred = [] if deferred else None
    ctx = StepContext(rec, step, CHUNKS, BATCH)
    for key, value in values(step, extra):
        rec.record(key, ctx, value)
    if not deferred:
        return None
    taken = rec.take_deferred()
    rec.deferred = None
    return taken


def capture(rec: Recording, step: int, extra: bool = False):
    """What a capture leaves: the graph's values of the planned keys, and their packing (built after the capture)."""
    planned, rest = record(rec, step, deferred=True, extra=extra)
    return planned, rec.packing((planned, rest))


def replay(rec: Recording, captured, step: int, extra: bool = False) -> None:
    """A replay: the graph's values are the step's (recomputed in place), then the packing and the flush."""
    planned, packed = captured
    fresh_planned, fresh_rest = record(rec, step, deferred=True, extra=extra)
    for k, (value, _) in planned.items():
        value.copy_(fresh_planned[k][0])
    fresh = {(key, chunk): value for key, chunk, value in fresh_rest}  # the probe key: recorded in early steps only
    for key, chunk, kept in packed.rest:
        kept.copy_(fresh.get((key, chunk), torch.full_like(kept, float("nan"))))
    rec.flush(packed, step)  # packs, then moves the row


def assert_same_store(a: StepTensors, b: StepTensors) -> None:
    assert a.tensors.keys() == b.tensors.keys() and not a.missing() and not b.missing()
    for k in a.tensors:
        assert a.tensors[k].shape == b.tensors[k].shape and a.tensors[k].dtype == b.tensors[k].dtype, k
        assert torch.equal(a.tensors[k], b.tensors[k]), k
        assert torch.equal(a.written[k], b.written[k]), k


@pytest.mark.parametrize("warm_up", [False, True], ids=["captured-first", "after-an-eager-step"])
def test_a_packed_replay_stores_what_key_by_key_recording_stores(warm_up):
    by_key, packed_rec = recording(), recording()
    for step in range(STEPS):
        record(by_key, step, deferred=False)
    first = 0
    if warm_up:  # the first edit on a device: an eager step, then the capture
        record(packed_rec, 0, deferred=False)
        first = 1
    captured = capture(packed_rec, first)
    packed = captured[1]
    assert packed.buffer is not None and packed.buffer.numel() == packed_rec.store.rows.block.shape[1]
    assert len(packed.copies.copies) == 2 * 4  # every planned (key, chunk), written by one set of row copies
    assert [(k, c) for k, c, _ in packed.rest] == [(PROBE, 0)]  # the positive chunk only, while step < probe_steps
    rows = packed_rec.store.rows.block
    for k in (MAP, TOKENS, STATS, OUT):  # planned: columns of the one block, a step's values a row of it
        assert packed_rec.store.tensors[(k, 0)].untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
    assert packed_rec.store.tensors[(TOKENS, 1)].shape == (STEPS, BATCH, len(REGION.positions), 3)
    for step in range(first, STEPS):
        replay(packed_rec, captured, step)
    packed_rec.finish(torch.zeros(BATCH, 4, 4, 4))  # waits for the rows still on their way into the store
    assert packed_rec.state == "complete"
    assert_same_store(by_key.store, packed_rec.store)


def test_a_step_that_records_other_keys_than_planned_is_stored_key_by_key():
    """A planned key missing from the step (and one it does not plan): no row to copy, every key stored alone."""
    by_key, other = recording(), recording()
    for step in range(STEPS):
        record(by_key, step, deferred=False, extra=True)
    captured = capture(other, 0, extra=True)
    packed = captured[1]
    assert packed.buffer is None and len(packed.rest) == 2 * 4 + 1
    for step in range(STEPS):
        replay(other, captured, step, extra=True)
    assert_same_store(by_key.store, other.store)


def test_the_row_lander_stores_each_row_as_it_was_put():
    """The caller overwrites its buffer right after each put (as the next replay does); every row still lands."""
    block = torch.zeros(40, 1 << 16, dtype=torch.uint8)
    buffer = torch.empty(1 << 16, dtype=torch.uint8)
    lander = RowLander(buffer.shape)
    expected = []
    for step in range(len(block)):
        buffer.random_(0, 256, generator=torch.Generator().manual_seed(step))
        expected.append(buffer.clone())
        lander.put(buffer, block[step], step)
        buffer.fill_(0)
    lander.drain()
    lander.shutdown()
    assert torch.equal(block, torch.stack(expected))


@pytest.mark.parametrize("nbytes, threads", [(1, 4), (5 << 16, 1), ((3 << 16) + 123, 4), (7 << 16, 3)])
def test_a_row_lands_in_parts_that_cover_it_once(nbytes, threads):
    """Landing threads each copy one part of a row; the parts tile it, and every row still lands whole."""
    from fisedit_engine.capture import _landing_parts
    parts = _landing_parts(nbytes, threads)
    assert len(parts) <= threads and parts[0].start == 0 and parts[-1].stop == nbytes
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    block = torch.zeros(6, nbytes, dtype=torch.uint8)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    lander = RowLander(buffer.shape, slots=3, threads=threads)
    for step in range(len(block)):
        buffer.fill_(step + 1)
        lander.put(buffer, block[step], step)
    lander.drain()
    lander.shutdown()
    assert torch.equal(block, torch.arange(1, 7, dtype=torch.uint8)[:, None].expand(6, nbytes))


def test_the_row_lander_writes_inference_tensors_and_raises_what_a_landing_raised():
    with torch.inference_mode():  # ComfyUI samples in inference mode: the store's block is an inference tensor
        block = torch.zeros(2, 8, dtype=torch.uint8)
    lander = RowLander((8,))
    lander.put(torch.full((8,), 7, dtype=torch.uint8), block[0], 0)
    lander.put(torch.full((8,), 9, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), 1)  # no room for it
    with pytest.raises(RuntimeError):
        lander.drain()
    lander.shutdown()
    assert block[0].tolist() == [7] * 8


def test_the_next_lander_takes_the_last_landers_staging_rows(monkeypatch):
    """Pinning is slow (benchmarks/host_memory.py): a lander's staging rows pass to the next one when they are large
    enough for it, and rows too large to keep between edits are not kept."""
    from fisedit_engine import capture
    monkeypatch.setattr(capture, "_spare_rows", [])  # none left by the tests before
    with torch.inference_mode():  # as ComfyUI samples; the next lander runs outside it
        first = RowLander((64,))
        first.put(torch.full((64,), 3, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8), 0)
        first.drain()
    flat = [r.untyped_storage().data_ptr() for r in first._flat]
    first.shutdown()
    smaller = RowLander((2, 16))  # views of the same rows
    assert [r.untyped_storage().data_ptr() for r in smaller._flat] == flat
    into = torch.zeros(2, 16, dtype=torch.uint8)
    smaller.put(torch.full((2, 16), 5, dtype=torch.uint8), into, 0)
    smaller.drain()
    smaller.shutdown()
    assert into.eq(5).all()
    larger = RowLander((128,))
    assert [r.untyped_storage().data_ptr() for r in larger._flat] != flat and larger._flat[0].numel() == 128
    larger.shutdown()
    monkeypatch.setattr(capture, "SPARE_STAGING_BYTES", 64)
    RowLander((128,)).shutdown()  # takes the 128-byte rows, and does not keep them
    assert capture._spare_rows == []


def test_missing_names_every_unwritten_step_of_planned_and_unplanned_keys():
    store = StepTensors(steps=3, batch=1)
    store.plan_rows([("a", 0, (1, 2), torch.float16), ("b", 1, (1, 4), torch.float32)])
    for key, chunk, shape, dtype in (("a", 0, (2,), torch.float16), ("b", 1, (4,), torch.float32),
                                     ("c", 0, (5,), torch.float32)):  # "c" is not planned: its own tensor
        store.slot(key, chunk, shape, dtype)
        store.written[(key, chunk)][:] = True
    in_rows = {k for k, flags in store.written.items()
               if flags.untyped_storage().data_ptr() == store.rows.written.untyped_storage().data_ptr()}
    assert in_rows == {("a", 0), ("b", 1)}
    assert store.missing() == []
    store.written[("a", 0)][1] = False
    store.written[("c", 0)][0] = False
    store.written[("c", 0)][2] = False
    assert sorted(store.missing()) == [("a", 0, 1), ("c", 0, 0), ("c", 0, 2)]
