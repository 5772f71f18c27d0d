"""The math backend's fast route on the CPU: torch's fused CPU attention
kernels (aten::_scaled_dot_product_flash_attention_for_cpu and its
backward), run on views of the packed rows, for the calls and sequences
they can express; math_cpu.py runs everything else its own way.

Schemas (torch 2.13's, read from the build; earlier releases' published
sources carry the same text; torch 2.11 itself was not run here):
    _scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, float dropout_p=0.,
        bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor output, Tensor logsumexp)
    _scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value,
        Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, Tensor? attn_mask=None,
        float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)
on (B, H, L, D) tensors of any strides but a unit one on D, key/value with
H or a divisor of H heads (GQA, in the kernel since torch 2.9: pytorch
PR 157893), causal aligned upper-left; logsumexp (B, H, Lq) in float32
(float64 for float64). Its output is (B, L, H, D) in memory, which is the
packed layout: a dense batch comes back without a copy.

What the kernel cannot be asked, or answers differently, and how:
- a length 0 anywhere (query rows, keys or heads): it dies of SIGFPE;
  sequences without keys are written here (out 0, lse -inf);
- lower-right causal: with Lq > Lk the first Lq - Lk rows see no key (written
  here) and the rest are upper-left causal against every key; with
  1 < Lq < Lk an additive mask (Lq, Lk) says it (with a bias too, math_cpu
  takes the sequence);
- attn_bias: the kernel takes an additive mask of q's dtype (no bool), size
  1 where it broadcasts and unit stride on keys where not; a bool mask
  becomes one. A row a mask hides entirely comes back with out 0 and lse 0
  (not -inf): rows with lse exactly 0 are checked against the mask and set
  to -inf, and the backward reads their lse as 0 (their probabilities are 0
  either way). It gives no bias gradient: math_cpu computes the backward
  when the bias needs one.

`declined(params)` is the one place that decides which calls keep the
existing path, each with its reason; `forward` and `backward` are math_cpu's
first step.
"""
from __future__ import annotations

import torch

FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# How a kernel call masks its rows: nothing, upper-left causal (the kernel's
# is_causal), or lower-right causal with Lq < Lk (an additive mask).
FULL, CAUSAL, LOWER_RIGHT = "full", "causal", "lower_right"


def declined(params, bias_grad: bool = False) -> str | None:
    """Why the whole call (its backward, with `bias_grad`) keeps math_cpu's own
    path, or None when torch's fused kernel takes it (all its sequences but
    those `_span` leaves). Measured on 2 cores, the kernel is 2-23x faster
    than math_cpu's loop in every dtype, float64 included, forward and
    backward (4 x 512 rows, 8 x 64: float64 47 against 637 ms forward; 256
    sequences of 1-40 rows: 3 against 68 ms), so no dtype is declined; its
    backward gives the same bits run to run (tests/test_grad.py), so
    deterministic calls take it too. Windows could be an additive mask, but
    one of Lq x Lk per call where math_cpu's loop stays within its workspace."""
    if params.device.type != "cpu":
        return "not on the CPU"
    if params.dropout_p > 0:
        return "dropout: varattn draws its own Philox stream (varattn/dropout.py), the same on every device"
    if params.has_window:
        return "sliding window: torch's kernel has no window"
    if params.head_dim_v != params.head_dim:
        return "head_dim_v differs from head_dim: torch's kernel takes one head size"
    if params.num_heads == 0:
        return "no heads: torch's kernel divides by the head count"
    if bias_grad and params.bias_kind == "additive":
        return "a gradient to attn_bias: torch's backward gives none"
    return None


def _span(len_q: int, len_k: int, params):
    """(rows from the start of the sequence that see no key, mode) of the
    kernel call for one sequence, or None when it cannot express it."""
    if len_k == 0:
        return len_q, FULL
    if not params.causal:
        return 0, FULL
    if params.causal_align == "upper_left" or len_q == len_k:
        return 0, CAUSAL
    if len_q > len_k:  # lower-right: the first len_q - len_k rows see nothing, the rest upper-left
        return len_q - len_k, CAUSAL
    if len_q == 1:  # lower-right, one row: it sees every key
        return 0, FULL
    if params.attn_bias is not None:  # its mask would have to be merged into the bias
        return None
    return 0, LOWER_RIGHT


def _lengths(cu_seqlens, seqused):
    """(starts, lengths) as lists (one read of each tensor: host time matters for small calls)."""
    cu = cu_seqlens.tolist()
    return cu[:-1], ([end - start for start, end in zip(cu, cu[1:])] if seqused is None else seqused.tolist())


class _Plan:
    """The call's sequences sorted into kernel calls: `groups` maps (rows,
    keys, mode, rows skipped) to the (start of its rows, start of its keys,
    b) of each sequence that a call of that shape takes; `hidden` the
    (start, rows) of query rows that see no key; `rest` math_cpu's
    sequences, (b, start_q, len_q, start_k, len_k) as math_cpu._sequences gives them."""

    def __init__(self, params):
        starts_q, lengths_q = _lengths(params.cu_seqlens_q, params.seqused_q)
        starts_k, lengths_k = _lengths(params.cu_seqlens_k, params.seqused_k)
        self.groups, self.hidden, self.rest = {}, [], []
        for b, (start_q, len_q, start_k, len_k) in enumerate(zip(starts_q, lengths_q, starts_k, lengths_k)):
            if len_q == 0:
                continue
            span = _span(len_q, len_k, params)
            if span is None:
                self.rest.append((b, start_q, len_q, start_k, len_k))
                continue
            skipped, mode = span
            if skipped:
                self.hidden.append((start_q, skipped))
            if skipped < len_q:
                self.groups.setdefault((len_q - skipped, len_k, mode, skipped), []).append(
                    (start_q + skipped, start_k, b))

    def whole(self, params) -> bool:
        """Whether one call covers every row, in order, of q and k: a dense batch."""
        if len(self.groups) != 1 or self.hidden or self.rest or params.seqused_q is not None:
            return False
        (rows, keys, _, _), starts = next(iter(self.groups.items()))
        return (rows * len(starts) == params.total_q and keys * len(starts) == params.total_k
                and starts[0][:2] == (0, 0)
                and (len(starts) == 1 or (_step(starts, 0) == rows and _step(starts, 1) == keys)))


def _step(starts, which: int):
    """The common difference of the starts' `which` element, or None when they are not evenly spaced."""
    first = starts[0][which]
    if len(starts) == 1:
        return 0
    step = starts[1][which] - first
    return step if all(s[which] == first + i * step for i, s in enumerate(starts)) else None


class _Rows:
    """The rows of `n` consecutive rows from each start, of packed (total, H, d)
    tensors, as (G, H, n, d) views where the starts are evenly spaced, else
    gathered; and back."""

    def __init__(self, starts, n: int):
        self.n, self.count, self.first = n, len(starts), starts[0]
        self.step = _step([(s,) for s in starts], 0)
        self.index = None
        if self.step is None:
            self.index = (torch.tensor(starts)[:, None] + torch.arange(n)).view(-1)

    def read(self, x):
        """(G, H, n, d) of packed x."""
        if self.index is None:
            s0, s1, s2 = x.stride()
            return x.as_strided((self.count, self.n, x.shape[1], x.shape[2]), (self.step * s0, s0, s1, s2),
                                x.storage_offset() + self.first * s0).transpose(1, 2)
        return x.index_select(0, self.index).view(self.count, self.n, *x.shape[1:]).transpose(1, 2)

    def write(self, x, made) -> None:
        """Packed x's rows = made (G, H, n, d)."""
        if self.index is None:
            self.read(x).copy_(made)
        else:
            x.index_copy_(0, self.index, made.transpose(1, 2).reshape(-1, *x.shape[1:]))

    def write_lse(self, lse, made) -> None:
        """(H, total) lse's columns = made (G, H, n)."""
        if self.index is None:
            s0, s1 = lse.stride()
            lse.as_strided((self.count, lse.shape[0], self.n), (self.step * s1, s0, s1),
                           lse.storage_offset() + self.first * s1).copy_(made)
        else:
            lse.index_copy_(1, self.index, made.transpose(0, 1).reshape(lse.shape[0], -1))

    def read_lse(self, lse):
        """(G, H, n) of (H, total) lse."""
        if self.index is None:
            s0, s1 = lse.stride()
            return lse.as_strided((self.count, lse.shape[0], self.n), (self.step * s1, s0, s1),
                                  lse.storage_offset() + self.first * s1)
        return lse.index_select(1, self.index).view(lse.shape[0], self.count, self.n).transpose(0, 1)


class _Call:
    """One kernel call: its query rows and key rows (_Rows), mode, the
    sequences' indices `batches` and the rows each skips (`skipped`, the
    rows before them in their sequence, for the bias)."""

    def __init__(self, rows: int, keys: int, mode: str, skipped: int, starts):
        self.q = _Rows([s[0] for s in starts], rows)
        self.k = _Rows([s[1] for s in starts], keys)
        self.mode, self.skipped, self.batches = mode, skipped, [s[2] for s in starts]

    def mask(self, params):
        """The kernel's attn_mask: additive, q's dtype, size 1 where it broadcasts; or None."""
        rows, keys = self.q.n, self.k.n
        if self.mode == LOWER_RIGHT:
            hidden = torch.arange(keys)[None, :] > torch.arange(rows)[:, None] + (keys - rows)
            return torch.zeros(1, 1, rows, keys, dtype=params.dtype).masked_fill_(hidden, float("-inf"))
        bias = _compact(params.attn_bias)
        if bias is None:
            return None
        rows_at = slice(self.skipped, self.skipped + rows) if bias.shape[2] > 1 else slice(None)
        bias = bias[:, :, rows_at, :keys]
        if bias.shape[0] > 1:  # this call's sequences
            batches = self.batches
            step = _step([(b,) for b in batches], 0)
            bias = (bias.index_select(0, torch.tensor(batches)) if step is None
                    else bias[batches[0]:batches[-1] + 1:max(step, 1)])
        if bias.dtype == torch.bool:
            return torch.zeros(bias.shape, dtype=params.dtype).masked_fill_(~bias, float("-inf"))
        return bias.contiguous() if bias.shape[3] > 1 and bias.stride(3) != 1 else bias

    def hide_unseen(self, made_lse, mask) -> None:
        """made_lse (G, H, rows) with -inf at the rows `mask` hides entirely
        (the kernel gives them lse 0; their output is 0 already)."""
        candidates = (made_lse == 0).nonzero()
        if not len(candidates):
            return
        keys = self.k.n
        g, h, i = candidates.unbind(1)
        scores = mask.expand(*made_lse.shape, keys)[g, h, i]  # (N, keys)
        hidden = scores == float("-inf")
        if self.mode == CAUSAL:
            hidden |= torch.arange(keys)[None, :] > i[:, None]
        unseen = hidden.all(-1)
        made_lse[g[unseen], h[unseen], i[unseen]] = float("-inf")


# Sequences of one shape that do not lie evenly spaced are gathered into one
# call when shorter than this, else called one by one on views: a call costs
# about 80 us of its own, about what copying a few thousand rows in and out
# does (2 cores, fp32: 1024 sequences of 3 or 5 rows, 8.6 ms gathered against
# 85 ms one by one; 128 of 64 or 128 rows, within a few percent either way).
GATHER_BELOW = 64


def _compact(bias):
    """attn_bias with the dimensions it broadcasts (zero strides) of size 1, as the kernel broadcasts them; or None."""
    if bias is None:
        return None
    return bias[tuple(slice(0, 1) if bias.stride(d) == 0 else slice(None) for d in range(4))]


def _mask_bytes(params, count: int, rows: int, keys: int) -> int:
    """The bytes of the additive mask a call of `count` sequences makes of a bool attn_bias (else 0)."""
    if params.bias_kind != "bool":
        return 0
    shape = _compact(params.attn_bias).shape
    return ((count if shape[0] > 1 else 1) * shape[1] * (rows if shape[2] > 1 else 1) * (keys if shape[3] > 1 else 1)
            * params.q.element_size())


def _calls(plan, params):
    """The kernel calls of the plan. A bool attn_bias becomes an additive mask
    per call: a call whose mask would outgrow the math backend's workspace
    (math.WORKSPACE_BYTES) is split into one call per sequence."""
    from . import math as math_backend  # math imports math_cpu, which imports this module
    for (rows, keys, mode, skipped), starts in plan.groups.items():
        if len(starts) > 1 and ((max(rows, keys) >= GATHER_BELOW and (_step(starts, 0) is None
                                                                      or _step(starts, 1) is None))
                                or _mask_bytes(params, len(starts), rows, keys) > math_backend.WORKSPACE_BYTES):
            for start in starts:
                yield _Call(rows, keys, mode, skipped, [start])
        else:
            yield _Call(rows, keys, mode, skipped, starts)


def forward(params):
    """(out, lse, the sequences left for math_cpu) with every other row
    written, or None when `declined`."""
    if declined(params) is not None:
        return None
    plan = _Plan(params)
    q, k, v, scale = params.q, params.k, params.v, params.scale
    calls = list(_calls(plan, params))
    whole = params.out is None and len(calls) == 1 and plan.whole(params)
    if not whole:
        out, lse = params.new_out(), params.new_lse()
        if params.seqused_q is None:  # rows that see no key; new_out / new_lse set them with seqused
            for start, rows in plan.hidden:
                out[start:start + rows] = 0
                lse[:, start:start + rows] = float("-inf")
    for call in calls:
        mask = call.mask(params)
        made, made_lse = FORWARD(call.q.read(q), call.k.read(k), call.k.read(v), is_causal=call.mode == CAUSAL,
                                 attn_mask=mask, scale=scale)
        if params.attn_bias is not None:
            call.hide_unseen(made_lse, mask)
        if whole:  # (G, H, L, D) made as (G, L, H, D): the packed rows
            return (made.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2]),
                    made_lse.transpose(0, 1).reshape(q.shape[1], -1).contiguous(), [])
        call.q.write(out, made)
        call.q.write_lse(lse, made_lse)
    return out, lse, plan.rest


def backward(params, out, lse, grad_out, bias_grad: bool):
    """(dq, dk, dv, the sequences left for math_cpu) with every other row
    written (zero where no gradient reaches), or None when `declined`. The
    gradient reaching lse must be None (math_cpu keeps those calls)."""
    if declined(params, bias_grad) is not None:
        return None
    plan = _Plan(params)
    q, k, v, scale = params.q, params.k, params.v, params.scale
    calls = list(_calls(plan, params))
    whole = len(calls) == 1 and plan.whole(params)
    if not whole:
        dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype) for x in (q, k, v))
    for call in calls:
        call_lse = call.q.read_lse(lse)
        if params.attn_bias is not None:  # rows the mask hides entirely: lse 0 for the kernel, as it made them
            call_lse = call_lse.masked_fill(call_lse == float("-inf"), 0.0)
        made = BACKWARD(call.q.read(grad_out), call.q.read(q), call.k.read(k), call.k.read(v), call.q.read(out),
                        call_lse, 0.0, call.mode == CAUSAL, attn_mask=call.mask(params), scale=scale)
        if whole:  # (G, H, L, D) made as (G, L, H, D): the packed rows
            return (*(d.transpose(1, 2).reshape(x.shape) for d, x in zip(made, (q, k, v))), [])
        call.q.write(dq, made[0])
        call.k.write(dk, made[1])
        call.k.write(dv, made[2])
    return dq, dk, dv, plan.rest
