"""sf.attention inside torch.compile(fullgraph=True): a custom op, no graph breaks,
forward and gradients equal to eager."""

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import custom_op


class Block(torch.nn.Module):
    """A tiny attention block: qkv projection, sf.SparseAttention, output projection."""

    def __init__(self, pattern, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, head_dim
        self.q = torch.nn.Linear(64, heads * head_dim)
        self.kv = torch.nn.Linear(64, 2 * kv_heads * head_dim)
        self.o = torch.nn.Linear(heads * head_dim, 64)
        self.attn = sf.SparseAttention(pattern)

    def forward(self, x):
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        y = self.attn(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, length, -1))


def _eager_and_compiled(model, x, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y, ref, grads, ref_grads


# the second is what FlexAttention masks lower to: its repr (negative numbers, a pattern
# argument) is parsed back inside the custom op
@pytest.mark.parametrize("pattern", [sf.sliding_window(9) | sf.sinks(2),
                                     sf.top_left(sf.affine(2, -1, -3) | sf.chunks(8)),
                                     sf.per_head([sf.causal(), sf.full(), sf.window(2, 2), sf.chunks(8)])],
                         ids=repr)
def test_fullgraph_forward_and_backward(pattern):
    torch.manual_seed(0)
    model = Block(pattern)
    y, ref, grads, ref_grads = _eager_and_compiled(model, torch.randn(2, 37, 64), "aot_eager")
    torch.testing.assert_close(y, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_inductor_fullgraph():
    torch.manual_seed(1)
    model = Block(sf.sliding_window(12))
    y, ref, grads, ref_grads = _eager_and_compiled(model, torch.randn(1, 50, 64), "inductor")
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grads[0], ref_grads[0])


@pytest.mark.parametrize("with_table", [False, True])
def test_op_registrations_pass_opcheck(with_table):
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 5, requires_grad=True)
    pattern = sf.sliding_window(5) & sf.rel_bias(table) if with_table else sf.sliding_window(5)
    key = custom_op.pattern_key(pattern)
    tensors = [table] if with_table else []
    torch.library.opcheck(custom_op.attention_op, (q, k, v, tensors, key, 0.25, False, "torch"))


def test_documents_built_inside_the_graph_compile_once():
    """Per-batch document ids (packed sequences): the pattern is rebuilt from ids each
    step, inside or outside the compiled function, and one graph serves them all."""
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(1, 4, 37, 16) for _ in range(3))

    def step(q, k, v, ids):
        return sf.attention(q, k, v, sf.causal() & sf.documents(ids))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for split in (3, 17, 30, 36):
        ids = torch.tensor([0] * split + [1] * (37 - split))
        torch.testing.assert_close(compiled(q, k, v, ids), step(q, k, v, ids))
    assert counters["stats"]["unique_graphs"] == 1


def test_rel_bias_table_trains_under_compile():
    torch.manual_seed(2)
    table = torch.nn.Parameter(torch.randn(4, 9) * 0.3)
    ids = torch.tensor([0] * 20 + [1] * 17)
    pattern = (sf.causal() & sf.documents(ids) & sf.rel_bias(table)
               & sf.alibi(sf.alibi_slopes(4)) & sf.softcap(3.0))
    model = Block(pattern)
    model.table = table  # a parameter of the model, reached through the pattern
    y, ref, grads, ref_grads = _eager_and_compiled(model, torch.randn(1, 37, 64), "inductor")
    torch.testing.assert_close(y, ref)
    assert grads[-1].abs().sum() > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_module_validates_and_describes_itself():
    with pytest.raises(TypeError, match="expected a sparseforge pattern"):
        sf.SparseAttention("causal")
    with pytest.raises(ValueError, match="backend"):
        sf.SparseAttention(sf.causal(), backend="cuda")
    assert f"pattern={sf.sliding_window(4)!r}" in repr(sf.SparseAttention(sf.sliding_window(4)))
