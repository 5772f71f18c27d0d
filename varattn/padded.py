"""Padded dense batch <-> packed form.

A padded batch (B, L, H, D) is already packed with every sequence in a slot
of L rows: cu_seqlens = [0, L, 2L, ...] and the lengths become seqused, so
no rows are copied when (B, L) can be merged into one dimension (always for
"blhd", and for "bhld" tensors that are transposed views of (B, L, H, D),
which is how attention layers make them). Output rows past a sequence's
length come back as zeros.
"""
from __future__ import annotations

import torch

from . import checks
from .ragged import Ragged, to_device_int32

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
    x = as_blhd(x, layout)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unpack(x, layout: str, lengths) -> Ragged:
    """x: (B, H, L, D) or (B, L, H, D); lengths: None (all full) or (device int32 tensor, host max or None)."""
    values = rows(x, layout)
    batch, length = as_blhd(x, layout).shape[:2]
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=x.device) * length
    seqused, max_seqlen = (None, length) if lengths is None else lengths
    return Ragged(values=values, cu_seqlens=cu_seqlens, seqused=seqused,
                  max_seqlen=length if max_seqlen is None else max_seqlen)


def repack(values, batch: int, length: int, layout: str) -> torch.Tensor:
    """(B * L, H, D) rows back to the caller's layout."""
    x = values.view(batch, length, *values.shape[1:])
    return as_blhd(x, layout)


def repack_lse(lse, batch: int, length: int, layout: str) -> torch.Tensor:
    """(H, B * L) -> (B, H, L) for "bhld", (B, L, H) for "blhd"."""
    x = lse.view(lse.shape[0], batch, length)
    return x.permute(1, 0, 2) if layout == "bhld" else x.permute(1, 2, 0)


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
            return lengths.to(torch.int32), None
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or len(lengths) != batch:
        raise ValueError(f"{name} must be a list or tensor of {batch} lengths, got {lengths!r}")
    _check_host_lengths(lengths, length, name)
    return to_device_int32(list(lengths), device), max(lengths, default=0)


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
    lengths = (~mask).sum(1)
    if (mask.device.type == "cpu" or checks.device_checks_enabled()) and not torch.compiler.is_compiling():
        # right padding only: once a row is padding, the rest of it is too
        if (mask.int().cummax(1).values != mask.int()).any():
            raise ValueError("key_padding_mask must pad at the end of each sequence (True after the "
                             "tokens, as nn.MultiheadAttention); pass attn_mask for other patterns")
        return lengths_arg(lengths.cpu(), batch, length, device, "key_padding_mask")
    return lengths.to(torch.int32), None
