"""`varattn.append_paged_kv`: new keys and values written into a paged KV
cache (the layout varattn/paged.py describes), on CUDA by one kernel
(kernels_cu/paged_append.cu)."""
from __future__ import annotations

import torch

from .. import checks, paged
from ..cuda import loader, structs
from ..params import needs_grad

loader.register_family("paged_append", ["paged_append"])
APPEND_THREADS = 256  # kernels_cu/paged_append.cu


def append_paged_kv(k_new, v_new, k_cache, v_cache, block_table, seqused_k, cu_seqlens_new=None) -> torch.Tensor:
    """Write new keys and values into a paged KV cache, after those it holds.

    The new tokens of sequence b go to its positions seqused_k[b],
    seqused_k[b] + 1, ...: position p is row p % page_size of page
    block_table[b, p // page_size] of k_cache and v_cache, written in place.

    Args:
        k_new, v_new: the new tokens, either batched, (B, S, H_kv, D) and
            (B, S, H_kv, D_v), S of them per sequence (FlashAttention's
            flash_attn_with_kvcache k and v), with cu_seqlens_new None; or
            packed, (total_new, H_kv, D) and (total_new, H_kv, D_v), with
            cu_seqlens_new (B + 1,) int32: sequence b's are rows
            [cu_seqlens_new[b], cu_seqlens_new[b + 1]). The caches' dtype.
        k_cache, v_cache: the page pools (num_pages, page_size, H_kv, D or D_v).
        block_table: (B, max_pages) int32, the pages of each sequence.
        seqused_k: (B,) int32, the tokens each sequence holds now.

    Returns:
        seqused_k plus the new lengths, a new (B,) int32 tensor: the lengths
        of the next attention call. seqused_k itself is not changed (as with
        FlashAttention's cache_seqlens, the caller advances it).

    Rows that would land in a page outside [0, num_pages) or past the
    table's last column are not written. Two sequences whose tables name
    one page at one position write it in an undefined order. Everything
    runs on the device without a sync: on CUDA one kernel writes both
    caches and the lengths (kernels_cu/paged_append.cu) where every row of
    heads is contiguous and 16-byte aligned in the new tensors and the
    caches; elsewhere (and on the CPU) torch ops compute the positions and
    each cache gets one index_put_. No gradients: inputs that require grad
    raise NotImplementedError.
    """
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        checks.tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must be a page pool (num_pages, page_size, heads_kv, head_dim), "
                             f"got shape {tuple(x.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must have the same (num_pages, page_size, heads_kv), got "
                         f"{tuple(k_cache.shape[:3])} and {tuple(v_cache.shape[:3])}")
    checks.page_size(k_cache.shape[1], "k_cache")
    device = k_cache.device
    checks.same_device(k_cache, "k_cache", v_cache, "v_cache")
    batched = cu_seqlens_new is None
    for name, x, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
        checks.tensor(x, name)
        checks.on_device(x, name, device, "k_cache")
        if batched and x.dim() != 4:
            raise ValueError(f"{name} must be (batch, new tokens, heads_kv, head_dim) without cu_seqlens_new, "
                             f"got shape {tuple(x.shape)}")
        if not batched and x.dim() != 3:
            raise ValueError(f"{name} must be packed as (total_new, heads_kv, head_dim) with cu_seqlens_new, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-2:] != cache.shape[-2:]:
            raise ValueError(f"{name} must have the cache's (heads_kv, head_dim) {tuple(cache.shape[-2:])}, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != cache.dtype:
            raise TypeError(f"{name} must have the cache's dtype {cache.dtype}, got {x.dtype}")
    if k_new.shape[:-2] != v_new.shape[:-2]:
        raise ValueError(f"k_new and v_new must hold the same tokens, got shapes {tuple(k_new.shape)} and "
                         f"{tuple(v_new.shape)}")
    checks.tensor(block_table, "block_table")
    batch = block_table.shape[0] if block_table.dim() == 2 else -1
    if batched and k_new.shape[0] != batch and block_table.dim() == 2:
        raise ValueError(f"k_new has {k_new.shape[0]} sequences (dim 0) but block_table has {batch} rows")
    checks.block_table(block_table, batch, device)
    checks.seqused(seqused_k, "seqused_k", batch, device)
    if seqused_k is None:
        raise ValueError("seqused_k is required: (B,) int32, the tokens each sequence holds now; got None")
    if not batched:
        if checks.cu_seqlens(cu_seqlens_new, "cu_seqlens_new", device) != batch:
            raise ValueError(f"cu_seqlens_new must have {batch + 1} entries (block_table's rows + 1), "
                             f"got {cu_seqlens_new.shape[0]}")
    if needs_grad(k_new, v_new, k_cache, v_cache):
        raise NotImplementedError("varattn.append_paged_kv: gradients through a paged KV cache are not "
                                  "implemented yet; call it under torch.no_grad() or on tensors that do not "
                                  "require grad")
    with torch.no_grad():
        return _append(k_new, v_new, k_cache, v_cache, block_table, seqused_k, cu_seqlens_new)


def _rows_aligned(x: torch.Tensor) -> bool:
    """Whether every (heads, head_dim) row of x is contiguous, a whole number
    of 16-byte chunks, and starts on 16 bytes."""
    size = x.element_size()
    return (x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and x.shape[-2] * x.shape[-1] * size % 16 == 0
            and x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-2]))


def _append_kernel(k_new, v_new, k_cache, v_cache, block_table, seqused_k, cu_seqlens_new) -> torch.Tensor | None:
    """_append in one kernel, or None where its rows are not contiguous and aligned."""
    if (not k_cache.is_cuda or loader.cupy_missing_reason() or block_table.stride(1) != 1
            or not all(map(_rows_aligned, (k_new, v_new, k_cache, v_cache)))):
        return None
    k_rows = k_new.reshape(-1, k_new.shape[-2] * k_new.shape[-1])  # a copy, if any, is aligned too
    v_rows = v_new.reshape(-1, v_new.shape[-2] * v_new.shape[-1])
    batch, max_pages = block_table.shape
    lengths = torch.empty(batch, dtype=torch.int32, device=k_cache.device)
    if batch == 0:
        return lengths
    seqused_k = seqused_k.contiguous()
    cu_seqlens_new = None if cu_seqlens_new is None else cu_seqlens_new.contiguous()
    size = k_new.element_size()
    args = structs.APPEND_PARAMS.pack(
        k_rows.data_ptr(), v_rows.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(),
        seqused_k.data_ptr(), 0 if cu_seqlens_new is None else cu_seqlens_new.data_ptr(), lengths.data_ptr(),
        k_rows.stride(0) * size, v_rows.stride(0) * size, k_cache.stride(0) * size, k_cache.stride(1) * size,
        v_cache.stride(0) * size, v_cache.stride(1) * size, k_rows.shape[0],
        batch, 0 if cu_seqlens_new is not None else k_new.shape[1], block_table.stride(0), max_pages,
        k_cache.shape[1].bit_length() - 1, k_cache.shape[0], k_rows.shape[1] * size // 16,
        v_rows.shape[1] * size // 16)
    kernel = loader.kernel("paged_append", "paged_append", k_cache.device)
    threads = max(32 * k_rows.shape[0], batch, 1)
    loader.launch(kernel, (-(-threads // APPEND_THREADS),), (APPEND_THREADS,), loader.Args(args),
                  stream=loader.current_stream(kernel))
    return lengths


def _append(k_new, v_new, k_cache, v_cache, block_table, seqused_k, cu_seqlens_new) -> torch.Tensor:
    fused = _append_kernel(k_new, v_new, k_cache, v_cache, block_table, seqused_k, cu_seqlens_new)
    if fused is not None:
        return fused
    device = k_cache.device
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    batch, max_pages = block_table.shape
    if cu_seqlens_new is None:
        per_sequence = k_new.shape[1]
        lengths = seqused_k + per_sequence
        k_rows = k_new.reshape(-1, *k_new.shape[2:])
        v_rows = v_new.reshape(-1, *v_new.shape[2:])
        sequence = torch.arange(batch, device=device).repeat_interleave(per_sequence)
        within = torch.arange(per_sequence, device=device).repeat(batch)
        row_ok = None
    else:
        starts = cu_seqlens_new.long()
        lengths = (seqused_k + (cu_seqlens_new[1:] - cu_seqlens_new[:-1])).to(torch.int32)
        k_rows, v_rows = k_new, v_new
        rows = torch.arange(k_new.shape[0], device=device)
        sequence = torch.searchsorted(starts[1:], rows, right=True)    # rows past cu_seqlens_new[-1]: batch
        row_ok = sequence < batch
        sequence = sequence.clamp(max=max(batch - 1, 0))
        within = rows - starts[sequence]
        row_ok &= within >= 0                                           # rows before cu_seqlens_new[0]
    if k_rows.shape[0] == 0 or batch == 0 or max_pages == 0 or num_pages == 0:
        return lengths
    position = seqused_k.long()[sequence] + within
    column = torch.div(position, page_size, rounding_mode="floor")
    ok = (position >= 0) & (column < max_pages)
    if row_ok is not None:
        ok &= row_ok
    page = block_table.long()[sequence, column.clamp(0, max_pages - 1)]
    ok &= paged.in_range(page, num_pages)
    slot = position % page_size
    # Rows not written repeat the first written row's write (its index and values: duplicates that agree),
    # or, when no row is written, write slot 0 of page 0 with what it holds.
    first = ok.to(torch.int32).argmax()
    some = ok[first]
    page = torch.where(ok, page, torch.where(some, page[first], 0))
    slot = torch.where(ok, slot, torch.where(some, slot[first], 0))
    keep = ok[:, None, None]
    for rows_new, cache in ((k_rows, k_cache), (v_rows, v_cache)):
        fallback = torch.where(some, rows_new[first], cache[0, 0])
        cache.index_put_((page, slot), torch.where(keep, rows_new, fallback))
    return lengths
