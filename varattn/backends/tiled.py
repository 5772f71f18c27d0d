"""What the tiled CUDA backends (flash, efficient) share on the host: the
tile plan, the row alignment their 16-byte loads need, and the backward's
parameter struct.

The plan (kernels_cu/flash_common.cuh: flash_plan) orders the sequences
longest first and lays their tiles out in that order, on the device, so the
host never reads the lengths: a grid of `tiles_upper_bound()` tiles per head
covers any lengths, and CTAs past the last tile exit.
"""
from __future__ import annotations

import struct

import torch

from .. import loader

PLAN_THREADS = 256  # kernels_cu/flash_common.cuh: PLAN_THREADS
BWD_PARAMS = struct.Struct("<QQQQQQQqqq")  # kernels_cu/flash_bwd_common.cuh: struct BwdParams
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


class Plan:
    """The tile plan of one call's lengths, from `kernel` (a flash_plan
    instance): launched on a stream the first time it is asked for there and
    reused after, since a front end's repeated call keeps its lengths.

    Keep the Plan alive until the kernels reading it are launched: its
    tensor's memory goes back to torch's allocator with it."""

    def __init__(self, kernel: loader.Kernel, batch: int, device: torch.device):
        self.kernel, self.batch, self.device = kernel, batch, device
        self._plan, self._stream, self._args = None, None, ()

    def args(self, packed: bytes, stream: int) -> tuple[bytes, bytes]:
        """The kernel arguments (order, tile_offsets) of the plan on `stream`."""
        if self._stream != stream:
            plan = torch.empty(2 * self.batch + 1, dtype=torch.int32, device=self.device)  # order, tile offsets
            args = (loader.pointer(plan), loader.pointer(plan, 4 * self.batch))
            loader.launch(self.kernel, (1,), (PLAN_THREADS,), loader.Args(packed, *args), stream=stream)
            self._plan, self._stream, self._args = plan, stream, args
        return self._args
