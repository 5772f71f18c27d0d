"""The decode backend: a few queries per sequence against long key/value
caches, contiguous or paged (kernels_cu/decode.cu).

It takes calls whose query sequences hold at most MAX_QUERIES rows (decode,
speculative decoding, short chunks), fp16 and bf16, head dims 64 to 256
(head_dim_v == head_dim), causal in both alignments, windows, GQA/MQA
(every query head of a key/value head in one CTA, up to the rows of
ROW_SHAPES), seqused, empty sequences, and k, v as page pools through a
block_table. The keys of each sequence are split so that the batch fills the
GPU (split-KV); the split is chosen on the device from the lengths, so a
call never syncs and its launches are the same for any lengths up to the
max_seqlen bounds (a CUDA graph replays it with new lengths). Gradients run
the flash backward, which takes the forward's out and lse as they are.
"""
from __future__ import annotations

import torch

from ..cuda import loader, structs
from . import capabilities, flash, tiled

HEAD_DIMS = (64, 96, 128, 192, 256)
MAX_QUERIES = 16
CAPABILITIES = capabilities.Capabilities(
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    max_head_dim=256,
    head_dims=HEAD_DIMS,
    min_compute_capability=(8, 0),
    window=True,
    backward=True,  # flash's: reasons()
    paged_kv=True,
)
STORAGE_TYPES = flash.STORAGE_TYPES
THREADS, BLOCK_N, PLAN_THREADS, COMBINE_THREADS = 128, 64, tiled.PLAN_THREADS, 256  # kernels_cu/decode.cu
# K and V buffers by head dim: about 100 KB of them (two CTAs an SM) up to
# 192, two at 256 (which fit an sm80's 163 KB).
STAGES = {64: 5, 96: 4, 128: 3, 192: 2, 256: 2}
# (row warps, m16 slices each) of a CTA's rows, smallest first; 128 rows past
# head dim 64 spill.
ROW_SHAPES = ((1, 1), (2, 1), (4, 1), (4, 2))
MAX_ROWS = {d: 128 if d <= 64 else 64 for d in HEAD_DIMS}
# The splits aim at this many waves of resident CTAs: finer splits even out
# the sequences' lengths, each costing one more partial row set.
TARGET_WAVES = 8


def row_shape(head_dim: int, rows: int) -> tuple[int, int]:
    """The smallest (row warps, slices) whose 16 * warps * slices rows hold `rows`."""
    for warps, slices in ROW_SHAPES:
        if 16 * warps * slices >= rows:
            return warps, slices
    raise ValueError(f"{rows} rows exceed the decode kernel's {MAX_ROWS[head_dim]}")


def instance(dtype: torch.dtype, head_dim: int, shape: tuple[int, int]) -> str:
    return f"decode_fwd<{STORAGE_TYPES[dtype]}, {head_dim}, {shape[0]}, {shape[1]}, {STAGES[head_dim]}>"


def shared_mem(head_dim: int, shape: tuple[int, int]) -> int:
    """decode_fwd's dynamic shared memory: the query rows and the K and V
    buffers (rows padded by 16 bytes), which the warps' merge reuses."""
    rows, key_warps, row_bytes = 16 * shape[0] * shape[1], 4 // shape[0], (head_dim + 8) * 2
    buffers = STAGES[head_dim] * 2 * BLOCK_N * row_bytes
    merge = key_warps * rows * (2 + head_dim + 4) * 4
    return rows * row_bytes + max(buffers, merge)


def _instances():
    for d in HEAD_DIMS:
        for shape in ROW_SHAPES:
            if 16 * shape[0] * shape[1] <= MAX_ROWS[d]:
                yield d, shape


INSTANCES = {instance(t, d, shape): shared_mem(d, shape) for t in STORAGE_TYPES for d, shape in _instances()}
loader.register_family("decode", [*INSTANCES, "decode_plan",
                                  *(f"decode_combine<{t}, {d}>" for t in STORAGE_TYPES.values() for d in HEAD_DIMS)])


def _aligned(x: torch.Tensor, paged: bool) -> bool:
    """Rows of x (packed, or a pool's pages of evenly spaced rows) on 16 bytes."""
    if paged:
        if x.shape[0] > 1 and x.stride(0) != x.stride(1) * x.shape[1]:
            return False
        x = x.flatten(0, 1)  # a view, with the strides just checked
    return tiled.rows_aligned(x)


def reasons(params) -> list[str]:
    found = capabilities.reasons(CAPABILITIES, params)
    if params.max_seqlen_q > MAX_QUERIES:
        found.append(f"takes at most {MAX_QUERIES} queries per sequence (decode); max_seqlen_q is "
                     f"{params.max_seqlen_q}")
    group = params.num_heads // max(params.num_heads_kv, 1)
    rows, most = params.max_seqlen_q * group, MAX_ROWS.get(params.head_dim, 0)
    if rows > most:
        found.append(f"max_seqlen_q x query heads per key/value head ({params.max_seqlen_q} x {group} = {rows}) "
                     f"exceed the {most} rows of one CTA at head_dim {params.head_dim}")
    if params.requires_grad:
        found += [f"the backward (flash's) {why}" for why in flash.reasons(params)
                  if why.startswith("the backward")]
    if params.device.type != "cuda":
        return found
    missing = loader.cupy_missing_reason()
    if missing:
        found.append(missing)
    if params.scale <= 0:
        found.append(f"scale must be positive (the softmax folds it into its max), got {params.scale}")
    for name, x in (("q", params.q), ("k", params.k), ("v", params.v)):
        if not _aligned(x, params.paged and name != "q"):
            step = 16 // x.element_size()
            found.append(f"{name} rows are not 16-byte aligned (data pointer and strides must be multiples of "
                         f"{step} elements{', pages evenly spaced' if params.paged and name != 'q' else ''})")
    return found


def _ctas_per_sm(shared: int, index: int) -> int:
    return max(1, min(2, (loader.shared_memory_per_block(index) + 1024) // (shared + 1024)))


def forward(params):
    """(out, lse): out `params.new_out()`, lse None when neither the caller nor a backward needs it."""
    out = params.new_out()
    lse = params.new_lse() if params.return_lse or params.requires_grad else None
    q, k, v, table = params.q, params.k, params.v, params.block_table
    batch = params.batch_size
    if q.shape[0] == 0 or batch == 0:
        return out, lse
    head_dim, index = q.shape[2], q.get_device()
    heads_kv = k.shape[-2]
    group = q.shape[1] // heads_kv
    rows = params.max_seqlen_q * group  # of a CTA, at most
    shape = row_shape(head_dim, rows)
    shared = shared_mem(head_dim, shape)
    name = instance(q.dtype, head_dim, shape)
    fwd_kernel = loader.kernel("decode", name, q.device, dynamic_shared_mem=shared)
    if table is not None:
        page_size, num_pages = k.shape[1], k.shape[0]
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # a view: the pages' rows are evenly spaced (reasons)
        table_args = (table.shape[1], table.stride(0), page_size.bit_length() - 1, num_pages)
    else:
        table_args = (0, 0, 0, 0)
    target = TARGET_WAVES * _ctas_per_sm(shared, index) * loader.multiprocessors(index)
    items = (batch + -(-target // heads_kv)) * heads_kv  # every split the plan can make (decode_plan)
    workspace = torch.empty(items * rows * (head_dim + 1), dtype=torch.float32, device=q.device)
    plan = torch.empty(3 * batch + 2, dtype=torch.int32, device=q.device)  # decode_plan fills it
    packed = structs.attn_params(params.with_tensors(q, k, v, None), out, lse)
    decode_args = structs.DECODE_PARAMS.pack(
        0 if table is None else table.data_ptr(), workspace.data_ptr(), workspace.data_ptr() + items * rows * head_dim * 4,
        plan.data_ptr(), *table_args, target, rows)
    args = loader.Args(packed, decode_args)
    stream = loader.current_stream(fwd_kernel)
    loader.launch(loader.kernel("decode", "decode_plan", q.device), (1,), (PLAN_THREADS,), args, stream=stream)
    loader.launch(fwd_kernel, (items,), (THREADS,), args, shared_mem=shared, stream=stream)
    combine = loader.kernel("decode", f"decode_combine<{STORAGE_TYPES[q.dtype]}, {head_dim}>", q.device)
    loader.launch(combine, (-(-q.shape[0] * q.shape[1] * 32 // COMBINE_THREADS),), (COMBINE_THREADS,), args,
                  stream=stream)
    return out, lse


def backward(params, out, lse, grad_out, grad_lse, bias_grad):
    """The flash backward: the gradients depend on the forward only through out and lse."""
    return flash.backward(params, out, lse, grad_out, grad_lse, bias_grad)
