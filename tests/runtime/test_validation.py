"""Bad input is refused up front with a message that names the argument."""

import pytest
import torch

import sparseforge as sf
from tests.helpers import random_qkv

q, k, v = random_qkv(1, 4, 2, 16, 16, 16)


@pytest.mark.parametrize("call, error, message", [
    (lambda: sf.attention(q.numpy(), k, v, sf.causal()), TypeError, "q: expected a torch.Tensor"),
    (lambda: sf.attention(q[0], k, v, sf.causal()), ValueError, r"q: expected 4 dims"),
    (lambda: sf.attention(q.long(), k.long(), v.long(), sf.causal()), TypeError, "not supported"),
    (lambda: sf.attention(q, k.half(), v, sf.causal()), TypeError, "share a dtype"),
    (lambda: sf.attention(q, k, v, sf.causal()), ValueError, "enable_gqa=True"),
    (lambda: sf.attention(q[:, :3], k, v, sf.causal(), enable_gqa=True), ValueError,
     r"multiple of k/v heads"),
    (lambda: sf.attention(q, k[..., :8], v[..., :8], sf.causal(), enable_gqa=True), ValueError,
     "head dim 8 does not match"),
    (lambda: sf.attention(q, k, v[:, :, :8], sf.causal(), enable_gqa=True), ValueError,
     r"k and v must have the same \[B, H, L\]"),
    (lambda: sf.attention(q, k, torch.randn(1, 2, 16, 300), sf.causal(), enable_gqa=True),
     ValueError, "v: head dim 300"),
    (lambda: sf.plan(sf.causal(), q_len=4, kv_len=4, head_dim=16, value_dim=0), ValueError,
     "value_dim"),
    (lambda: sf.attention(q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1),
                          sf.causal(), enable_gqa=True), ValueError, "batch"),
    (lambda: sf.attention(q, k, v, "causal", enable_gqa=True), TypeError, "pattern: expected"),
    (lambda: sf.attention(q, k, v, sf.causal(), enable_gqa=True, scale="x"), TypeError, "scale"),
    (lambda: sf.attention(q, k, v, sf.causal(), enable_gqa=True, scale=float("nan")), TypeError,
     "scale"),
    (lambda: sf.attention(q, k, v, sf.causal(), enable_gqa=True, backend="cuda"), ValueError,
     "backend='cuda'"),
    (lambda: sf.attention(q, k, v, sf.per_head([sf.causal()] * 3), enable_gqa=True), ValueError,
     "per_head: got 3 patterns for 4"),
    (lambda: sf.attention(q, k, v, sf.documents(torch.zeros(5, dtype=torch.long)),
                          enable_gqa=True), ValueError, "documents"),
    (lambda: sf.plan(sf.causal(), q_len=-1, kv_len=4, head_dim=16), ValueError, "q_len"),
    (lambda: sf.plan(sf.causal(), q_len=4, kv_len=4, head_dim=300), ValueError, "head_dim"),
    (lambda: sf.plan(sf.causal(), q_len=4, kv_len=4, head_dim=16, dtype="int8"), ValueError, "dtype"),
    (lambda: sf.plan(sf.causal(), q_len=4, kv_len=4, head_dim=16, target="sm_70"), ValueError,
     "target"),
    (lambda: sf.plan(sf.causal(), q_len=4, kv_len=4, head_dim=16, block_m=24), ValueError,
     "power of two"),
    (lambda: sf.dense_mask(sf.causal(), -1, 3), ValueError, "q_len"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_head_dim_over_256_is_refused():
    big = torch.randn(1, 1, 4, 300)
    with pytest.raises(ValueError, match="head dim 300"):
        sf.attention(big, big, big, sf.causal())
