"""The math backend on CUDA: kernels_cu/math.cu's forward kernels over chunks of query rows, and its backward."""
from __future__ import annotations

import torch

from ..cuda import loader, structs

STORAGE_TYPES = {torch.float16: "half_t", torch.bfloat16: "bf16_t", torch.float32: "float", torch.float64: "double"}
KERNELS = ("math_scores", "math_softmax", "math_weighted_sum")
THREADS = 128  # kernels_cu/math.cu: THREADS

BACKWARD_KERNELS = ("math_grad_q", "math_grad_kv")
_MAX_GRID_X = 2**31 - 1

loader.register_family("math", [f"{k}<{t}>" for k in KERNELS + BACKWARD_KERNELS for t in STORAGE_TYPES.values()])


def forward(params, chunk: int):
    """(out, lse), materialising scores for `chunk` query rows at a time."""
    out, lse = params.new_out(), params.new_lse()
    if params.total_q == 0 or params.num_heads == 0:
        return out, lse
    scores = torch.empty(chunk * params.num_heads * max(params.max_seqlen_k, 1),
                         dtype=params.lse_dtype, device=params.device)
    packed = structs.attn_params(params, out, lse)
    kernels = [loader.kernel("math", f"{name}<{STORAGE_TYPES[params.dtype]}>", params.device)
               for name in KERNELS]
    for first in range(0, params.total_q, chunk):
        rows = min(chunk, params.total_q - first)
        args = loader.Args(packed, loader.int64(first), loader.pointer(scores))
        for kernel in kernels:
            loader.launch(kernel, (rows, params.num_heads), (THREADS,), args)
    return out, lse


def backward(params, out, lse, grad_out, grad_lse, bias_grad: bool):
    """(dq, dk, dv, dbias): see math_cpu.backward; deterministic."""
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (params.q, params.k, params.v))
    dbias = None
    if bias_grad and params.bias_kind == "additive":
        dbias = torch.zeros(params.attn_bias.shape, dtype=params.dtype, device=params.device)
    if params.total_q == 0 or params.total_k == 0 or params.batch_size == 0 or params.num_heads == 0:
        return dq, dk, dv, dbias
    delta = torch.empty(params.num_heads, params.total_q, dtype=params.lse_dtype, device=params.device)
    if grad_lse is not None:
        grad_lse = grad_lse.to(params.lse_dtype).contiguous()
    mq, mk = (dbias.shape[2], dbias.shape[3]) if dbias is not None else (0, 0)
    grads = structs.MATH_GRADS.pack(grad_out.data_ptr(), 0 if grad_lse is None else grad_lse.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                        dv.data_ptr(), 0 if dbias is None else dbias.data_ptr(), delta.data_ptr(),
                        grad_out.stride(0), grad_out.stride(1), mk, mq * mk)
    args = loader.Args(structs.attn_params(params, out, lse), grads)
    grad_q, grad_kv = (loader.kernel("math", f"{name}<{STORAGE_TYPES[params.dtype]}>", params.device)
                       for name in BACKWARD_KERNELS)
    # A block per row: rows from 2**31 - 1 on (the grid's limit) lie past every int32 cu_seqlens, so in no
    # sequence, and keep their zeros.
    loader.launch(grad_q, (min(params.total_q, _MAX_GRID_X), params.num_heads), (THREADS,), args)
    loader.launch(grad_kv, (min(params.total_k, _MAX_GRID_X), params.num_heads_kv), (THREADS,), args)
    return dq, dk, dv, dbias
