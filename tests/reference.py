"""The one reference every test compares with: float64 on the CPU, per
sequence, written straight from DESIGN.md's semantics (not from varattn's
own math backend), and the random inputs the tests draw.
"""
from __future__ import annotations

import itertools
import math

import torch


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_q=None, seqused_k=None, causal=False,
              causal_align="upper_left", window=(-1, -1), scale=None, attn_bias=None, dropout_p=0.0,
              dropout_keep=None):
    """(out (total_q, H, Dv), lse (H, total_q)) in float64; rows outside every
    sequence and rows that see no key: out 0, lse -inf. Differentiable: float64
    leaves that require grad get their gradients by autograd. With dropout,
    dropout_keep (B, H, Lq_max, Lk_max) bool says which probabilities stay
    (scaled by 1 / (1 - dropout_p)); lse is of the probabilities before it."""
    q, k, v = (x.cpu().double() for x in (q, k, v))
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used_q = None if seqused_q is None else seqused_q.tolist()
    used_k = None if seqused_k is None else seqused_k.tolist()
    heads, heads_kv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape[0], heads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((heads, q.shape[0]), -math.inf, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        start_q, start_k = cu_q[b], cu_k[b]
        len_q = cu_q[b + 1] - start_q if used_q is None else used_q[b]
        len_k = cu_k[b + 1] - start_k if used_k is None else used_k[b]
        if len_q == 0:
            continue
        qb = q[start_q:start_q + len_q].transpose(0, 1)                                   # (H, Lq, D)
        kb = k[start_k:start_k + len_k].transpose(0, 1).repeat_interleave(heads // heads_kv, 0)
        vb = v[start_k:start_k + len_k].transpose(0, 1).repeat_interleave(heads // heads_kv, 0)
        scores = scale * qb @ kb.transpose(1, 2)                                           # (H, Lq, Lk)
        i = torch.arange(len_q)[:, None]
        j = torch.arange(len_k)[None, :]
        diagonal = i + (len_k - len_q if causal_align == "lower_right" else 0)
        allowed = torch.ones(len_q, len_k, dtype=torch.bool).expand(heads, len_q, len_k).clone()
        if causal:
            allowed &= j <= diagonal
        if window[0] >= 0:
            allowed &= j >= diagonal - window[0]
        if window[1] >= 0:
            allowed &= j <= diagonal + window[1]
        if attn_bias is not None:
            # (H or 1, Mq or 1, Mk or 1): the first Lq x Lk positions, size-1 dims broadcast
            bias = attn_bias[b if attn_bias.shape[0] > 1 else 0].cpu()[:, :len_q, :len_k].expand(heads, len_q, len_k)
            if bias.dtype == torch.bool:
                allowed &= bias
            else:
                scores = scores + bias.double()
        seen = allowed.any(-1)                                                              # (H, Lq)
        # rows that see nothing: zeros instead of all -inf, so no NaN reaches autograd
        scores = scores.masked_fill(~allowed & seen[..., None], -math.inf).masked_fill(~seen[..., None], 0.0)
        row_lse = torch.where(seen, torch.logsumexp(scores, -1), torch.tensor(-math.inf, dtype=torch.float64))
        probs = torch.where(seen[..., None], torch.softmax(scores, -1), torch.zeros((), dtype=torch.float64))
        probs = probs.nan_to_num(0.0)
        if dropout_keep is not None:
            probs = probs * dropout_keep[b, :, :len_q, :len_k].double() / (1 - dropout_p)
        out[start_q:start_q + len_q] = (probs @ vb).transpose(0, 1)
        lse[:, start_q:start_q + len_q] = row_lse
    return out, lse


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    if torch.isnan(actual).any():
        return math.inf
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


def lse_error(actual, expected) -> float:
    """Largest absolute lse difference on finite entries; inf when -inf entries disagree."""
    actual, expected = (x.detach().cpu().double() for x in (actual, expected))
    finite = torch.isfinite(expected)
    if not torch.equal(torch.isfinite(actual), finite) or torch.isnan(actual).any():
        return math.inf
    return (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0


# ---------------------------------------------------------------------------
# Random inputs: fresh on every call, never zeros.

def lengths(gen: torch.Generator, batch: int, longest: int) -> list[int]:
    """Random lengths in [0, longest], with 0, 1 and `longest` among them."""
    drawn = torch.randint(0, longest + 1, (batch,), generator=gen).tolist()
    for position, special in zip(torch.randperm(batch, generator=gen).tolist(), (0, 1, longest)):
        drawn[position] = special
    return drawn


def cu_seqlens(lengths_, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths_)], dtype=torch.int32, device=device)


def randn(gen, *shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def packed_inputs(gen, lengths_q, lengths_k, heads, heads_kv, head_dim, head_dim_v=None, dtype=torch.float32,
                  device="cpu"):
    """q, k, v and both cu_seqlens for those lengths."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = randn(gen, sum(lengths_q), heads, head_dim, dtype=dtype, device=device)
    k = randn(gen, sum(lengths_k), heads_kv, head_dim, dtype=dtype, device=device)
    v = randn(gen, sum(lengths_k), heads_kv, head_dim_v, dtype=dtype, device=device)
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
