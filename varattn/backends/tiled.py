"""What the tiled CUDA backends (flash, efficient) share on the host: the
tile plan, the row alignment their 16-byte loads need, and the backward's
parameter struct.

The plan (kernels_cu/tile_plan.cuh: flash_plan) orders the sequences
longest first and lays their tiles out in that order, on the device, so the
host never reads the lengths: a grid of `tiles_upper_bound()` tiles per head
covers any lengths, and CTAs past the last tile exit.
"""
from __future__ import annotations

import torch

from ..cuda import loader

PLAN_THREADS = 256  # kernels_cu/tile_plan.cuh: PLAN_THREADS
DELTA_THREADS = 256  # the backward's delta kernels: a warp per query row


def tiles_upper_bound(total: int, block: int, batch: int) -> int:
    """Tiles of `block` rows over sequences of `total` rows in all: each
    sequence wastes at most one partial tile."""
    return -(-total // block) + batch


def rows_aligned(x: torch.Tensor) -> bool:
    """Whether every (row, head) of a packed (total, heads, dim) tensor starts
    on 16 bytes and its elements are adjacent, as cp.async and vector loads need."""
    step = 16 // x.element_size()
    return x.data_ptr() % 16 == 0 and x.stride(0) % step == 0 and x.stride(1) % step == 0 and x.stride(2) == 1


def alignment_reasons(params) -> list[str]:
    """Why q, k or v cannot be read in 16-byte pieces, if so."""
    step = 16 // params.q.element_size()
    return [f"{name} rows are not 16-byte aligned (data pointer and strides must be multiples of {step} elements)"
            for name, x in (("q", params.q), ("k", params.k), ("v", params.v)) if not rows_aligned(x)]


def launch_plan(kernel: loader.Kernel, packed: bytes, params, stream: int):
    """The tile plan of `kernel` (a flash_plan instance) for the call whose
    AttnParams are `packed`: (its buffer, the kernel arguments (order,
    tile_offsets) that read it). Launched on `stream`, or found in
    params.memo, made on this stream for the same lengths. Keep the buffer
    until the kernels reading it are launched: its memory goes back to
    torch's allocator with it."""
    key = (kernel.name, stream, params.total_q, params.total_k, params.max_seqlen_q, params.max_seqlen_k)
    memo = params.memo
    if memo is not None:
        found = memo.get(key)
        if found is not None:
            return found
    batch = params.cu_seqlens_q.shape[0] - 1
    plan = torch.empty(2 * batch + 1, dtype=torch.int32, device=params.q.device)  # order, tile offsets
    args = (loader.pointer(plan), loader.pointer(plan, 4 * batch))
    loader.launch(kernel, (1,), (PLAN_THREADS,), loader.Args(packed, *args), stream=stream)
    if memo is not None and not torch.cuda.is_current_stream_capturing():
        memo[key] = (plan, args)
    return plan, args


def launch_delta(kernel: loader.Kernel, packed: bytes, grads: bytes, total_q: int, stream: int) -> None:
    """The backward's preprocess `kernel` (a flash_bwd_delta instance: delta =
    rowsum(dO * O) - dLSE per query row and head), a warp per row."""
    loader.launch(kernel, (-(-total_q // (DELTA_THREADS // 32)),), (DELTA_THREADS,), loader.Args(packed, grads),
                  stream=stream)
