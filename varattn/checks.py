"""Input checks, one small predicate per rule; each failure names the argument,
what was expected and what came.

Everything here reads only shapes, dtypes, strides and devices, except the
checks of lengths' contents: those run for free on CPU tensors, and on CUDA
tensors only when device checks are on (they cost a device->host sync).
"""
from __future__ import annotations

import math
import os
import sys

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_device_checks = os.environ.get("VARATTN_DEVICE_CHECKS", "0") not in ("", "0")


def set_device_checks(enabled: bool) -> None:
    """Also check the contents of lengths tensors that live on a GPU.

    Off by default because reading them back stalls the host until the GPU
    catches up. The environment variable VARATTN_DEVICE_CHECKS=1 turns it on
    at import.
    """
    global _device_checks
    _device_checks = bool(enabled)


def device_checks_enabled() -> bool:
    return _device_checks


def type_name(x) -> str:
    """The name of x's type as torch's errors give it: `int`, `numpy.bool`,
    `torch.Tensor` (a numpy bool's own __name__ is plain `bool`)."""
    kind = type(x)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(x)}")


def packed_qkv(q, k, v, paged: bool = False) -> None:
    """q (total_q, H, D), k (total_k, H_kv, D), v (total_k, H_kv, D_v); with
    `paged`, k and v are page pools (num_pages, page_size, H_kv, D or D_v)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        tensor(x, name)
        if x.is_nested:
            raise TypeError(f"{name} is a NestedTensor: use varattn.attention for nested inputs")
        if paged and name != "q":
            if x.dim() != 4:
                raise ValueError(f"{name} must be a page pool (num_pages, page_size, heads_kv, head_dim) with "
                                 f"block_table, got shape {tuple(x.shape)}")
        elif x.dim() != 3:
            raise ValueError(f"{name} must be packed as (total, heads, head_dim), got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
        if x.stride(-1) != 1 and x.shape[-1] > 0:
            raise ValueError(f"{name} must have unit stride on its last (head_dim) dimension, got strides {x.stride()}")
    device = q.device
    if k.device != device or v.device != device:
        same_device(q, "q", k, "k")
        same_device(q, "q", v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (_, heads, head_dim), (heads_kv, head_dim_k), (heads_v, head_dim_v) = q.shape, k.shape[-2:], v.shape[-2:]
    if head_dim != head_dim_k:
        raise ValueError(f"q and k must have the same head_dim, got {head_dim} and {head_dim_k}")
    if head_dim == 0 or head_dim_v == 0:
        raise ValueError(f"head_dim must be positive, got q {head_dim} and v {head_dim_v}")
    if paged:
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must have the same (num_pages, page_size, heads_kv), got "
                             f"{tuple(k.shape[:3])} and {tuple(v.shape[:3])}")
        page_size(k.shape[1], "k")
    elif k.shape[0] != v.shape[0] or heads_kv != heads_v:
        raise ValueError(f"k and v must have the same (total_k, heads_kv), got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the key/value heads (GQA/MQA), "
            f"got {q.shape[1]} query heads and {heads_kv} key/value heads")


PAGE_SIZES = (16, 32, 64, 128, 256)


def page_size(size: int, name: str) -> None:
    """A paged KV cache's page size (dimension 1 of its pools): a power of two from 16 to 256."""
    if size not in PAGE_SIZES:
        raise ValueError(f"{name} has page_size {size} (dimension 1 of the page pool); expected a power of two "
                         f"from 16 to 256: {', '.join(map(str, PAGE_SIZES))}")


def block_table(x, batch: int, device, name: str = "block_table") -> None:
    """(batch, max_pages) int32 on `device`; its contents are never read here
    (an entry outside [0, num_pages) is a page that is skipped: varattn/paged.py)."""
    tensor(x, name)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch_size, max_pages), got shape {tuple(x.shape)}")
    if x.shape[0] != batch:
        raise ValueError(f"{name} must have one row per sequence ({batch}), got shape {tuple(x.shape)}")
    on_device(x, name, device)


def same_device(a, a_name: str, b, b_name: str) -> None:
    on_device(b, b_name, a.device, a_name)


def on_device(x, name: str, device, where: str = "q") -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {where} is on {device}; all inputs must share one device")


def int32_vector(x, name: str, length: int | None, device) -> None:
    tensor(x, name)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {x.shape[0]}")
    on_device(x, name, device)
    if x.stride(0) != 1 and x.shape[0] > 1:
        raise ValueError(f"{name} must be contiguous")


def cu_seqlens(x, name: str, device) -> int:
    """Returns the batch size the prefix sums describe."""
    int32_vector(x, name, None, device)
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have batch_size + 1 >= 1 entries, got 0")
    return x.shape[0] - 1


def seqused(x, name: str, batch: int, device) -> None:
    if x is not None:
        int32_vector(x, name, batch, device)


def non_negative_int(x, name: str) -> None:
    if isinstance(x, torch.SymInt):  # traced by torch.compile (a NestedTensor's max_seqlen): checked when it runs
        return
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be a non-negative int, got {x!r}")


def flag(x, name: str) -> None:
    """A Python bool and nothing else, as torch SDPA's is_causal and enable_gqa:
    ints, numpy bools, 0-d tensors and strings ("False" is truthy) are refused."""
    if type(x) is not bool:
        raise TypeError(f"{name} must be a bool, got {type_name(x)}")


def real(x, name: str) -> float:
    """x as a float, taking what torch's argument parser takes for a float
    (SDPA's dropout_p and scale): a Python bool, int or float (or a
    subclass), a numpy scalar, or a 0-d tensor that does not require grad
    (read with .item(): a sync on a GPU). Anything else, a string or None
    included, is a TypeError naming its type."""
    kind = type(x)
    if kind is float or kind is int:
        return float(x)
    if isinstance(x, (int, float)):  # bool, IntEnum, float subclasses
        return float(x)
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.requires_grad:
            raise TypeError(f"{name} must be a float; a tensor is taken only with 0 dims and not requiring "
                            f"grad, got a torch.Tensor of shape {tuple(x.shape)}"
                            f"{' that requires grad' if x.requires_grad else ''}")
        return float((x.real if x.is_complex() else x).item())
    numpy = sys.modules.get("numpy")  # a numpy scalar's module is loaded already
    if numpy is not None and isinstance(x, (numpy.number, numpy.bool_)):
        return float(x.real) if isinstance(x, numpy.complexfloating) else float(x)
    raise TypeError(f"{name} must be a float, got {type_name(x)}")


def window(w) -> tuple[int, int]:
    try:
        left, right = w
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (left, right), got {w!r}") from None
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"window {side} must be an int >= 0, or -1 for unbounded; got {value!r}")
    return int(left), int(right)


def scale(s, head_dim: int) -> float:
    """The score scale as a float: 1/sqrt(head_dim) for None, else `real`'s
    types; a value that is not finite is a ValueError."""
    if s is None:
        return 1.0 / math.sqrt(head_dim)
    value = s if type(s) is float else real(s, "scale")
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number or None, got {s!r}")
    return value


def dropout(p) -> float:
    """dropout_p as a float in [0, 1) (`real`'s types; out of range: a ValueError)."""
    value = p if type(p) is float else real(p, "dropout_p")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {p!r}")
    return value


def attn_bias(bias, q, batch: int, max_seqlen_q: int, max_seqlen_k: int, name: str = "attn_bias") -> torch.Tensor:
    """Accepts (B or 1, H or 1, Mq, Mk), Mq >= max_seqlen_q or 1, likewise Mk;
    returns a view broadcast (by zero strides) to (B, H, Mq', Mk'). name: the
    caller's name for it (attn_mask in the SDPA-style front ends)."""
    tensor(bias, name)
    same_device(q, "q", bias, name)
    if bias.dtype != torch.bool and bias.dtype != q.dtype:
        raise TypeError(f"{name} must be bool (True = take part) or have q's dtype {q.dtype}, got {bias.dtype}")
    if bias.dim() != 4:
        raise ValueError(
            f"{name} must be 4-D (batch or 1, heads or 1, query positions, key positions), got shape {tuple(bias.shape)}")
    heads = q.shape[1]
    b, h, mq, mk = bias.shape
    expected = (("batch", b, batch), ("heads", h, heads))
    for what, got, want in expected:
        if got not in (1, want):
            raise ValueError(f"{name} dimension 0/1 ({what}) must be 1 or {want}, got shape {tuple(bias.shape)}")
    for what, got, want in (("query", mq, max_seqlen_q), ("key", mk, max_seqlen_k)):
        if got != 1 and got < want:
            raise ValueError(
                f"{name} has {got} {what} positions but the longest sequence has {want}; "
                f"expected 1 (broadcast) or at least {want}")
    # Size-1 dimensions become zero strides, which is all the kernels look at.
    return bias.expand(batch, heads, mq if mq != 1 else max(1, max_seqlen_q),
                       mk if mk != 1 else max(1, max_seqlen_k))


def longest(cu, used) -> int:
    """max_seqlen from the lengths themselves (a device->host sync on CUDA)."""
    lengths = cu[1:] - cu[:-1] if used is None else used
    return int(lengths.max().item()) if lengths.numel() else 0


def lengths_content(cu, used, total: int, max_seqlen: int, which: str) -> None:
    """The rules on cu_seqlens_{which} / seqused_{which} contents (DESIGN.md)."""
    cu = cu.cpu().long()
    name = f"cu_seqlens_{which}"
    slots = cu[1:] - cu[:-1]
    if (slots < 0).any():
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if used is None:
        if cu[0] != 0 or cu[-1] != total:
            raise ValueError(
                f"{name} must start at 0 and end at the total number of {which} rows ({total}), "
                f"got {cu[0].item()} ... {cu[-1].item()}")
        lengths = slots
    else:
        used = used.cpu().long()
        if cu[0] < 0 or cu[-1] > total:
            raise ValueError(f"{name} must lie in [0, {total}], got {cu[0].item()} ... {cu[-1].item()}")
        if ((used < 0) | (used > slots)).any():
            raise ValueError(f"seqused_{which} must lie in [0, {name}[b+1] - {name}[b]] for each sequence b")
        lengths = used
    if lengths.numel() and lengths.max() > max_seqlen:
        raise ValueError(
            f"max_seqlen_{which} is {max_seqlen} but a {which} sequence has {lengths.max().item()} rows")


def paged_lengths_content(used, capacity: int, max_seqlen: int, name: str = "seqused_k") -> None:
    """The rules on a paged call's key lengths: each in [0, max_pages * page_size], none above max_seqlen_k."""
    used = used.cpu().long()
    if ((used < 0) | (used > capacity)).any():
        raise ValueError(f"{name} must lie in [0, {capacity}] (block_table's max_pages * page_size) for each "
                         f"sequence, got {used.tolist()}")
    if used.numel() and used.max() > max_seqlen:
        raise ValueError(f"max_seqlen_k is {max_seqlen} but a k sequence has {used.max().item()} rows")
