"""Bad input gets a clear error: the right class, naming the argument."""
from __future__ import annotations

import pytest
import torch

import reference
import varattn


@pytest.fixture
def packed(gen):
    return reference.packed_inputs(gen, [3, 4], [3, 4], 4, 2, 8)


def call(packed, **changes):
    q, k, v, cu_q, cu_k = packed
    arguments = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4)
    arguments.update(changes)
    return varattn.varlen_attention(**arguments)


@pytest.mark.parametrize("change, error, words", [
    (lambda q, k, v, cu: dict(q=q[:, :3]), ValueError, "multiple of the key/value heads"),
    (lambda q, k, v, cu: dict(k=k[..., :4], v=v[..., :4]), ValueError, "same head_dim"),
    (lambda q, k, v, cu: dict(v=v[:, :1]), ValueError, "k and v"),
    (lambda q, k, v, cu: dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q"),
    (lambda q, k, v, cu: dict(cu_seqlens_k=cu[:2]), ValueError, "same number of sequences"),
    (lambda q, k, v, cu: dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (lambda q, k, v, cu: dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda q, k, v, cu: dict(max_seqlen_q=3), ValueError, "max_seqlen_q"),
    (lambda q, k, v, cu: dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    (lambda q, k, v, cu: dict(q=q.int()), TypeError, "dtype"),
    (lambda q, k, v, cu: dict(k=k.double(), v=v.double()), TypeError, "one dtype"),
    (lambda q, k, v, cu: dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "unit stride"),
    (lambda q, k, v, cu: dict(q=q[0]), ValueError, "packed as"),
    (lambda q, k, v, cu: dict(q=q.numpy()), TypeError, "torch.Tensor"),
    (lambda q, k, v, cu: dict(causal_align="diagonal"), ValueError, "causal_align"),
    (lambda q, k, v, cu: dict(window=(-2, 0)), ValueError, "window"),
    (lambda q, k, v, cu: dict(window=3), ValueError, "window"),
    (lambda q, k, v, cu: dict(scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v, cu: dict(causal=1), TypeError, "causal"),
    (lambda q, k, v, cu: dict(dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 4, 4)), ValueError, "attn_bias"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 3, 4, 4)), ValueError, "attn_bias"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 1, 2, 4)), ValueError, "attn_bias"),
    (lambda q, k, v, cu: dict(attn_bias=torch.ones(2, 1, 4, 4, dtype=torch.int64)), TypeError, "attn_bias"),
    (lambda q, k, v, cu: dict(seqused_q=torch.tensor([5, 1], dtype=torch.int32)), ValueError, "seqused_q"),
])
def test_packed_errors(packed, change, error, words):
    q, k, v, cu_q, _ = packed
    with pytest.raises(error, match=words):
        call(packed, **change(q, k, v, cu_q))


def test_nested_and_dense_mixed(gen):
    nt = torch.nested.nested_tensor([torch.randn(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    dense = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="all NestedTensors or all dense"):
        varattn.attention(nt, dense, dense)


@pytest.mark.parametrize("arguments, error, words", [
    (dict(lengths=[3, 9]), ValueError, "lengths"),
    (dict(lengths=[3]), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    (dict(kv_lengths=[1, 2], key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "not both"),
    (dict(key_padding_mask=torch.tensor([[False, True, False, False, False]] * 2)), ValueError, "pad at the end"),
    (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(layout="hbld"), ValueError, "layout"),
])
def test_padded_errors(gen, arguments, error, words):
    q = reference.randn(gen, 2, 4, 5, 8)
    with pytest.raises(error, match=words):
        varattn.attention(q, q, q, **arguments)


def test_lengths_for_queries_with_other_key_length(gen):
    q = reference.randn(gen, 2, 4, 5, 8)
    k = reference.randn(gen, 2, 4, 7, 8)
    with pytest.raises(ValueError, match="kv_lengths"):
        varattn.attention(q, k, k, lengths=[5, 3])


def test_nested_takes_no_lengths(gen):
    nt = torch.nested.nested_tensor([torch.randn(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match="lengths"):
        varattn.attention(nt, nt, nt, lengths=[3])


def test_nested_key_value_must_match(gen):
    k = torch.nested.nested_tensor([torch.randn(3, 2, 8), torch.randn(2, 2, 8)], layout=torch.jagged).transpose(1, 2)
    v = torch.nested.nested_tensor([torch.randn(2, 2, 8), torch.randn(3, 2, 8)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match="same sequence lengths"):
        varattn.attention(k, k, v)


def test_sdpa_heads_without_enable_gqa(gen):
    q = reference.randn(gen, 1, 4, 3, 8)
    k = reference.randn(gen, 1, 2, 3, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        varattn.scaled_dot_product_attention(q, k, k)
