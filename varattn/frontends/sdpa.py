"""`varattn.scaled_dot_product_attention`: torch's SDPA signature and semantics, on varattn."""
from __future__ import annotations

import sys

from . import batched, nested


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """A drop-in for torch.nn.functional.scaled_dot_product_attention.

    Dense inputs (N, ..., H, L, E) with attn_mask broadcastable to
    (N, ..., H, L, S), bool (True = take part) or additive; NestedTensors in
    (B, H, j, E) layout, as in the PyTorch SDPA tutorial; attn_mask may also be
    torch.nn.attention.bias.causal_upper_left / causal_lower_right. With
    enable_gqa, key/value may have fewer heads than query. A row that sees no
    key gives zeros. dropout_p applies as in torch (the caller passes 0
    outside training); calls no backend can run (dropout with fp64 on
    CUDA, say) raise NotImplementedError naming the reasons.
    """
    causal, align = bool(is_causal), "upper_left"
    if _is_causal_bias(attn_mask):
        if is_causal:
            raise ValueError("pass is_causal=True or a CausalBias attn_mask, not both")
        causal = True
        align = "upper_left" if attn_mask.variant.name == "UPPER_LEFT" else "lower_right"
        attn_mask = None
    elif attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True are mutually exclusive (as in torch)")
    _check_heads(query, key, value, enable_gqa)
    options = dict(causal=causal, causal_align=align, scale=scale, dropout_p=dropout_p)
    if nested.is_nested(query):
        return batched.attention(query, key, value, attn_mask=attn_mask, **options)

    batch_shape, (length_q, _) = query.shape[:-3], query.shape[-2:]
    heads = query.shape[-3] if query.dim() >= 3 else 1
    for name, x in (("key", key), ("value", value)):
        if x.dim() != query.dim() or x.shape[:-3] != batch_shape:
            raise ValueError(f"{name} must have query's batch dims {tuple(batch_shape)}, got shape {tuple(x.shape)}")

    def as_4d(x):
        return x.reshape(-1, x.shape[-3] if x.dim() >= 3 else 1, *x.shape[-2:])

    if attn_mask is not None:
        if attn_mask.dim() > query.dim():
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores "
                             f"({', '.join(map(str, (*batch_shape, heads, length_q, key.shape[-2])))})")
        attn_mask = as_4d(attn_mask.expand(*batch_shape, heads, length_q, key.shape[-2]))
    out = batched.attention(as_4d(query), as_4d(key), as_4d(value), layout="bhld", attn_mask=attn_mask, **options)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def _is_causal_bias(attn_mask) -> bool:
    """Whether attn_mask is a torch.nn.attention.bias.CausalBias. That module
    imports torch._dynamo (seconds), so varattn does not import it: a caller
    holding a CausalBias has imported it already."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(attn_mask, bias.CausalBias)


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
