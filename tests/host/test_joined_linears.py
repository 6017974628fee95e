"""Linear layers joined into one GEMM (fisedit_engine/joined.py) give each layer's own output, rebuild their joined
weight when a weight changes, and run one by one where they cannot be joined; an edit's cross-attention keys and
values are computed once per model call for every sparse block."""
import pytest
import torch


def linear(n_in, n_out, seed, bias=False):
    import comfy.ops
    torch.manual_seed(seed)
    layer = comfy.ops.manual_cast.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def separately(modules, x):
    return [m(x) for m in modules]


def test_joined_outputs_are_each_layers_own(host):
    from fisedit_engine.joined import JoinedLinears
    joined = JoinedLinears()
    modules = (linear(16, 8, 0), linear(16, 12, 1), linear(16, 8, 2))
    x = torch.randn(2, 5, 16)
    outs = joined(modules, x)
    assert [o.shape for o in outs] == [(2, 5, 8), (2, 5, 12), (2, 5, 8)]
    for got, want in zip(outs, separately(modules, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert outs[0].untyped_storage().data_ptr() == outs[2].untyped_storage().data_ptr()  # one GEMM's output

    weight = joined.weight(modules, x)
    assert joined.weight(modules, x) is weight  # kept for the edit
    with torch.no_grad():
        modules[1].weight.mul_(-2)  # written in place (a LoRA patched in by ComfyUI)
    assert joined.weight(modules, x) is not weight
    for got, want in zip(joined(modules, x), separately(modules, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    joined.clear()
    assert not joined._kept


@pytest.mark.parametrize("case", ["bias", "cast"])
def test_layers_that_cannot_be_joined_run_one_by_one(host, case):
    from fisedit_engine.joined import JoinedLinears
    joined = JoinedLinears()
    modules = (linear(16, 8, 0), linear(16, 8, 1, bias=case == "bias"))
    x = torch.randn(3, 16, dtype=torch.float64 if case == "cast" else torch.float32)  # cast: weights converted per call
    assert joined.weight(modules, x) is None
    for got, want in zip(joined(modules, x), separately(modules, x)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not joined._kept


def test_cross_attention_keys_and_values_once_per_model_call(host, monkeypatch):
    from fisedit_engine.capture import StepContext
    from fisedit_engine.edit import EditState
    from fisedit_engine.joined import JoinedLinears

    class Attention:
        def __init__(self, seed):
            self.to_k, self.to_v = linear(16, 8, seed), linear(16, 8, seed + 1)

    blocks = [Attention(0), Attention(2)]
    outside = Attention(4)  # a block that is not in the joined set
    state = EditState(plan=None, source=None, dense_from=0,
                      cross_kv=tuple(m for a in blocks for m in (a.to_k, a.to_v)))
    calls = []
    real = JoinedLinears.__call__
    monkeypatch.setattr(JoinedLinears, "__call__", lambda self, modules, x: calls.append(len(modules))
                        or real(self, modules, x))
    context = torch.randn(2, 7, 16)
    ctx = StepContext(recording=None, step=0, chunks=[1, 0], batch=1, edit=state)
    for attn in (*blocks, outside, *blocks):
        k, v = state.cross_attention_kv(ctx, attn, context)
        torch.testing.assert_close(k, attn.to_k(context), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, attn.to_v(context), rtol=1e-5, atol=1e-5)
    assert calls == [4, 2]  # every joined block at the first one, the other on its own
    other = StepContext(recording=None, step=1, chunks=[1, 0], batch=1, edit=state)
    state.cross_attention_kv(other, blocks[1], context)
    assert calls == [4, 2, 4]  # the next model call computes them anew
