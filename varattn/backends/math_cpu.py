"""The math backend on CPU: torch's fused CPU attention where it can run the
call (fused_cpu.py decides, and runs it), else per sequence, per chunk of
query rows, in torch ops."""
from __future__ import annotations

import torch

from .. import dropout
from . import fused_cpu


def _spans(cu_seqlens, seqused):
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if seqused is None else seqused.tolist()
    return starts, lengths


def _sequences(params):
    """(b, start_q, len_q, start_k, len_k) of each sequence."""
    starts_q, lengths_q = _spans(params.cu_seqlens_q, params.seqused_q)
    starts_k, lengths_k = _spans(params.cu_seqlens_k, params.seqused_k)
    return zip(range(params.batch_size), starts_q, lengths_q, starts_k, lengths_k)


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


def _keys(params, start_k: int, len_k: int):
    """Keys (H_kv, 1, Lk, D) and values (H_kv, 1, Lk, Dv) of one sequence: query heads of a group share them."""
    acc = params.lse_dtype
    k = params.k[start_k:start_k + len_k].to(acc).transpose(0, 1)[:, None]
    v = params.v[start_k:start_k + len_k].to(acc).transpose(0, 1)[:, None]
    return k, v


def _by_group(params, x) -> torch.Tensor:
    """Rows (r, H, d) of q, out or grad_out as (H_kv, G, r, d) in the accumulation dtype."""
    return x.to(params.lse_dtype).view(x.shape[0], params.num_heads_kv, -1, x.shape[-1]).permute(1, 2, 0, 3)


def _scores(params, b: int, first: int, len_q: int, q, k) -> torch.Tensor:
    """(H_kv, G, r, Lk) scaled and biased scores of the r query rows from
    `first` of sequence b, -inf where a key is hidden."""
    rows, len_k = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * params.scale
    keep = key_visible(torch.arange(first, first + rows), len_q, len_k, params)
    if params.attn_bias is not None:
        bias = params.attn_bias[b, :, first:first + rows, :len_k]
        bias = bias.reshape(*scores.shape)
        if params.bias_kind == "bool":
            keep = keep & bias
        else:
            scores = scores + bias.to(scores.dtype)
    return scores.masked_fill(~keep, float("-inf"))


def _kept(params, at: slice, len_k: int):
    """(H_kv, G, r, Lk) factors of the dropped-out probabilities of packed
    rows `at`: 0 where dropped, 1 / (1 - p) where kept; None without dropout."""
    if params.dropout_p == 0:
        return None
    keep = dropout.keep(params.dropout_state, params.dropout_p, params.num_heads, torch.arange(at.start, at.stop), len_k)
    factors = keep.to(params.lse_dtype) / (1 - params.dropout_p)
    return factors.view(params.num_heads_kv, params.num_heads // params.num_heads_kv, *factors.shape[1:])


def _chunks(start_q: int, len_q: int, chunk: int):
    """(first row in the sequence, its rows in the packed tensors) of each chunk."""
    for first in range(0, len_q, chunk):
        yield first, slice(start_q + first, start_q + min(first + chunk, len_q))


def forward(params, chunk: int):
    """(out, lse): torch's fused kernel for what fused_cpu takes, the rest
    materialising scores for `chunk` query rows at a time."""
    fused = fused_cpu.forward(params)
    out, lse, sequences = (params.new_out(), params.new_lse(), _sequences(params)) if fused is None else fused
    heads = params.num_heads
    for b, start_q, len_q, start_k, len_k in sequences:
        k, v = _keys(params, start_k, len_k)
        for first, at in _chunks(start_q, len_q, chunk):
            scores = _scores(params, b, first, len_q, _by_group(params, params.q[at]), k)
            rows = scores.shape[2]
            row_max = scores.amax(-1, keepdim=True) if len_k else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
            exps = torch.exp(scores - row_max.nan_to_num(neginf=0.0))          # a row that sees nothing: all 0
            sums = exps.sum(-1, keepdim=True)
            probs = exps / sums.clamp_min(torch.finfo(scores.dtype).tiny)
            kept = _kept(params, at, len_k)
            if kept is not None:
                probs = probs * kept
            out[at] = (probs @ v).permute(2, 0, 1, 3).reshape(rows, heads, -1).to(out.dtype)
            lse[:, at] = (row_max + sums.log()).reshape(heads, rows)
    return out, lse


def backward(params, out, lse, grad_out, grad_lse, bias_grad: bool, chunk: int):
    """(dq, dk, dv, dbias) of the call `params` whose forward gave `out` and
    `lse`, recomputing the probabilities of `chunk` query rows at a time from
    lse. grad_lse (H, total_q), or None, is the gradient reaching lse. dbias,
    when bias_grad and the bias is additive, has the shape of
    `params.attn_bias` (autograd sums it over the dimensions the caller's
    bias broadcast); else None. Rows outside every sequence get zero gradients.
    torch's fused backward takes what fused_cpu takes when no gradient reaches lse."""
    acc = params.lse_dtype
    heads, heads_kv = params.num_heads, params.num_heads_kv
    if grad_lse is not None and not grad_lse.any():  # lse in the loss times 0: the same as no gradient
        grad_lse = None
    fused = None if grad_lse is not None else fused_cpu.backward(params, out, lse, grad_out, bias_grad)
    if fused is None:
        dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype) for x in (params.q, params.k, params.v))
        sequences = _sequences(params)
    else:
        dq, dk, dv, sequences = fused
    dbias = None
    if bias_grad and params.bias_kind == "additive":
        dbias = torch.zeros(params.attn_bias.shape, dtype=params.dtype)
    for b, start_q, len_q, start_k, len_k in sequences:
        k, v = _keys(params, start_k, len_k)
        dk_seq = k.new_zeros(heads_kv, len_k, k.shape[-1])
        dv_seq = v.new_zeros(heads_kv, len_k, v.shape[-1])
        for first, at in _chunks(start_q, len_q, chunk):
            q = _by_group(params, params.q[at])                                   # (H_kv, G, r, D)
            rows = q.shape[2]
            scores = _scores(params, b, first, len_q, q, k)
            row_lse = lse[:, at].to(acc).reshape(heads_kv, -1, rows, 1)
            probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0))            # hidden keys, empty rows: 0
            d_out = _by_group(params, grad_out[at])                               # (H_kv, G, r, Dv)
            delta = (d_out * _by_group(params, out[at])).sum(-1, keepdim=True)    # rowsum(dO * O)
            if grad_lse is not None:
                delta = delta - grad_lse[:, at].to(acc).reshape(heads_kv, -1, rows, 1)
            d_probs = d_out @ v.transpose(-1, -2)                                 # dP of the probabilities V met
            kept = _kept(params, at, len_k)
            if kept is not None:                                                  # dropout: those were P * kept
                d_probs = d_probs * kept
            d_scores = probs * (d_probs - delta)                                  # dS = P * (dP - delta)
            dv_seq += ((probs if kept is None else probs * kept).transpose(-1, -2) @ d_out).sum(1)
            dk_seq += (d_scores.transpose(-1, -2) @ q).sum(1) * params.scale
            dq[at] = ((d_scores @ k) * params.scale).permute(2, 0, 1, 3).reshape(rows, heads, -1).to(dq.dtype)
            if dbias is not None:
                dbias[b, :, first:first + rows, :len_k] = d_scores.reshape(heads, rows, len_k).to(dbias.dtype)
        dk[start_k:start_k + len_k] = dk_seq.transpose(0, 1).to(dk.dtype)
        dv[start_k:start_k + len_k] = dv_seq.transpose(0, 1).to(dv.dtype)
    return dq, dk, dv, dbias
