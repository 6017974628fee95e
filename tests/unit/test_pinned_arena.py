"""cache.PinnedArena: tensors carved from blocks that double from FIRST_BLOCK to BLOCK, never overlapping, aligned;
a tensor of a block's size or more gets its own."""
import torch

from fisedit_engine.cache import PinnedArena


def test_blocks_double_and_tensors_do_not_overlap():
    arena = PinnedArena()
    mib = 1 << 20
    tensors = [arena.empty((mib // 4,), torch.float32) for _ in range(8)]  # 1 MiB each
    blocks = {}
    for t in tensors:
        blocks.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    sizes = [arena_block.untyped_storage().nbytes() for arena_block in (ts[0] for ts in blocks.values())]
    assert sizes == [1 * mib, 2 * mib, 4 * mib, 8 * mib]  # 1 + 2 + 4 + (1 of 8) tensors
    assert [len(ts) for ts in blocks.values()] == [1, 2, 4, 1]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    odd = arena.empty((3,), torch.float16)
    after = arena.empty((5,), torch.float32)
    assert after.data_ptr() % PinnedArena.ALIGN == 0 and after.data_ptr() >= odd.data_ptr() + odd.nbytes
    big = arena.empty((PinnedArena.BLOCK // 2,), torch.float16)  # a whole block's bytes: a block of its own
    assert big.untyped_storage().nbytes() == PinnedArena.BLOCK
    assert arena.empty((1,), torch.float32).untyped_storage().data_ptr() == after.untyped_storage().data_ptr()
    for _ in range(10):
        arena._block = None  # each new block is at most BLOCK
        arena.empty((1,), torch.uint8)
    assert arena._block.numel() == PinnedArena.BLOCK
