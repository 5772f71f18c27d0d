"""`varattn.varlen_attn`: torch.nn.attention.varlen.varlen_attn's signature and semantics, on varattn.

torch's varlen_attn runs FlashAttention-2, whose mask arguments read as
follows (its flash_api.cpp): causal and sliding windows are measured from
the lower-right diagonal (query i of a sequence sees key j when
j - (i + Lk - Lq) lies in [-left, right]); is_causal sets right to 0; a
negative side is unbounded, and so is a side of max_k or more, except that
the right side of a bounded left one is max_k (set_params_fprop). `fa2_mask`
turns them into varattn's, for varlen_attn and for the aten flash ops
(varattn/integrations/torch.py).
"""
from __future__ import annotations

from .. import checks
from .packed import varlen_attention


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """A drop-in for torch.nn.attention.varlen.varlen_attn (torch 2.13).

    query (T_q, H, D), key and value (T_k, H_kv, D); cu_seq_q, cu_seq_k
    (N + 1,) int32 prefix sums of the sequences' lengths; max_q, max_k the
    longest of each. window_size (left, right) around the lower-right
    diagonal: (-1, -1) full, (-1, 0) causal, (W, 0) causal within W keys.
    enable_gqa allows H_kv < H (a divisor of it). seqused_k (N,) int32: only
    the first seqused_k[b] keys of sequence b take part. return_aux: an
    AuxRequest (torch.nn.attention.varlen's, or anything with an `lse`
    field); with lse=True, (out, lse) come back, lse (H, T_q) as torch's
    kernels give it (its docstring says (T_q, H)).

    As torch's, it returns out (T_q, H, D) of query's dtype and lse float32,
    and gradients flow to query, key and value. Where it differs, it does
    more: float32 and float64 inputs and the CPU (lse float64 for float64),
    D_v != D, gradients with seqused_k (torch refuses them) and through lse
    (torch drops them). A row that sees no key gives zeros, as in torch, and
    lse -inf, where FlashAttention-2 writes +inf.

    block_table (N, max_pages_per_seq) int32, as in torch: key and value are
    then the page pools (total_pages, page_size, H_kv, D), page_size a power
    of two from 16 to 256, and seqused_k is required (the keys each sequence
    holds); cu_seq_k is checked as an (N + 1,) int32 tensor and otherwise
    unused. Inference only, as in torch (inputs that require grad raise
    NotImplementedError); varattn runs it on its math backend, on the CPU and
    CUDA, and skips pages outside [0, total_pages) (their keys take no part;
    see varattn.varlen_attention). num_splits (split-KV) raises
    NotImplementedError. Errors from
    the checks shared with varlen_attention name its arguments: cu_seqlens_q
    for cu_seq_q, max_seqlen_q for max_q, window for window_size.
    """
    if num_splits is not None:
        refuse("varattn.varlen_attn", num_splits=num_splits)
    heads_kv = key.shape[-2:-1] if block_table is not None and key.dim() == 4 else key.shape[1:2]
    if not enable_gqa and query.shape[1:2] != heads_kv:
        raise ValueError(f"query and key must have the same number of heads (dim 1) unless enable_gqa=True "
                         f"(grouped-query attention), got shapes {tuple(query.shape)} and {tuple(key.shape)}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    causal, window = fa2_mask(left, right, False, max_k)
    return varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal,
                            causal_align="lower_right", window=window, scale=scale, seqused_k=seqused_k,
                            return_lse=return_aux is not None and bool(return_aux.lse), block_table=block_table)


def fa2_mask(left, right, is_causal: bool, max_k) -> tuple[bool, tuple[int, int]]:
    """(causal, window) in varattn's terms, aligned lower-right, of
    FlashAttention-2's window_size_left/right and is_causal. A window whose
    right side is 0 is the causal mask (the kernels skip the same tiles
    either way; a backend without windows still takes plain causal calls)."""
    checks.non_negative_int(max_k, "max_k")
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_size {side} must be an int, got {value!r}")
    if is_causal:
        right = 0
    left = -1 if left < 0 or left >= max_k else left
    right = -1 if right < 0 or right >= max_k else right
    if left >= 0 and right < 0:
        right = int(max_k)  # specialised when torch.compile traces max_k: a window holds ints
    return (True, (left, -1)) if right == 0 else (False, (left, right))


def refuse(where: str, **arguments) -> None:
    """NotImplementedError naming those of `arguments` that were given (not None or False)."""
    given = [name for name, value in arguments.items() if value is not None and value is not False]
    if given:
        raise NotImplementedError(f"{where}: {', '.join(given)} not supported by varattn yet")
