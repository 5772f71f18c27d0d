"""`varattn.scaled_dot_product_attention`: torch's SDPA signature and semantics, on varattn."""
from __future__ import annotations

import math
import sys

import torch

from .. import checks
from . import batched, nested


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """A drop-in for torch.nn.functional.scaled_dot_product_attention.

    Dense inputs (N, ..., H, L, E) with attn_mask broadcastable to
    (N, ..., H, L, S), bool (True = take part) or additive; NestedTensors in
    (B, H, j, E) layout, as in the PyTorch SDPA tutorial, with attn_mask in
    padded positions (B or 1, H or 1, longest query, longest key); attn_mask
    may also be torch.nn.attention.bias.causal_upper_left /
    causal_lower_right. With enable_gqa, key/value may have fewer heads than
    query. A row that sees no key gives zeros (as torch does when S == 0).
    dropout_p applies as in torch (the caller passes 0 outside training);
    calls no backend can run (dropout with fp64 on CUDA, say) raise
    NotImplementedError naming the reasons.

    The arguments take what torch's take: is_causal and enable_gqa a Python
    bool only; dropout_p and scale a Python or numpy number or a 0-d tensor
    (others are a TypeError naming their type). A dense attn_mask that does
    not broadcast to (N, ..., H, L, S), or a causal_lower_right bias made for
    other lengths than (L, S), is a RuntimeError, as in torch (which runs a
    causal_lower_right(n, n) of other lengths as upper-left is_causal;
    varattn refuses it; causal_upper_left of any lengths is is_causal=True
    in both). Empty dense inputs give what torch gives: L == 0, H == 0,
    N == 0 or Ev == 0 an empty output, S == 0 zeros, E == 0 the softmax of
    the mask alone (uniform weights) over value; gradients flow (zeros or
    empty) in each case. NestedTensors of head dim 0 are a ValueError.
    """
    made = call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if made[0] is None:  # nothing to compute: the output has no elements
        return _Empty.apply(made[3], *made[2])
    params, form, inputs, shape = made
    out, _ = batched.run_call(params, form, inputs)
    return out if shape is None else out.reshape(shape)


def call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(AttentionParams, run.Form, inputs, output shape) of a call, not run:
    what `scaled_dot_product_attention` runs (through batched.run_call) and
    `explain` reads. Output shape: the dense output's, None for NestedTensors.
    For a call whose output has no elements, (None, None, the tensors that
    get (zero) gradients, the output's shape)."""
    checks.flag(is_causal, "is_causal")
    checks.flag(enable_gqa, "enable_gqa")
    for name, x in (("query", query), ("key", key), ("value", value)):
        checks.tensor(x, name)
    causal, align = is_causal, "upper_left"
    bias = _causal_bias(attn_mask)
    if bias is not None:
        if is_causal:
            raise ValueError("pass is_causal=True or a CausalBias attn_mask, not both")
        causal, align = True, "upper_left" if bias.variant.name == "UPPER_LEFT" else "lower_right"
        attn_mask = None
    elif attn_mask is not None:
        checks.tensor(attn_mask, "attn_mask")
        if is_causal:
            raise ValueError("attn_mask and is_causal=True are mutually exclusive (as in torch)")
    _check_heads(query, key, value, enable_gqa)
    options = dict(causal=causal, causal_align=align, scale=scale, dropout_p=dropout_p)
    if nested.is_nested(query):
        params, form, inputs = batched.call(query, key, value, attn_mask=attn_mask, **options)
        if attn_mask is not None:
            _check_nested_mask(attn_mask, params)
        return params, form, inputs, None

    batch_shape, (length_q, head_dim) = query.shape[:-3], query.shape[-2:]
    heads = query.shape[-3] if query.dim() >= 3 else 1
    for name, x in (("key", key), ("value", value)):
        if x.dim() != query.dim() or x.shape[:-3] != batch_shape:
            raise ValueError(f"{name} must have query's batch dims {tuple(batch_shape)}, got shape {tuple(x.shape)}")
    length_k = key.shape[-2]
    scores = (*batch_shape, heads, length_q, length_k)
    if bias is not None and align == "lower_right" and (bias.seq_len_q, bias.seq_len_kv) != (length_q, length_k):
        raise RuntimeError(
            f"attn_mask must be made for the call's L = {length_q} query and S = {length_k} key positions: "
            f"expected causal_lower_right({length_q}, {length_k}), got causal_lower_right({bias.seq_len_q}, "
            f"{bias.seq_len_kv})")
    if attn_mask is not None:
        _check_dense_mask(attn_mask, scores)
    shape = (*query.shape[:-1], value.shape[-1])
    if 0 in shape:
        _check_empty(query, key, value, attn_mask, scale, dropout_p, enable_gqa)
        leaves = (query, key, value) if attn_mask is None or attn_mask.dtype == torch.bool else (
            query, key, value, attn_mask)
        return None, None, leaves, shape
    if head_dim == 0:
        # Every score is 0 (+ the mask): what any head dim of zeros gives, and one is the least to run.
        if scale is None:
            scale = 1.0
        options["scale"] = scale
        query, key = (torch.nn.functional.pad(x, (0, 1)) for x in (query, key))
    batch = math.prod(batch_shape)  # not -1 in the reshapes below: with no elements, it could be anything

    def as_4d(x):
        return x.reshape(batch, x.shape[-3] if x.dim() >= 3 else 1, *x.shape[-2:])

    if attn_mask is not None:
        attn_mask = as_4d(attn_mask.expand(scores))
    params, form, inputs = batched.call(as_4d(query), as_4d(key), as_4d(value), layout="bhld", attn_mask=attn_mask,
                                        **options)
    return params, form, inputs, shape


def _causal_bias(attn_mask):
    """attn_mask when it is a torch.nn.attention.bias.CausalBias, else None.
    That module imports torch._dynamo (seconds), so varattn does not import
    it: a caller holding a CausalBias has imported it already."""
    if attn_mask is None:
        return None
    bias = sys.modules.get("torch.nn.attention.bias")
    return attn_mask if bias is not None and isinstance(attn_mask, bias.CausalBias) else None


def _check_heads(query, key, value, enable_gqa):
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError("query, key and value need at least (length, head_dim) dims")
    if query.dim() < 3:
        return
    heads_q, heads_k, heads_v = query.size(-3), key.size(-3), value.size(-3)  # .shape fails on strided NestedTensors
    if heads_k != heads_v:
        raise ValueError(f"key and value must have the same number of heads, got {heads_k} and {heads_v}")
    if heads_q != heads_k and not enable_gqa:
        raise ValueError(f"query has {heads_q} heads and key/value {heads_k}: pass enable_gqa=True for "
                         "grouped-query attention")


def _check_dense_mask(mask, scores) -> None:
    """A dense attn_mask must broadcast to the scores (N, ..., H, L, S) (size-1
    or missing leading dims); a RuntimeError, as torch raises."""
    shape = tuple(mask.shape)
    if len(shape) > len(scores):
        raise RuntimeError(f"attn_mask must broadcast to the attention scores (N, ..., H, L, S) = {scores}: "
                           f"expected at most {len(scores)} dims, got shape {shape}")
    for dim in range(1, len(shape) + 1):
        if shape[-dim] != 1 and shape[-dim] != scores[-dim]:
            raise RuntimeError(
                f"attn_mask must broadcast to the attention scores (N, ..., H, L, S) = {scores}: expected size "
                f"{scores[-dim]} or 1 at its dim {len(shape) - dim}, got shape {shape}")


def _check_nested_mask(mask, params) -> None:
    """attn_mask with NestedTensors, in padded positions: (B or 1, H or 1,
    longest query or 1, longest key or 1), no larger (torch takes no mask
    with NestedTensors; varattn.attention's checks took the 4-D form)."""
    expected = (params.max_seqlen_q, params.max_seqlen_k)
    got = tuple(mask.shape[-2:])
    if any(g != 1 and g != e for g, e in zip(got, expected)):
        raise ValueError(
            f"attn_mask with NestedTensors is in padded positions: expected (B or 1, H or 1, {expected[0]} or 1, "
            f"{expected[1]} or 1) (the longest query and key sequences), got shape {tuple(mask.shape)}")


def _check_empty(query, key, value, attn_mask, scale, dropout_p, enable_gqa) -> None:
    """The checks a call with an empty output skips by not running: those of
    build_params that do not need rows to run (dtypes, devices, heads, options)."""
    dtype, device = query.dtype, query.device
    if dtype not in checks.SUPPORTED_DTYPES:
        raise TypeError(f"query has dtype {dtype}; supported: {', '.join(map(str, checks.SUPPORTED_DTYPES))}")
    if key.dtype != dtype or value.dtype != dtype:
        raise TypeError(f"query, key and value must share one dtype, got {dtype}, {key.dtype}, {value.dtype}")
    checks.same_device(query, "query", key, "key")
    checks.same_device(query, "query", value, "value")
    if query.dim() >= 3 and key.size(-3) and query.size(-3) % key.size(-3):
        raise ValueError(
            f"the number of query heads must be a multiple of the key/value heads (GQA/MQA), "
            f"got {query.size(-3)} query heads and {key.size(-3)} key/value heads")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head_dim, got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length, got {key.shape[-2]} and {value.shape[-2]}")
    if attn_mask is not None:
        checks.same_device(query, "query", attn_mask, "attn_mask")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
            raise TypeError(f"attn_mask must be bool (True = take part) or have query's dtype {dtype}, "
                            f"got {attn_mask.dtype}")
    checks.scale(scale, 1)
    checks.dropout(dropout_p)


class _Empty(torch.autograd.Function):
    """An output with no elements, made without a backend: zeros of `shape`,
    whose backward gives each input a zero gradient."""

    @staticmethod
    def forward(ctx, shape, *inputs):
        ctx.inputs = [(x.shape, x.dtype, x.device) for x in inputs]
        return inputs[0].new_zeros(shape)

    @staticmethod
    def backward(ctx, grad):
        return (None, *(torch.zeros(shape, dtype=dtype, device=device) if needed else None
                        for (shape, dtype, device), needed in zip(ctx.inputs, ctx.needs_input_grad[1:])))
