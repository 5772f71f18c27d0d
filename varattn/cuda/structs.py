"""Host mirrors of the structs the kernels take by value.

Each `Struct` lists one kernel struct's fields in order with their
struct-module codes ("Q" pointer, "q" int64, "d" double, "i" int32, "I"
uint32, "f" float) and the file of kernels_cu/ that defines it; `pack()`
gives the bytes the loader passes to a kernel. One CPU test
(tests/test_kernels_compile.py) compiles static_asserts generated from every
mirror against its file, so a mirror and its struct cannot drift apart
unnoticed.
"""
from __future__ import annotations

import struct


class Struct:
    """A kernel struct's layout: `name` as in kernels_cu/`source`, its fields in order."""

    def __init__(self, name: str, source: str, fields: tuple[tuple[str, str], ...]):
        self.name, self.source, self.fields = name, source, fields
        self._layout = struct.Struct("<" + "".join(code for _, code in fields))
        self.size = self._layout.size
        self.offsets, at = {}, 0
        for field, code in fields:
            self.offsets[field] = at
            at += struct.calcsize(code)

    def pack(self, *values) -> bytes:
        """The struct's bytes from its fields' values, in order."""
        return self._layout.pack(*values)

    def layout_assertions(self) -> str:
        """C++ static_asserts that the device struct has exactly this layout."""
        lines = [f'static_assert(sizeof({self.name}) == {self.size}, "{self.name} size");']
        lines += [f'static_assert(__builtin_offsetof({self.name}, {field}) == {offset}, "{self.name}::{field}");'
                  for field, offset in self.offsets.items()]
        return "\n".join(lines)


ATTN_PARAMS = Struct("AttnParams", "attn_params.cuh", (
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
))
# What a call's tensors and lengths set, each part at its offset; the rest
# (strides, sizes, options) its structure fixes.
_ATTN_POINTERS, _ATTN_ROWS, _ATTN_LONGEST = struct.Struct("<10Q"), struct.Struct("<qq"), struct.Struct("<ii")
_ATTN_ROWS_AT, _ATTN_LONGEST_AT = ATTN_PARAMS.offsets["total_q"], ATTN_PARAMS.offsets["max_seqlen_q"]

BWD_PARAMS = Struct("BwdParams", "bwd_params.cuh", (
    ("dout", "Q"), ("dq_accum", "Q"), ("dk", "Q"), ("dv", "Q"), ("delta", "Q"), ("dlse", "Q"), ("dq_turns", "Q"),
    ("dout_row_stride", "q"), ("dout_head_stride", "q"), ("tiles_per_head", "q"),
))

DROPOUT = Struct("Dropout", "efficient_common.cuh", (
    ("seed", "Q"), ("offset", "Q"), ("threshold", "I"), ("scale", "f"),
))

BIAS_GRAD = Struct("BiasGrad", "efficient_bwd.cu", (
    ("dbias", "Q"), ("batch_stride", "q"), ("head_stride", "q"), ("row_stride", "q"), ("col_stride", "q"),
))

MATH_GRADS = Struct("MathGrads", "math.cu", (
    ("dout", "Q"), ("dlse", "Q"), ("dq", "Q"), ("dk", "Q"), ("dv", "Q"), ("dbias", "Q"), ("delta", "Q"),
    ("dout_row_stride", "q"), ("dout_head_stride", "q"), ("dbias_row_stride", "q"), ("dbias_head_stride", "q"),
))

DECODE_PARAMS = Struct("DecodeParams", "decode.cu", (
    ("block_table", "Q"), ("o_partial", "Q"), ("lse_partial", "Q"), ("plan", "Q"),
    ("max_pages", "i"), ("table_stride", "i"), ("page_shift", "i"), ("num_pages", "i"),
    ("target_items", "i"), ("rows_per_item", "i"),
))

APPEND_PARAMS = Struct("AppendParams", "paged_append.cu", (
    ("k_new", "Q"), ("v_new", "Q"), ("k_cache", "Q"), ("v_cache", "Q"), ("block_table", "Q"), ("seqused_k", "Q"),
    ("cu_seqlens_new", "Q"), ("lengths", "Q"),
    ("k_new_row_stride", "q"), ("v_new_row_stride", "q"), ("k_page_stride", "q"), ("k_slot_stride", "q"),
    ("v_page_stride", "q"), ("v_slot_stride", "q"), ("rows", "q"),
    ("batch", "i"), ("per_sequence", "i"), ("table_stride", "i"), ("max_pages", "i"),
    ("page_shift", "i"), ("num_pages", "i"), ("k_chunks", "i"), ("v_chunks", "i"),
))

STRUCTS = (ATTN_PARAMS, BWD_PARAMS, DROPOUT, BIAS_GRAD, MATH_GRADS, DECODE_PARAMS, APPEND_PARAMS)

BIAS_KINDS = {"none": 0, "bool": 1, "additive": 2}


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def attn_params(p, out, lse) -> bytes:
    """The AttnParams of call `p` (an AttentionParams) writing into `out` and
    `lse` (None: a null pointer); the outputs are contiguous. What its
    structure fixes is packed once per structure (p.structure.derived)."""
    structure = p.structure
    if structure is None:
        packed = bytearray(_attn_fixed(p))
    else:
        fixed = structure.derived.get(ATTN_PARAMS)
        if fixed is None:
            fixed = structure.derived[ATTN_PARAMS] = _attn_fixed(p)
        packed = bytearray(fixed)
    q, k = p.q, p.k
    _ATTN_POINTERS.pack_into(packed, 0, q.data_ptr(), k.data_ptr(), p.v.data_ptr(), _ptr(out), _ptr(lse),
                             _ptr(p.attn_bias), p.cu_seqlens_q.data_ptr(), _ptr(p.cu_seqlens_k),
                             _ptr(p.seqused_q), _ptr(p.seqused_k))
    _ATTN_ROWS.pack_into(packed, _ATTN_ROWS_AT, q.shape[0], k.shape[0])
    _ATTN_LONGEST.pack_into(packed, _ATTN_LONGEST_AT, p.max_seqlen_q, p.max_seqlen_k)
    return bytes(packed)


def _attn_fixed(p) -> bytes:
    """AttnParams with what the structure of call `p` fixes, zeros elsewhere."""
    q, k, v, bias = p.q, p.k, p.v, p.attn_bias
    q_stride, k_stride, v_stride = q.stride(), k.stride(), v.stride()
    heads, head_dim, heads_kv, head_dim_v = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
    return ATTN_PARAMS.pack(
        *(0,) * 10,
        q_stride[0], q_stride[1], k_stride[0], k_stride[1], v_stride[0], v_stride[1],
        heads * head_dim_v, head_dim_v, *(bias.stride() if bias is not None else (0, 0, 0, 0)),
        0, 0,
        p.scale,
        p.cu_seqlens_q.shape[0] - 1, heads, heads_kv, head_dim, head_dim_v,
        0, 0,
        BIAS_KINDS[p.bias_kind], int(p.causal), int(p.causal_align == "lower_right"),
        p.window[0], p.window[1],
    )
