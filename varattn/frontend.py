"""`varattn.attention`: attention on the batch in the form the caller holds it.

NestedTensors (jagged or strided) or padded dense batches go in; the packed
form is built without copying where the layout allows, dispatched, and the
result handed back in the same form.
"""
from __future__ import annotations

import torch

from . import checks, dispatch, nested, padded, repeat
from .params import build_params


def attention(query, key, value, *, layout=None, lengths=None, kv_lengths=None, key_padding_mask=None,
              attn_mask=None, causal=False, causal_align="upper_left", window=(-1, -1), scale=None,
              dropout_p=0.0, return_lse=False, deterministic=False):
    """Scaled dot-product attention over a batch of sequences of different lengths.

    Args:
        query, key, value: either NestedTensors, jagged or strided, in SDPA
            layout (B, H, j, D) (or (B, j, H, D) with layout="blhd"), or
            padded dense tensors (B, H, L, D) (layout="bhld", the default) or
            (B, L, H, D) (layout="blhd"). key and value may have fewer heads
            than query (GQA/MQA) when the query heads are a multiple of them.
        lengths: padded batches only: valid length of each query sequence, a
            list or an integer tensor (B,); also of the keys/values when
            kv_lengths and key_padding_mask are not given and Lq == Lk.
        kv_lengths: padded batches only: valid lengths of the key/value sequences.
        key_padding_mask: padded batches only: (B, Lk) bool, True at padding,
            which must follow each sequence's tokens (as in
            nn.MultiheadAttention); an alternative to kv_lengths. It also gives
            the query lengths when `lengths` is not given and Lq == Lk.
        attn_mask: (B or 1, H or 1, Lq, Lk) per-sequence mask in padded
            positions: bool (True = take part) or an additive float bias of the
            inputs' dtype.
        causal, causal_align: causal masking, "upper_left" (query i sees keys
            j <= i, torch's is_causal) or "lower_right" (j <= i + Lk - Lq).
        window: (left, right) sliding window around the same diagonal; -1 = unbounded.
        scale: score scale, default 1/sqrt(D).
        dropout_p: dropout on the attention weights, applied whenever it is
            above 0 (pass 0 outside training); its mask comes from torch's
            generator (varattn/dropout.py). The efficient backend runs it on
            CUDA, the math backend on the CPU.
        return_lse: also return the log-sum-exp of each query row's scores
            (differentiable, like the output).
        deterministic: the backward gives the same bits on every run (also
            on under torch.use_deterministic_algorithms(True)).

    Gradients flow to query, key, value (NestedTensor or padded; zero at
    padded positions) and to an additive attn_mask that requires grad.

    Returns:
        The output in the caller's form: a NestedTensor of the same layout, or a
        padded tensor of the same layout whose rows past each query length are
        zero. With return_lse, (out, lse) where lse is (B, H, j) / (B, H, L)
        (or (B, j, H) / (B, L, H) for "blhd"), float32 (float64 for float64
        inputs), -inf for rows that see no key.
    """
    options = dict(causal=causal, causal_align=causal_align, window=window, scale=scale, dropout_p=dropout_p,
                   return_lse=return_lse, deterministic=deterministic)
    if nested.is_nested(query) and nested.is_nested(key) and nested.is_nested(value) and \
            lengths is None and kv_lengths is None and key_padding_mask is None and \
            not _needs_grad(query, key, value, attn_mask):
        return _nested_call(query, key, value, layout, attn_mask, options)()
    params, finish = prepare(query, key, value, layout=layout, lengths=lengths, kv_lengths=kv_lengths,
                             key_padding_mask=key_padding_mask, attn_mask=attn_mask, **options)
    out, lse = dispatch.run(params)
    return finish(out, lse)


def prepare(query, key, value, *, layout=None, lengths=None, kv_lengths=None, key_padding_mask=None,
            attn_mask=None, **options):
    """(AttentionParams, finish) where finish(out, lse) returns the caller's form."""
    is_nested = [nested.is_nested(x) for x in (query, key, value)]
    if all(is_nested):
        for name, given in (("lengths", lengths), ("kv_lengths", kv_lengths), ("key_padding_mask", key_padding_mask)):
            if given is not None:
                raise ValueError(f"{name} applies to padded batches; a NestedTensor carries its own lengths")
        return _prepare_nested(query, key, value, layout, attn_mask, options)
    if any(is_nested):
        kinds = ", ".join(f"{n}: {'NestedTensor' if f else 'dense'}" for n, f in zip(("query", "key", "value"), is_nested))
        raise TypeError(f"query, key and value must be all NestedTensors or all dense tensors; got {kinds}")
    return _prepare_padded(query, key, value, layout or "bhld", lengths, kv_lengths, key_padding_mask,
                           attn_mask, options)


def _ragged_dim(query, layout) -> int:
    if layout is not None:
        padded.check_layout(layout)
    if query.layout == torch.jagged:
        inferred = query._ragged_idx
        if layout is not None and inferred != {"bhld": 2, "blhd": 1}[layout]:
            raise ValueError(f"layout={layout!r} but query is ragged in dim {inferred}")
        return inferred
    return 1 if layout == "blhd" else 2


def _prepare_nested(query, key, value, layout, attn_mask, options):
    params, form = _nested_params(query, key, value, layout, attn_mask, options)
    return params, lambda out, lse: _nested_result(params, form, out, lse, None)


def _nested_params(query, key, value, layout, attn_mask, options):
    ragged_dim = _ragged_dim(query, layout)
    if query.dim() != 4:
        raise ValueError(f"query must be a 4-D NestedTensor (B, H, j, D), got {query.dim()} dims")
    q, form = nested.unpack(query, ragged_dim, "query")
    k, k_form = nested.unpack(key, ragged_dim, "key")
    v, v_form = nested.unpack(value, ragged_dim, "value")
    _same_rows(k_form, v_form)
    params = build_params(q.values, k.values, v.values, q.cu_seqlens, k.cu_seqlens, q.max_seqlen, k.max_seqlen,
                          seqused_q=q.seqused, seqused_k=k.seqused, attn_bias=attn_mask, **options)
    return params, form


def _nested_result(params, form, out, lse, out_nested):
    result = form.rebuild(out) if out_nested is None else out_nested
    return (result, form.rebuild(lse.transpose(0, 1))) if params.return_lse else result


class _NestedCall:
    """A NestedTensor call ready to run: each run allocates the output as a
    NestedTensor of the caller's form (cheaply where the form allows) and
    has the chosen backend write into it."""

    def __init__(self, params, form):
        self.params, self.form, self.runner = params, form, dispatch.prepare(params)
        self.features = (params.num_heads, params.head_dim_v)

    def __call__(self):
        p = self.params
        out, out_nested = self.form.new_output(self.features, p.dtype, p.device)
        out, lse = self.runner(p.new_out() if out is None else out)
        return _nested_result(p, self.form, out, lse, out_nested)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _nested_call(query, key, value, layout, attn_mask, options):
    """The call for these NestedTensors (none needs grad), remembered
    (varattn/repeat.py) when no mask comes with it."""
    signature = (layout, *options.values(), torch.are_deterministic_algorithms_enabled(), dispatch.allowed(),
                 checks.device_checks_enabled())
    call = repeat.find(query, key, value, signature) if attn_mask is None else None
    if call is None:
        call = _NestedCall(*_nested_params(query, key, value, layout, attn_mask, options))
        if attn_mask is None:
            repeat.remember(query, key, value, signature, call)
    return call


def _same_rows(k_form, v_form) -> None:
    """key and value must hold each sequence at the same rows (one cu_seqlens_k serves both)."""
    if k_form.jagged != v_form.jagged:
        raise TypeError("key and value must both be jagged or both strided NestedTensors")
    if k_form.jagged:
        same = [(k_form.offsets, v_form.offsets), (k_form.lengths, v_form.lengths)]
        for a, b in same:
            if a is b:
                continue
            # Separately built NestedTensors: compare contents (a sync on CUDA, only in this case).
            if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
                raise ValueError("key and value must have the same sequence lengths and offsets")
    elif k_form.rows_key != v_form.rows_key:
        raise ValueError("key and value must have the same sequence lengths and layout")


def _prepare_padded(query, key, value, layout, lengths, kv_lengths, key_padding_mask, attn_mask, options):
    padded.check_layout(layout)
    for name, x in (("query", query), ("key", key), ("value", value)):
        padded.check_dense(x, name)
    q, k, v = (padded.as_blhd(x, layout) for x in (query, key, value))
    batch, len_q = q.shape[:2]
    len_k = k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch or v.shape[1] != len_k:
        raise ValueError(f"query, key and value must share the batch size and key/value the length; got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} ({layout})")
    device = query.device
    if kv_lengths is not None and key_padding_mask is not None:
        raise ValueError("pass kv_lengths or key_padding_mask, not both")
    q_lengths = None if lengths is None else padded.lengths_arg(lengths, batch, len_q, device, "lengths")
    if kv_lengths is not None:
        k_lengths = padded.lengths_arg(kv_lengths, batch, len_k, device, "kv_lengths")
    elif key_padding_mask is not None:
        k_lengths = padded.lengths_from_padding_mask(key_padding_mask, batch, len_k, device)
        if q_lengths is None and len_q == len_k:
            q_lengths = k_lengths
    elif q_lengths is not None and len_q != len_k:
        raise ValueError(f"lengths describe the queries (padded to {len_q}); the keys/values are padded "
                         f"to {len_k}: pass kv_lengths for them")
    else:
        k_lengths = q_lengths
    rq = padded.unpack(query, layout, q_lengths)
    rk = padded.unpack(key, layout, k_lengths)
    params = build_params(rq.values, rk.values, padded.rows(value, layout), rq.cu_seqlens, rk.cu_seqlens, rq.max_seqlen,
                          rk.max_seqlen, seqused_q=rq.seqused, seqused_k=rk.seqused, attn_bias=attn_mask,
                          **options)

    def finish(out, lse):
        result = padded.repack(out, batch, len_q, layout)
        return (result, padded.repack_lse(lse, batch, len_q, layout)) if params.return_lse else result
    return params, finish
