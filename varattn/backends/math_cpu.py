"""The math backend on CPU: per sequence, per chunk of query rows, in torch ops."""
from __future__ import annotations

import torch



def _spans(cu_seqlens, seqused):
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if seqused is None else seqused.tolist()
    return starts, lengths


def key_visible(rows, len_q: int, len_k: int, params) -> torch.Tensor:
    """(len(rows), len_k) bool: which keys each query row sees under causal / window."""
    keys = torch.arange(len_k)
    diagonal = len_k - len_q if params.causal_align == "lower_right" else 0
    from_diagonal = keys[None, :] - rows[:, None] - diagonal
    visible = torch.ones(len(rows), len_k, dtype=torch.bool)
    left, right = params.window
    if params.causal:
        visible &= from_diagonal <= 0
    if left >= 0:
        visible &= from_diagonal >= -left
    if right >= 0:
        visible &= from_diagonal <= right
    return visible


def forward(params, chunk: int):
    """(out, lse), materialising scores for `chunk` query rows at a time."""
    out, lse = params.new_out(), params.new_lse()
    acc = params.lse_dtype
    heads, heads_kv = params.num_heads, params.num_heads_kv
    group = heads // heads_kv
    starts_q, lengths_q = _spans(params.cu_seqlens_q, params.seqused_q)
    starts_k, lengths_k = _spans(params.cu_seqlens_k, params.seqused_k)
    for b, (start_q, len_q, start_k, len_k) in enumerate(zip(starts_q, lengths_q, starts_k, lengths_k)):
        # keys as (H_kv, 1, D, Lk) and values as (H_kv, 1, Lk, Dv): query heads of a group share them
        k = params.k[start_k:start_k + len_k].to(acc).permute(1, 2, 0)[:, None]
        v = params.v[start_k:start_k + len_k].to(acc).transpose(0, 1)[:, None]
        for first in range(0, len_q, chunk):
            rows = torch.arange(first, min(first + chunk, len_q))
            q = params.q[start_q + first:start_q + first + len(rows)].to(acc)
            q = q.view(len(rows), heads_kv, group, -1).permute(1, 2, 0, 3)     # (H_kv, G, r, D)
            scores = (q @ k) * params.scale                                      # (H_kv, G, r, Lk)
            keep = key_visible(rows, len_q, len_k, params)
            if params.attn_bias is not None:
                bias = params.attn_bias[b, :, first:first + len(rows), :len_k]
                bias = bias.reshape(heads_kv, group, len(rows), len_k)
                if params.bias_kind == "bool":
                    keep = keep & bias
                else:
                    scores = scores + bias.to(acc)
            scores = scores.masked_fill(~keep, float("-inf"))
            row_max = scores.amax(-1, keepdim=True) if len_k else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
            exps = torch.exp(scores - row_max.nan_to_num(neginf=0.0))          # a row that sees nothing: all 0
            sums = exps.sum(-1, keepdim=True)
            probs = exps / sums.clamp_min(torch.finfo(acc).tiny)
            rows_out = (probs @ v).permute(2, 0, 1, 3).reshape(len(rows), heads, -1)
            out[start_q + first:start_q + first + len(rows)] = rows_out.to(out.dtype)
            lse[:, start_q + first:start_q + first + len(rows)] = (row_max + sums.log()).reshape(heads, len(rows))
    return out, lse
