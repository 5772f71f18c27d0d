"""The host side of `struct AttnParams` (kernels_cu/attn_params.cuh).

FIELDS lists the struct's fields in order with their struct-module codes;
`pack()` turns an AttentionParams (plus the output buffers) into the
struct's bytes, which the loader passes to a kernel by value. A CPU test
compiles static_asserts generated from FIELDS against the header, so the two
cannot drift apart unnoticed.
"""
from __future__ import annotations

import struct

# code: "Q" pointer, "q" int64, "d" double, "i" int32
FIELDS = (
    ("q", "Q"), ("k", "Q"), ("v", "Q"), ("out", "Q"), ("lse", "Q"), ("bias", "Q"),
    ("cu_seqlens_q", "Q"), ("cu_seqlens_k", "Q"), ("seqused_q", "Q"), ("seqused_k", "Q"),
    ("q_row_stride", "q"), ("q_head_stride", "q"),
    ("k_row_stride", "q"), ("k_head_stride", "q"),
    ("v_row_stride", "q"), ("v_head_stride", "q"),
    ("out_row_stride", "q"), ("out_head_stride", "q"),
    ("bias_batch_stride", "q"), ("bias_head_stride", "q"), ("bias_row_stride", "q"), ("bias_col_stride", "q"),
    ("total_q", "q"), ("total_k", "q"),
    ("scale", "d"),
    ("batch", "i"), ("heads", "i"), ("heads_kv", "i"), ("head_dim", "i"), ("head_dim_v", "i"),
    ("max_seqlen_q", "i"), ("max_seqlen_k", "i"),
    ("bias_kind", "i"), ("causal", "i"), ("lower_right", "i"),
    ("window_left", "i"), ("window_right", "i"),
)

_LAYOUT = struct.Struct("<" + "".join(code for _, code in FIELDS))


def _offsets():
    offsets, at = [], 0
    for _, code in FIELDS:
        offsets.append(at)
        at += struct.calcsize(code)
    return offsets


OFFSETS = _offsets()
SIZE = _LAYOUT.size
BIAS_KINDS = {"none": 0, "bool": 1, "additive": 2}


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def pack(p, out, lse) -> bytes:
    """The AttnParams struct for `p` writing into `out` and `lse` (None: a null
    pointer, filled in later by `with_outputs`); outputs are contiguous."""
    bias = p.attn_bias
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    return _LAYOUT.pack(
        _ptr(p.q), _ptr(p.k), _ptr(p.v), _ptr(out), _ptr(lse), _ptr(bias),
        _ptr(p.cu_seqlens_q), _ptr(p.cu_seqlens_k), _ptr(p.seqused_q), _ptr(p.seqused_k),
        p.q.stride(0), p.q.stride(1), p.k.stride(0), p.k.stride(1), p.v.stride(0), p.v.stride(1),
        p.num_heads * p.head_dim_v, p.head_dim_v, *bias_strides,
        p.total_q, p.total_k,
        p.scale,
        p.batch_size, p.num_heads, p.num_heads_kv, p.head_dim, p.head_dim_v,
        p.max_seqlen_q, p.max_seqlen_k,
        BIAS_KINDS[p.bias_kind], int(p.causal), int(p.causal_align == "lower_right"),
        p.window[0], p.window[1],
    )


def layout_assertions(struct_name: str = "AttnParams") -> str:
    """C++ static_asserts that the device struct has exactly this layout."""
    lines = [f"static_assert(sizeof({struct_name}) == {SIZE}, \"{struct_name} size\");"]
    for (name, _), offset in zip(FIELDS, OFFSETS):
        lines.append(f"static_assert(__builtin_offsetof({struct_name}, {name}) == {offset}, \"{name}\");")
    return "\n".join(lines)


_OUT, _LSE = (OFFSETS[[name for name, _ in FIELDS].index(field)] for field in ("out", "lse"))
_POINTERS = struct.Struct("<QQ")
assert _LSE == _OUT + 8


def with_outputs(packed: bytes, out, lse) -> bytes:
    """`packed` writing into `out` and `lse` (None: not written) instead."""
    return packed[:_OUT] + _POINTERS.pack(_ptr(out), _ptr(lse)) + packed[_OUT + 16:]
