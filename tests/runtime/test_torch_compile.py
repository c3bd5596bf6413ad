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


@pytest.mark.parametrize("pattern", [sf.sliding_window(9) | sf.sinks(2), sf.causal(),
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


def test_op_registrations_pass_opcheck():
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    key = custom_op.pattern_key(sf.sliding_window(5))
    torch.library.opcheck(custom_op.attention_op, (q, k, v, key, 0.25, False, "torch"))


def test_documents_under_compile_is_a_clear_error():
    ids = torch.tensor([0] * 10 + [1] * 10)
    with pytest.raises(NotImplementedError, match="documents"):
        custom_op.pattern_key(sf.documents(ids))


def test_module_validates_and_describes_itself():
    with pytest.raises(TypeError, match="expected a sparseforge pattern"):
        sf.SparseAttention("causal")
    with pytest.raises(ValueError, match="backend"):
        sf.SparseAttention(sf.causal(), backend="cuda")
    assert f"pattern={sf.sliding_window(4)!r}" in repr(sf.SparseAttention(sf.sliding_window(4)))
