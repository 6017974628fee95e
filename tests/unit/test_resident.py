"""resident.DeviceBudget and ResidentContext: the bound on the attention context kept on the GPU (CPU tensors
stand in for device ones: the bookkeeping is the same)."""
import pytest
import torch

from fisedit_engine import resident


def _context(budget):
    return resident.ResidentContext(budget, torch.device("cpu"))


def test_parse_budget():
    total = 80 * 2**30
    assert resident.parse_budget("6GiB", total) == 6 * 2**30
    assert resident.parse_budget("512 MiB", total) == 512 * 2**20
    assert resident.parse_budget("10%", total) == 8 * 2**30
    assert resident.parse_budget("0", total) == 0
    assert resident.parse_budget("1.5gb", total) == 1_500_000_000
    with pytest.raises(ValueError, match="FISEDIT_RESIDENT_BUDGET"):
        resident.parse_budget("lots", total)


def test_keep_copies_and_counts_within_the_budget():
    budget = resident.DeviceBudget(budget_bytes=3000)
    ctx = _context(budget)
    value = torch.ones(250)  # 1000 bytes
    assert ctx.keep("b.attn1:k", 0, 0, value)
    value.zero_()
    assert torch.equal(ctx.get("b.attn1:k", 0, 0), torch.ones(250))  # a copy, not a view
    assert ctx.keep("b.attn1:k", 0, 0, value) and budget.used == 1000  # kept once
    assert ctx.keep("b.attn1:v", 0, 0, value) and ctx.keep("b.attn1:k", 0, 1, value)
    assert not ctx.keep("b.attn1:v", 0, 1, value)  # full: this context does not evict itself
    assert ctx.get("b.attn1:v", 0, 1) is None and budget.used == ctx.nbytes == 3000
    assert not ctx.keep("huge.attn1:k", 0, 0, torch.ones(1000))  # larger than the whole budget
    ctx.release()
    assert budget.used == 0 and not ctx.tensors


def test_least_recently_used_context_makes_room():
    budget = resident.DeviceBudget(budget_bytes=2000)
    a, b, c = _context(budget), _context(budget), _context(budget)
    assert a.keep("k", 0, 0, torch.ones(250)) and b.keep("k", 0, 0, torch.ones(250))
    budget.touch(a)  # a was read last: b goes first
    assert c.keep("k", 0, 0, torch.ones(250))
    assert a.nbytes == 1000 and b.nbytes == 0 and not b.tensors and budget.used == 2000
    b.release()  # releasing an evicted context changes nothing
    assert budget.used == 2000


def test_no_device_context_without_a_gpu():
    assert resident.DeviceBudget(budget_bytes=2**30).context("cpu") is None


def test_attention_context_keys():
    assert resident.is_attention_context("input_blocks.1.1.transformer_blocks.0.attn1:k")
    assert resident.is_attention_context("input_blocks.1.1.transformer_blocks.0.attn1:v")
    assert not resident.is_attention_context("input_blocks.1.1.transformer_blocks.0.attn2:q")
    assert not resident.is_attention_context("input_blocks.1.0:h")
