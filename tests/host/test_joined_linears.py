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

    weight, bias = joined.weight(modules, x)
    assert bias is None and joined.weight(modules, x)[0] is weight  # kept for the edit
    with torch.no_grad():
        modules[1].weight.mul_(-2)  # written in place (a LoRA patched in by ComfyUI)
    assert joined.weight(modules, x)[0] is not weight
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


def test_biased_layers_join_with_their_biases(host):
    from fisedit_engine.joined import JoinedLinears
    joined = JoinedLinears()
    modules = (linear(16, 8, 0, bias=True), linear(16, 4, 1, bias=True))
    x = torch.randn(3, 16)
    weight, bias = joined.weight(modules, x)
    assert weight.shape == (12, 16) and bias.shape == (12,)
    for got, want in zip(joined(modules, x), separately(modules, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Counted:
    """Counts the GEMMs of JoinedLinears calls (the number of layers each computed)."""

    def __init__(self, monkeypatch):
        from fisedit_engine.joined import JoinedLinears
        self.calls = []
        real = JoinedLinears.__call__

        def counted(joined, modules, x):
            self.calls.append(len(modules))
            return real(joined, modules, x)
        monkeypatch.setattr(JoinedLinears, "__call__", counted)


def test_cross_attention_keys_and_values_once_per_model_call(host, monkeypatch):
    from fisedit_engine.capture import StepContext
    from fisedit_engine.edit import EditState

    class Attention:
        def __init__(self, seed):
            self.to_k, self.to_v = linear(16, 8, seed), linear(16, 8, seed + 1)

    blocks = [Attention(0), Attention(2)]
    outside = Attention(4)  # a block that is not in the joined set
    group = tuple(m for a in blocks for m in (a.to_k, a.to_v))
    state = EditState(plan=None, source=None, dense_from=0, cross_kv=group)
    counted = Counted(monkeypatch)
    context = torch.randn(2, 7, 16)
    ctx = StepContext(recording=None, step=0, chunks=[1, 0], batch=1, edit=state)
    for attn in (*blocks, outside, *blocks):
        for proj in (attn.to_k, attn.to_v):
            torch.testing.assert_close(state.shared_linear(ctx, group, proj, context), proj(context),
                                       rtol=1e-5, atol=1e-5)
    assert counted.calls == [4, 1, 1]  # every joined layer at the first one, the others on their own
    other = StepContext(recording=None, step=1, chunks=[1, 0], batch=1, edit=state)
    state.shared_linear(other, group, blocks[1].to_v, context)
    assert counted.calls == [4, 1, 1, 4]  # the next model call computes them anew
    state.shared_linear(other, group, blocks[1].to_v, context.clone())
    assert counted.calls == [4, 1, 1, 4, 4]  # and so does another context


def test_time_embedding_once_per_model_call(host, monkeypatch):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    from fisedit_engine.capture import StepContext
    from fisedit_engine.edit import EditState
    torch.manual_seed(0)
    blocks = [ResBlock(32, 24, 0.0, out_channels=c, dims=2, operations=comfy.ops.disable_weight_init)
              for c in (32, 64, 64)]
    for b in blocks:
        with torch.no_grad():
            b.emb_layers[1].weight.normal_()
            b.emb_layers[1].bias.normal_()
    state = EditState(plan=None, source=None, dense_from=0, emb_linears=tuple(b.emb_layers[1] for b in blocks[:2]))
    counted = Counted(monkeypatch)
    emb = torch.randn(2, 24)
    ctx = StepContext(recording=None, step=0, chunks=[1, 0], batch=1, edit=state)
    for b in (*blocks, *blocks):
        torch.testing.assert_close(state.time_embedding(ctx, b, emb), b.emb_layers(emb), rtol=1e-5, atol=1e-5)
    assert counted.calls == [2]  # the third block is not in the group: its own layers ran
    assert sum(isinstance(k, tuple) and k[0] == "silu" for k in ctx.shared) == 1
