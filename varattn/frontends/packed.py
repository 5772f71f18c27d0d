"""`varattn.varlen_attention`: the packed form in, the packed form out."""
from __future__ import annotations

import torch

from .. import run
from ..params import build_params, checked_params, needs_grad
from . import ragged


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=False, causal_align="upper_left", window=(-1, -1), scale=None, attn_bias=None,
                     dropout_p=0.0, seqused_q=None, seqused_k=None, return_lse=False, deterministic=False,
                     block_table=None):
    """Attention over packed sequences, with FlashAttention's varlen conventions.

    Args:
        q: (total_q, H, D); k: (total_k, H_kv, D); v: (total_k, H_kv, D_v), with
            H a multiple of H_kv (GQA/MQA). Any strides with unit stride on the
            last dim. float16, bfloat16, float32 or float64.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on the inputs' device: sequence
            b holds rows [cu[b], cu[b + 1]). Zero-length sequences are fine.
        max_seqlen_q, max_seqlen_k: the longest sequence of each side. Left out,
            they are read from the device (a sync); rows past them are ignored.
        causal: mask keys after the diagonal; causal_align chooses the diagonal,
            "upper_left" (query i sees keys j <= i) or "lower_right"
            (j <= i + Lk - Lq, for decoding and chunked prefill).
        window: (left, right) sliding window around the same diagonal, -1 = unbounded.
        scale: score scale, default 1/sqrt(D).
        attn_bias: per-sequence bias in padded positions, (B or 1, H or 1, Mq, Mk)
            with Mq >= max_seqlen_q (or 1) and Mk >= max_seqlen_k (or 1): bool
            (True = take part) or additive of q's dtype; element [b, h, i, j]
            applies to query i and key j of sequence b.
        dropout_p: dropout on the attention weights, applied whenever it is
            above 0 (pass 0 outside training); its mask comes from torch's
            generator (varattn/dropout.py). The efficient backend runs it on
            CUDA, the math backend on the CPU.
        seqused_q, seqused_k: (B,) int32: sequence b uses only the first
            seqused[b] rows of its slot (padding or holes after it). Output rows
            outside every sequence are zero.
        return_lse: also return lse (H, total_q), the natural-log log-sum-exp
            of each row's scores: float32 (float64 for float64 inputs), -inf for
            a row that sees no key. Differentiable, like out.
        deterministic: the backward gives the same bits on every run (also
            on under torch.use_deterministic_algorithms(True)).
        block_table: (B, max_pages) int32, for a paged KV cache: k and v are
            then page pools (num_pages, page_size, H_kv, D) and (num_pages,
            page_size, H_kv, D_v), page_size a power of two from 16 to 256;
            sequence b's key j is row j % page_size of page
            block_table[b, j // page_size]. seqused_k is required and gives
            each sequence's key count; cu_seqlens_k may be None (given, it
            is checked as a (B + 1,) int32 tensor and otherwise unused);
            max_seqlen_k left out is max_pages * page_size (no sync). An
            entry outside [0, num_pages) is skipped: that page's keys take
            no part (they still count in seqused_k), and nothing outside the
            pools is read. Inference only for now: a paged call that needs
            gradients, or one with attn_bias, raises NotImplementedError; the
            math backend runs it (CPU and CUDA). FlashAttention's names:
            flash_attn_varlen_func's block_table and seqused_k are these;
            flash_attn_with_kvcache's k_cache, v_cache, block_table and
            cache_seqlens are k, v, block_table and seqused_k (its q
            (B, S, H, D) is q packed with cu_seqlens_q [0, S, 2S, ...]).
            varattn.append_paged_kv writes new tokens into the pages.

    Gradients flow to q, k, v and to an additive attn_bias that requires
    grad (summed over its broadcast dimensions); rows outside every
    sequence get zero gradients. Under torch.compile the call is one custom
    op (varattn::attention) with its backward (varattn::attention_backward).

    Returns:
        out (total_q, H, D_v), or (out, lse) with return_lse.
    """
    requires_grad, structure, params = None, None, None
    if attn_bias is None and block_table is None and all(type(x) is torch.Tensor and not x.is_nested for x in (q, k, v)):
        # (a NestedTensor has no shape to key by: build_params says what it expected)
        requires_grad = needs_grad(q, k, v)
        options = (causal, causal_align, window, scale, dropout_p, return_lse, deterministic)
        structure = ragged.structure(q, k, v, cu_seqlens_q, seqused_q, cu_seqlens_k, seqused_k, requires_grad, options)
        params = checked_params(structure, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                                max_seqlen_k, options, requires_grad)
    if params is None:
        params = build_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              causal_align=causal_align, window=window, scale=scale, attn_bias=attn_bias,
                              dropout_p=dropout_p, seqused_q=seqused_q, seqused_k=seqused_k, return_lse=return_lse,
                              deterministic=deterministic, requires_grad=requires_grad, structure=structure,
                              block_table=block_table)
    out, lse = run.attention(params)
    return (out, lse) if return_lse else out
