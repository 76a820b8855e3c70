"""The pieces a decode step is made of, taken once instead of in every layer:
the same floats as the operations they stand for."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from wavecast.server.engines.dense import Dense
from wavecast.server.engines.kv import LayerMask, StaticKV


@pytest.mark.parametrize("bias", [False, True])
def test_a_dense_layer_is_f_linear_bit_for_bit(bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    b = torch.randn(24) if bias else None
    dense = Dense(weight, b)
    rows = torch.randn(5, 16)
    strided = torch.randn(5, 3, 16)[:, -1]  # (a prefill's last positions: a view)
    for x in (rows, strided):
        assert torch.equal(dense.rows(x), F.linear(x, weight, b))
    positions = torch.randn(5, 3, 16)
    assert torch.equal(dense(positions), F.linear(positions, weight, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_mask_attends_as_the_boolean_one(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 2, 1, 8, dtype=dtype)
    k, v = torch.randn(3, 2, 10, 8, dtype=dtype), torch.randn(3, 2, 10, 8, dtype=dtype)
    lengths = torch.tensor([1, 6, 10])  # one position, some, all of them
    keep = (torch.arange(10) < lengths[:, None]).view(3, 1, 1, 10)
    mask = LayerMask(keep)
    additive = mask.for_(q)
    assert additive.dtype == dtype
    assert mask.for_(q) is additive  # made once, for every layer
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_the_cache_views_follow_the_cache_as_it_grows() -> None:
    kv = StaticKV(2, 2, 4, rows=2, length=8, device="cpu", dtype=torch.float32)
    keys, values = kv.layers(2, 4)[1]
    assert keys.shape == values.shape == (2, 2, 4, 4)
    assert kv.layers(2, 4)[1][0] is keys  # made once per shape
    key, value = torch.ones(2, 2, 1, 4), torch.full((2, 2, 1, 4), 2.0)
    kv.step_writer(torch.tensor([3, 0]))(1, key, value)
    assert torch.equal(keys[0, :, 3], key[0, :, 0]) and torch.equal(values[1, :, 0], value[1, :, 0])
    kv.grow(rows=3, length=12)  # the tensors move: the views are made again
    grown, _ = kv.layers(2, 4)[1]
    assert grown is not keys and grown.data_ptr() == kv.k[1].data_ptr()
    assert torch.equal(grown, keys)  # what was stored came along
    kv.step_writer(torch.tensor([5, 5]))(1, 3 * key, value)
    assert torch.equal(kv.layers(4, 8)[1][0][:2, :, 5], 3 * key[:, :, 0])
