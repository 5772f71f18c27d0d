"""`varattn.attention`: attention on the batch in the form the caller holds it.

NestedTensors (jagged or strided) or padded dense batches go in; the packed
form is built without copying where the layout allows (frontends/nested.py,
frontends/padded.py), run, and the result handed back in the same form.
"""
from __future__ import annotations

from .. import run
from . import nested, padded


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
            On the host (a list, a CPU tensor) it is checked and copied to the
            device without a sync; a CUDA tensor is used unread.
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
    params, form, inputs = call(query, key, value, layout=layout, lengths=lengths, kv_lengths=kv_lengths,
                                key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal,
                                causal_align=causal_align, window=window, scale=scale, dropout_p=dropout_p,
                                return_lse=return_lse, deterministic=deterministic)
    out, lse = run_call(params, form, inputs)
    return (out, lse) if return_lse else out


def run_call(params, form, inputs):
    """(out, lse) of a call made by `call`."""
    return (nested.attend if isinstance(form, nested.NestedForm) else run.attention)(params, form, inputs)


def call(query, key, value, *, layout=None, lengths=None, kv_lengths=None, key_padding_mask=None, attn_mask=None,
         **options):
    """(AttentionParams, run.Form, the caller's q, k, v) of an `attention` call, not run."""
    if (type(query) is nested.Jagged and type(key) is nested.Jagged and type(value) is nested.Jagged
            and lengths is None and kv_lengths is None and key_padding_mask is None):
        return nested.call(query, key, value, layout, attn_mask, options)  # the common case, asked first
    kinds = [nested.is_nested(x) for x in (query, key, value)]
    if all(kinds):
        for name, given in (("lengths", lengths), ("kv_lengths", kv_lengths), ("key_padding_mask", key_padding_mask)):
            if given is not None:
                raise ValueError(f"{name} applies to padded batches; a NestedTensor carries its own lengths")
    elif any(kinds):
        kinds = ", ".join(f"{n}: {'NestedTensor' if f else 'dense'}" for n, f in zip(("query", "key", "value"), kinds))
        raise TypeError(f"query, key and value must be all NestedTensors or all dense tensors; got {kinds}")
    if all(kinds):
        return nested.call(query, key, value, layout, attn_mask, options)
    return padded.call(query, key, value, layout or "bhld", lengths, kv_lengths, key_padding_mask, attn_mask, options)
