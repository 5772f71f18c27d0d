"""The flash backend: the tensor-core forward of kernels_cu/flash_fwd.cu, fp16 and bf16.

The fast path: causal in both alignments, sliding windows, GQA/MQA, Lq != Lk,
LSE, head dims 32 to 256; no bias, no dropout, no backward yet.
"""
from __future__ import annotations

import numpy
import torch

from .. import kernel_params, loader
from . import capabilities

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
CAPABILITIES = capabilities.Capabilities(
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    max_head_dim=256,
    head_dims=HEAD_DIMS,
    min_compute_capability=(8, 0),
    window=True,
)
STORAGE_TYPES = {torch.float16: "half_t", torch.bfloat16: "bf16_t"}
THREADS = 128       # kernels_cu/flash_fwd.cu: FLASH_THREADS
PLAN_THREADS = 256  # kernels_cu/flash_fwd.cu: PLAN_THREADS
# (BLOCK_M, BLOCK_N) per head dim: the largest tiles that keep S and O in
# registers without spilling (see the table at the top of flash_fwd.cu).
TILES = {32: (128, 64), 64: (128, 64), 96: (128, 32), 128: (128, 64), 192: (64, 64), 256: (64, 64)}
TILES_SM80 = {**TILES, 128: (128, 32)}  # sm_80's register allocation spills at (128, 64)


def _tiles(head_dim: int, arch: str) -> tuple[int, int]:
    return (TILES if arch.startswith("sm_9") else TILES_SM80)[head_dim]


def _instance(dtype, head_dim, block_m, block_n) -> str:
    return f"flash_fwd<{STORAGE_TYPES[dtype]}, {head_dim}, {block_m}, {block_n}>"


loader.register_family("flash_fwd", sorted(
    {_instance(t, d, *tiles[d]) for t in STORAGE_TYPES for tiles in (TILES, TILES_SM80) for d in HEAD_DIMS}
    | {f"flash_plan<{m}>" for m in {m for m, _ in TILES.values()}}))


def reasons(params) -> list[str]:
    found = capabilities.reasons(CAPABILITIES, params)
    if params.device.type != "cuda":
        return found
    missing = loader.cupy_missing_reason()
    if missing:
        found.append(missing)
    if params.scale <= 0:
        found.append(f"scale must be positive (the softmax folds it into its max), got {params.scale}")
    for name, x in (("q", params.q), ("k", params.k), ("v", params.v)):
        if x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) % 8:
            found.append(f"{name} rows are not 16-byte aligned (data pointer and strides must be multiples of 8 elements)")
    return found


def shared_mem_bytes(head_dim: int, block_m: int, block_n: int) -> int:
    return (block_m + 2 * block_n) * (head_dim + 8) * 2


def forward(params):
    out, lse = params.new_out(), params.new_lse()
    batch, heads = params.batch_size, params.num_heads
    if params.total_q == 0 or batch == 0:
        return out, lse
    device = params.device
    block_m, block_n = _tiles(params.head_dim, loader.arch_of(device))
    shared_mem = shared_mem_bytes(params.head_dim, block_m, block_n)
    plan_kernel = loader.kernel("flash_fwd", f"flash_plan<{block_m}>", device)
    fwd_kernel = loader.kernel("flash_fwd", _instance(params.dtype, params.head_dim, block_m, block_n), device,
                               dynamic_shared_mem=shared_mem)
    plan = torch.empty(2 * batch + 1, dtype=torch.int32, device=device)  # order, then tile offsets
    args = (kernel_params.pack(params, out, lse), numpy.uint64(plan.data_ptr()),
            numpy.uint64(plan.data_ptr() + 4 * batch))
    loader.launch(plan_kernel, (1,), (PLAN_THREADS,), args, device)
    tiles_upper_bound = -(-params.total_q // block_m) + batch
    loader.launch(fwd_kernel, (tiles_upper_bound * heads,), (THREADS,), args, device, shared_mem=shared_mem)
    return out, lse
