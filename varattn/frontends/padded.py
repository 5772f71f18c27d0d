"""Padded dense batches <-> the packed form, and `attention` on padded batches.

A padded batch (B, L, H, D) is already packed with every sequence in a slot
of L rows: cu_seqlens = [0, L, 2L, ...] and the lengths become seqused, so
no rows are copied when (B, L) can be merged into one dimension (always for
"blhd", and for "bhld" tensors that are transposed views of (B, L, H, D),
which is how attention layers make them). Output rows past a sequence's
length come back as zeros.

Lengths given on the host (a list, a CPU tensor) are checked there and
copied to the device without a sync; a CUDA tensor of lengths is used as it
is, unread (its contents are checked only with varattn.set_device_checks),
and so is a CUDA key_padding_mask, whose lengths are counted on the device
once per mask object (frontends/ragged.py).
"""
from __future__ import annotations

import contextlib

import numpy
import torch

from .. import checks, params as params_
from . import ragged
from .ragged import Ragged

LAYOUTS = ("bhld", "blhd")


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} for a padded batch, got {layout!r}")


def check_dense(x, name: str) -> None:
    checks.tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, length, head_dim) or "
                         f"(batch, length, heads, head_dim), got shape {tuple(x.shape)}")


def as_blhd(x, layout: str) -> torch.Tensor:
    return x if layout == "blhd" else x.transpose(1, 2)


def rows(x, layout: str) -> torch.Tensor:
    """(B * L, H, D): a view when (B, L) merge, else a copy."""
    return merged(as_blhd(x, layout))


def merged(x) -> torch.Tensor:
    """(B, L, *features) -> (B * L, *features)."""
    shape = x.shape
    return x.reshape(shape[0] * shape[1], *shape[2:])


def unpack(x, layout: str, lengths, cu_seqlens=None) -> Ragged:
    """x: (B, H, L, D) or (B, L, H, D); lengths: None (all full) or (device
    int32 tensor, host max or None); cu_seqlens: the slots' (of a side with
    the same B and L), or None."""
    x = as_blhd(x, layout)
    batch, length = x.shape[:2]
    seqused, max_seqlen = (None, length) if lengths is None else lengths
    if cu_seqlens is None:
        cu_seqlens = (ragged.slots(batch, length, x.device) if not torch.compiler.is_compiling()
                      else torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=x.device))
    return Ragged(values=merged(x), cu_seqlens=cu_seqlens, seqused=seqused,
                  max_seqlen=length if max_seqlen is None else max_seqlen)


def repack(values, batch: int, length: int, layout: str) -> torch.Tensor:
    """(B * L, H, D) rows back to the caller's layout."""
    return as_blhd(values.view(batch, length, *values.shape[1:]), layout)


def repack_lse(lse, batch: int, length: int, layout: str) -> torch.Tensor:
    """(H, B * L) -> (B, H, L) for "bhld", (B, L, H) for "blhd"."""
    x = lse.view(lse.shape[0], batch, length)
    return x.permute(1, 0, 2) if layout == "bhld" else x.permute(1, 2, 0)


def lse_rows(lse, layout: str) -> torch.Tensor:
    """repack_lse's inverse: (B, H, L) or (B, L, H) -> (H, B * L)."""
    x = lse.permute(1, 0, 2) if layout == "bhld" else lse.permute(2, 0, 1)
    return x.reshape(x.shape[0], -1)


def lengths_arg(lengths, batch: int, length: int, device, name: str):
    """A lengths argument (list, or tensor on the host or the device) as
    (int32 tensor on `device`, host max or None)."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"{name} must hold integers, got {lengths.dtype}")
        if lengths.device.type != "cpu":
            checks.on_device(lengths, name, device, "query")
        if torch.compiler.is_compiling():  # traced, not read: its contents are checked in eager calls
            return lengths.to(device=device, dtype=torch.int32), None
        if lengths.device.type != "cpu":
            if checks.device_checks_enabled():
                _check_host_lengths(lengths.tolist(), length, name)
            return ragged.as_int32(lengths), None
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or len(lengths) != batch:
        raise ValueError(f"{name} must be a list or tensor of {batch} lengths, got {lengths!r}")
    _check_host_lengths(lengths, length, name)
    return ragged.device_int32(numpy.array(lengths, dtype=numpy.int64), device=device)[0], max(lengths, default=0)


def _check_host_lengths(lengths, length: int, name: str) -> None:
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= length:
            raise ValueError(f"{name} must hold ints in [0, {length}] (the padded length), got {lengths}")


def lengths_from_padding_mask(mask, batch: int, length: int, device):
    """key_padding_mask (B, L), True at padding after each sequence's tokens -> lengths_arg form."""
    checks.tensor(mask, "key_padding_mask")
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        raise ValueError(f"key_padding_mask must be a bool tensor of shape ({batch}, {length}), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    checks.on_device(mask, "key_padding_mask", device, "query")
    if (mask.device.type == "cpu" or checks.device_checks_enabled()) and not torch.compiler.is_compiling():
        # right padding only: once a row is padding, the rest of it is too
        if (mask.int().cummax(1).values != mask.int()).any():
            raise ValueError("key_padding_mask must pad at the end of each sequence (True after the "
                             "tokens, as nn.MultiheadAttention); pass attn_mask for other patterns")
        return lengths_arg((length - mask.sum(1)).cpu(), batch, length, device, "key_padding_mask")
    if torch.compiler.is_compiling():
        return length - mask.sum(1, dtype=torch.int32), None
    return ragged.lengths_of_padding_mask(mask), None


class PaddedForm:
    """run.Form of a call on padded batches: outputs and gradients back in the caller's layout."""

    def __init__(self, batch: int, len_q: int, len_k: int, layout: str):
        self.batch, self.len_q, self.len_k, self.layout = batch, len_q, len_k, layout

    def outputs(self, out, lse):
        result = repack(out, self.batch, self.len_q, self.layout)
        return result, None if lse is None else repack_lse(lse, self.batch, self.len_q, self.layout)

    def grad_outputs(self, grad_out, grad_lse):
        return (None if grad_out is None else rows(grad_out, self.layout),
                None if grad_lse is None else lse_rows(grad_lse, self.layout))

    def input_grads(self, dq, dk, dv):
        return (repack(dq, self.batch, self.len_q, self.layout), repack(dk, self.batch, self.len_k, self.layout),
                repack(dv, self.batch, self.len_k, self.layout))


def call(query, key, value, layout, lengths, kv_lengths, key_padding_mask, attn_mask, options):
    """(AttentionParams, PaddedForm, the caller's q, k, v) of a call on padded batches."""
    check_layout(layout)
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_dense(x, name)
    q, k, v = as_blhd(query, layout), as_blhd(key, layout), as_blhd(value, layout)
    batch, len_q = q.shape[:2]
    len_k = k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch or v.shape[1] != len_k:
        raise ValueError(f"query, key and value must share the batch size and key/value the length; got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} ({layout})")
    device = query.device
    if kv_lengths is not None and key_padding_mask is not None:
        raise ValueError("pass kv_lengths or key_padding_mask, not both")
    q_lengths = None if lengths is None else lengths_arg(lengths, batch, len_q, device, "lengths")
    if kv_lengths is not None:
        k_lengths = lengths_arg(kv_lengths, batch, len_k, device, "kv_lengths")
    elif key_padding_mask is not None:
        k_lengths = lengths_from_padding_mask(key_padding_mask, batch, len_k, device)
        if q_lengths is None and len_q == len_k:
            q_lengths = k_lengths
    elif q_lengths is not None and len_q != len_k:
        raise ValueError(f"lengths describe the queries (padded to {len_q}); the keys/values are padded "
                         f"to {len_k}: pass kv_lengths for them")
    else:
        k_lengths = q_lengths
    requires_grad = params_.needs_grad(query, key, value, attn_mask)
    with torch.no_grad() if requires_grad and not torch.compiler.is_compiling() else contextlib.nullcontext():
        # eagerly, run.py's Function carries the gradients to the caller's tensors
        rq = unpack(q, "blhd", q_lengths)
        rk = unpack(k, "blhd", k_lengths, rq.cu_seqlens if len_k == len_q else None)
        rows_v = merged(v)
    values = params_.option_values(options)
    memo = ragged.memo(rq.cu_seqlens, rq.seqused, rk.cu_seqlens, rk.seqused)
    structure = None if attn_mask is not None else ragged.structure(
        rq.values, rk.values, rows_v, rq.cu_seqlens, rq.seqused, rk.cu_seqlens, rk.seqused, requires_grad, values)
    params = params_.checked_params(structure, rq.values, rk.values, rows_v, rq.cu_seqlens, rk.cu_seqlens, rq.seqused,
                                    rk.seqused, rq.max_seqlen, rk.max_seqlen, values, requires_grad, memo)
    if params is None:
        params = params_.build_params(rq.values, rk.values, rows_v, rq.cu_seqlens, rk.cu_seqlens, rq.max_seqlen,
                                      rk.max_seqlen, seqused_q=rq.seqused, seqused_k=rk.seqused, attn_bias=attn_mask,
                                      bias_name="attn_mask", requires_grad=requires_grad, memo=memo,
                                      structure=structure, **options)
    form = PaddedForm(batch, len_q, len_k, layout)
    return params, form, None if torch.compiler.is_compiling() else (query, key, value)


