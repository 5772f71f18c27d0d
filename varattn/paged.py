"""The layout of a paged KV cache, and reading its keys through a block table
(appending to it: frontends/paged_kv.py).

A paged cache keeps every sequence's keys and values in pages of one pool:
k_cache (num_pages, page_size, H_kv, D), v_cache (num_pages, page_size,
H_kv, D_v), page_size a power of two from 16 to 256. Row b of block_table
(B, max_pages) int32 lists the pages of sequence b in order, and
seqused_k[b] says how many keys it holds: its key j is row j % page_size of
page block_table[b, j // page_size]. Entries past a sequence's used pages
are never looked at, and the rows of a page past seqused_k[b] take no part.

Out-of-range entries (outside [0, num_pages)) are skipped, never read: in
attention, the keys of such a page take no part (as if masked; they still
count in seqused_k, so a lower-right causal diagonal stays where it was);
in append_paged_kv, rows that would land in such a page, or past the
table's last column, are not written. Neither reads the table's contents
on the host, so neither costs a sync.

`gathered(params)` is how the math backend runs a paged call: each
sequence's pages copied into a contiguous slot of max_pages * page_size
rows (skipped pages and rows past seqused_k zeroed, so that NaN there cannot
reach an output), a bool bias hiding the skipped pages; the same call then
runs as a contiguous one. The decode backend reads the pages in place
(kernels_cu/decode.cu); flash over pages is later work.
"""
from __future__ import annotations

import dataclasses

import torch

from .params import AttentionParams


def in_range(table: torch.Tensor, num_pages: int) -> torch.Tensor:
    return (table >= 0) & (table < num_pages)


def gathered(params: AttentionParams) -> AttentionParams:
    """The paged call `params` as a contiguous one (see the module's docstring)."""
    k, v, table = params.k, params.v, params.block_table
    num_pages, page_size, heads_kv = k.shape[0], k.shape[1], k.shape[2]
    batch, max_pages = table.shape
    capacity = max_pages * page_size
    device = k.device
    longest = min(params.max_seqlen_k, capacity)
    # Beyond the checks (on the CPU, or with device checks on): a length past the slot would read the next one.
    used = params.seqused_k.clamp(0, longest)
    present = in_range(table, num_pages).repeat_interleave(page_size, 1)              # (B, capacity)
    keep = present & (torch.arange(capacity, device=device) < used[:, None])
    flat_keep = keep.reshape(-1, 1, 1)
    if num_pages == 0:
        keys = k.new_zeros(batch * capacity, heads_kv, k.shape[3])
        values = v.new_zeros(batch * capacity, heads_kv, v.shape[3])
    else:
        pages = table.long().clamp(0, num_pages - 1)
        keys = k[pages].reshape(batch * capacity, heads_kv, k.shape[3]).masked_fill_(~flat_keep, 0)
        values = v[pages].reshape(batch * capacity, heads_kv, v.shape[3]).masked_fill_(~flat_keep, 0)
    cu_seqlens_k = torch.arange(batch + 1, dtype=torch.int32, device=device) * capacity
    # bool, True = take part: (B, H, max_seqlen_q or 1, capacity) by zero strides, as build_params expands a bias
    bias = keep[:, None, None, :].expand(batch, params.num_heads, max(1, params.max_seqlen_q), capacity)
    return dataclasses.replace(params, k=keys, v=values, cu_seqlens_k=cu_seqlens_k, seqused_k=used,
                               max_seqlen_k=longest, attn_bias=bias, block_table=None, structure=None, memo=None)
