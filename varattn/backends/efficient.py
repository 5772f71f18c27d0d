"""The efficient backend: what flash leaves out, at flash-like memory,
forward and backward (kernels_cu/efficient_fwd.cu, kernels_cu/efficient_bwd.cu).

It takes a bool mask or an additive bias, read in place from the caller's
padded (B or 1, H or 1, Lq, Lk) tensor, and gives the bias its gradient;
dropout, from varattn/dropout.py's Philox stream, which the backward
regenerates; fp32 besides fp16 and bf16; any head dim that is a multiple of
8 up to 256, run by the instance of the next compiled bucket. With causal
masks in both alignments, windows, GQA/MQA, Lq != Lk and the LSE. Memory:
O(total tokens), plus the bias the caller passed and, for its gradient, one
of the bias's broadcast shape (B, H, Mq, Mk).

fp32 products run on TF32 tensor cores, split in three passes for fp32
accuracy, or in one when torch allows TF32 for fp32 matmuls
(torch.backends.cuda.matmul.allow_tf32), as its own matmuls then do.
The backward adds dQ with atomics: a deterministic call that needs
gradients is left to the math backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dropout
from ..cuda import loader, structs
from . import capabilities, tiled

CAPABILITIES = capabilities.Capabilities(
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    max_head_dim=256,
    min_compute_capability=(8, 0),
    bias=True,
    dropout=True,
    window=True,
    backward=True,
)
STORAGE_TYPES = {torch.float16: "half_t", torch.bfloat16: "bf16_t", torch.float32: "float"}
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 192, 256)  # compiled head dims; a call runs on the first >= its own
THREADS = 128
# Forward tiles (query rows x keys) per bucket. fp16/bf16: flash_fwd.cu's
# mma.sync table, except 64 x 64 at 96 and 128, where the bias code pushes
# 128 x 32 into spills (H200, W8 forward: 128 x 32 6.25 ms, 64 x 64 5.45 ms).
# fp32: 64 x 32 everywhere, its tiles taking twice the shared memory and its
# three-pass operands twice the registers.
HALF_TILES = {32: (128, 64), 64: (128, 64), 96: (64, 64), 128: (64, 64), 192: (64, 64), 256: (64, 64)}
FP32_TILE = (64, 32)
BACKWARD_BLOCK_N = 64  # keys per CTA in the backward
# Backward: the columns of dK and dV a CTA keeps in registers, per bucket;
# bucket // OUT_COLS CTAs share each key tile, each recomputing S^T and dP^T.
# fp16/bf16: all of them up to 128 columns, half past that, though nvcc
# spills some (H200, W8 forward + backward: 64 columns 28.6 ms, 128 columns
# 19.5 ms); fp32: at most 64, three-pass operands taking the room.
HALF_BACKWARD_OUT_COLS = {32: 32, 64: 64, 96: 96, 128: 128, 192: 96, 256: 128}
FP32_BACKWARD_OUT_COLS = {32: 32, 64: 64, 96: 48, 128: 64, 192: 64, 256: 64}


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use TF32. torch 2.9 and later
    keep this in `fp32_precision`; reading `allow_tf32` there raises once the
    newer setting has been used."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return torch.backends.cuda.matmul.allow_tf32 if precision is None else precision == "tf32"


def passes(dtype: torch.dtype) -> int:
    """Tensor-core passes per product: 3 for fp32 (hi*hi + hi*lo + lo*hi on
    TF32 halves, fp32 accuracy) unless TF32 is allowed, else 1."""
    return 3 if dtype == torch.float32 and not tf32_allowed() else 1


def head_dim_bucket(head_dim: int) -> int:
    return next(b for b in HEAD_DIM_BUCKETS if b >= head_dim)


@dataclass(frozen=True)
class Instance:
    """One compiled kernel and how to launch it."""
    name: str
    block_m: int        # query rows per tile (forward) or per step (backward)
    shared_mem: int     # dynamic shared memory, bytes, without the bias tile
    bias_tile: int      # and what a bias read through shared memory adds (BiasTile)
    column_splits: int = 1  # CTAs per key tile, each with some of dK's and dV's columns (backward: grid y)

    def shared_mem_for(self, params) -> int:
        """What a call needs: the bias tile only for a bias with adjacent keys, which the kernels stage."""
        staged = params.attn_bias is not None and params.attn_bias.stride(3) == 1
        return self.shared_mem + (self.bias_tile if staged else 0)

    def load(self, family: str, device):
        """The compiled kernel, allowed all the shared memory any call may need where the device has it."""
        limit = loader.shared_memory_per_block(device.index)
        return loader.kernel(family, self.name, device, dynamic_shared_mem=min(self.shared_mem + self.bias_tile, limit))


def _pitch(bucket: int, size: int) -> int:
    return bucket + 16 // size  # shared-memory rows padded by 16 bytes


def _bias_tile(rows: int, cols: int, size: int) -> int:
    # kernels_cu/efficient_common.cuh: BiasTile, rows of 4-byte words at any offset, and the offsets
    return rows * (cols * size // 4 + 1) * 4 + rows * 4


def forward_instance(dtype: torch.dtype, head_dim: int, passes_: int) -> Instance:
    bucket, size = head_dim_bucket(head_dim), dtype.itemsize
    block_m, block_n = FP32_TILE if dtype == torch.float32 else HALF_TILES[bucket]
    return Instance(f"efficient_fwd<{STORAGE_TYPES[dtype]}, {bucket}, {block_m}, {block_n}, {passes_}>", block_m,
                    (block_m + 2 * block_n) * _pitch(bucket, size) * size,  # Q, K and V tiles
                    _bias_tile(block_m, block_n, size))


def backward_instance(dtype: torch.dtype, head_dim: int, passes_: int) -> Instance:
    bucket, size, block_n = head_dim_bucket(head_dim), dtype.itemsize, BACKWARD_BLOCK_N
    out_cols = (FP32_BACKWARD_OUT_COLS if dtype == torch.float32 else HALF_BACKWARD_OUT_COLS)[bucket]
    block_m = 32 if dtype == torch.float32 and bucket > 128 else 64  # 4-byte tiles must fit in shared memory
    # K, V; Q, dO; dS^T (keys x query rows); lse and delta
    shared_mem = ((2 * block_n + 2 * block_m) * _pitch(bucket, size) * size + block_n * (block_m + 16 // size) * size
                  + 2 * block_m * 4)
    return Instance(f"efficient_bwd<{STORAGE_TYPES[dtype]}, {bucket}, {out_cols}, {block_m}, {passes_}>", block_m,
                    shared_mem, _bias_tile(block_m, block_n, size), bucket // out_cols)


_COMPILED = [(dtype, bucket, count) for dtype in STORAGE_TYPES for bucket in HEAD_DIM_BUCKETS
             for count in ((1, 3) if dtype == torch.float32 else (1,))]
loader.register_family("efficient_fwd", [forward_instance(*c).name for c in _COMPILED]
                       + sorted({f"flash_plan<{forward_instance(*c).block_m}>" for c in _COMPILED}))
loader.register_family("efficient_bwd", [f"flash_bwd_delta<{t}>" for t in STORAGE_TYPES.values()]
                       + [f"flash_plan<{BACKWARD_BLOCK_N}, KEY_ROWS>"] + [backward_instance(*c).name for c in _COMPILED])


def reasons(params) -> list[str]:
    found = capabilities.reasons(CAPABILITIES, params)
    if params.block_table is not None:  # (said above; the rest reads k and v as packed rows)
        return found
    if params.head_dim % 8:  # (a head_dim_v unlike head_dim is declined above)
        found.append(f"head_dim {params.head_dim} is not a multiple of 8 (the kernels move rows in blocks of 8 columns)")
    if params.requires_grad and params.deterministic:
        found.append("deterministic=True (or torch.use_deterministic_algorithms): the backward adds dQ with "
                     "atomics, in an order that changes from run to run")
    if params.device.type != "cuda":
        return found
    missing = loader.cupy_missing_reason()
    if missing:
        found.append(missing)
    found += tiled.alignment_reasons(params)
    # (Any scale will do: the kernels scale the scores before the softmax's max, unlike flash's.)
    if not missing and params.dtype in STORAGE_TYPES and params.head_dim <= HEAD_DIM_BUCKETS[-1]:  # else said above
        found += _shared_memory_reasons(params)
    return found


def _shared_memory_reasons(params) -> list[str]:
    limit = loader.shared_memory_per_block(params.device.index)
    needs = [("the forward", forward_instance(params.dtype, params.head_dim, 1))]
    if params.requires_grad:
        needs.append(("the backward", backward_instance(params.dtype, params.head_dim, 1)))
    return [f"{what} at head_dim {params.head_dim} ({params.dtype}) needs {instance.shared_mem_for(params) // 1024} KB "
            f"of shared memory per block, the device allows {limit // 1024} KB"
            for what, instance in needs if instance.shared_mem_for(params) > limit]


def dropout_args(params) -> bytes:
    """The Dropout struct of the call's stream (threshold 0: no dropout)."""
    if params.dropout_p == 0:
        return structs.DROPOUT.pack(0, 0, 0, 1.0)
    if params.dropout_state is None:
        raise RuntimeError("varattn: dropout needs the call's stream (run.py draws it) before its kernels run")
    seed, offset = params.dropout_state
    return structs.DROPOUT.pack(seed, offset, dropout.threshold(params.dropout_p), 1.0 / (1.0 - params.dropout_p))


def forward(params):
    """(out, lse): out `params.new_out()`, which the kernel fills; lse None
    when neither the caller nor a backward needs it. The call's dropout
    stream must be drawn (run.py does); fp32 follows the TF32 setting of the
    moment."""
    out = params.new_out()
    lse = params.new_lse() if params.return_lse or params.requires_grad else None
    if params.total_q == 0 or params.batch_size == 0 or params.num_heads == 0:
        return out, lse
    device, batch = params.device, params.batch_size
    instance = forward_instance(params.dtype, params.head_dim, passes(params.dtype))
    plan_kernel = loader.kernel("efficient_fwd", f"flash_plan<{instance.block_m}>", device)
    kernel = instance.load("efficient_fwd", device)
    packed = structs.attn_params(params, out, lse)
    stream = loader.current_stream(kernel)
    plan, plan_args = tiled.launch_plan(plan_kernel, packed, params, stream)
    grid = (tiled.tiles_upper_bound(params.total_q, instance.block_m, batch) * params.num_heads,)
    loader.launch(kernel, grid, (THREADS,), loader.Args(packed, *plan_args, dropout_args(params)),
                  shared_mem=instance.shared_mem_for(params), stream=stream)
    return out, lse


def backward(params, out, lse, grad_out, grad_lse, bias_grad):
    """(dq, dk, dv, dbias) of the call `params` whose forward gave `out` and
    `lse` (with the same dropout stream); grad_lse (H, total_q), or None, is
    the gradient reaching lse. dbias, for an additive bias when `bias_grad`,
    has the bias's broadcast shape; else None."""
    if not tiled.rows_aligned(grad_out):
        grad_out = grad_out.contiguous()
    device, batch = params.device, params.batch_size
    # Zeros: the kernels write only rows (and bias elements) inside sequences.
    dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=device) for x in (params.k, params.v))
    dbias = None
    if bias_grad and params.bias_kind == "additive":
        dbias = torch.zeros(params.attn_bias.shape, dtype=params.dtype, device=device)
    if params.total_q == 0 or params.total_k == 0 or batch == 0 or params.num_heads == 0:
        return torch.zeros(params.q.shape, dtype=params.dtype, device=device), dk, dv, dbias
    instance = backward_instance(params.dtype, params.head_dim, passes(params.dtype))
    dq_accum = torch.zeros(params.q.shape, dtype=torch.float32, device=device)  # key tiles add to it
    delta = torch.empty(params.num_heads, params.total_q, dtype=torch.float32, device=device)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    delta_kernel = loader.kernel("efficient_bwd", f"flash_bwd_delta<{STORAGE_TYPES[params.dtype]}>", device)
    plan_kernel = loader.kernel("efficient_bwd", f"flash_plan<{BACKWARD_BLOCK_N}, KEY_ROWS>", device)
    bwd_kernel = instance.load("efficient_bwd", device)
    packed = structs.attn_params(params, out, lse)
    # No dQ turns (never deterministic) and no query-tile slots: dq_accum is (total_q, H, head_dim).
    grads = structs.BWD_PARAMS.pack(grad_out.data_ptr(), dq_accum.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                  delta.data_ptr(), 0 if grad_lse is None else grad_lse.data_ptr(), 0,
                                  grad_out.stride(0), grad_out.stride(1), 0)
    bias_grads = (structs.BIAS_GRAD.pack(0, 0, 0, 0, 0) if dbias is None
                  else structs.BIAS_GRAD.pack(dbias.data_ptr(), *dbias.stride()))
    stream = loader.current_stream(bwd_kernel)
    tiled.launch_delta(delta_kernel, packed, grads, params.total_q, stream)
    plan, plan_args = tiled.launch_plan(plan_kernel, packed, params, stream)
    grid = (tiled.tiles_upper_bound(params.total_k, BACKWARD_BLOCK_N, batch) * params.num_heads_kv,
            instance.column_splits)
    loader.launch(bwd_kernel, grid, (THREADS,), loader.Args(packed, *plan_args, grads, bias_grads, dropout_args(params)),
                  shared_mem=instance.shared_mem_for(params), stream=stream)
    return dq_accum.to(params.dtype), dk, dv, dbias
